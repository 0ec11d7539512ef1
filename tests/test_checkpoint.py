"""Checkpoints: atomic layout, rotation, newest-complete resume, bit-exact continuation."""

from __future__ import annotations

import os

import pytest
import torch
from _multiproc import run_ranks
from _train_workers import resume_worker

from megagrpo.conversion.convert import megatron_to_hf
from megagrpo.conversion.safetensors_io import SafetensorsDir
from megagrpo.training.checkpoint import (
    COMPLETE,
    complete_checkpoints,
    latest_checkpoint,
    resolve_resume,
)


def test_resume_continues_bit_exactly_with_tp2(tiny_checkpoint, tmp_path):
    hf_dir = tiny_checkpoint("qwen2")
    out = str(tmp_path / "run")
    results = run_ranks(2, resume_worker, hf_dir, out, 2)
    for r in results:
        assert r["same"] and r["rng_ok"]
        assert r["step"] == 2 and r["state"] == {"epoch": 0, "position": 8}
    path = results[0]["path"]
    assert sorted(os.listdir(path)) == [
        "COMPLETE",
        "hf",
        "megagrpo_megatron.json",
        "mp_rank_00_000",
        "mp_rank_01_000",
        "optimizer",
        "rng",
        "trainer_state.json",
    ]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert [s for s, _ in complete_checkpoints(out)] == [2, 3]  # save_total_limit=2 rotated 1
    # the checkpoint's model exports to a Hugging Face checkpoint directly
    megatron_to_hf(path, str(tmp_path / "hf"))
    exported = SafetensorsDir(str(tmp_path / "hf"))
    original = SafetensorsDir(hf_dir)
    assert sorted(exported.names()) == sorted(original.names())
    assert not torch.equal(exported.get("model.norm.weight"), original.get("model.norm.weight"))
    assert os.path.isfile(tmp_path / "hf" / "tokenizer.json")


def _fake_checkpoint(root, step, complete=True):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    if complete:
        (d / COMPLETE).write_text(str(step))
    return str(d)


def test_latest_complete_checkpoint_and_resume_rules(tmp_path):
    assert latest_checkpoint(str(tmp_path / "none")) is None
    _fake_checkpoint(tmp_path, 5)
    newest = _fake_checkpoint(tmp_path, 20)
    _fake_checkpoint(tmp_path, 30, complete=False)  # a save that was cut off
    (tmp_path / ".checkpoint-40.tmp").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [5, 20]
    assert latest_checkpoint(str(tmp_path)) == newest
    assert resolve_resume(str(tmp_path), None) == newest
    assert resolve_resume(str(tmp_path), True) == newest
    assert resolve_resume(str(tmp_path), False) is None
    assert resolve_resume(str(tmp_path), str(tmp_path / "checkpoint-5")).endswith("checkpoint-5")
    with pytest.raises(ValueError, match="incomplete"):
        resolve_resume(str(tmp_path), str(tmp_path / "checkpoint-30"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_resume(str(tmp_path), str(tmp_path / "checkpoint-99"))
