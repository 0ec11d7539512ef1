"""Triton kernel: logits straight to the GRPO per-token loss (token level, unsharded vocab).

One program per row: the row's softmax statistics (read once, :mod:`logprobs_triton`), the
target's log-prob, then the per-token loss of :mod:`grpo_loss_triton` and its derivative
``coef = d loss / d logp``. The backward is the log-prob backward kernel fed with
``grad_loss * coef``, so a training step holds no ``N x V`` fp32 tensor: only the logits, their
gradient (logits' dtype) and a handful of ``[N]`` vectors.

Imported lazily (see :mod:`backend`). Shapes: ``_n`` rows/tokens, ``_v`` vocab.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grpo_loss_triton import NUM_PARTIALS, spec_args, token_loss
from .logprobs_triton import finalize_row, launch_config, load_target, row_softmax_stats


@triton.jit
def _fused_fwd_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    n_cols,
    temperature,
    old_ptr,
    ref_ptr,
    adv_ptr,
    valid_ptr,
    weight_ptr,
    loss_ptr,
    logp_ptr,
    entropy_ptr,
    max_ptr,
    lse_ptr,
    coef_ptr,
    partial_ptr,
    eps_low,
    eps_high,
    delta,
    beta,
    tau_pos,
    tau_neg,
    BLOCK: tl.constexpr,
    SCALE: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    OBJECTIVE: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    BIAS_KL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    m, s, w = row_softmax_stats(row_ptr, n_cols, temperature, BLOCK, SCALE, WITH_ENTROPY)
    tgt, owner, z_target = load_target(row_ptr, targets_ptr, row, 0, n_cols)
    logp, entropy, log_s = finalize_row(m, s, w, z_target, owner, temperature, SCALE)
    tl.store(logp_ptr + row, logp)
    tl.store(max_ptr + row, m)
    tl.store(lse_ptr + row, log_s)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, entropy)

    valid = tl.load(valid_ptr + row) != 0
    lp = tl.where(valid, logp, 0.0)
    old = lp
    if HAS_OLD:
        old = tl.where(valid, tl.load(old_ptr + row), 0.0)
    adv = tl.where(valid, tl.load(adv_ptr + row), 0.0)
    ref = lp
    if HAS_REF:
        ref = tl.where(valid, tl.load(ref_ptr + row), 0.0)
    weight = lp * 0.0 + 1.0
    if HAS_WEIGHT:
        weight = tl.where(valid, tl.load(weight_ptr + row), 0.0)
    loss, dlogw, dlogp, low, high, kl = token_loss(
        lp - old,
        lp,
        ref,
        adv,
        weight,
        eps_low,
        eps_high,
        delta,
        beta,
        tau_pos,
        tau_neg,
        OBJECTIVE,
        HAS_DELTA,
        HAS_REF,
        HAS_BETA,
        BIAS_KL,
    )
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(coef_ptr + row, tl.where(valid, dlogw + dlogp, 0.0))
    valid_f = valid.to(tl.float32)
    base = partial_ptr + row * 5
    tl.store(base + 0, tl.where(low, valid_f, 0.0))
    tl.store(base + 1, tl.where(high, valid_f, 0.0))
    tl.store(base + 2, tl.where(low | high, valid_f, 0.0))
    tl.store(base + 3, tl.where(valid, kl, 0.0))
    tl.store(base + 4, valid_f)


def fused_forward(
    logits_nv: torch.Tensor,
    targets_n: torch.Tensor,
    inputs,
    spec,
    with_entropy: bool,
    block_size: int | None = None,
):
    """``(loss_n, logp_n, entropy_n | None, max_n, lse_n, coef_n, partial_n5)``; the policy
    weight is ``inputs.is_n`` (a fusable spec has no other)."""
    n_rows, n_cols = logits_nv.shape
    assert logits_nv.stride(1) == 1, "logits must be contiguous along the vocab"
    block, warps = launch_config(n_cols, block_size)
    f32 = dict(dtype=torch.float32, device=logits_nv.device)
    loss_n, logp_n, max_n, lse_n, coef_n = (torch.empty(n_rows, **f32) for _ in range(5))
    entropy_n = torch.empty(n_rows, **f32) if with_entropy else None
    partial_n5 = torch.zeros((n_rows, NUM_PARTIALS), **f32)
    if n_rows > 0:
        _fused_fwd_kernel[(n_rows,)](
            logits_nv,
            logits_nv.stride(0),
            targets_n,
            n_cols,
            float(spec.temperature),
            inputs.old_n,
            inputs.ref_n,
            inputs.adv_n,
            inputs.valid_n.to(torch.uint8),
            inputs.is_n,
            loss_n,
            logp_n,
            entropy_n,
            max_n,
            lse_n,
            coef_n,
            partial_n5,
            BLOCK=block,
            SCALE=spec.temperature != 1.0,
            WITH_ENTROPY=with_entropy,
            HAS_OLD=inputs.old_n is not None,
            HAS_REF=inputs.ref_n is not None,
            HAS_BETA=inputs.ref_n is not None and spec.beta != 0.0,
            HAS_WEIGHT=inputs.is_n is not None,
            num_warps=warps,
            **spec_args(spec),
        )
    return loss_n, logp_n, entropy_n, max_n, lse_n, coef_n, partial_n5
