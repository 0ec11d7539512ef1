"""Context parallelism (CP): each sequence of a model replica split over the CP ranks.

Legend: b sequences, L padded sequence length, t packed tokens, C the CP size, r a CP rank.

**Megatron's load-balanced order.** A sequence of L positions (L a multiple of 2 x C) is cut
into 2 x C chunks of L / 2C; CP rank r holds chunks r and 2C - 1 - r, in that order, so under
causal attention every rank has the same work (megatron-core's ``get_batch_on_this_cp_rank`` and
``get_pos_emb_on_this_cp_rank``, which applies the rotary positions of exactly these chunks).
Packed sequences (THD) are split the same way one sequence at a time, each padded to a multiple
of 2 x C (``cu_seqlens`` counts the padding; it trails the sequence, so causal attention keeps
it away from the real tokens, and Transformer Engine's CP attention needs no separate padded
offsets).

**What is split and what is not.** The model runs on this rank's positions: its input ids, and so
its hidden states, logits and the vocabulary-sized log-prob work, of L / C positions. The
per-token tensors of the loss stay whole ([b, L]: masks, advantages, old / reference / sampler
log-probs, importance weights): each CP rank computes the log-probs (and entropies) of its own
positions and ``gather_replicated`` all-gathers them over the CP group (b x L floats against the
b x L/C x V logits they come from), so the loss and every per-sequence reduction in it (GSPO's
sequence ratio, per-sequence means and token counts, VESPO's phi, the top-entropy quantile) are
exactly the unsplit ones, and the same on every CP rank. The gather's backward hands each rank
the gradient of its own positions (every rank computed the same loss of the same tensor);
megatron's schedule multiplies a micro-batch's loss by C and the gradient reduction averages
over DP x CP, so the parameters' gradient is the unsplit one.

Attention needs every earlier position's keys and values: on GPU Transformer Engine's ring
attention exchanges them; on CPU ``models/sdpa_attention.py`` all-gathers them with
``gather_summed`` (whose backward sums the ranks' key / value gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in its context-parallel group."""

    group: Any
    rank: int
    size: int

    @classmethod
    def of(cls, groups) -> ContextParallel | None:
        """The CP group of ``groups`` (a ``ParallelGroups``); None without context parallelism."""
        if getattr(groups, "cp_size", 1) <= 1:
            return None
        return cls(groups.cp, groups.cp_rank, groups.cp_size)

    def positions(self, length: int, rank: int | None = None) -> torch.Tensor:
        """long [L / C]: the positions of a sequence of ``length`` that CP rank ``rank`` (this
        one by default) holds."""
        return sequence_positions(length, self.rank if rank is None else rank, self.size)

    def packed_positions(self, cu_seqlens: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        """long [t / C]: the packed positions CP rank ``rank`` holds of sequences back to back at
        ``cu_seqlens`` (each a multiple of 2 x C long)."""
        return packed_positions(cu_seqlens, self.rank if rank is None else rank, self.size)


def chunk_multiple(size: int) -> int:
    """What each sequence's length must be a multiple of under a CP group of ``size``: its 2 x
    CP chunks (1 without context parallelism)."""
    return 2 * size if size > 1 else 1


def sequence_positions(length: int, rank: int, size: int) -> torch.Tensor:
    """long [length / size]: chunks ``rank`` and ``2 size - 1 - rank`` of ``2 size`` chunks."""
    if length % (2 * size):
        raise ValueError(
            f"a sequence of {length} positions does not split into 2 x context_parallel_size="
            f"{2 * size} chunks (its length must be a multiple of {2 * size})"
        )
    chunk = length // (2 * size)
    first = torch.arange(rank * chunk, (rank + 1) * chunk)
    second = torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk)
    return torch.cat([first, second])


def packed_positions(cu_seqlens: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """long [t / size]: ``sequence_positions`` of each packed sequence, offset to its start."""
    cu = cu_seqlens.long().cpu().tolist()
    parts = [
        start + sequence_positions(end - start, rank, size)
        for start, end in zip(cu[:-1], cu[1:])
        if end > start
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def split(x: torch.Tensor, positions: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's ``positions`` of ``x`` along ``dim``."""
    return x.index_select(dim, positions.to(x.device))


def _all_positions(cp: ContextParallel, full: int, packed_cu: torch.Tensor | None):
    if packed_cu is None:
        return [cp.positions(full, r) for r in range(cp.size)]
    return [cp.packed_positions(packed_cu, r) for r in range(cp.size)]


def _gather(local: torch.Tensor, cp: ContextParallel, dim: int, positions: list[torch.Tensor]):
    parts = [torch.empty_like(local) for _ in range(cp.size)]
    dist.all_gather(parts, local.contiguous(), group=cp.group)
    shape = list(local.shape)
    shape[dim] = local.shape[dim] * cp.size
    out = local.new_empty(shape)
    for pos, part in zip(positions, parts):
        out.index_copy_(dim, pos.to(out.device), part)
    return out


class _GatherReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, cp, dim, packed_cu):
        positions = _all_positions(cp, local.shape[dim] * cp.size, packed_cu)
        ctx.dim, ctx.own = dim, positions[cp.rank]
        return _gather(local, cp, dim, positions)

    @staticmethod
    def backward(ctx, grad_full):
        return grad_full.index_select(ctx.dim, ctx.own.to(grad_full.device)), None, None, None


class _GatherSummed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, cp, dim, packed_cu):
        positions = _all_positions(cp, local.shape[dim] * cp.size, packed_cu)
        ctx.dim, ctx.own, ctx.cp = dim, positions[cp.rank], cp
        return _gather(local, cp, dim, positions)

    @staticmethod
    def backward(ctx, grad_full):
        grad_full = grad_full.contiguous()
        dist.all_reduce(grad_full, group=ctx.cp.group)
        return grad_full.index_select(ctx.dim, ctx.own.to(grad_full.device)), None, None, None


def gather_replicated(
    local: torch.Tensor, cp: ContextParallel, dim: int, packed_cu: torch.Tensor | None = None
) -> torch.Tensor:
    """The whole sequences from every CP rank's positions of them (along ``dim``; packed
    sequences at ``packed_cu``), for a computation every CP rank then repeats identically (the
    loss): the backward keeps this rank's positions of the gradient, without communication."""
    return _GatherReplicated.apply(local, cp, dim, packed_cu)


def gather_summed(
    local: torch.Tensor, cp: ContextParallel, dim: int, packed_cu: torch.Tensor | None = None
) -> torch.Tensor:
    """As ``gather_replicated``, for a computation that differs between CP ranks (attention of
    each rank's queries over every key): the backward sums the gradient over the CP ranks."""
    return _GatherSummed.apply(local, cp, dim, packed_cu)
