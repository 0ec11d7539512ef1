"""Packed, token-budget micro-batches (``max_tokens_per_micro_batch``) train exactly as padded
per-sample micro-batches: the same loss and metrics, the same (DP-summed) gradients and the same
old log-probs, for every loss type, on one process and under TP=2, PP=2 and DP=2 (where the
sequences are rebalanced over the ranks by tokens)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _multiproc import run_ranks
from _train_workers import packed_updates_worker
from megagrpo_kernels import GRPOLossSpec

from megagrpo.algorithms.importance_sampling import ImportanceSampling
from megagrpo.training.batch import CompletionBatch

SPEC = GRPOLossSpec(temperature=0.7, epsilon_low=0.2, epsilon_high=0.28)
MAX_TOKENS = 40


def _batch(n: int = 8) -> CompletionBatch:
    """Two groups of 4 with completions of 1..8 tokens (prompt + completion 5..13 tokens)."""
    g = torch.Generator().manual_seed(3)
    prompts = [[1, 30, 40, 41, 2]] * (n // 2) + [[1, 31, 42, 2]] * (n // 2)
    lengths = [6, 1, 8, 3, 2, 7, 5, 8][:n]
    completions = [torch.randint(8, 100, (k,), generator=g).tolist() for k in lengths]
    return CompletionBatch(
        prompt_ids=prompts,
        completion_ids=completions,
        finish_reasons=["stop"] * n,
        advantages_n=torch.randn(n, generator=g),
        # near the model's own log-probs (~ -log 105), so the sampler weights vary
        sampler_logprobs=[
            (-4.6 + 0.3 * torch.randn(len(c), generator=g)).tolist() for c in completions
        ],
    )


def _cases(loss_types=None):
    token_mask = ImportanceSampling("token_mask", 0.5, 2.0)
    seq_trunc = ImportanceSampling("sequence_truncate", 0.5, 2.0)
    cases = [(name, SPEC, False, 0.0, None) for name in ("grpo", "bnpo", "dr_grpo", "dapo")] + [
        ("luspo", replace(SPEC, importance_sampling_level="sequence"), True, 0.0, seq_trunc),
        ("grpo", replace(SPEC, importance_sampling_level="sequence", beta=0.0), True, 0.01, None),
        ("cispo", replace(SPEC, objective="cispo", epsilon_high=2.0), True, 0.01, token_mask),
        (
            "sapo",
            replace(SPEC, objective="sapo", off_policy_mask_threshold=0.05),
            True,
            0.0,
            token_mask,
        ),
        ("vespo", replace(SPEC, objective="vespo"), True, 0.01, token_mask),
    ]
    return cases if loss_types is None else [c for c in cases if c[0] in loss_types]


def _assert_same(ranks, cases):
    """``ranks``: each rank's results. Metrics and gradient shards per rank; the old log-probs
    of every sequence, wherever it trained."""
    for k, (name, spec, *_) in enumerate(cases):
        label = f"{name}/{spec.objective}/{spec.importance_sampling_level}"
        old = {"padded": {}, "packed": {}}
        for results in ranks:
            padded, packed = results[k]["padded"], results[k]["packed"]
            for key, value in padded["metrics"].items():
                got = packed["metrics"][key]
                assert got == pytest.approx(value, rel=1e-5, abs=1e-7), (label, key)
            assert padded["grads"].keys() == packed["grads"].keys()
            assert any(g.abs().max() > 1e-5 for g in padded["grads"].values()), label
            for key, g in padded["grads"].items():
                torch.testing.assert_close(
                    packed["grads"][key],
                    g,
                    rtol=1e-5,
                    atol=1e-7,
                    msg=lambda m, k=key, where=label: f"{where} {k}: {m}",
                )
            old["padded"].update(padded["old_logp"])
            old["packed"].update(packed["old_logp"])
        assert old["padded"].keys() == old["packed"].keys(), label
        for i, logp in old["padded"].items():
            torch.testing.assert_close(old["packed"][i], logp, rtol=1e-5, atol=1e-6)


def test_packed_update_equals_padded_one_process(tiny_checkpoint):
    cases = _cases()
    (results,) = run_ranks(
        1, packed_updates_worker, tiny_checkpoint("qwen2"), 1, 1, _batch(), cases, MAX_TOKENS
    )
    _assert_same([results], cases)
    # the budget packs the 8 sequences into fewer micro-batches than the 4 padded ones
    assert results[0]["packed"]["num_microbatches"] < results[0]["padded"]["num_microbatches"]
    # the output layer ran on the 40 completion positions only, in the packed update and in
    # every old log-prob pass; the padded update's fused kernel takes the logits of all
    # 4 x 2 x 13 positions
    completion_tokens = sum(len(c) for c in _batch().completion_ids)
    for k, (_, _, need_old, _, _) in enumerate(cases):
        passes = completion_tokens * need_old
        assert results[k]["packed"]["output_positions"] == completion_tokens + passes
        assert results[k]["padded"]["output_positions"] == 4 * 2 * 13 + passes


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_packed_update_equals_padded_tp_pp(tp, pp, tiny_checkpoint):
    cases = _cases(("grpo", "dapo", "vespo"))
    results = run_ranks(
        tp * pp,
        packed_updates_worker,
        tiny_checkpoint("qwen2"),
        tp,
        pp,
        _batch(),
        cases,
        MAX_TOKENS,
    )
    _assert_same(results, cases)
    last = [r for r in results if r[0]["padded"]["pp_rank"] == pp - 1]
    assert last and all(r[-1]["packed"]["old_logp"] for r in last)  # vespo's pass ran there


def test_sequence_parallel_update_equals_tensor_parallel(tiny_checkpoint):
    """TP=2 with sequence parallelism (on the CPU through megagrpo's RMSNorm, whose weight
    gradients megatron sums over TP) trains as TP=2 without it, padded and packed (where the
    output layer gathers the sequence-parallel positions before taking the loss's rows): the
    same metrics, every gradient shard and the old log-probs."""
    cases = _cases(("grpo", "vespo"))
    args = (tiny_checkpoint("qwen2"), 2, 1, _batch(), cases, MAX_TOKENS)
    plain = run_ranks(2, packed_updates_worker, *args, False)
    sequence_parallel = run_ranks(2, packed_updates_worker, *args, True)
    for rank, (want_rank, got_rank) in enumerate(zip(plain, sequence_parallel)):
        for k, (want_case, got_case) in enumerate(zip(want_rank, got_rank)):
            for layout in ("padded", "packed"):
                want, got = want_case[layout], got_case[layout]
                label = (rank, cases[k][0], layout)
                assert got["metrics"] == pytest.approx(want["metrics"], rel=1e-5, abs=1e-7), label
                assert got["grads"].keys() == want["grads"].keys()
                for key, g in want["grads"].items():
                    torch.testing.assert_close(
                        got["grads"][key],
                        g,
                        rtol=1e-5,
                        atol=1e-7,
                        msg=lambda m, where=label: f"{where} {m}",
                    )
                assert got["old_logp"].keys() == want["old_logp"].keys()
                for i, logp in want["old_logp"].items():
                    torch.testing.assert_close(got["old_logp"][i], logp, rtol=1e-5, atol=1e-6)
    norm = [k for k in plain[0][0]["packed"]["grads"] if k.endswith("input_layernorm.weight")]
    assert norm and plain[0][0]["packed"]["grads"][norm[0]].abs().max() > 1e-6


def test_token_budget_over_dp_keeps_every_normaliser(tiny_checkpoint):
    """DP=2: the sequences move between ranks (balanced by tokens) and the ranks run different
    numbers of micro-batches; loss and DP-averaged gradients equal the unbalanced padded path's
    for every loss type (dapo's global count, dr_grpo's constant, bnpo's local count, grpo's
    per-sequence means)."""
    cases = _cases()
    results = run_ranks(
        2, packed_updates_worker, tiny_checkpoint("qwen2"), 1, 1, _batch(), cases, 24
    )
    _assert_same(results, cases)
    # balanced by tokens, the ranks hold other sequences than their own groups
    assert sorted(results[0][-1]["packed"]["old_logp"]) != [0, 1, 2, 3]
    assert [r[0]["packed"]["num_microbatches"] for r in results] == [3, 2]
