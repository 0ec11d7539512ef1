"""Packed micro-batches: sequences back to back under a token budget, no padding between them.

Legend: b sequences in a micro-batch, L its longest sequence, t packed tokens.

The model runs ``[1, t]`` tokens with megatron's ``PackedSeqParams`` (``qkv_format="thd"``):
Transformer Engine's varlen attention on GPU, ``models/sdpa_attention.py`` on CPU; each sequence
attends to itself only and its rotary positions restart at 0 (megatron applies RoPE per
``cu_seqlens``). The per-token tensors stay in the right-padded ``[b, L]`` layout of
``batch.py`` (L: this micro-batch's longest sequence): the log-probs are taken from the packed
logits and gathered into it (``model_io.token_logprobs``), so the loss, its per-sequence
reductions and the log-prob pass are the padded path's. A pack is also kept to sequences x
longest <= the budget (``fill_budget``): the CPU attention scatters a pack into that padded
[sequences, longest] grid.

Under context parallelism every sequence is padded to a multiple of 2 x CP (``sequence_multiple``;
the padding trails it inside its ``cu_seqlens`` span, masked out of the loss), so each CP rank
holds its two chunks of every sequence (``distributed/context_parallel.py``).

Pipeline stages exchange tensors of one shape, so under PP every packed micro-batch is padded to
the token budget (``total``): the padding forms extra sequences (no longer than the micro-batch's
longest, so attention over them costs no more than over real ones) whose mask is 0.
"""

from __future__ import annotations

import torch

from megagrpo.training.batch import CompletionBatch, MicroBatch, PackedSequences, padded_micro_batch


def sequence_lengths(batch: CompletionBatch, multiple: int = 1) -> list[int]:
    """Prompt + completion tokens of each sequence, rounded up to a multiple of ``multiple``."""
    return [
        -(-(len(p) + len(c)) // multiple) * multiple
        for p, c in zip(batch.prompt_ids, batch.completion_ids)
    ]


def fill_budget(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``max_tokens`` tokens whose padded view
    (sequences x the longest) is also at most ``max_tokens`` positions (first fit over the
    sequences longest first: a bin's first sequence is its longest); each bin's indices in
    ascending order."""
    too_long = [n for n in lengths if n > max_tokens]
    if too_long:
        raise ValueError(
            f"max_tokens_per_micro_batch={max_tokens} is below the longest sequence "
            f"(prompt + completion: {max(too_long)} tokens); raise it to at least "
            "max_prompt_length + max_completion_length"
        )
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for k, free in enumerate(room):
            longest = lengths[bins[k][0]]
            if lengths[i] <= free and (len(bins[k]) + 1) * longest <= max_tokens:
                bins[k].append(i)
                room[k] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]


def packed_micro_batch(
    batch: CompletionBatch,
    idx: list[int],
    *,
    pad_token_id: int,
    mask_truncated_completions: bool = False,
    length_multiple: int = 1,
    total: int | None = None,
    sequence_multiple: int = 1,
) -> MicroBatch:
    """The sequences ``idx`` of ``batch`` packed, each padded to a multiple of
    ``sequence_multiple`` (2 x CP); the pack is padded to ``total`` tokens when given (pipeline
    parallelism), else to a multiple of ``length_multiple``."""
    lengths = sequence_lengths(batch)
    lengths_b = [lengths[i] for i in idx]
    spans_b = [-(-n // sequence_multiple) * sequence_multiple for n in lengths_b]
    used = sum(spans_b)
    size = total if total is not None else used
    size = -(-size // length_multiple) * length_multiple
    if used > size:
        raise ValueError(f"{used} packed tokens exceed the micro-batch's {size}")
    mb = padded_micro_batch(
        batch,
        idx,
        max(lengths_b),
        pad_token_id=pad_token_id,
        mask_truncated_completions=mask_truncated_completions,
    )
    longest = max(spans_b)
    pads = [longest] * ((size - used) // longest) + [(size - used) % longest]
    seqlens = spans_b + [n for n in pads if n > 0]
    cu_seqlens = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(seqlens).cumsum(0)
    starts_b = cu_seqlens[: len(idx)].long()
    pos_l = torch.arange(max(lengths_b))
    valid_bl = pos_l[None, :] < torch.tensor(lengths_b)[:, None]
    unpack_bl = torch.where(valid_bl, starts_b[:, None] + pos_l[None, :], 0)
    ids_t = torch.full((size,), pad_token_id, dtype=torch.long)
    ids_t[unpack_bl[valid_bl]] = mb.input_ids_bl[valid_bl]
    targets_t = torch.zeros(size, dtype=torch.long)
    targets_t[unpack_bl[valid_bl]] = mb.targets_bl[valid_bl]
    mb.packed = PackedSequences(
        input_ids_1t=ids_t[None, :],
        targets_1t=targets_t[None, :],
        cu_seqlens=cu_seqlens,
        max_seqlen=max(seqlens),
        unpack_bl=unpack_bl,
    )
    return mb
