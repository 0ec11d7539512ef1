"""``log_level``: the logging level of the libraries megagrpo runs (transformers' meaning of the
setting, applied on global rank 0; ``passive`` leaves every library's own level)."""

from __future__ import annotations

import logging

LIBRARY_LOGGERS = ("transformers", "datasets", "vllm", "megatron", "torch")
"""Loggers set by ``log_level``: their children (``vllm.engine...``) inherit the level."""


def apply_log_level(level: str) -> None:
    if level == "passive":
        return
    value = getattr(logging, level.upper())
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(value)
