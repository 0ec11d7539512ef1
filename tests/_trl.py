"""Importing TRL for the tests that compare against it, without its import-time side effect.

TRL's import sets ``VLLM_LOGGING_LEVEL=ERROR`` in ``os.environ`` (``trl/_compat.py``,
``_patch_vllm_logging``). In the test process that would reach every vLLM process spawned by a
later test, whose checks read vLLM's INFO log (the rollout-server settings test did fail so).
"""

from __future__ import annotations

import importlib
import os

_KEY = "VLLM_LOGGING_LEVEL"


def import_trl(module: str = "trl"):
    """``importlib.import_module(module)`` with ``os.environ[VLLM_LOGGING_LEVEL]`` restored."""
    before = os.environ.get(_KEY)
    try:
        return importlib.import_module(module)
    finally:
        if before is None:
            os.environ.pop(_KEY, None)
        else:
            os.environ[_KEY] = before
