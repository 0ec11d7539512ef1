"""From rollout samples to the micro-batches the policy is trained on.

Legend: N completions on this rank (group-major), b completions in a micro-batch, L padded
sequence length, t tokens of a packed micro-batch.

A sequence is the prompt's tokens followed by the completion's, right-padded to L (all
micro-batches of a step share L, so pipeline stages exchange tensors of one shape). The logits at
position t predict token t + 1, so the per-token tensors are laid out by *predicting* position:
``targets_bl[:, t] = input_ids_bl[:, t + 1]`` and ``mask_bl[:, t] = 1`` where token t + 1 is a
completion token that counts in the loss. Sampler, old and reference log-probs use the same
layout. ``mask_truncated_completions`` zeroes the mask of completions that hit max_tokens.

A packed micro-batch (``packing.py``) runs the model on its sequences back to back (``packed``)
and keeps the same right-padded per-sequence tensors, L being its own longest sequence: the
per-token log-probs (not the logits) are gathered into that layout before the loss
(``model_io.token_logprobs``), so every per-token and per-sequence reduction is the padded
path's. Its ``loss_weight_bl`` / ``entropy_weight_bl`` carry each
token's weight in the step's objective (``token_budget.py``); None for padded micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch


@dataclass
class CompletionBatch:
    """This rank's completions of one step (whole groups, group-major)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    finish_reasons: list[str]
    """``stop`` or ``length`` per completion."""
    advantages_n: torch.Tensor
    sampler_logprobs: list[list[float]] | None = None
    """Per completion token, log-prob under the distribution it was sampled from."""
    weight_versions: list[int] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.completion_ids)
        lengths = {
            "prompt_ids": len(self.prompt_ids),
            "finish_reasons": len(self.finish_reasons),
            "advantages_n": self.advantages_n.numel(),
        }
        if self.sampler_logprobs is not None:
            lengths["sampler_logprobs"] = len(self.sampler_logprobs)
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ValueError(f"CompletionBatch: {n} completions but {bad}")
        if self.sampler_logprobs is not None:
            for i, (ids, lp) in enumerate(zip(self.completion_ids, self.sampler_logprobs)):
                if len(ids) != len(lp):
                    raise ValueError(f"completion {i}: {len(ids)} tokens but {len(lp)} log-probs")

    def __len__(self) -> int:
        return len(self.completion_ids)


@dataclass
class MicroBatch:
    input_ids_bl: torch.Tensor
    targets_bl: torch.Tensor
    mask_bl: torch.Tensor
    """float 0/1: the position predicts a completion token that counts in the loss."""
    advantages_b: torch.Tensor
    sampler_logp_bl: torch.Tensor | None = None
    old_logp_bl: torch.Tensor | None = None
    ref_logp_bl: torch.Tensor | None = None
    is_weight_bl: torch.Tensor | None = None
    """The sampler importance weight of each position (``algorithms/importance_sampling.py``)."""
    index: list[int] = field(default_factory=list)
    """Positions of these completions in the step's CompletionBatch."""
    packed: PackedSequences | None = None
    """The model's input when the sequences run packed (``packing.py``); None: ``input_ids_bl``."""
    loss_weight_bl: torch.Tensor | None = None
    """Token-budget micro-batches: each position's weight in the step's policy objective."""
    entropy_weight_bl: torch.Tensor | None = None
    """Token-budget micro-batches: each position's weight in the step's entropy bonus."""

    @property
    def num_tokens(self) -> int:
        return int(self.mask_bl.sum().item())

    def to(self, device) -> MicroBatch:
        moved = {
            k: (v.to(device) if torch.is_tensor(v) or isinstance(v, PackedSequences) else v)
            for k, v in self.__dict__.items()
        }
        return replace(self, **moved)


@dataclass
class PackedSequences:
    """Sequences back to back for the model: megatron's ``PackedSeqParams`` (THD) layout."""

    input_ids_1t: torch.Tensor
    targets_1t: torch.Tensor
    """long [1, t]: the token each packed position predicts (the next one of its sequence; 0 at
    a sequence's last position and in padding): the log-probs are taken in the packed layout."""
    cu_seqlens: torch.Tensor
    """int32 [S + 1]: where each sequence starts (padding up to a fixed size: more sequences;
    under context parallelism each sequence is padded to a multiple of 2 x CP, its padding
    part of it)."""
    max_seqlen: int
    unpack_bl: torch.Tensor
    """long [b, L]: the packed position of each position of the micro-batch's padded layout
    (0 past a sequence's end, where the mask is 0): ``logp_1t[0][unpack_bl]`` is ``logp_bl``."""

    def params(self):
        """megatron's ``PackedSeqParams`` for these sequences."""
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )

    def to(self, device) -> PackedSequences:
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return replace(self, **moved)


FP8_LENGTH_MULTIPLE = 16
"""Transformer Engine's FP8 GEMMs assert the product of an input's leading dimensions (b x L, or
b x L / TP under sequence parallelism) is divisible by 8 (``assert_dim_for_fp8_exec``); 16 also
covers the MXFP8 / blockwise recipes' stricter alignment."""


def sequence_length_multiple(
    *, fp8: bool, sequence_parallel: bool, tp_size: int, cp_size: int = 1
) -> int:
    """What every micro-batch's padded length L (a packed micro-batch's token count) must be a
    multiple of: this rank's L / CP positions a multiple of 16 with FP8 and of TP under sequence
    parallelism (each TP rank holds L / CP / TP positions of the activations), and L a multiple
    of 2 x CP (context parallelism's chunks, ``distributed/context_parallel.py``)."""
    multiple = FP8_LENGTH_MULTIPLE if fp8 else 1
    if sequence_parallel:
        multiple *= tp_size
    if cp_size > 1:
        multiple = cp_size * math.lcm(multiple, 2)
    return multiple


def padded_length(batch: CompletionBatch, multiple: int = 1) -> int:
    longest = max(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids))
    return -(-longest // multiple) * multiple


def make_micro_batches(
    batch: CompletionBatch,
    micro_batch_size: int,
    *,
    pad_token_id: int,
    mask_truncated_completions: bool = False,
    length_multiple: int = 1,
) -> list[MicroBatch]:
    """Split the step's completions into micro-batches of ``micro_batch_size``, in order."""
    n = len(batch)
    if micro_batch_size < 1 or n % micro_batch_size:
        raise ValueError(
            f"{n} completions do not split into micro-batches of micro_batch_size="
            f"{micro_batch_size}"
        )
    length = padded_length(batch, length_multiple)
    return [
        padded_micro_batch(
            batch,
            list(range(start, start + micro_batch_size)),
            length,
            pad_token_id=pad_token_id,
            mask_truncated_completions=mask_truncated_completions,
        )
        for start in range(0, n, micro_batch_size)
    ]


def padded_micro_batch(
    batch: CompletionBatch,
    idx: list[int],
    length: int,
    *,
    pad_token_id: int,
    mask_truncated_completions: bool = False,
) -> MicroBatch:
    """The completions ``idx`` of ``batch``, right-padded to ``length``."""
    ids_bl = torch.full((len(idx), length), pad_token_id, dtype=torch.long)
    mask_bl = torch.zeros(len(idx), length)
    samp_bl = torch.zeros(len(idx), length) if batch.sampler_logprobs is not None else None
    for row, i in enumerate(idx):
        p, c = batch.prompt_ids[i], batch.completion_ids[i]
        ids_bl[row, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids_bl[row, len(p) : len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
        if not (mask_truncated_completions and batch.finish_reasons[i] == "length"):
            mask_bl[row, len(p) - 1 : len(p) - 1 + len(c)] = 1.0
        if samp_bl is not None and c:
            samp_bl[row, len(p) - 1 : len(p) - 1 + len(c)] = torch.tensor(
                batch.sampler_logprobs[i], dtype=torch.float32
            )
    targets_bl = torch.zeros_like(ids_bl)
    targets_bl[:, :-1] = ids_bl[:, 1:]
    return MicroBatch(
        input_ids_bl=ids_bl,
        targets_bl=targets_bl,
        mask_bl=mask_bl,
        advantages_b=batch.advantages_n[idx].float(),
        sampler_logp_bl=samp_bl,
        index=list(idx),
    )
