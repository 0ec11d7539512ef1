"""TP / PP sharded models over real gloo processes equal the unsharded transformers model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _model_workers import hf_iter_worker, logits_worker, train_step_worker
from _multiproc import run_ranks

from megagrpo.conversion.convert import hf_to_megatron
from megagrpo.demo.tokenizer import VOCAB_SIZE


def _hf_model(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()


def _batches(seed=0, n=2, shape=(2, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB_SIZE, shape, generator=g) for _ in range(n)]


def _only(results):
    got = [r for r in results if r is not None]
    assert len(got) == 1
    return got[0]


@pytest.mark.parametrize(
    "name,world,tp,pp,vpp",
    [
        ("qwen3", 2, 2, 1, None),
        ("qwen2", 2, 1, 2, None),
        ("llama3", 2, 2, 1, None),  # tied embeddings; TP rank 1 holds only vocab padding
        ("qwen2-tied", 2, 1, 2, None),  # tied embeddings across pipeline stages
        ("qwen2", 2, 1, 2, 2),  # interleaved (virtual) pipeline stages
        ("qwen3", 4, 2, 2, None),
    ],
)
def test_sharded_logits_equal_unsharded(name, world, tp, pp, vpp, tiny_checkpoint):
    hf_dir = tiny_checkpoint(name)
    batches = _batches()
    out = _only(run_ranks(world, logits_worker, hf_dir, tp, pp, vpp, batches))
    hf = _hf_model(hf_dir)
    with torch.no_grad():
        for ours, ids in zip(out, batches):
            diff = (ours - hf(ids).logits).abs().max().item()
            assert diff <= 1e-4, f"{name} TP={tp} PP={pp} VPP={vpp}: {diff}"


def test_offline_shards_load_into_the_live_layout(tiny_checkpoint, tmp_path):
    """hf-to-megatron for TP=2 x PP=2, then each of 4 ranks loads its own file."""
    hf_dir = tiny_checkpoint("qwen2", sharded=True)
    meg = str(tmp_path / "meg")
    hf_to_megatron(hf_dir, meg, tp=2, pp=2)
    batches = _batches(seed=5)
    out = _only(run_ranks(4, logits_worker, hf_dir, 2, 2, None, batches, meg))
    hf = _hf_model(hf_dir)
    with torch.no_grad():
        for ours, ids in zip(out, batches):
            assert (ours - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name,tp,pp", [("qwen2", 2, 2), ("llama3", 2, 1), ("qwen2-tied", 1, 2)])
def test_hf_tensor_iterator_is_bit_identical(name, tp, pp, tiny_checkpoint):
    hf_dir = tiny_checkpoint(name)
    from megagrpo.conversion.safetensors_io import SafetensorsDir

    expected = SafetensorsDir(hf_dir).names()
    for r in run_ranks(tp * pp, hf_iter_worker, hf_dir, tp, pp, None):
        assert r["bad"] == []
        assert sorted(r["seen"]) == sorted(expected)
        assert r["seen"][0] == "model.embed_tokens.weight"


@pytest.mark.parametrize("name,tp,pp", [("qwen3", 2, 1), ("qwen2-tied", 1, 2)])
def test_backward_and_optimizer_step_change_every_parameter(name, tp, pp, tiny_checkpoint):
    hf_dir = tiny_checkpoint(name)
    batches, labels = _batches(seed=1), _batches(seed=2)
    results = run_ranks(tp * pp, train_step_worker, hf_dir, tp, pp, batches, labels)
    hf = _hf_model(hf_dir)
    ref = torch.stack(
        [
            F.cross_entropy(hf(b).logits.reshape(-1, VOCAB_SIZE), y.reshape(-1))
            for b, y in zip(batches, labels)
        ]
    ).mean()
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert losses and all(abs(loss - ref) < 1e-4 for loss in losses)
    for r in results:
        assert r["unchanged"] == [], f"rank tp={r['tp_rank']} pp={r['pp_rank']}"
        assert r["padding_moved"] == []
        assert len(r["grads"]) > 0


def test_sharded_gradients_equal_unsharded(tiny_checkpoint):
    """TP=2 gradients, re-assembled, equal the single-process gradients."""
    hf_dir = tiny_checkpoint("qwen2")
    batches, labels = _batches(seed=3), _batches(seed=4)
    (single,) = run_ranks(1, train_step_worker, hf_dir, 1, 1, batches, labels)
    tp2 = run_ranks(2, train_step_worker, hf_dir, 2, 1, batches, labels)
    ref = single["grads"]
    name = "module.decoder.layers.1.self_attention.linear_proj.weight"  # row-parallel: dim 1
    torch.testing.assert_close(torch.cat([r["grads"][name] for r in tp2], 1), ref[name])
    name = "module.decoder.layers.0.mlp.linear_fc2.weight"
    torch.testing.assert_close(torch.cat([r["grads"][name] for r in tp2], 1), ref[name])
    name = "module.decoder.final_layernorm.weight"  # replicated: the full gradient on each rank
    for r in tp2:
        torch.testing.assert_close(r["grads"][name], ref[name], rtol=1e-5, atol=1e-6)
