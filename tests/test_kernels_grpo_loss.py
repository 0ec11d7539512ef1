"""GRPO per-token loss: TRL semantics, hand-computed values, Triton vs fp64 reference, gradcheck.

``trl_loss`` below restates TRL's ``GRPOTrainer._compute_loss`` (per-token loss before
aggregation, on [B, T] tensors with advantages [B]) in the plainest torch, including its
sequence-level (GSPO) and GSPO-token variants and its clip/KL metrics; both backends must agree
with it.
"""

import math

import pytest
import torch
from _kernel_backends import (  # before triton is imported: its interpreter without CUDA
    BACKENDS,
    only_without_triton_here,
    run_triton_cases_in_fresh_process,
)
from megagrpo_kernels import GRPOLossSpec
from megagrpo_kernels import grpo_loss as kernel_grpo_loss
from megagrpo_kernels.testing import check_error_rule, max_error

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

LEVELS = ["token", "sequence", "sequence_token"]
OPTIONS = {
    "plain": dict(epsilon_low=0.2, epsilon_high=0.2),
    "all": dict(epsilon_low=0.2, epsilon_high=0.28, delta=1.3, beta=0.04, tis_cap=1.5),
}


def grpo_loss(logp, old, ref, adv, mask=None, *, sampler_logp=None, tis_cap=None, **kw):
    """``kernel_grpo_loss`` with the spec's knobs as keywords and the truncated sampler weight
    ``min(exp(old - sampler), tis_cap)`` (TRL's token_truncate) as ``is_weight``."""
    spec_kw = {k: kw.pop(k) for k in list(kw) if k in GRPOLossSpec.__dataclass_fields__}
    is_weight = None
    if sampler_logp is not None:
        base = logp.detach() if old is None else old
        is_weight = torch.exp(torch.nan_to_num(base - sampler_logp, nan=0.0))
        if tis_cap is not None:
            is_weight = torch.clamp(is_weight, max=tis_cap)
    return kernel_grpo_loss(
        logp, old, ref, adv, mask, spec=GRPOLossSpec(**spec_kw), is_weight=is_weight, **kw
    )


def trl_loss(
    lp, old, ref, adv_b, mask, level, epsilon_low, epsilon_high, delta=None, beta=0.0, is_ratio=None
):
    """TRL's per-token loss times the mask, and its metrics (clip low/high/region, kl)."""
    adv = adv_b.unsqueeze(1)
    mask = mask.to(lp.dtype)
    log_ratio = lp - old
    seq_mean = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    if level == "token":
        log_w = log_ratio
    elif level == "sequence":
        log_w = seq_mean
    else:
        log_w = lp - lp.detach() + seq_mean.detach()
    coef_1 = torch.exp(log_w)
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if is_ratio is not None:
        per_token_loss = per_token_loss * is_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * kl

    def global_masked_mean(x):
        if x.shape[1] == 1:
            return x.sum() / max(x.shape[0], 1)
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    low = ((coef_1 < 1 - epsilon_low) & (adv < 0)).to(lp.dtype)
    high = ((coef_1 > 1 + epsilon_high) & (adv > 0)).to(lp.dtype)
    region = torch.maximum(low, high)
    metrics = [global_masked_mean(m) for m in (low, high, region)] + [global_masked_mean(kl)]
    metrics = [m.detach() for m in metrics]
    return per_token_loss * mask, metrics


def make_batch(seed, batch=5, length=9, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    lp = rnd(batch, length) * 0.5 - 2.0
    old = lp + rnd(batch, length) * 0.25
    ref = lp + rnd(batch, length) * 0.2
    sampler = old + rnd(batch, length) * 0.3
    adv = rnd(batch)
    mask = torch.rand(batch, length, generator=gen) > 0.25
    mask[:, 0] = True
    mask[-1] = False  # a sequence with no valid token
    return lp, old, ref, sampler, adv, mask


def run_ours(backend, lp, old, ref, sampler, adv, mask, level, opts, weight, dtype):
    x = lp.to(dtype).clone().requires_grad_()
    out = grpo_loss(
        x,
        old.to(dtype),
        ref.to(dtype),
        adv.to(dtype),
        mask,
        sampler_logp=sampler.to(dtype) if "tis_cap" in opts else None,
        importance_sampling_level=level,
        backend=backend,
        **opts,
    )
    (out.loss * weight.to(dtype)).sum().backward()
    return out, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("options", list(OPTIONS))
def test_matches_trl_semantics(backend, level, options):
    opts = OPTIONS[options]
    lp, old, ref, sampler, adv, mask = make_batch(seed=LEVELS.index(level))
    weight = torch.randn(lp.shape, generator=torch.Generator().manual_seed(9), dtype=lp.dtype)
    is_ratio = None
    if "tis_cap" in opts:
        is_ratio = torch.clamp(torch.exp(old - sampler), max=opts["tis_cap"])
    x64 = lp.clone().requires_grad_()
    trl_opts = {k: v for k, v in opts.items() if k != "tis_cap"}
    ref_loss, ref_metrics = trl_loss(x64, old, ref, adv, mask, level, is_ratio=is_ratio, **trl_opts)
    (ref_loss * weight).sum().backward()
    if backend == "torch":  # the reference itself, in fp64: agreement to rounding
        out, grad = run_ours(
            backend, lp, old, ref, sampler, adv, mask, level, opts, weight, torch.float64
        )
        assert max_error(out.loss, ref_loss) < 1e-12
        assert max_error(grad, x64.grad) < 1e-12
    else:  # Triton computes in fp32: the 2x rule against the fp32 reference
        out, grad = run_ours(
            backend, lp, old, ref, sampler, adv, mask, level, opts, weight, torch.float32
        )
        base, base_grad = run_ours(
            "torch", lp, old, ref, sampler, adv, mask, level, opts, weight, torch.float32
        )
        check_error_rule("loss", out.loss, base.loss, ref_loss, 1e-6)
        check_error_rule("grad_logp", grad, base_grad, x64.grad, 1e-6)
    got = [out.clip_low, out.clip_high, out.clip_region]
    for name, a, b in zip(["clip_low", "clip_high", "clip_region"], got, ref_metrics):
        assert abs(float(a) - float(b)) < 1e-6, (name, float(a), float(b))
    if opts.get("beta"):
        assert abs(float(out.kl_mean) - float(ref_metrics[3])) < 1e-6
    assert out.loss.shape == lp.shape and (out.loss[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_values(backend):
    """One token per situation, values worked out by hand (epsilon 0.2, A = +-1)."""
    ln = math.log
    old = torch.zeros(6)
    lp = torch.tensor([ln(1.5), ln(1.5), ln(1.5), ln(0.5), ln(1.1), ln(1.1)])
    adv = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, 1.0])
    ref = lp.clone()
    ref[5] = lp[5] + ln(2.0)  # k3 = 2 - ln 2 - 1
    sampler = old.clone()
    sampler[4] = -ln(4.0)  # importance weight 4, capped at 3

    def one(i, **kw):
        x = lp[i : i + 1].clone().requires_grad_()
        out = grpo_loss(
            x,
            old[i : i + 1],
            ref[i : i + 1],
            adv[i : i + 1],
            backend=backend,
            epsilon_low=0.2,
            epsilon_high=0.2,
            **kw,
        )
        out.loss.sum().backward()
        return float(out.loss.detach()), float(x.grad), out

    # ratio 1.5, A=+1: clipped at 1.2, no gradient; counted as clipped high.
    loss, grad, out = one(0)
    assert loss == pytest.approx(-1.2) and grad == 0.0 and float(out.clip_high) == 1.0
    # ratio 1.5, A=-1: unclipped branch is the min: loss 1.5, d/dlogp = -A * ratio = 1.5.
    loss, grad, out = one(1)
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5)
    assert float(out.clip_region) == 0.0
    # same with delta=1.4: the ratio is capped, loss 1.4, no gradient.
    loss, grad, _ = one(2, delta=1.4)
    assert loss == pytest.approx(1.4) and grad == 0.0
    # ratio 0.5, A=-1: clipped at 0.8, loss 0.8, no gradient, clipped low.
    loss, grad, out = one(3)
    assert loss == pytest.approx(0.8) and grad == 0.0 and float(out.clip_low) == 1.0
    # ratio 1.1 inside the range, TIS weight min(4, 3) = 3: loss -3.3, gradient -3.3.
    x = lp[4:5].clone().requires_grad_()
    out = grpo_loss(
        x, old[4:5], None, adv[4:5], sampler_logp=sampler[4:5], tis_cap=3.0, backend=backend
    )
    out.loss.sum().backward()
    assert float(out.loss.detach()) == pytest.approx(-3.3, rel=1e-6)
    assert float(x.grad) == pytest.approx(-3.3, rel=1e-6) and out.kl_mean is None
    # KL: ref - logp = ln 2, k3 = 1 - ln 2, d k3 / d logp = 1 - 2 = -1 (times beta).
    loss, grad, out = one(5, beta=0.5)
    assert loss == pytest.approx(-1.1 + 0.5 * (1 - ln(2.0)), rel=1e-6)
    assert grad == pytest.approx(-1.1 - 0.5, rel=1e-6)
    assert float(out.kl_mean) == pytest.approx(1 - ln(2.0), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
def test_masked_garbage_cannot_leak(backend, level):
    """Masked tokens holding -inf/NaN change neither the loss nor the gradient of other tokens."""
    lp, old, ref, sampler, adv, mask = make_batch(seed=5, dtype=torch.float32)
    adv_bt = adv[:, None].expand_as(lp).clone()
    clean = grpo_loss(
        lp.clone().requires_grad_(),
        old,
        ref,
        adv_bt,
        mask,
        beta=0.1,
        sampler_logp=sampler,
        tis_cap=2.0,
        importance_sampling_level=level,
        backend=backend,
    )
    dirty_lp = torch.where(mask, lp, -torch.inf).requires_grad_()
    nan = torch.full_like(lp, torch.nan)
    out = grpo_loss(
        dirty_lp,
        torch.where(mask, old, nan),
        torch.where(mask, ref, nan),
        torch.where(mask, adv_bt, nan),
        mask,
        beta=0.1,
        sampler_logp=torch.where(mask, sampler, nan),
        tis_cap=2.0,
        importance_sampling_level=level,
        backend=backend,
    )
    out.loss.sum().backward()
    assert torch.equal(out.loss, clean.loss.detach())
    assert torch.isfinite(dirty_lp.grad).all() and (dirty_lp.grad[~mask] == 0).all()
    for a, b in [(out.clip_region, clean.clip_region), (out.kl_mean, clean.kl_mean)]:
        assert float(a) == pytest.approx(float(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_with_seq_ids(backend):
    """1-D packed tokens with seq_ids give the same as the [B, T] layout."""
    lp, old, ref, _, adv, mask = make_batch(seed=7, dtype=torch.float32)
    seq = torch.arange(lp.shape[0])[:, None].expand_as(lp)
    keep = mask.clone()
    keep[-1, :] = True  # keep the empty sequence's tokens in the packed layout (masked)
    kw = dict(beta=0.1, importance_sampling_level="sequence", backend=backend)
    a = grpo_loss(lp, old, ref, adv, mask, **kw)
    adv_bt = adv[:, None].expand_as(lp)
    b = grpo_loss(
        lp[keep],
        old[keep],
        ref[keep],
        adv_bt[keep],
        mask[keep],
        seq_ids=seq[keep],
        num_sequences=lp.shape[0],
        **kw,
    )
    assert max_error(b.loss, a.loss[keep]) < 1e-6
    assert float(a.clip_region) == pytest.approx(float(b.clip_region))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gradcheck_reference(level):
    """Finite differences of the reference (fp64). Not "sequence_token": GSPO-token's stop-gradient
    makes its gradient differ from the derivative of its value on purpose (checked against TRL
    in test_matches_trl_semantics instead)."""
    lp, old, ref, sampler, adv, mask = make_batch(seed=11, batch=3, length=5)
    x = lp.clone().requires_grad_()

    def fn(v):
        return grpo_loss(
            v,
            old,
            ref,
            adv,
            mask,
            epsilon_low=0.2,
            epsilon_high=0.28,
            delta=1.3,
            beta=0.04,
            sampler_logp=sampler,
            tis_cap=1.5,
            importance_sampling_level=level,
            backend="torch",
        ).loss

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_bad_input_is_named():
    lp = torch.randn(2, 4)
    adv = torch.randn(2)
    with pytest.raises(ValueError, match=r"old_logp: expected shape \(2, 4\)"):
        grpo_loss(lp, torch.randn(2, 3), None, adv)
    with pytest.raises(ValueError, match="ref_logp: required when beta != 0"):
        grpo_loss(lp, None, None, adv, beta=0.1)
    with pytest.raises(ValueError, match="advantages: shape \\(3,\\) does not broadcast"):
        grpo_loss(lp, None, None, torch.randn(3))
    with pytest.raises(ValueError, match="mask: expected shape"):
        grpo_loss(lp, None, None, adv, torch.ones(4))
    with pytest.raises(ValueError, match="epsilon_low: expected a number in \\[0, 1\\)"):
        grpo_loss(lp, None, None, adv, epsilon_low=1.5)
    with pytest.raises(ValueError, match="importance_sampling_level: expected one of"):
        grpo_loss(lp, None, None, adv, importance_sampling_level="seq")
    with pytest.raises(ValueError, match="seq_ids: importance_sampling_level='sequence' needs"):
        grpo_loss(lp.reshape(-1), None, None, adv.repeat(4), importance_sampling_level="sequence")
    with pytest.raises(ValueError, match=r"seq_ids: expected ids in \[0, 2\)"):
        grpo_loss(
            lp,
            None,
            None,
            adv,
            importance_sampling_level="sequence",
            seq_ids=torch.full((2, 4), 2),
            num_sequences=2,
        )
    with pytest.raises(TypeError, match="sampler_logp: expected a floating-point tensor"):
        kernel_grpo_loss(lp, None, None, adv, sampler_logp=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="is_weight: expected weights >= 0"):
        kernel_grpo_loss(lp, None, None, adv, is_weight=-torch.ones(2, 4))
    with pytest.raises(ValueError, match="entropy: required when top_entropy_quantile < 1"):
        kernel_grpo_loss(lp, None, None, adv, spec=GRPOLossSpec(top_entropy_quantile=0.2))
    with pytest.raises(TypeError, match="spec: expected a GRPOLossSpec"):
        kernel_grpo_loss(lp, None, None, adv, spec=dict(beta=0.1))
    with pytest.raises(ValueError, match="objective: expected one of"):
        GRPOLossSpec(objective="ppo")
    with pytest.raises(ValueError, match="top_entropy_quantile: expected a number in"):
        GRPOLossSpec(top_entropy_quantile=1.5)
    with pytest.raises(ValueError, match="seq_ids: objective='vespo' needs seq_ids"):
        vespo = GRPOLossSpec(objective="vespo")
        kernel_grpo_loss(lp.reshape(-1), None, None, adv.repeat(4), spec=vespo)
    with pytest.raises(TypeError, match="logp: expected a floating-point tensor"):
        grpo_loss(torch.zeros(2, 4, dtype=torch.long), None, None, adv)


@only_without_triton_here
def test_triton_cases_in_fresh_process():
    """Run this file's Triton cases in a fresh interpreter-mode process (see _kernel_backends)."""
    run_triton_cases_in_fresh_process(__file__)
