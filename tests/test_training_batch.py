"""Micro-batches: shifted targets, completion masks, sampler log-probs, truncation."""

from __future__ import annotations

import pytest
import torch

from megagrpo.training.batch import CompletionBatch, make_micro_batches, sequence_length_multiple


def _batch(**kw):
    args = dict(
        prompt_ids=[[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]],
        completion_ids=[[10, 11], [12], [13, 14, 15], []],
        finish_reasons=["stop", "length", "length", "stop"],
        advantages_n=torch.tensor([1.0, -1.0, 0.5, -0.5]),
        sampler_logprobs=[[-0.1, -0.2], [-0.3], [-0.4, -0.5, -0.6], []],
    )
    args.update(kw)
    return CompletionBatch(**args)


def test_layout_by_predicting_position():
    mbs = make_micro_batches(_batch(), 2, pad_token_id=0)
    assert len(mbs) == 2
    a, b = mbs
    assert a.input_ids_bl.tolist() == [[5, 6, 7, 10, 11], [5, 6, 7, 12, 0]]  # L = 5 for both
    assert b.input_ids_bl.tolist() == [[8, 9, 13, 14, 15], [8, 9, 0, 0, 0]]
    # position t predicts token t+1: completion tokens are predicted from the last prompt token on
    assert a.mask_bl.tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]]
    assert a.targets_bl[0].tolist() == [6, 7, 10, 11, 0]
    assert (a.targets_bl * a.mask_bl.long())[0].tolist() == [0, 0, 10, 11, 0]
    assert b.mask_bl.tolist() == [[0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert a.sampler_logp_bl[0].tolist() == pytest.approx([0, 0, -0.1, -0.2, 0])
    assert b.sampler_logp_bl[0].tolist() == pytest.approx([0, -0.4, -0.5, -0.6, 0])
    assert a.advantages_b.tolist() == [1.0, -1.0] and b.index == [2, 3]
    assert a.num_tokens == 3 and b.num_tokens == 3


def test_mask_truncated_completions_and_length_multiple():
    a, b = make_micro_batches(
        _batch(), 2, pad_token_id=0, mask_truncated_completions=True, length_multiple=4
    )
    assert a.input_ids_bl.shape == (2, 8)
    assert a.mask_bl.sum(1).tolist() == [2, 0]  # the second one hit max_tokens
    assert b.mask_bl.sum().item() == 0


def test_bad_inputs():
    with pytest.raises(
        ValueError, match="4 completions do not split into micro-batches of micro_batch_size=3"
    ):
        make_micro_batches(_batch(), 3, pad_token_id=0)
    with pytest.raises(ValueError, match="4 completions but .*advantages_n.: 3"):
        _batch(advantages_n=torch.zeros(3))
    with pytest.raises(ValueError, match="completion 1: 1 tokens but 2 log-probs"):
        _batch(sampler_logprobs=[[-0.1, -0.2], [-0.3, -0.3], [-0.4, -0.5, -0.6], []])


@pytest.mark.parametrize(
    "fp8, sequence_parallel, tp, multiple",
    [(False, False, 4, 1), (False, True, 4, 4), (True, False, 4, 16), (True, True, 4, 64)],
)
def test_fp8_sequence_length_multiple(fp8, sequence_parallel, tp, multiple):
    got = sequence_length_multiple(fp8=fp8, sequence_parallel=sequence_parallel, tp_size=tp)
    assert got == multiple
    for mb in make_micro_batches(_batch(), 2, pad_token_id=0, length_multiple=got):
        b, length = mb.input_ids_bl.shape
        assert length % multiple == 0 and length >= 5
        if fp8:  # Transformer Engine's FP8 GEMM rule on this rank's share of the tokens
            assert (b * length // (tp if sequence_parallel else 1)) % 8 == 0


def _causal_toy_logits(ids_bl, emb_vh, out_hv):
    """Logits at t depend on tokens <= t only, as in the causal policy: extra right padding
    leaves the real positions' logits alone."""
    hidden_blh = torch.cumsum(emb_vh[ids_bl], dim=1)
    return torch.tanh(hidden_blh) @ out_hv


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fp8_padding_is_masked_out_of_the_loss(loss_type, level):
    """The FP8 padding (L from 5 to 16) changes neither the loss nor its gradient."""
    from megagrpo_kernels import GRPOLossSpec, logprob_grpo_loss

    from megagrpo.algorithms.loss_aggregation import BatchContext, get_loss_type

    gen = torch.Generator().manual_seed(0)
    vocab, hidden = 17, 8
    emb_vh = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
    out_hv = torch.randn(hidden, vocab, generator=gen, dtype=torch.float64)
    kind = get_loss_type(loss_type)

    def loss_and_grads(multiple):
        weights = [emb_vh.clone().requires_grad_(), out_hv.clone().requires_grad_()]
        mbs = make_micro_batches(_batch(), 2, pad_token_id=0, length_multiple=multiple)
        ctx = BatchContext(
            num_microbatches=len(mbs),
            dp_size=1,
            max_completion_length=8,
            global_num_tokens=sum(mb.num_tokens for mb in mbs),
        )
        total = 0.0
        for mb in mbs:
            logits = _causal_toy_logits(mb.input_ids_bl, *weights)
            out = logprob_grpo_loss(
                logits,
                mb.targets_bl,
                mb.sampler_logp_bl.double(),  # old log-probs: a ratio away from 1
                mb.sampler_logp_bl.double() - 0.05,  # reference log-probs
                mb.advantages_b.double(),
                mb.mask_bl,
                spec=GRPOLossSpec(beta=0.04, importance_sampling_level=level),
                backend="torch",
            )
            total = total + kind.loss(out.loss, mb.mask_bl, ctx)
        total.backward()
        return total.detach(), [w.grad for w in weights], mbs[0].input_ids_bl.shape[1]

    loss_5, grads_5, length_5 = loss_and_grads(1)
    loss_16, grads_16, length_16 = loss_and_grads(16)
    assert (length_5, length_16) == (5, 16) and loss_5.abs() > 1e-3
    torch.testing.assert_close(loss_16, loss_5, rtol=1e-12, atol=1e-12)
    for g16, g5 in zip(grads_16, grads_5):
        torch.testing.assert_close(g16, g5, rtol=1e-10, atol=1e-12)
