"""Shared fixtures: tiny Hugging Face checkpoints built locally (no model hub)."""

from __future__ import annotations

import os

import torch

# One CPU thread per test process (and, through the environment, per process a test starts): the
# README's test command runs two pytest workers on a 2-core machine, and the multi-rank tests start
# 2-4 processes each; with torch's default of one thread per core the threads outnumber the cores
# and OpenMP's spinning makes the tiny models several times slower. MKL / OpenMP read these
# variables when torch first starts its thread pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Triton fixes interpreter mode when it is first imported (transformers and megatron-core import
# it): on a machine without CUDA the kernels run in the interpreter, so set it before anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from megagrpo.demo.tiny_models import TINY_CONFIGS, save_tiny_checkpoint  # noqa: E402


def shared_dir(tmp_path_factory, name: str):
    """``name`` under the session's temporary directory; under pytest-xdist (the README's test
    command runs two workers), the one directory every worker of the run shares."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-of-<user>/pytest-N/, above the per-worker popen-gwK/
    return root / name


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The embedded demo's data and warm-started tiny model, built once for the whole run (the
    warm start takes minutes on a loaded 2-core machine): the first worker to need it builds it,
    under a file lock, and the others wait for it and reuse it."""
    from filelock import FileLock

    from megagrpo.demo.grpo_demo import prepare_demo

    d = shared_dir(tmp_path_factory, "demo-assets")
    with FileLock(f"{d}.lock"):
        if not (d / "built").is_file():
            prepare_demo(str(d))
            (d / "built").touch()
    return str(d)


LEARNING_PROBLEMS = 16
"""Training problems of the learning tests' data (``demo_learning_data``)."""


@pytest.fixture(scope="session")
def demo_learning_data(demo_dir, tmp_path_factory):
    """The demo's data with its first 16 training problems only (the 100 held-out ones kept), for
    the tests that check the demo learns within 60 steps: each prompt comes back 30 times, and
    the reward rose +0.32 and +0.34 (accuracy +0.30 and +0.30) in 60 steps on two seeds, where on
    all 400 problems the first 60 steps moved it by +0.01 to +0.20: early GRPO on the full set is
    the noisy phase (docs/measurements.md, the demo)."""
    import shutil

    d = tmp_path_factory.mktemp("demo-learning-data")
    with open(os.path.join(demo_dir, "data", "train.jsonl"), encoding="utf-8") as f:
        rows = f.readlines()[:LEARNING_PROBLEMS]
    (d / "train.jsonl").write_text("".join(rows), encoding="utf-8")
    shutil.copy(os.path.join(demo_dir, "data", "test.jsonl"), d / "test.jsonl")
    return str(d)


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
