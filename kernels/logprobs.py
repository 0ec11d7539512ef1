"""Per-token log-probabilities (and entropy) of target ids under temperature-scaled logits.

    logp, entropy = logprobs(logits, targets, temperature=0.7, return_entropy=True)

``logits [..., V_local]`` (bf16, fp16 or fp32; fp64 on the torch backend), ``targets [...]``
integer ids. Returns ``logp [...]`` in fp32 (fp64 for fp64 logits), and ``entropy [...]`` of the
temperature-scaled distribution on request; both are differentiable w.r.t. the logits, and the
gradient has the logits' dtype. No ``N x V`` fp32 tensor is built on either backend.

Vocab-parallel use (megatron-core's ``ColumnParallelLinear`` output layer with
``gather_output=False``): pass ``tp_group`` and each rank's ``[..., V/TP]`` logits; every rank gets
the full-vocab log-probs. Each rank's per-row statistics are merged with ONE all-gather
(:mod:`vocab_parallel`); the backward needs no communication, since every rank receives the same
``grad_logp`` (as with megatron's vocab-parallel cross-entropy).

Shapes: ``_n`` rows (flattened leading dims), ``_v`` local vocab.
"""

from __future__ import annotations

import torch

from . import reference
from .backend import resolve_backend, triton_module
from .vocab_parallel import (
    check_owners,
    default_vocab_start,
    finalize_row_stats,
    gather_row_stats,
    merge_row_stats,
)

LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_logprob_inputs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, backend: str
) -> None:
    """Raises ``ValueError``/``TypeError`` naming the argument and what was expected."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError(
            f"logits: expected a tensor [..., V], got {type(logits).__name__} "
            f"{getattr(logits, 'shape', '')}"
        )
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits: expected one of {LOGIT_DTYPES}, got {logits.dtype}")
    if backend == "triton" and logits.dtype == torch.float64:
        raise TypeError(
            "logits: the triton backend computes in fp32 and takes bf16/fp16/fp32 "
            "logits; use backend='torch' for fp64"
        )
    if (
        not isinstance(targets, torch.Tensor)
        or targets.dtype.is_floating_point
        or targets.dtype == torch.bool
        or targets.is_complex()
    ):
        raise TypeError(
            f"targets: expected an integer tensor of token ids, got "
            f"{getattr(targets, 'dtype', type(targets).__name__)}"
        )
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets: expected shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), "
            f"got {tuple(targets.shape)}"
        )
    if targets.device != logits.device:
        raise ValueError(
            f"targets: expected device {logits.device} (the logits' device), got {targets.device}"
        )
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")


def _check_target_range(targets_n: torch.Tensor, vocab: int) -> None:
    """Unsharded case: one host sync."""
    if targets_n.numel() and (bool((targets_n < 0).any()) or bool((targets_n >= vocab).any())):
        bad = ((targets_n < 0) | (targets_n >= vocab)).nonzero()[0, 0]
        raise ValueError(
            f"targets: id {int(targets_n[bad])} at row {int(bad)} is outside the "
            f"vocabulary; expected ids in [0, {vocab})"
        )


def forward_rows(
    logits_nv,
    targets_n,
    temperature,
    tp_group,
    vocab_start,
    with_entropy,
    backend,
    validate,
    chunk_size=None,
    block_size=None,
):
    """``(logp_n, entropy_n, max_n, lse_n)`` on 2-D rows; shared with the fused loss."""
    vocab = logits_nv.shape[1]
    if tp_group is None:
        if validate:
            _check_target_range(targets_n, vocab)
        if backend == "triton":
            return triton_module("logprobs_triton").logprobs_forward(
                logits_nv, targets_n, vocab_start, temperature, with_entropy, True, block_size
            )
        stats_n5 = reference.local_row_stats(
            logits_nv, targets_n, vocab_start, temperature, chunk_size, with_entropy
        )
    else:
        if backend == "triton":
            stats_n5 = triton_module("logprobs_triton").logprobs_forward(
                logits_nv, targets_n, vocab_start, temperature, with_entropy, False, block_size
            )
        else:
            stats_n5 = reference.local_row_stats(
                logits_nv, targets_n, vocab_start, temperature, chunk_size, with_entropy
            )
        stats_n5 = merge_row_stats(gather_row_stats(stats_n5, tp_group), temperature)
        if validate:
            check_owners(stats_n5, vocab, vocab_start, tp_group)
    logp_n, entropy_n, max_n, lse_n = finalize_row_stats(stats_n5, temperature)
    return logp_n, (entropy_n if with_entropy else None), max_n, lse_n


def backward_rows(
    logits_nv,
    targets_n,
    vocab_start,
    temperature,
    max_n,
    lse_n,
    grad_logp_n,
    entropy_n,
    grad_entropy_n,
    backend,
    chunk_size=None,
    block_size=None,
):
    """``grad_logits`` from the saved row statistics; shared with the fused loss."""
    if backend == "triton":
        return triton_module("logprobs_triton").logprobs_backward(
            logits_nv,
            targets_n,
            vocab_start,
            temperature,
            max_n,
            lse_n,
            grad_logp_n,
            entropy_n,
            grad_entropy_n,
            block_size,
        )
    return reference.logprobs_backward(
        logits_nv,
        targets_n,
        vocab_start,
        temperature,
        max_n,
        lse_n,
        grad_logp_n,
        entropy_n,
        grad_entropy_n,
        chunk_size,
    )


class _LogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits_nv,
        targets_n,
        temperature,
        tp_group,
        vocab_start,
        with_entropy,
        backend,
        validate,
        chunk_size,
        block_size,
    ):
        logp_n, entropy_n, max_n, lse_n = forward_rows(
            logits_nv,
            targets_n,
            temperature,
            tp_group,
            vocab_start,
            with_entropy,
            backend,
            validate,
            chunk_size,
            block_size,
        )
        ctx.save_for_backward(logits_nv, targets_n, max_n, lse_n, entropy_n)
        ctx.args = (vocab_start, temperature, backend, chunk_size, block_size)
        ctx.set_materialize_grads(False)
        return logp_n, entropy_n

    @staticmethod
    def backward(ctx, grad_logp_n, grad_entropy_n):
        logits_nv, targets_n, max_n, lse_n, entropy_n = ctx.saved_tensors
        vocab_start, temperature, backend, chunk_size, block_size = ctx.args
        if entropy_n is None:
            grad_entropy_n = None
        grad_nv = backward_rows(
            logits_nv,
            targets_n,
            vocab_start,
            temperature,
            max_n,
            lse_n,
            grad_logp_n,
            entropy_n,
            grad_entropy_n,
            backend,
            chunk_size,
            block_size,
        )
        return grad_nv, *([None] * 9)


def as_rows(logits: torch.Tensor, targets: torch.Tensor):
    """``[..., V] -> [N, V]`` with unit column stride (a view when possible), ``[...] -> [N]``."""
    logits_nv = logits.reshape(-1, logits.shape[-1])
    if logits_nv.stride(-1) != 1:
        logits_nv = logits_nv.contiguous()
    return logits_nv, targets.reshape(-1).contiguous()


def logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group=None,
    return_entropy: bool = False,
    vocab_start_index: int | None = None,
    *,
    backend: str | None = None,
    validate: bool = True,
    chunk_size: int | None = None,
    block_size: int | None = None,
):
    """Log-prob of ``targets`` under ``softmax(logits / temperature)`` -> ``logp`` (, ``entropy``).

    Args:
        logits: ``[..., V_local]``; the full vocab, or this rank's shard when ``tp_group`` is set.
        targets: ``[...]`` integer ids in the full vocabulary.
        temperature: divides the logits (> 0), as the sampler did.
        tp_group: tensor-parallel process group whose ranks hold the vocab shards, or None.
        return_entropy: also return the entropy of the scaled distribution (differentiable).
        vocab_start_index: first vocab id of this shard; None means ``rank * V_local`` in
            ``tp_group`` (megatron's equal partition), 0 without a group.
        backend: "triton", "torch" (chunked reference) or None (Triton on CUDA, torch otherwise).
        validate: check that every target id is in the vocabulary (one host sync).
        chunk_size: vocab columns per chunk of the torch backend (None: about 4M elements/chunk).
        block_size: vocab columns per Triton block (power of two; None: up to 4096).
    """
    backend = resolve_backend(backend, logits)
    check_logprob_inputs(logits, targets, temperature, backend)
    logits_nv, targets_n = as_rows(logits, targets)
    vocab_start = (
        default_vocab_start(logits_nv.shape[1], tp_group)
        if vocab_start_index is None
        else int(vocab_start_index)
    )
    logp_n, entropy_n = _LogprobsFunction.apply(
        logits_nv,
        targets_n,
        float(temperature),
        tp_group,
        vocab_start,
        bool(return_entropy),
        backend,
        bool(validate),
        chunk_size,
        block_size,
    )
    logp = logp_n.reshape(targets.shape)
    if return_entropy:
        return logp, entropy_n.reshape(targets.shape)
    return logp
