"""Logits straight to the GRPO loss: fp64 reference comparison, forward and backward.

Grid: backend x {bf16, fp32} x V in {1, 7, 1000, 4099} x temperature {1, 0.7} x {mask, no mask},
with delta, beta and the truncated sampler importance weight switched on. The fp64 reference is
log_softmax + gather in fp64 followed by the GRPO reference loss in fp64; the baseline for the
2x rule is the same computation in the logits' dtype.
"""

import dataclasses

import pytest
import torch
from _kernel_backends import (  # before triton is imported: its interpreter without CUDA
    BACKENDS,
    only_without_triton_here,
    run_triton_cases_in_fresh_process,
)
from megagrpo_kernels import GRPOLossSpec, grpo_loss, logprob_grpo_loss, logprobs
from megagrpo_kernels.reference import logprobs_eager
from megagrpo_kernels.testing import check_error_rule, fp32_ulp, max_error, special_logits  # noqa: E501

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

N_ROWS = 16
SPEC = GRPOLossSpec(epsilon_low=0.2, epsilon_high=0.28, delta=1.5, beta=0.04)
TIS_CAP = 2.0  # the sampler weight min(exp(old - sampler), 2): TRL's token_truncate


def make_case(vocab, dtype, masked, seed, temperature):
    """Special logits; rows 1 (all -inf) and 3 (target logit -inf) are masked out, or replaced by
    ordinary rows when there is no mask (their loss is not finite)."""
    case = special_logits(N_ROWS, vocab, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    logits_nv = case.logits_nv.clone()
    if masked:
        mask_n = torch.rand(N_ROWS, generator=gen) > 0.3
        mask_n[[0, 2]] = True
        mask_n[[1, 3]] = False
    else:
        mask_n = None
        logits_nv[[1, 3]] = (torch.randn(2, vocab, generator=gen) * 3).to(dtype)
    lp64 = logprobs_eager(logits_nv.double(), case.targets_n, temperature)
    lp64 = lp64.nan_to_num(nan=0.0, neginf=0.0)
    old_n = (lp64 + 0.3 * torch.randn(N_ROWS, generator=gen, dtype=torch.float64)).float()
    ref_n = (lp64 + 0.2 * torch.randn(N_ROWS, generator=gen, dtype=torch.float64)).float()
    sampler_n = old_n + 0.3 * torch.randn(N_ROWS, generator=gen)
    is_n = torch.clamp(torch.exp(old_n - sampler_n), max=TIS_CAP)  # the sampler weight
    adv_n = torch.randn(N_ROWS, generator=gen)
    weight_n = torch.randn(N_ROWS, generator=gen)
    return logits_nv, case.targets_n, old_n, ref_n, is_n, adv_n, mask_n, weight_n


def composed(logits_nv, targets_n, old_n, ref_n, is_n, adv_n, mask_n, weight_n, temperature):
    """log_softmax + gather in the logits' dtype, then the reference loss (fp64 for fp64)."""
    x = logits_nv.clone().requires_grad_()
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    logp_n = logprobs_eager(x, targets_n, temperature).to(dtype)
    logp_n.retain_grad()
    out = grpo_loss(
        logp_n,
        old_n.to(dtype),
        ref_n.to(dtype),
        adv_n.to(dtype),
        mask_n,
        spec=SPEC,
        is_weight=is_n.to(dtype),
        backend="torch",
    )
    out.loss.retain_grad()
    (out.loss * weight_n.to(dtype)).sum().backward()
    out.dloss_dlogp = logp_n.grad / out.loss.grad  # token level: d loss_i / d logp_i
    out.logp = logp_n.detach()
    return out, x.grad


def dloss_dlogp(logp_n, old_n, ref_n, is_n, adv_n, mask_n):
    """The fp64 reference's ``d loss_i / d logp_i`` at the given log-probs."""
    x = logp_n.clone().requires_grad_()
    out = grpo_loss(
        x,
        old_n.double(),
        ref_n.double(),
        adv_n.double(),
        mask_n,
        spec=SPEC,
        is_weight=is_n.double(),
        backend="torch",
    )
    out.loss.sum().backward()
    return x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4099])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_fused_loss_matches_fp64_reference(backend, dtype, vocab, temperature, masked):
    logits_nv, targets_n, old_n, ref_n, is_n, adv_n, mask_n, weight_n = make_case(
        vocab, dtype, masked, seed=vocab + int(masked), temperature=temperature
    )
    x = logits_nv.clone().requires_grad_()
    out = logprob_grpo_loss(
        x,
        targets_n,
        old_n,
        ref_n,
        adv_n,
        mask_n,
        spec=dataclasses.replace(SPEC, temperature=temperature),
        is_weight=is_n,
        return_entropy=True,
        backend=backend,
    )
    (out.loss * weight_n).sum().backward()
    ref64, grad64 = composed(
        logits_nv.double(), targets_n, old_n, ref_n, is_n, adv_n, mask_n, weight_n, temperature
    )
    base, grad_base = composed(
        logits_nv, targets_n, old_n, ref_n, is_n, adv_n, mask_n, weight_n, temperature
    )
    keep_n = torch.ones(N_ROWS, dtype=torch.bool) if mask_n is None else mask_n
    assert x.grad.dtype == dtype
    # fp32 rounding of a log-prob (up to ~1e-3 at the +-1e4 row) propagated into the loss
    lp_slack = fp32_ulp(ref64.logp).nan_to_num(nan=0.0, posinf=0.0)
    loss_slack = (ref64.dloss_dlogp.abs() * lp_slack).nan_to_num(nan=0.0) + fp32_ulp(ref64.loss)
    check_error_rule("loss", out.loss, base.loss, ref64.loss, 1e-6, slack=loss_slack)
    # the gradient is coef_i * (onehot - p) / T with coef_i = d loss_i / d logp_i: it inherits
    # coef's change under a one-ulp change of the fp32 log-prob
    coef_rel_n = torch.zeros(N_ROWS, dtype=torch.float64)
    for sign in (1.0, -1.0):
        coef_n = dloss_dlogp(ref64.logp + sign * lp_slack, old_n, ref_n, is_n, adv_n, mask_n)
        coef_rel_n = torch.maximum(
            coef_rel_n,
            ((coef_n - ref64.dloss_dlogp).abs() / ref64.dloss_dlogp.abs()).nan_to_num(nan=0.0),
        )
    grad_slack = grad64.abs() * coef_rel_n[:, None] + fp32_ulp(grad64) * (dtype == torch.float32)
    check_error_rule(
        "grad_logits", x.grad, grad_base, grad64, 1e-6, keep_n, slack=grad_slack.nan_to_num(nan=0.0)
    )
    if mask_n is not None:  # masked rows: zero gradient (the Triton backward does not read them)
        assert (x.grad[~mask_n] == 0).all() and (out.loss[~mask_n] == 0).all()
    for name in ("clip_low", "clip_high", "clip_region"):
        assert float(getattr(out, name)) == pytest.approx(float(getattr(ref64, name))), name
    # d k3 / d logp = 1 - exp(ref - logp): the KL inherits the log-probs' fp32 rounding too
    dkl_dlogp = (1 - torch.exp(ref_n.double() - ref64.logp)).abs()
    kl_slack = (dkl_dlogp * lp_slack)[keep_n].sum() / keep_n.sum()
    check_error_rule(
        "kl_mean",
        out.kl_mean,
        base.kl_mean,
        ref64.kl_mean,
        1e-6,
        slack=kl_slack.nan_to_num(nan=0.0).reshape(()),
    )
    logp_ref, ent_ref = logprobs(
        logits_nv, targets_n, temperature, return_entropy=True, backend="torch"
    )
    assert max_error(out.logp, logp_ref, keep_n) < 1e-5 * (1 + float(logp_ref[keep_n].abs().max()))
    assert max_error(out.entropy, ent_ref, keep_n) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_sequence_levels_through_logits(backend, level):
    """GSPO levels (chained kernels) on [B, T, V] logits vs the reference chain in fp64."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 6, 40, generator=gen)
    targets = torch.randint(0, 40, (3, 6), generator=gen)
    old = logprobs_eager(logits.double(), targets).float() + 0.2 * torch.randn(3, 6, generator=gen)
    adv = torch.randn(3, generator=gen)
    mask = torch.rand(3, 6, generator=gen) > 0.2
    x = logits.clone().requires_grad_()
    out = logprob_grpo_loss(
        x,
        targets,
        old,
        None,
        adv,
        mask,
        spec=GRPOLossSpec(temperature=0.7, importance_sampling_level=level),
        backend=backend,
    )
    out.loss.sum().backward()
    x64 = logits.double().requires_grad_()
    ref = grpo_loss(
        logprobs_eager(x64, targets, 0.7),
        old.double(),
        None,
        adv.double(),
        mask,
        spec=GRPOLossSpec(importance_sampling_level=level),
        backend="torch",
    )
    ref.loss.sum().backward()
    assert max_error(out.loss, ref.loss) < 1e-5
    assert max_error(x.grad, x64.grad) < 1e-5
    assert float(out.clip_region) == pytest.approx(float(ref.clip_region))


@only_without_triton_here
def test_triton_cases_in_fresh_process():
    """Run this file's Triton cases in a fresh interpreter-mode process (see _kernel_backends)."""
    run_triton_cases_in_fresh_process(__file__)
