"""Shared fixtures: tiny Hugging Face checkpoints built locally (no model hub)."""

from __future__ import annotations

import os

import torch

# Triton fixes interpreter mode when it is first imported (transformers and megatron-core import
# it): on a machine without CUDA the kernels run in the interpreter, so set it before anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from megagrpo.demo.tiny_models import TINY_CONFIGS, save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The embedded demo's data and warm-started tiny model, built once for the whole session
    (the warm start takes minutes on a loaded 2-core machine)."""
    from megagrpo.demo.grpo_demo import prepare_demo

    d = str(tmp_path_factory.mktemp("demo"))
    prepare_demo(d)
    return d


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(name, sharded=False)`` -> directory of a saved tiny HF checkpoint."""
    made: dict[tuple[str, bool], str] = {}

    def make(name: str, sharded: bool = False) -> str:
        key = (name, sharded)
        if key not in made:
            d = tmp_path_factory.mktemp(f"hf-{name}{'-sharded' if sharded else ''}")
            save_tiny_checkpoint(name, str(d), max_shard_size="40KB" if sharded else None)
            made[key] = str(d)
        return made[key]

    return make


ARCH_NAMES = sorted(TINY_CONFIGS)
