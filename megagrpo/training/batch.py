"""From rollout samples to the micro-batches the policy is trained on.

Legend: N completions on this rank (group-major), b completions in a micro-batch, L padded
sequence length.

A sequence is the prompt's tokens followed by the completion's, right-padded to L (all
micro-batches of a step share L, so pipeline stages exchange tensors of one shape). The logits at
position t predict token t + 1, so the per-token tensors are laid out by *predicting* position:
``targets_bl[:, t] = input_ids_bl[:, t + 1]`` and ``mask_bl[:, t] = 1`` where token t + 1 is a
completion token that counts in the loss. Sampler, old and reference log-probs use the same
layout. ``mask_truncated_completions`` zeroes the mask of completions that hit max_tokens.
"""

from __future__ import annotations

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

    @property
    def num_tokens(self) -> int:
        return int(self.mask_bl.sum().item())

    def to(self, device) -> MicroBatch:
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return replace(self, **moved)


FP8_LENGTH_MULTIPLE = 16
"""Transformer Engine's FP8 GEMMs assert the product of an input's leading dimensions (b x L, or
b x L / TP under sequence parallelism) is divisible by 8 (``assert_dim_for_fp8_exec``); 16 also
covers the MXFP8 / blockwise recipes' stricter alignment."""


def sequence_length_multiple(*, fp8: bool, sequence_parallel: bool, tp_size: int) -> int:
    """What every micro-batch's padded length L must be a multiple of: 16 with FP8, times TP under
    sequence parallelism (each TP rank holds L / TP positions of the activations)."""
    multiple = FP8_LENGTH_MULTIPLE if fp8 else 1
    return multiple * tp_size if sequence_parallel else multiple


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
    out = []
    for start in range(0, n, micro_batch_size):
        idx = list(range(start, start + micro_batch_size))
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
        out.append(
            MicroBatch(
                input_ids_bl=ids_bl,
                targets_bl=targets_bl,
                mask_bl=mask_bl,
                advantages_b=batch.advantages_n[idx].float(),
                sampler_logp_bl=samp_bl,
                index=idx,
            )
        )
    return out
