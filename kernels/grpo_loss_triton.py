"""Triton kernel: the GRPO per-token loss, its derivatives and its clip/KL metric sums, one pass.

Elementwise over tokens (``BLOCK`` tokens per program, 64-bit offsets). Per token it writes the
loss (zero on masked tokens), ``d loss / d logw`` (the part through the importance ratio) and
``d loss / d logp`` (the direct part: CISPO's and VESPO's ``logp`` factor and the KL); per
program it writes five partial sums (clipped-low, clipped-high, clipped-region, KL, valid count)
so that the metrics come from the same pass. Semantics: :func:`reference.grpo_loss_reference`
(TRL's ``_compute_loss``); the objectives are numbered as :data:`OBJECTIVE_IDS`.

Imported lazily (see :mod:`backend`). Shapes: ``_n`` tokens, ``_s`` sequences, ``_p`` programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .loss_spec import OBJECTIVES

BLOCK_TOKENS = 1024
NUM_PARTIALS = 5  # clipped low, clipped high, clipped region, KL, valid tokens
OBJECTIVE_IDS = {name: i for i, name in enumerate(OBJECTIVES)}  # clip 0, cispo 1, sapo 2, vespo 3


@triton.jit
def token_loss(
    logw,
    lp,
    ref,
    adv,
    w,
    eps_low,
    eps_high,
    delta,
    beta,
    tau_pos,
    tau_neg,
    OBJECTIVE: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_BETA: tl.constexpr,
    BIAS_KL: tl.constexpr,
):
    """Loss of one token and its pieces: ``(loss, dloss_dlogw, dloss_dlogp, low, high, kl)``.

    ``r = exp(logw)``, ``w`` the constant policy weight. clip: ``-min(r' A, clamp(r) A) w``
    (where both branches are equal the derivative is their mean, torch.min's convention);
    cispo: ``-sg(min(r, eps_high)) A logp w``; sapo: ``-sigmoid(tau (r-1)) 4/tau A w``; vespo:
    ``-A logp w``. Then ``+ beta * k3`` (times ``r`` with ``BIAS_KL``).
    """
    ratio = tl.exp(logw)
    zero = tl.zeros_like(ratio)
    low = zero != 0.0
    high = zero != 0.0
    dlogp = zero
    if OBJECTIVE == 0:  # clip
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
        loss = -tl.minimum(l1, l2) * w
        dlogw = -adv * dmin * w
        low = (coef1 < lo) & (adv < 0.0)
        high = (coef1 > hi) & (adv > 0.0)
    elif OBJECTIVE == 1:  # cispo
        capped = tl.minimum(ratio, eps_high)
        loss = -capped * adv * lp * w
        dlogw = zero
        dlogp = -capped * adv * w
        high = (ratio > eps_high) & (adv > 0.0)
    elif OBJECTIVE == 2:  # sapo
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)
        s = tl.sigmoid(tau * (ratio - 1.0))
        loss = -s * 4.0 / tau * adv * w
        dlogw = -4.0 * s * (1.0 - s) * ratio * adv * w
    else:  # vespo: phi is the weight
        loss = -adv * lp * w
        dlogw = zero
        dlogp = -adv * w
    kl = zero
    if HAS_REF:
        diff = ref - lp
        ediff = tl.exp(diff)
        kl = ediff - diff - 1.0
        dkl = 1.0 - ediff
        if BIAS_KL:
            dkl = dkl * ratio
            if HAS_BETA:
                dlogw += beta * kl * ratio
            kl = kl * ratio
        if HAS_BETA:
            loss += beta * kl
            dlogp += beta * dkl
    return loss, dlogw, dlogp, low, high, kl


@triton.jit
def _grpo_loss_fwd_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    valid_ptr,
    weight_ptr,
    seq_ptr,
    seq_logw_ptr,
    seq_count_ptr,
    loss_ptr,
    dlogw_ptr,
    dlogp_ptr,
    partial_ptr,
    n_tokens,
    eps_low,
    eps_high,
    delta,
    beta,
    tau_pos,
    tau_neg,
    BLOCK: tl.constexpr,
    OBJECTIVE: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    BIAS_KL: tl.constexpr,
    LEVEL: tl.constexpr,
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
    w = tl.full(lp.shape, 1.0, tl.float32)
    if HAS_WEIGHT:
        w = tl.where(valid, tl.load(weight_ptr + offs, mask=in_range, other=0.0), 0.0)
    if LEVEL == 0:  # token
        logw = lp - old
        metric_w = valid.to(tl.float32)
    else:  # sequence (1) / sequence_token (2): the sequence's log weight, per token
        seq = tl.load(seq_ptr + offs, mask=in_range, other=0)
        logw = tl.load(seq_logw_ptr + seq, mask=in_range, other=0.0)
        count = tl.load(seq_count_ptr + seq, mask=in_range, other=1.0)
        metric_w = tl.where(valid, 1.0 / tl.maximum(count, 1.0), 0.0)
    loss, dlogw, dlogp, low, high, kl = token_loss(
        logw,
        lp,
        ref,
        adv,
        w,
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
    tl.store(loss_ptr + offs, tl.where(valid, loss, 0.0), mask=in_range)
    tl.store(dlogw_ptr + offs, tl.where(valid, dlogw, 0.0), mask=in_range)
    tl.store(dlogp_ptr + offs, tl.where(valid, dlogp, 0.0), mask=in_range)
    base = partial_ptr + pid.to(tl.int64) * 5
    tl.store(base + 0, tl.sum(tl.where(low, metric_w, 0.0), axis=0))
    tl.store(base + 1, tl.sum(tl.where(high, metric_w, 0.0), axis=0))
    tl.store(base + 2, tl.sum(tl.where(low | high, metric_w, 0.0), axis=0))
    tl.store(base + 3, tl.sum(tl.where(valid, kl, 0.0), axis=0))
    tl.store(base + 4, tl.sum(valid.to(tl.float32), axis=0))


def spec_args(spec) -> dict:
    """The spec's scalars and switches as the kernels take them (shared with the fused kernel)."""
    return dict(
        eps_low=float(spec.epsilon_low),
        eps_high=float(spec.epsilon_high),
        delta=float(spec.delta if spec.delta is not None else 0.0),
        beta=float(spec.beta),
        tau_pos=float(spec.sapo_temperature_pos),
        tau_neg=float(spec.sapo_temperature_neg),
        OBJECTIVE=OBJECTIVE_IDS[spec.objective],
        HAS_DELTA=spec.delta is not None,
        BIAS_KL=bool(spec.kl_bias_correction),
    )


def grpo_loss_forward(logp_n, inputs, weight_n, seq_logw_s, seq_count_s, spec):
    """``(loss_n, dloss_dlogw_n, dloss_dlogp_n, partial_p5)``; ``inputs`` a
    :class:`grpo_loss.LossInputs` (fp32 contiguous), ``weight_n`` fp32 or None."""
    n_tokens = logp_n.numel()
    n_programs = triton.cdiv(max(n_tokens, 1), BLOCK_TOKENS)
    loss_n = torch.empty_like(logp_n)
    dlogw_n = torch.empty_like(logp_n)
    dlogp_n = torch.empty_like(logp_n)
    partial_p5 = torch.zeros((n_programs, NUM_PARTIALS), dtype=torch.float32, device=logp_n.device)
    level = ("token", "sequence", "sequence_token").index(spec.importance_sampling_level)
    if n_tokens > 0:
        _grpo_loss_fwd_kernel[(n_programs,)](
            logp_n,
            inputs.old_n,
            inputs.ref_n,
            inputs.adv_n,
            inputs.valid_n.to(torch.uint8),
            None if weight_n is None else weight_n.float().contiguous(),
            inputs.seq_n if level else None,
            seq_logw_s,
            seq_count_s,
            loss_n,
            dlogw_n,
            dlogp_n,
            partial_p5,
            n_tokens,
            BLOCK=BLOCK_TOKENS,
            HAS_OLD=inputs.old_n is not None,
            HAS_REF=inputs.ref_n is not None,
            HAS_BETA=inputs.ref_n is not None and spec.beta != 0.0,
            HAS_WEIGHT=weight_n is not None,
            LEVEL=level,
            **spec_args(spec),
        )
    return loss_n, dlogw_n, dlogp_n, partial_p5
