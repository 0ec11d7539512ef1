"""Context parallelism: megatron's load-balanced split of each sequence over the CP ranks, the
gather of per-token results back, and a GRPO update under CP=2 (real gloo ranks, megatron-core's
model with the CPU attention's all-gathered keys and values) equal to one process's: loss,
metrics, every gradient and the old log-probs, padded and packed, for several loss types."""

from __future__ import annotations

import pytest
import torch
from _multiproc import run_ranks
from _train_workers import context_parallel_updates_worker
from test_packed_update import MAX_TOKENS, _assert_same, _batch, _cases

from megagrpo.distributed.context_parallel import (
    ContextParallel,
    chunk_multiple,
    packed_positions,
    sequence_positions,
)
from megagrpo.training.batch import sequence_length_multiple


def test_context_parallel_positions_follow_megatrons_load_balanced_chunks():
    # 2 x CP chunks of L / 2CP; rank r holds chunks r and 2CP - 1 - r
    assert sequence_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert sequence_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert sequence_positions(12, 2, 3).tolist() == [4, 5, 6, 7]
    every = torch.cat([sequence_positions(24, r, 3) for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))
    assert [chunk_multiple(c) for c in (1, 2, 3)] == [1, 4, 6]
    # packed: each sequence split on its own, at its offset
    cu = torch.tensor([0, 4, 12, 16], dtype=torch.int32)
    assert packed_positions(cu, 0, 2).tolist() == [0, 3, 4, 5, 10, 11, 12, 15]
    assert packed_positions(cu, 1, 2).tolist() == [1, 2, 6, 7, 8, 9, 13, 14]


def test_context_parallel_split_refuses_a_length_it_cannot_chunk():
    with pytest.raises(ValueError, match=r"multiple of 4"):
        sequence_positions(6, 0, 2)
    with pytest.raises(ValueError, match=r"2 x context_parallel_size=4"):
        packed_positions(torch.tensor([0, 4, 10], dtype=torch.int32), 1, 2)


@pytest.mark.parametrize(
    "fp8, sp, tp, cp, expected",
    [
        (False, False, 1, 2, 4),  # 2 x CP chunks
        (False, False, 2, 4, 8),
        (False, True, 2, 2, 4),  # L / CP a multiple of TP
        (False, True, 4, 2, 8),
        (True, False, 1, 2, 32),  # L / CP a multiple of 16
        (True, True, 2, 2, 64),
        (True, False, 1, 1, 16),
    ],
)
def test_context_parallel_length_multiple(fp8, sp, tp, cp, expected):
    m = sequence_length_multiple(fp8=fp8, sequence_parallel=sp, tp_size=tp, cp_size=cp)
    assert m == expected
    local = m // cp
    assert m % (2 * cp) == 0 or cp == 1
    assert local % (16 if fp8 else 1) == 0 and local % (tp if sp else 1) == 0


def _groups():
    """megatron's groups with a CP group of two ranks (started once per process)."""
    from megatron.core import parallel_state

    from megagrpo.config.megatron import MegatronConfig
    from megagrpo.distributed.groups import init_distributed

    global _GROUPS
    if _GROUPS is None or not parallel_state.model_parallel_is_initialized():
        _GROUPS = init_distributed(MegatronConfig(context_parallel_size=2))
    return _GROUPS


_GROUPS = None


def _gather_worker():
    """Per rank of CP=2: split, gather, and the gradients both gathers hand back."""
    from megagrpo.distributed.context_parallel import gather_replicated, gather_summed, split

    cp = ContextParallel.of(_groups())
    g = torch.Generator().manual_seed(0)
    whole = torch.randn(3, 8, generator=g)
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    packed = torch.randn(1, 12, generator=g)
    weights = torch.randn(3, 8, generator=g)
    own = cp.positions(8)
    local = split(whole, own, 1).requires_grad_()
    gathered = gather_replicated(local, cp, 1)
    (gathered * weights).sum().backward()
    local_p = split(packed, cp.packed_positions(cu), 1)
    gathered_p = gather_replicated(local_p, cp, 1, cu)
    # a computation that differs per rank: each rank weighs the whole tensor by (rank + 1)
    local_s = split(whole, own, 1).requires_grad_()
    (gather_summed(local_s, cp, 1) * weights * (cp.rank + 1)).sum().backward()
    return {
        "whole": whole,
        "gathered": gathered.detach(),
        "grad": local.grad,
        "expected_grad": split(weights, own, 1),
        "packed": packed,
        "gathered_packed": gathered_p,
        "summed_grad": local_s.grad,
        "expected_summed_grad": split(weights * 3, own, 1),  # (1 + 2) x weights
    }


def _gather_and_loss_worker(cases):
    return {"gather": _gather_worker(), "loss": _loss_worker(cases)}


@pytest.fixture(scope="module")
def cp_pair():
    """Both CP=2 ranks' results of ``_gather_worker`` and ``_loss_worker`` (one start)."""
    cases = _cases()
    return cases, run_ranks(2, _gather_and_loss_worker, cases)


def test_context_parallel_split_then_gather_equals_the_unsplit_tensors(cp_pair):
    for r in (rank["gather"] for rank in cp_pair[1]):
        assert torch.equal(r["gathered"], r["whole"])
        assert torch.equal(r["gathered_packed"], r["packed"])
        # the loss is repeated on every CP rank: each keeps its own positions' gradient
        assert torch.equal(r["grad"], r["expected_grad"])
        # attention's keys and values: the gradient summed over the ranks
        torch.testing.assert_close(r["summed_grad"], r["expected_summed_grad"])


def _loss_worker(cases):
    """The GRPO loss and d loss / d logp over CP=2 from each rank's positions of the log-probs,
    against the unsplit loss on every rank."""
    from megagrpo_kernels import grpo_loss

    from megagrpo.algorithms.loss_aggregation import BatchContext, get_loss_type
    from megagrpo.distributed.context_parallel import gather_replicated, split
    from megagrpo.training.batch import make_micro_batches

    cp = ContextParallel.of(_groups())
    (mb,) = make_micro_batches(_batch(), 8, pad_token_id=0, length_multiple=4)
    g = torch.Generator().manual_seed(1)
    logp_bl = -4.6 + 0.3 * torch.randn(mb.mask_bl.shape, generator=g)
    old_bl = (logp_bl + 0.1 * torch.randn(logp_bl.shape, generator=g)) * mb.mask_bl
    ctx = BatchContext(1, 1, 8, float(mb.mask_bl.sum()))
    out = []
    own = cp.positions(logp_bl.shape[1])
    for loss_type_name, spec, *_ in cases:
        loss_type = get_loss_type(loss_type_name)

        def loss_of(logp, spec=spec, loss_type=loss_type):
            o = grpo_loss(logp, old_bl, None, mb.advantages_b, mb.mask_bl, spec=spec)
            return loss_type.loss(o.loss, mb.mask_bl, ctx)

        whole = logp_bl.clone().requires_grad_()
        unsplit = loss_of(whole)
        unsplit.backward()
        local = split(logp_bl, own, 1).requires_grad_()
        value = loss_of(gather_replicated(local, cp, 1))
        value.backward()
        out.append((unsplit.item(), value.item(), split(whole.grad, own, 1), local.grad))
    return out


def test_context_parallel_loss_and_its_gradient_equal_the_unsplit_ones(cp_pair):
    cases = cp_pair[0]
    for rank in (r["loss"] for r in cp_pair[1]):
        for (name, spec, *_), (unsplit, value, grad, local_grad) in zip(cases, rank):
            label = f"{name}/{spec.objective}/{spec.importance_sampling_level}"
            assert value == pytest.approx(unsplit, rel=1e-6), label
            assert local_grad.abs().max() > 0, label
            torch.testing.assert_close(local_grad, grad, rtol=1e-6, atol=1e-9, msg=label)


def test_context_parallel_update_equals_one_process(tiny_checkpoint):
    """CP=2 against one process, padded and packed: the same loss and metrics, gradients and
    old log-probs (megatron multiplies a loss by CP and averages gradients over DP x CP)."""
    cases = _cases(("grpo", "dapo", "luspo", "vespo"))
    hf = tiny_checkpoint("qwen2")
    (one,) = run_ranks(1, context_parallel_updates_worker, hf, 1, 1, 1, _batch(), cases, MAX_TOKENS)
    two = run_ranks(2, context_parallel_updates_worker, hf, 1, 1, 2, _batch(), cases, MAX_TOKENS)
    assert [r[0]["padded"]["cp_rank"] for r in two] == [0, 1]
    for rank in two:
        merged = [
            {"padded": one[k]["padded"], "packed": rank[k]["padded"]} for k in range(len(cases))
        ]
        _assert_same([merged], cases)  # CP's padded layout against one process's
        merged = [
            {"padded": one[k]["packed"], "packed": rank[k]["packed"]} for k in range(len(cases))
        ]
        _assert_same([merged], cases)  # CP's packed layout against one process's


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_context_parallel_with_tensor_or_pipeline_parallel_equals_no_cp(tp, pp, tiny_checkpoint):
    """TP=2 x CP=2 and PP=2 x CP=2 (four ranks) against the same TP / PP layout without CP: each
    rank's metrics, gradient shards and (last stage) old log-probs, padded and packed."""
    cases = _cases(("vespo",))  # with the old log-prob pass
    hf = tiny_checkpoint("qwen2")
    args = (_batch(), cases, MAX_TOKENS)
    reference = {
        (r[0]["padded"]["tp_rank"], r[0]["padded"]["pp_rank"]): r
        for r in run_ranks(tp * pp, context_parallel_updates_worker, hf, tp, pp, 1, *args)
    }
    ranks = run_ranks(tp * pp * 2, context_parallel_updates_worker, hf, tp, pp, 2, *args)
    assert sorted(r[0]["padded"]["cp_rank"] for r in ranks) == [0, 0, 1, 1]
    for r in ranks:
        ref = reference[(r[0]["padded"]["tp_rank"], r[0]["padded"]["pp_rank"])]
        for k in range(len(cases)):
            for layout in ("padded", "packed"):
                merged = [{"padded": ref[k][layout], "packed": r[k][layout]}]
                _assert_same([merged], [cases[k]])
