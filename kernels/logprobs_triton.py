"""Triton kernels: per-row log-prob (and entropy) of a target id, forward and backward.

One program per row on the first grid axis; a row's offset is computed in 64 bits
(``row.to(int64) * stride``) so that ``N x V > 2^31`` logits are addressed correctly. The forward
reads the row once, block by block, keeping an online max and per-lane sums in fp32 (see
:mod:`vocab_parallel` for the statistics); the backward recomputes ``p_j`` from the saved row max
and log-sum-exp with the same fp32 arithmetic and writes ``grad_logits`` in the logits' dtype.

Imported lazily (see :mod:`backend`): ``TRITON_INTERPRET`` must be decided before this import.
Shapes: ``_n`` rows, ``_v`` local vocab columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .vocab_parallel import NUM_STATS

MAX_BLOCK = 4096


@triton.jit
def row_softmax_stats(
    row_ptr,
    n_cols,
    temperature,
    BLOCK: tl.constexpr,
    SCALE: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    """Raw max ``M``, ``S = sum exp((z-M)/T)`` and ``W = sum exp(u) u`` of one row, in fp32."""
    offs = tl.arange(0, BLOCK)
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    s_b = tl.zeros([BLOCK], dtype=tl.float32)
    w_b = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        z = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        safe_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        shift = tl.where(m == float("-inf"), 0.0, m - safe_new)
        u = z - safe_new
        if SCALE:
            u = u / temperature
            shift = shift / temperature
        e = tl.exp(u)
        alpha = tl.exp(shift)
        if WITH_ENTROPY:
            w_b = alpha * (w_b + shift * s_b) + tl.where(e > 0.0, e * u, 0.0)
        s_b = alpha * s_b + e
        m = m_new
    return m, tl.sum(s_b, axis=0), tl.sum(w_b, axis=0)


@triton.jit
def cast_for_store(x, OUT_DTYPE: tl.constexpr, ROUND_BF16_BY_BITS: tl.constexpr):
    """fp32 -> the output dtype, rounding to nearest even.

    GPUs round fp32 -> bf16 to nearest even in hardware; the Triton interpreter truncates instead
    (triton 3.9 ``_convert_float``), so under the interpreter the rounding is done on the bits.
    """
    if ROUND_BF16_BY_BITS:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(OUT_DTYPE)


@triton.jit
def finalize_row(m, s, w, z_target, owner, temperature, SCALE: tl.constexpr):
    """``(logp, entropy, log S)`` of a row from its statistics (conventions: vocab_parallel)."""
    live = s > 0.0
    log_s = tl.where(live, tl.log(tl.where(live, s, 1.0)), float("-inf"))
    d = z_target - tl.where(live, m, 0.0)
    if SCALE:
        d = d / temperature
    logp = tl.where(live, d - log_s, float("-inf"))
    logp = tl.where(owner, logp, float("nan"))
    entropy = tl.where(live, log_s - w / tl.where(live, s, 1.0), 0.0)
    return logp, entropy, log_s


@triton.jit
def load_target(row_ptr, targets_ptr, row, vocab_start, n_cols):
    """This shard's column of the row's target, whether it owns it, and its raw logit (0 if not)."""
    tgt = tl.load(targets_ptr + row).to(tl.int64) - vocab_start
    owner = (tgt >= 0) & (tgt < n_cols)
    z_target = tl.load(row_ptr + tl.where(owner, tgt, 0), mask=owner, other=0.0).to(tl.float32)
    return tgt, owner, z_target


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    vocab_start,
    n_cols,
    temperature,
    logp_ptr,
    entropy_ptr,
    max_ptr,
    lse_ptr,
    stats_ptr,
    BLOCK: tl.constexpr,
    SCALE: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    FINALIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    m, s, w = row_softmax_stats(row_ptr, n_cols, temperature, BLOCK, SCALE, WITH_ENTROPY)
    tgt, owner, z_target = load_target(row_ptr, targets_ptr, row, vocab_start, n_cols)
    if FINALIZE:
        logp, entropy, log_s = finalize_row(m, s, w, z_target, owner, temperature, SCALE)
        tl.store(logp_ptr + row, logp)
        tl.store(max_ptr + row, m)
        tl.store(lse_ptr + row, log_s)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, entropy)
    else:  # statistics for the vocab-parallel merge, layout of vocab_parallel
        base = stats_ptr + row * 5
        tl.store(base + 0, m)
        tl.store(base + 1, s)
        tl.store(base + 2, w)
        tl.store(base + 3, z_target)
        tl.store(base + 4, owner.to(tl.float32))


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    vocab_start,
    n_cols,
    temperature,
    max_ptr,
    lse_ptr,
    grad_logp_ptr,
    entropy_ptr,
    grad_entropy_ptr,
    grad_ptr,
    grad_stride_row,
    BLOCK: tl.constexpr,
    SCALE: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    ROUND_BF16_BY_BITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_ptr + row * grad_stride_row
    log_s = tl.load(lse_ptr + row)
    dead = log_s == float("-inf")
    safe_m = tl.where(dead, 0.0, tl.load(max_ptr + row))
    safe_ls = tl.where(dead, 0.0, log_s)
    g = 0.0
    if HAS_GRAD_LOGP:
        g = tl.where(dead, 0.0, tl.load(grad_logp_ptr + row))
    gh = 0.0
    h = 0.0
    if HAS_GRAD_ENTROPY:
        gh = tl.where(dead, 0.0, tl.load(grad_entropy_ptr + row))
        h = tl.where(dead, 0.0, tl.load(entropy_ptr + row))
    tgt = tl.load(targets_ptr + row).to(tl.int64) - vocab_start
    offs = tl.arange(0, BLOCK)
    if (g == 0.0) & (gh == 0.0):  # masked tokens of the fused loss, dead rows: skip the read
        zero = cast_for_store(
            tl.zeros([BLOCK], dtype=tl.float32), grad_ptr.dtype.element_ty, ROUND_BF16_BY_BITS
        )
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            tl.store(grad_row_ptr + cols, zero, mask=cols < n_cols)
    else:
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            in_row = cols < n_cols
            z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
            u = z - safe_m
            if SCALE:
                u = u / temperature
            logq = u - safe_ls
            p = tl.exp(logq)
            gz = tl.where(cols == tgt, g, 0.0) - g * p
            if HAS_GRAD_ENTROPY:
                gz -= gh * tl.where(p > 0.0, p * (logq + h), 0.0)
            if SCALE:
                gz = gz / temperature
            tl.store(
                grad_row_ptr + cols,
                cast_for_store(gz, grad_ptr.dtype.element_ty, ROUND_BF16_BY_BITS),
                mask=in_row,
            )


def round_bf16_by_bits(out: torch.Tensor) -> bool:
    """Whether stores into ``out`` need the interpreter's bf16 rounding fix (see cast_for_store)."""
    return out.dtype == torch.bfloat16 and not out.is_cuda


def launch_config(n_cols: int, block_size: int | None) -> tuple[int, int]:
    """``(BLOCK, num_warps)``: a power of two covering the row up to ``MAX_BLOCK`` columns."""
    block = block_size or min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK)
    if block & (block - 1):
        raise ValueError(f"block_size must be a power of two, got {block}")
    return block, (8 if block >= 4096 else 4)


def logprobs_forward(
    logits_nv: torch.Tensor,
    targets_n: torch.Tensor,
    vocab_start: int,
    temperature: float,
    with_entropy: bool,
    finalize: bool,
    block_size: int | None = None,
):
    """``finalize``: ``(logp_n, entropy_n | None, max_n, lse_n)``; else ``[N, 5]`` statistics."""
    n_rows, n_cols = logits_nv.shape
    assert logits_nv.stride(1) == 1, "logits must be contiguous along the vocab"
    block, warps = launch_config(n_cols, block_size)
    f32 = dict(dtype=torch.float32, device=logits_nv.device)
    logp_n = torch.empty(n_rows, **f32) if finalize else None
    entropy_n = torch.empty(n_rows, **f32) if finalize and with_entropy else None
    max_n = torch.empty(n_rows, **f32) if finalize else None
    lse_n = torch.empty(n_rows, **f32) if finalize else None
    stats_n5 = None if finalize else torch.empty((n_rows, NUM_STATS), **f32)
    if n_rows > 0:
        _logprobs_fwd_kernel[(n_rows,)](
            logits_nv,
            logits_nv.stride(0),
            targets_n,
            vocab_start,
            n_cols,
            float(temperature),
            logp_n,
            entropy_n,
            max_n,
            lse_n,
            stats_n5,
            BLOCK=block,
            SCALE=temperature != 1.0,
            WITH_ENTROPY=with_entropy,
            FINALIZE=finalize,
            num_warps=warps,
        )
    if finalize:
        return logp_n, entropy_n, max_n, lse_n
    return stats_n5


def logprobs_backward(
    logits_nv: torch.Tensor,
    targets_n: torch.Tensor,
    vocab_start: int,
    temperature: float,
    max_n: torch.Tensor,
    lse_n: torch.Tensor,
    grad_logp_n: torch.Tensor | None,
    entropy_n: torch.Tensor | None = None,
    grad_entropy_n: torch.Tensor | None = None,
    block_size: int | None = None,
    grad_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``grad_logits`` in the logits' dtype (into ``grad_out`` when given, any row stride)."""
    n_rows, n_cols = logits_nv.shape
    block, warps = launch_config(n_cols, block_size)
    grad_nv = (
        torch.empty_like(logits_nv, memory_format=torch.contiguous_format)
        if grad_out is None
        else grad_out
    )
    assert grad_nv.shape == logits_nv.shape and grad_nv.stride(1) == 1
    f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
    if n_rows > 0:
        _logprobs_bwd_kernel[(n_rows,)](
            logits_nv,
            logits_nv.stride(0),
            targets_n,
            vocab_start,
            n_cols,
            float(temperature),
            f32(max_n),
            f32(lse_n),
            f32(grad_logp_n),
            f32(entropy_n),
            f32(grad_entropy_n),
            grad_nv,
            grad_nv.stride(0),
            BLOCK=block,
            SCALE=temperature != 1.0,
            HAS_GRAD_LOGP=grad_logp_n is not None,
            HAS_GRAD_ENTROPY=grad_entropy_n is not None,
            ROUND_BF16_BY_BITS=round_bf16_by_bits(grad_nv),
            num_warps=warps,
        )
    return grad_nv
