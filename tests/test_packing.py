"""Packed micro-batches' layout, the token-budget bins and the balance over DP ranks, the
packed attention against per-sequence attention, and the loss types' token weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megagrpo.algorithms.loss_aggregation import LOSS_TYPES, BatchContext, TokenWeighted
from megagrpo.training.batch import CompletionBatch, make_micro_batches
from megagrpo.training.packing import fill_budget, packed_micro_batch
from megagrpo.training.token_budget import balance_by_tokens


def _batch():
    return CompletionBatch(
        prompt_ids=[[5, 6, 7], [8, 9], [5, 6, 7]],
        completion_ids=[[10, 11], [13, 14, 15], [12]],
        finish_reasons=["stop", "stop", "length"],
        advantages_n=torch.tensor([1.0, -1.0, 0.5]),
        sampler_logprobs=[[-0.1, -0.2], [-0.3, -0.4, -0.5], [-0.6]],
    )


def test_packed_layout_keeps_the_padded_per_sequence_tensors():
    batch = _batch()
    mb = packed_micro_batch(batch, [0, 1, 2], pad_token_id=0, mask_truncated_completions=True)
    (ref,) = make_micro_batches(batch, 3, pad_token_id=0, mask_truncated_completions=True)
    for name in ("input_ids_bl", "targets_bl", "mask_bl", "sampler_logp_bl", "advantages_b"):
        torch.testing.assert_close(getattr(mb, name), getattr(ref, name), msg=name)
    p = mb.packed
    assert p.input_ids_1t.tolist() == [[5, 6, 7, 10, 11, 8, 9, 13, 14, 15, 5, 6, 7, 12]]
    assert p.cu_seqlens.tolist() == [0, 5, 10, 14] and p.cu_seqlens.dtype == torch.int32
    assert p.max_seqlen == 5
    # the padded layout gathered back from the pack: real positions only (mask is 0 elsewhere)
    gathered = p.input_ids_1t[0][p.unpack_bl]
    real = mb.input_ids_bl != 0
    assert torch.equal(gathered[real], mb.input_ids_bl[real])


def test_pack_padded_to_a_fixed_size_adds_short_padding_sequences():
    mb = packed_micro_batch(_batch(), [0, 2], pad_token_id=0, total=21, length_multiple=4)
    p = mb.packed
    assert p.input_ids_1t.shape == (1, 24)  # 21 rounded up to the multiple
    # real sequences of 5 and 4 tokens, then 15 padding tokens in pieces of at most 5
    assert p.cu_seqlens.tolist() == [0, 5, 9, 14, 19, 24]
    assert p.max_seqlen == 5
    assert p.input_ids_1t[0, 9:].eq(0).all()


def test_fill_budget_and_its_error():
    # 9 and 7 fill their bins' padded view (2 x 9, 2 x 7 > 12); 5 + 4: 2 x 5 <= 12; 3 alone
    assert fill_budget([5, 9, 3, 7, 4], 12) == [[1], [3], [0, 4], [2]]
    # tokens and padded view both within 20: 6 + 6 + 6, then 4 x 5
    assert fill_budget([6, 6, 6, 5, 5, 5, 5, 2], 20) == [[0, 1, 2], [3, 4, 5, 6], [7]]
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=8 is below the longest"):
        fill_budget([5, 9], 8)


def test_balance_by_tokens():
    ranks = balance_by_tokens([13, 6, 11, 8, 6, 11, 9, 12], 2)
    assert sorted(i for r in ranks for i in r) == list(range(8))
    assert [sum([13, 6, 11, 8, 6, 11, 9, 12][i] for i in r) for r in ranks] == [38, 38]


def test_packed_attention_equals_per_sequence_attention():
    from megatron.core.packed_seq_params import PackedSeqParams

    from megagrpo.models.sdpa_attention import SDPAttention

    g = torch.Generator().manual_seed(0)
    lengths, heads, groups, d = [5, 1, 7, 3], 4, 2, 8
    t = sum(lengths)
    q = torch.randn(t, heads, d, generator=g, requires_grad=True)
    k = torch.randn(t, groups, d, generator=g, requires_grad=True)
    v = torch.randn(t, groups, d, generator=g, requires_grad=True)
    cu = torch.tensor([0, *lengths]).cumsum(0).int()
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7
    )
    attn = SDPAttention.__new__(SDPAttention)  # only softmax_scale is read on the packed path
    attn.softmax_scale = d**-0.5
    out = attn._packed(q, k, v, params)
    expected = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        expected.append(o[0].transpose(0, 1).reshape(e - s, heads * d))
    expected = torch.cat(expected)
    torch.testing.assert_close(out, expected)
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad((expected * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", sorted(LOSS_TYPES))
def test_token_weights_reproduce_each_loss_type(name):
    """Summed with their token weights, the per-token losses give what megatron makes of the
    loss type's micro-batch losses (sum over micro-batches of loss / M, mean over DP)."""
    g = torch.Generator().manual_seed(1)
    loss_type = LOSS_TYPES[name]()
    ctx = BatchContext(num_microbatches=3, dp_size=2, max_completion_length=6, global_num_tokens=40)
    masks = [(torch.rand(2, 6, generator=g) > 0.4).float() for _ in range(3)]
    losses = [torch.randn(2, 6, generator=g) for _ in range(3)]
    megatron = sum(loss_type.loss(lo, m, ctx) for lo, m in zip(losses, masks)) / 3 / 2
    weights = [loss_type.token_weights(m, ctx) for m in masks]
    weighted = sum(TokenWeighted().objective(lo, w, ctx) for lo, w in zip(losses, weights))
    assert float(weighted) == pytest.approx(float(megatron), rel=1e-6)


@pytest.mark.parametrize("name", sorted(LOSS_TYPES))
def test_token_budget_plan_keeps_each_step_objective(name):
    """Two optimizer steps per generation batch (shuffled per rank), DP=2: each step's sequences
    are spread over the ranks exactly once, and with a per-token loss that depends only on the
    sequence and position, the weighted sums over the ranks' micro-batches give the padded
    micro-batches' objective (megatron's mean over micro-batches and ranks)."""
    from megagrpo.training.generation_steps import split_generation
    from megagrpo.training.token_budget import TokenBudget, token_budget_micro_batches

    g = torch.Generator().manual_seed(4)
    n, dp, parts, b = 16, 2, 2, 2
    completions = [
        torch.randint(8, 50, (int(k),), generator=g).tolist()
        for k in torch.randint(1, 9, (n,), generator=g)
    ]
    prompts = [[1, 2, 3] if i % 2 else [1, 2] for i in range(n)]
    batch = CompletionBatch(prompts, completions, ["stop"] * n, torch.randn(n, generator=g))
    key = {i: (tuple(p), tuple(c)) for i, (p, c) in enumerate(zip(prompts, completions))}
    assert len(set(key.values())) == n

    loss_type = LOSS_TYPES[name]()
    shares = [batch_select(batch, range(r * n // dp, (r + 1) * n // dp)) for r in range(dp)]
    budget = TokenBudget(max_tokens=24, micro_batch_size=b)
    plans = [
        token_budget_micro_batches(
            shares,
            r,
            budget,
            loss_type,
            parts=parts,
            seed=7,
            generation=3,
            max_completion_length=8,
            pad_token_id=0,
        )
        for r in range(dp)
    ]
    splits = [
        split_generation(s, parts, seed=7, generation=3, dp_rank=r) for r, s in enumerate(shares)
    ]
    tokens = sum(len(c) for c in completions)
    for p in range(parts):
        ref_mbs = [make_micro_batches(splits[r][p], b, pad_token_id=0) for r in range(dp)]
        ctx = BatchContext(len(ref_mbs[0]), dp, 8, tokens / parts)
        expected = sum(
            float(loss_type.loss(_trimmed_loss(mb), mb.mask_bl, ctx))
            for mbs in ref_mbs
            for mb in mbs
        ) / (ctx.num_microbatches * dp)
        got = sum(
            float(TokenWeighted().objective(_trimmed_loss(mb), mb.loss_weight_bl, ctx))
            for r in range(dp)
            for mb in plans[r][p]
        )
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-9), p
        seen = sorted(
            tuple(
                mb.input_ids_bl[
                    row, : int(mb.packed.cu_seqlens[row + 1] - mb.packed.cu_seqlens[row])
                ].tolist()
            )
            for r in range(dp)
            for mb in plans[r][p]
            for row in range(len(mb.index))
        )
        wanted = sorted(
            tuple(p_ + c) for s in splits for p_, c in zip(s[p].prompt_ids, s[p].completion_ids)
        )
        assert seen == wanted
        assert all(mb.packed.input_ids_1t.numel() <= 24 for r in range(dp) for mb in plans[r][p])


def _trimmed_loss(mb):
    """``token_loss`` of each row over its own tokens only (padding does not change it)."""
    out = torch.zeros(mb.mask_bl.shape)
    for row in range(mb.mask_bl.shape[0]):
        ids = mb.input_ids_bl[row]
        n = int((mb.mask_bl[row] > 0).nonzero().max()) + 2 if mb.mask_bl[row].any() else 1
        seq = ids[:n]
        h = torch.Generator().manual_seed(hash(tuple(seq.tolist())) % (2**31))
        out[row, :n] = torch.randn(n, generator=h)
    return out


def batch_select(batch, idx):
    from megagrpo.training.generation_steps import _select

    return _select(batch, list(idx))
