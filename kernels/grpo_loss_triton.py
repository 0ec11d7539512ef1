"""Triton kernel: the GRPO per-token loss, its derivative and its clip/KL metric sums, one pass.

Elementwise over tokens (``BLOCK`` tokens per program, 64-bit offsets). Per token it writes the
loss (zero on masked tokens), ``d loss / d logw`` (the policy part, through the importance
weight ``logw``) and ``beta * d KL / d logp``; per program it writes five partial sums
(clipped-low, clipped-high, clipped-region, KL, valid count) so that the metrics come from the
same pass. Semantics: :func:`reference.grpo_loss_reference` (TRL's ``_compute_loss``).

Imported lazily (see :mod:`backend`). Shapes: ``_n`` tokens, ``_s`` sequences, ``_p`` programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_TOKENS = 1024
NUM_PARTIALS = 5  # clipped low, clipped high, clipped region, KL, valid tokens


@triton.jit
def token_loss(
    logw,
    lp,
    ref,
    adv,
    tis,
    eps_low,
    eps_high,
    delta,
    beta,
    HAS_DELTA: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_BETA: tl.constexpr,
):
    """Loss of one token and its pieces: ``(loss, dloss_dlogw, beta_dkl_dlogp, low, high, kl)``.

    ``ratio = exp(logw)``; ``coef1`` is the ratio capped at ``delta``, ``coef2`` the ratio clipped
    to ``[1-eps_low, 1+eps_high]``; ``loss = -min(coef1*A, coef2*A) * tis + beta * k3``. Where
    ``coef1*A == coef2*A`` the derivative is the mean of both branches (torch.min's convention).
    """
    ratio = tl.exp(logw)
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    coef2 = tl.minimum(tl.maximum(ratio, lo), hi)
    dcoef2 = tl.where((ratio >= lo) & (ratio <= hi), ratio, 0.0)
    coef1 = ratio
    dcoef1 = ratio
    if HAS_DELTA:
        coef1 = tl.minimum(ratio, delta)
        dcoef1 = tl.where(ratio <= delta, ratio, 0.0)
    l1 = coef1 * adv
    l2 = coef2 * adv
    dmin = tl.where(l1 < l2, dcoef1, tl.where(l1 > l2, dcoef2, 0.5 * (dcoef1 + dcoef2)))
    loss = -tl.minimum(l1, l2) * tis
    dlogw = -adv * dmin * tis
    kl = tl.zeros_like(ratio)
    dkl = tl.zeros_like(ratio)
    if HAS_REF:
        diff = ref - lp
        ediff = tl.exp(diff)
        kl = ediff - diff - 1.0
        if HAS_BETA:
            loss += beta * kl
            dkl = beta * (1.0 - ediff)
    low = (coef1 < lo) & (adv < 0.0)
    high = (coef1 > hi) & (adv > 0.0)
    return loss, dlogw, dkl, low, high, kl


@triton.jit
def tis_weight(old, sampler, valid, tis_cap, HAS_SAMPLER: tl.constexpr, HAS_CAP: tl.constexpr):
    """Truncated importance weight ``min(exp(old - sampler), cap)``; 1 without a sampler."""
    w = tl.full(old.shape, 1.0, tl.float32)
    if HAS_SAMPLER:
        w = tl.exp(old - tl.where(valid, sampler, 0.0))
        if HAS_CAP:
            w = tl.minimum(w, tis_cap)
    return w


@triton.jit
def _grpo_loss_fwd_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    valid_ptr,
    sampler_ptr,
    seq_ptr,
    seq_logw_ptr,
    seq_count_ptr,
    loss_ptr,
    dlogw_ptr,
    dkl_ptr,
    partial_ptr,
    n_tokens,
    eps_low,
    eps_high,
    delta,
    beta,
    tis_cap,
    BLOCK: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_SAMPLER: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_CAP: tl.constexpr,
    IS_SEQ: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n_tokens
    valid = tl.load(valid_ptr + offs, mask=in_range, other=0) != 0
    lp = tl.where(valid, tl.load(logp_ptr + offs, mask=in_range, other=0.0), 0.0)
    old = lp
    if HAS_OLD:
        old = tl.where(valid, tl.load(old_ptr + offs, mask=in_range, other=0.0), 0.0)
    adv = tl.where(valid, tl.load(adv_ptr + offs, mask=in_range, other=0.0), 0.0)
    ref = lp
    if HAS_REF:
        ref = tl.where(valid, tl.load(ref_ptr + offs, mask=in_range, other=0.0), 0.0)
    sampler = old
    if HAS_SAMPLER:
        sampler = tl.load(sampler_ptr + offs, mask=in_range, other=0.0)
    if IS_SEQ:
        seq = tl.load(seq_ptr + offs, mask=in_range, other=0)
        logw = tl.load(seq_logw_ptr + seq, mask=in_range, other=0.0)
        count = tl.load(seq_count_ptr + seq, mask=in_range, other=1.0)
        metric_w = tl.where(valid, 1.0 / tl.maximum(count, 1.0), 0.0)
    else:
        logw = lp - old
        metric_w = valid.to(tl.float32)
    tis = tis_weight(old, sampler, valid, tis_cap, HAS_SAMPLER, HAS_CAP)
    loss, dlogw, dkl, low, high, kl = token_loss(
        logw, lp, ref, adv, tis, eps_low, eps_high, delta, beta, HAS_DELTA, HAS_REF, HAS_BETA
    )
    tl.store(loss_ptr + offs, tl.where(valid, loss, 0.0), mask=in_range)
    tl.store(dlogw_ptr + offs, tl.where(valid, dlogw, 0.0), mask=in_range)
    if HAS_BETA:
        tl.store(dkl_ptr + offs, tl.where(valid, dkl, 0.0), mask=in_range)
    base = partial_ptr + pid.to(tl.int64) * 5
    tl.store(base + 0, tl.sum(tl.where(low, metric_w, 0.0), axis=0))
    tl.store(base + 1, tl.sum(tl.where(high, metric_w, 0.0), axis=0))
    tl.store(base + 2, tl.sum(tl.where(low | high, metric_w, 0.0), axis=0))
    tl.store(base + 3, tl.sum(tl.where(valid, kl, 0.0), axis=0))
    tl.store(base + 4, tl.sum(valid.to(tl.float32), axis=0))


def grpo_loss_forward(
    logp_n, old_n, ref_n, adv_n, valid_n, sampler_n, seq_n, seq_logw_s, seq_count_s, spec
):
    """``(loss_n, dloss_dlogw_n, beta_dkl_dlogp_n | None, partial_p5)``; inputs fp32 contiguous,
    ``valid_n`` uint8, ``seq_n`` int64 (sequence levels only)."""
    n_tokens = logp_n.numel()
    n_programs = triton.cdiv(max(n_tokens, 1), BLOCK_TOKENS)
    loss_n = torch.empty_like(logp_n)
    dlogw_n = torch.empty_like(logp_n)
    has_beta = ref_n is not None and spec.beta != 0.0
    dkl_n = torch.empty_like(logp_n) if has_beta else None
    partial_p5 = torch.zeros((n_programs, NUM_PARTIALS), dtype=torch.float32, device=logp_n.device)
    if n_tokens > 0:
        _grpo_loss_fwd_kernel[(n_programs,)](
            logp_n,
            old_n,
            ref_n,
            adv_n,
            valid_n,
            sampler_n,
            seq_n,
            seq_logw_s,
            seq_count_s,
            loss_n,
            dlogw_n,
            dkl_n,
            partial_p5,
            n_tokens,
            float(spec.epsilon_low),
            float(spec.epsilon_high),
            float(spec.delta if spec.delta is not None else 0.0),
            float(spec.beta),
            float(spec.tis_cap if spec.tis_cap is not None else 0.0),
            BLOCK=BLOCK_TOKENS,
            HAS_OLD=old_n is not None,
            HAS_REF=ref_n is not None,
            HAS_BETA=has_beta,
            HAS_SAMPLER=sampler_n is not None,
            HAS_DELTA=spec.delta is not None,
            HAS_CAP=spec.tis_cap is not None,
            IS_SEQ=seq_n is not None,
        )
    return loss_n, dlogw_n, dkl_n, partial_p5
