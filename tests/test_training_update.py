"""A GRPO update through megatron (TP / PP) equals the same update on the transformers model with
the loss written out as TRL writes it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _multiproc import run_ranks
from _train_workers import update_worker, updates_worker
from megagrpo_kernels import GRPOLossSpec

from megagrpo.training.batch import CompletionBatch

SETTINGS = GRPOLossSpec(temperature=0.7, epsilon_low=0.2, epsilon_high=0.28)


def _batch():
    g = torch.Generator().manual_seed(3)
    prompts = [[1, 30, 40, 41, 2], [1, 31, 42, 2]] * 2
    completions = [torch.randint(8, 100, (n,), generator=g).tolist() for n in (6, 3, 8, 5)]
    return CompletionBatch(
        prompt_ids=prompts,
        completion_ids=completions,
        finish_reasons=["stop"] * 4,
        advantages_n=torch.tensor([1.0, -0.5, 0.25, -1.0]),
        sampler_logprobs=[[-1.0] * len(c) for c in completions],
    )


def _reference(hf_dir, batch, loss_type):
    """TRL's per-token loss (on-policy: old = logp.detach()) on the HF model, micro-batches of 2
    averaged as megatron averages them; returns (loss, grads by HF name)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).float()
    total_tokens = sum(len(c) for c in batch.completion_ids)
    loss_sum = 0.0
    for start in (0, 2):
        per_seq, tok_sum, tok_count = [], 0.0, 0
        for i in range(start, start + 2):
            p, c = batch.prompt_ids[i], batch.completion_ids[i]
            ids = torch.tensor([p + c])
            logits = model(ids).logits[0, len(p) - 1 : len(p) - 1 + len(c)] / SETTINGS.temperature
            logp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
            ratio = torch.exp(logp - logp.detach())
            a = batch.advantages_n[i]
            clipped = torch.clamp(ratio, 1 - SETTINGS.epsilon_low, 1 + SETTINGS.epsilon_high)
            tok = -torch.min(ratio * a, clipped * a)
            per_seq.append(tok.mean())
            tok_sum = tok_sum + tok.sum()
            tok_count += len(c)
        if loss_type == "grpo":
            mb = torch.stack(per_seq).mean()
            loss_sum = loss_sum + mb / 2
        else:  # dapo: global token mean
            loss_sum = loss_sum + tok_sum / total_tokens
    loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return float(loss_sum), grads


@pytest.mark.parametrize("loss_type,tp,pp", [("grpo", 2, 1), ("dapo", 1, 2)])
def test_megatron_update_equals_trl_on_transformers(loss_type, tp, pp, tiny_checkpoint):
    hf_dir = tiny_checkpoint("qwen2")
    batch = _batch()
    results = run_ranks(tp * pp, update_worker, hf_dir, tp, pp, batch, loss_type, SETTINGS, False)
    ref_loss, ref_grads = _reference(hf_dir, batch, loss_type)
    m = results[0]["metrics"]
    assert m["loss"] == pytest.approx(ref_loss, abs=1e-6)
    assert m["num_tokens"] == 22.0
    assert m["clip_ratio/region_mean"] == 0.0  # on-policy: ratio 1
    grads = {k: v for r in results for k, v in r["grads"].items()}
    torch.testing.assert_close(
        grads["decoder.final_layernorm.weight"],
        ref_grads["model.norm.weight"],
        rtol=1e-4,
        atol=1e-6,
    )
    torch.testing.assert_close(
        grads["3:self_attention.linear_proj.weight"],
        ref_grads["model.layers.3.self_attn.o_proj.weight"],
        rtol=1e-4,
        atol=1e-6,
    )
    torch.testing.assert_close(
        grads["0:mlp.linear_fc2.weight"],
        ref_grads["model.layers.0.mlp.down_proj.weight"],
        rtol=1e-4,
        atol=1e-6,
    )


def test_old_logprob_pass_gives_ratio_one(tiny_checkpoint):
    """With old log-probs from the forward-only pass of the same weights, the ratio is 1, so the
    loss and metrics equal the on-policy ones."""
    hf_dir = tiny_checkpoint("qwen2")
    batch = _batch()
    (on,) = run_ranks(1, update_worker, hf_dir, 1, 1, batch, "grpo", SETTINGS, False)
    (old,) = run_ranks(1, update_worker, hf_dir, 1, 1, batch, "grpo", SETTINGS, True)
    assert old["metrics"]["loss"] == pytest.approx(on["metrics"]["loss"], abs=1e-6)
    torch.testing.assert_close(
        old["grads"]["decoder.final_layernorm.weight"],
        on["grads"]["decoder.final_layernorm.weight"],
        rtol=1e-4,
        atol=1e-7,
    )


def _variants():
    """One loss type per family, each with the sampler weight, a mask and (some) a bonus."""
    from megagrpo.algorithms.importance_sampling import ImportanceSampling

    token_mask = ImportanceSampling("token_mask", 0.5, 2.0)
    seq_trunc = ImportanceSampling("sequence_truncate", 0.5, 2.0)
    spec = GRPOLossSpec(temperature=0.7, epsilon_high=0.28)
    return [
        ("luspo", replace(spec, importance_sampling_level="sequence"), True, 0.0, seq_trunc),
        (
            "cispo",
            replace(spec, objective="cispo", epsilon_high=2.0, top_entropy_quantile=0.5),
            True,
            0.01,
            token_mask,
        ),
        (
            "sapo",
            replace(spec, objective="sapo", off_policy_mask_threshold=0.05),
            True,
            0.0,
            token_mask,
        ),
        ("vespo", replace(spec, objective="vespo"), True, 0.01, token_mask),
    ]


def test_loss_variants_tp2_equal_one_process(tiny_checkpoint):
    """A TP=2 update of one loss type per family (clip/luspo, cispo, sapo, vespo), with their
    masks, sampler weights and entropy bonus, equals the one-process update."""
    hf_dir = tiny_checkpoint("qwen2")
    batch = _batch()
    g = torch.Generator().manual_seed(8)  # sampler log-probs near the model's (~ -log 105)
    batch.sampler_logprobs = [
        (-4.6 + 0.3 * torch.randn(len(c), generator=g)).tolist() for c in batch.completion_ids
    ]
    cases = _variants()
    one = run_ranks(1, updates_worker, hf_dir, 1, 1, batch, cases)[0]
    two = run_ranks(2, updates_worker, hf_dir, 2, 1, batch, cases)[0]
    for (name, *_), a, b in zip(cases, one, two):
        for key, value in a["metrics"].items():
            assert b["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)
        assert a["grads"]["decoder.final_layernorm.weight"].abs().max() > 1e-5, name
        for key in ("decoder.final_layernorm.weight", "3:self_attention.linear_proj.weight"):
            torch.testing.assert_close(
                b["grads"][key],
                a["grads"][key],
                rtol=1e-4,
                atol=1e-7,
                msg=lambda m, name=name: f"{name}: {m}",
            )
