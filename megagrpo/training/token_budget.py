"""Token-budget micro-batches (``max_tokens_per_micro_batch``): packed sequences, balanced over
data-parallel ranks by tokens, with the loss normalisers of padded per-sample micro-batches.

Legend: b sequences in a micro-batch, L its longest sequence.

Every rank holds the whole generation batch (``broadcast_step``) with its advantages computed
over whole groups, so each rank builds the same plan without communication:

1. the reference layout: each DP rank's share (``rank_share``), split into optimizer-step batches
   (``split_generation``) and cut into padded micro-batches of ``micro_batch_size``, exactly
   as without a budget. The loss type's ``token_weights`` on those micro-batches give each token
   its weight in the step's objective (dapo's global token count, dr_grpo's constant, bnpo's
   per-micro-batch count, grpo's per-sequence means), and ``TokenMean``'s the entropy bonus's;
2. each optimizer-step batch's sequences, from every rank, go to the DP rank with the fewest
   tokens so far, longest first (a sequence may train on another rank than its group);
3. each rank packs its sequences into micro-batches of at most ``max_tokens`` tokens
   (``packing.fill_budget``), carrying their weights; ``TokenWeighted`` sums the weighted losses.

So the loss and the gradient summed over DP ranks are those of the padded path, whatever the
packing. The number of micro-batches may differ between ranks and optimizer steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megagrpo.algorithms.loss_aggregation import BatchContext, LossType, TokenMean
from megagrpo.training.batch import CompletionBatch, MicroBatch, make_micro_batches
from megagrpo.training.generation_steps import split_generation
from megagrpo.training.packing import fill_budget, packed_micro_batch, sequence_lengths


@dataclass(frozen=True)
class TokenBudget:
    """How a step's sequences become token-budget micro-batches."""

    max_tokens: int
    """Packed tokens per micro-batch (``max_tokens_per_micro_batch``)."""
    micro_batch_size: int
    """Sequences per padded micro-batch of the reference layout that defines the normalisers."""
    pad_to_budget: bool = False
    """Pad every pack to ``max_tokens`` (pipeline stages exchange one shape)."""


def balance_by_tokens(lengths: list[int], num_ranks: int) -> list[list[int]]:
    """Indices of ``lengths`` per rank: longest first, each to the rank with the fewest tokens
    (the lowest rank on ties); each rank's indices in ascending order."""
    load = [0] * num_ranks
    out: list[list[int]] = [[] for _ in range(num_ranks)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(num_ranks), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += lengths[i]
    return [sorted(idx) for idx in out]


def token_budget_micro_batches(
    shares: list[CompletionBatch],
    dp_rank: int,
    budget: TokenBudget,
    loss_type: LossType,
    *,
    parts: int,
    seed: int,
    generation: int,
    max_completion_length: int,
    pad_token_id: int,
    mask_truncated_completions: bool = False,
    length_multiple: int = 1,
    sequence_multiple: int = 1,
) -> list[list[MicroBatch]]:
    """Data-parallel rank ``dp_rank``'s micro-batches of each optimizer-step batch. ``shares``:
    every DP rank's share of the generation batch, in rank order. ``sequence_multiple``: each
    sequence's packed span (2 x CP under context parallelism), which the balance and the budget
    count."""
    dp_size = len(shares)
    splits = [
        split_generation(share, parts, seed=seed, generation=generation, dp_rank=r)
        for r, share in enumerate(shares)
    ]
    reference = [
        [
            make_micro_batches(
                part,
                budget.micro_batch_size,
                pad_token_id=pad_token_id,
                mask_truncated_completions=mask_truncated_completions,
            )
            for part in split
        ]
        for split in splits
    ]
    tokens = sum(mb.num_tokens for rank in reference for part in rank for mb in part)
    out = []
    for p in range(parts):
        ctx = BatchContext(
            num_microbatches=len(reference[0][p]),
            dp_size=dp_size,
            max_completion_length=max_completion_length,
            global_num_tokens=float(tokens) / parts,
        )
        pool = _concat([splits[r][p] for r in range(dp_size)])
        lengths = sequence_lengths(pool)
        spans = sequence_lengths(pool, sequence_multiple)
        loss_w, entropy_w = [], []  # per sequence of the pool, over its own positions
        for r in range(dp_size):
            for mb in reference[r][p]:
                loss_w += list(loss_type.token_weights(mb.mask_bl, ctx).float().unbind(0))
                entropy_w += list(TokenMean().token_weights(mb.mask_bl, ctx).float().unbind(0))
        mine = balance_by_tokens(spans, dp_size)[dp_rank]
        if not mine:
            raise ValueError(
                f"{len(lengths)} sequences leave data-parallel rank {dp_rank} without any"
            )
        bins = fill_budget([spans[i] for i in mine], budget.max_tokens)
        mbs = []
        for b in bins:
            idx = [mine[k] for k in b]
            mb = packed_micro_batch(
                pool,
                idx,
                pad_token_id=pad_token_id,
                mask_truncated_completions=mask_truncated_completions,
                length_multiple=length_multiple,
                total=budget.max_tokens if budget.pad_to_budget else None,
                sequence_multiple=sequence_multiple,
            )
            width = mb.mask_bl.shape[1]
            mb.loss_weight_bl = torch.stack([_fit(loss_w[i], lengths[i], width) for i in idx])
            mb.entropy_weight_bl = torch.stack([_fit(entropy_w[i], lengths[i], width) for i in idx])
            mbs.append(mb)
        out.append(mbs)
    return out


def _fit(weights_l: torch.Tensor, length: int, width: int) -> torch.Tensor:
    """A sequence's weights over its own ``length`` positions, zero-padded to ``width``."""
    out = torch.zeros(width, dtype=weights_l.dtype)
    out[:length] = weights_l[:length]
    return out


def _concat(batches: list[CompletionBatch]) -> CompletionBatch:
    def cat(name):
        values = [getattr(b, name) for b in batches]
        return None if any(v is None for v in values) else [x for v in values for x in v]

    return CompletionBatch(
        prompt_ids=cat("prompt_ids"),
        completion_ids=cat("completion_ids"),
        finish_reasons=cat("finish_reasons"),
        advantages_n=torch.cat([b.advantages_n for b in batches]),
        sampler_logprobs=cat("sampler_logprobs"),
        weight_versions=cat("weight_versions") or [],
    )
