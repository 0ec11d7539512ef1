"""The dry-run memory estimate against a hand computation for the Qwen2.5-1.5B recipe."""

from __future__ import annotations

import os
import warnings

import pytest

from megagrpo.config import load_recipe
from megagrpo.models.known_configs import resolve_arch
from megagrpo.planning.memory import GIB, estimate_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "launch", "configs", "qwen2.5-1.5b-openr1-demo.yaml")


def _recipe(*overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_recipe(RECIPE, list(overrides))


def test_qwen25_15b_recipe_by_hand():
    recipe = _recipe("--beta", "0.04")
    arch = resolve_arch(recipe.model.model_name_or_path)
    est = estimate_memory(recipe, arch, dp=8, gpu_memory_bytes=80 * GIB)

    # Qwen2.5-1.5B: h=1536, F=8960, L=28, a=12 heads, g=2 groups, d=128, V=151936, tied, qkv bias.
    qkv_rows = 12 * 128 + 2 * 2 * 128  # 2048
    per_layer = 1536 * 2048 + 2048 + 1536 * 1536 + 3 * 1536 * 8960 + 2 * 1536  # 46,797,824
    params = 28 * per_layer + 151936 * 1536 + 1536
    assert params == 1_543_714_304  # the published 1.54B
    assert est.parameters == 2 * params  # bf16
    assert est.gradients == 4 * params
    assert est.optimizer == 12 * params // 8  # fp32 master + 2 moments, sharded over DP=8
    assert est.reference == 2 * params  # beta > 0: a bf16 reference model

    s, b = 512 + 1024, 8  # prompt + completion; micro_batch_size 8
    layer = (
        4 * s * b * 1536  # two norm inputs, the QKV and fc1 inputs
        + s * b * qkv_rows  # q, k, v (flash attention: no s^2 term)
        + s * b * 1536  # output projection input
        + 3 * s * b * 8960  # gate, up, SwiGLU product
    ) * 2
    assert est.activations_no_recompute == 28 * layer
    # gradient_checkpointing: full recompute, one layer per chunk: 28 chunk inputs + one layer
    assert est.activations_full_recompute == 28 * s * b * 1536 * 2 + layer
    assert est.activations == est.activations_full_recompute
    assert est.logits == s * b * 151936 * 2 * 2
    assert est.vllm == int(0.3 * 80 * GIB)  # use_vllm, colocated (default) at 0.3 utilisation
    parts = 2 * params + 4 * params + 12 * params // 8 + 28 * s * b * 1536 * 2 + layer
    assert est.update_total == parts + s * b * 151936 * 4 + 2 * params
    assert 22 * GIB < est.update_total < 23 * GIB  # logits of 8 x 1536 tokens dominate: 7 GiB


def test_vllm_colocated_and_no_recompute():
    recipe = _recipe(
        "--vllm_mode",
        "colocate",
        "--vllm_gpu_memory_utilization",
        "0.3",
        "--gradient_checkpointing",
        "false",
    )
    est = estimate_memory(
        recipe, resolve_arch("Qwen/Qwen2.5-1.5B-Instruct"), dp=8, gpu_memory_bytes=80 * GIB
    )
    assert est.vllm == int(0.3 * 80 * GIB)
    assert est.activations == est.activations_no_recompute
    assert "vLLM colocated" in est.table() and "GiB" in est.table()


def test_unknown_remote_model_is_a_clear_error():
    from megagrpo.models.arch import ArchitectureError

    with pytest.raises(ArchitectureError, match="not a local directory and not one of"):
        resolve_arch("someone/unknown-model")


def test_context_parallel_splits_activations_and_logits_and_shards_the_optimizer():
    arch = resolve_arch("Qwen/Qwen2.5-1.5B-Instruct")
    one = estimate_memory(_recipe("--use_distributed_optimizer"), arch, dp=4)
    cp = estimate_memory(
        _recipe("--use_distributed_optimizer", "--context_parallel_size", "2"), arch, dp=4
    )
    # each rank runs 768 of every sequence's 1536 positions (flash attention: linear in s)
    assert cp.activations_no_recompute * 2 == one.activations_no_recompute
    assert cp.logits * 2 == one.logits
    assert cp.optimizer * 2 == one.optimizer  # sharded over DP x CP
    assert cp.parameters == one.parameters and cp.gradients == one.gradients
    assert any("context_parallel_size=2" in n for n in cp.notes)
