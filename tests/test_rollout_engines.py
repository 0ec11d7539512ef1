"""How the recipe becomes rollout engines: derived vLLM settings, GPUs of spawned vLLM servers,
the weight-sync address, no weight copy for servers the pool cannot restart."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from megagrpo.config import load_recipe
from megagrpo.demo.grpo_demo import DEMO_RECIPE
from megagrpo.models.arch import load_arch
from megagrpo.rollout.colocated import EngineShare, contiguous_bounds
from megagrpo.rollout.pool import RolloutPool, RolloutPoolConfig
from megagrpo.rollout.vllm_engine import VLLMConfig
from megagrpo.rollout.weight_sync import default_sync_host
from megagrpo.training.rollout_engines import vllm_config


def test_colocated_vllm_settings_derive_from_the_recipe(tiny_checkpoint):
    hf = tiny_checkpoint("qwen2-demo")
    recipe = load_recipe(DEMO_RECIPE, ["--use_vllm", "true", "--seed", "5"])
    arch = load_arch(hf)
    share = EngineShare(index=1, count=2, leader=True, is_root=False)
    cfg = vllm_config(recipe, hf, arch, share=share, completions_per_step=64, on_gpu=False)
    assert (cfg.mode, cfg.model, cfg.dtype, cfg.seed) == ("colocate", hf, "float32", 6)
    assert cfg.max_num_seqs == 32  # the step's 64 completions over 2 engines
    assert cfg.max_model_len == 128 + 32  # max_prompt_length + max_completion_length
    # room for 32 full sequences: 2 (k, v) x 4 layers x 2 KV heads x 32 dims x 4 bytes, twice
    assert cfg.kv_cache_memory_bytes == max(16 * 2**20, 2 * (2 * 4 * 2 * 32 * 4) * 32 * 160)
    assert cfg.enforce_eager and cfg.enable_prefix_caching and not cfg.enable_sleep_mode
    recipe = load_recipe(
        DEMO_RECIPE, ["--use_vllm", "true", "--vllm_max_model_length", "512",
                      "--vllm_kv_cache_memory_bytes", "1000000", "--bf16", "true",
                      "--torch_dtype", "auto", "--trust_remote_code", "true"],
    )  # fmt: skip
    gpu = vllm_config(recipe, hf, arch, share=EngineShare(), completions_per_step=64, on_gpu=True)
    assert (gpu.max_model_len, gpu.kv_cache_memory_bytes) == (512, 1000000)
    assert gpu.dtype == "bfloat16" and not gpu.enforce_eager and gpu.max_num_seqs == 64
    assert gpu.trust_remote_code and not cfg.trust_remote_code


def test_shares_are_contiguous_and_cover_the_batch():
    assert contiguous_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert contiguous_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    reqs = list(range(10))
    parts = [EngineShare(index=i, count=3).mine(reqs) for i in range(3)]
    assert sum(parts, []) == reqs
    assert EngineShare(index=0, count=1).mine(None) == []


def _pool(cfg):
    return SimpleNamespace(config=cfg)


def test_spawned_vllm_servers_get_their_own_gpus(monkeypatch):
    gpus = RolloutPool._vllm_gpus
    cfg = RolloutPoolConfig(model="m", engine="vllm", vllm=VLLMConfig(tensor_parallel_size=2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpus(_pool(cfg), 0) is None  # CPU: nothing to choose
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [gpus(_pool(cfg), i) for i in range(2)] == ["0,1", "2,3"]
    with pytest.raises(ValueError, match=r"vLLM engine 2 needs GPUs 4..5, this machine has 4"):
        gpus(_pool(cfg), 2)
    given = RolloutPoolConfig(model="m", engine="vllm", devices=["cuda:3", "1,2"])
    assert [gpus(_pool(given), i) for i in range(2)] == ["3", "1,2"]


def test_the_sync_store_address_engines_can_reach(monkeypatch):
    assert default_sync_host(["127.0.0.1", "localhost"]) == "127.0.0.1"
    monkeypatch.setenv("MASTER_ADDR", "node-007")
    assert default_sync_host(["127.0.0.1", "node-002"]) == "node-007"  # rank 0's node
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert default_sync_host(["node-002"]) == socket.getfqdn()
    monkeypatch.delenv("MASTER_ADDR")
    assert default_sync_host(["node-002"]) == socket.getfqdn()


def test_no_weight_copy_for_servers_the_pool_did_not_start(tiny_checkpoint, tmp_path):
    hf = tiny_checkpoint("qwen2")
    ready = tmp_path / "ready.json"
    server = subprocess.Popen(
        [sys.executable, "-m", "megagrpo.cli", "rollout-server", "--model", hf, "--port", "0",
         "--ready-file", str(ready), "--num-threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        import json

        port = json.loads(ready.read_text())["port"]
        pool = RolloutPool(RolloutPoolConfig(server_addresses=[f"127.0.0.1:{port}"]))
        try:
            from megagrpo.rollout.hf_engine import TransformersEngine, TransformersEngineConfig

            weights = TransformersEngine.from_pretrained(
                TransformersEngineConfig(model=hf)
            ).state_dict_copy()
            pool.update_weights(weights.items(), 1)
            assert pool.weight_version == 1 and pool._weights_copy is None
            assert pool.config.keep_weights_copy  # asked for, useless here: not kept
        finally:
            pool.close()
    finally:
        server.kill()
        server.wait()
    assert not os.path.exists(f"/proc/{server.pid}") or server.returncode is not None
