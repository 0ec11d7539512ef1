"""The GRPO clipped-KL per-token loss, with TRL's semantics, and its clip/KL metrics.

    out = grpo_loss(logp, old_logp, ref_logp, advantages, mask,
                    epsilon_low=0.2, epsilon_high=0.28, beta=0.04)
    out.loss         # per-token loss, zero on masked tokens, differentiable w.r.t. logp
    out.clip_region  # fraction of clipped tokens, from the same pass

Per token (TRL ``GRPOTrainer._compute_loss``; ``A`` the advantage):

    logw    = logp - old_logp                        (importance_sampling_level="token")
            = masked mean over the sequence of (logp - old_logp)          ("sequence", GSPO)
            = logp - sg(logp) + sg(sequence mean)                   ("sequence_token", GSPO-token)
    ratio   = exp(logw);  coef1 = min(ratio, delta) if delta else ratio
    coef2   = clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss    = -min(coef1 * A, coef2 * A) * tis + beta * (exp(ref - logp) - (ref - logp) - 1)
    tis     = min(exp(old_logp - sampler_logp), tis_cap)           (only with sampler_logp)

Metrics as TRL logs them: ``clip_low`` = share of tokens with ``coef1 < 1 - epsilon_low`` and
``A < 0``, ``clip_high`` = ``coef1 > 1 + epsilon_high`` and ``A > 0``, ``clip_region`` = either,
over masked-in tokens (over sequences at the sequence levels, like TRL); ``kl_mean`` = masked
mean of the k3 KL (None without ``ref_logp``). Loss-type aggregation (grpo, bnpo, dr_grpo,
dapo) is not here: it belongs to the library, which sums ``loss`` as it sees fit.

Shapes: ``_n`` flattened tokens, ``_s`` sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference
from .backend import resolve_backend, triton_module
from .loss_spec import GRPOLossSpec


@dataclass
class GRPOLossOutput:
    """Per-token loss and the metrics computed in the same pass (metrics are detached 0-dim)."""

    loss: torch.Tensor
    """Per-token loss, shape of ``logp``, fp32 (fp64 for fp64 on the torch backend), zero on
    masked tokens; its backward gives d loss / d logp (in logp's dtype)."""
    clip_low: torch.Tensor
    clip_high: torch.Tensor
    clip_region: torch.Tensor
    kl_mean: torch.Tensor | None
    """Masked mean of the k3 KL; None without ``ref_logp``."""
    logp: torch.Tensor | None = None
    """Fused path only: the log-probs (detached)."""
    entropy: torch.Tensor | None = None
    """Fused path only, on request: the entropies (detached)."""


@dataclass
class LossInputs:
    """Flattened, validated loss inputs (``valid_n`` bool; ``seq_n`` only at sequence levels)."""

    old_n: torch.Tensor | None
    ref_n: torch.Tensor | None
    adv_n: torch.Tensor
    valid_n: torch.Tensor
    sampler_n: torch.Tensor | None
    seq_n: torch.Tensor | None
    num_sequences: int


def _same_shape(name: str, x, shape, device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name}: expected a tensor of shape {tuple(shape)}, got {type(x).__name__}"
        )
    if tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"{name}: expected shape {tuple(shape)} (the log-probs' shape), got {tuple(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"{name}: expected device {device}, got {x.device}")


def _float_input(name, x, shape, device, dtype):
    if x is None:
        return None
    _same_shape(name, x, shape, device)
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    return x.detach().reshape(-1).to(dtype).contiguous()


def _advantages(advantages, shape, device, dtype):
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages: expected a tensor, got {type(advantages).__name__}")
    adv = advantages
    if adv.dim() < len(shape):  # TRL's advantages [B] for log-probs [B, T]
        adv = adv.reshape(tuple(adv.shape) + (1,) * (len(shape) - adv.dim()))
    try:
        adv = torch.broadcast_to(adv, shape)
    except RuntimeError:
        raise ValueError(
            f"advantages: shape {tuple(advantages.shape)} does not broadcast to the "
            f"log-probs' shape {tuple(shape)} (expected {tuple(shape)} or "
            f"{tuple(shape[:1])})"
        ) from None
    return _float_input("advantages", adv, shape, device, dtype)


def _sequence_ids(seq_ids, num_sequences, shape, device, level):
    if level == "token":
        return None, 0
    if seq_ids is None:
        if len(shape) != 2:
            raise ValueError(
                f"seq_ids: importance_sampling_level={level!r} needs seq_ids for "
                f"log-probs of shape {tuple(shape)} (only [B, T] rows are sequences "
                f"by default)"
            )
        seq_ids = torch.arange(shape[0], device=device)[:, None].expand(shape)
        num_sequences = shape[0] if num_sequences is None else num_sequences
    _same_shape("seq_ids", seq_ids, shape, device)
    if seq_ids.dtype.is_floating_point or seq_ids.dtype == torch.bool:
        raise TypeError(f"seq_ids: expected an integer tensor, got {seq_ids.dtype}")
    seq_n = seq_ids.reshape(-1).long().contiguous()
    if num_sequences is None:
        num_sequences = int(seq_n.max()) + 1 if seq_n.numel() else 0
    if seq_n.numel() and (int(seq_n.min()) < 0 or int(seq_n.max()) >= num_sequences):
        raise ValueError(
            f"seq_ids: expected ids in [0, {num_sequences}), got "
            f"[{int(seq_n.min())}, {int(seq_n.max())}]"
        )
    return seq_n, int(num_sequences)


def prepare_loss_inputs(
    shape,
    device,
    old_logp,
    ref_logp,
    advantages,
    mask,
    sampler_logp,
    seq_ids,
    num_sequences,
    spec: GRPOLossSpec,
    dtype,
) -> LossInputs:
    """Validates the loss inputs against the log-probs' ``shape``; flattens them to ``[N]``."""
    shape = torch.Size(shape)
    if spec.beta != 0.0 and ref_logp is None:
        raise ValueError(f"ref_logp: required when beta != 0 (beta={spec.beta})")
    if mask is None:
        valid_n = torch.ones(shape.numel(), dtype=torch.bool, device=device)
    else:
        _same_shape("mask", mask, shape, device)
        valid_n = (mask.detach() != 0).reshape(-1).contiguous()
    seq_n, n_seq = _sequence_ids(
        seq_ids, num_sequences, shape, device, spec.importance_sampling_level
    )
    return LossInputs(
        old_n=_float_input("old_logp", old_logp, shape, device, dtype),
        ref_n=_float_input("ref_logp", ref_logp, shape, device, dtype),
        adv_n=_advantages(advantages, shape, device, dtype),
        valid_n=valid_n,
        sampler_n=_float_input("sampler_logp", sampler_logp, shape, device, dtype),
        seq_n=seq_n,
        num_sequences=n_seq,
    )


def metrics_from_partials(partial_p5: torch.Tensor, inputs: LossInputs, spec: GRPOLossSpec):
    """``(clip_low, clip_high, clip_region, kl_mean)`` from the kernel's per-program sums."""
    sums_5 = partial_p5.sum(dim=0)
    n_valid = sums_5[4].clamp(min=1.0)
    if spec.importance_sampling_level == "token":
        denom = n_valid
    else:
        denom = torch.tensor(float(max(inputs.num_sequences, 1)), device=sums_5.device)
    kl_mean = None if inputs.ref_n is None else sums_5[3] / n_valid
    return sums_5[0] / denom, sums_5[1] / denom, sums_5[2] / denom, kl_mean


def sequence_weights(lp_n, inputs: LossInputs):
    """GSPO's ``(logw_s, count_s)`` from sanitised log-probs (fp32, no gradient)."""
    zeros_n = torch.zeros_like(lp_n)
    lp_n = torch.where(inputs.valid_n, lp_n, zeros_n)
    old_n = lp_n if inputs.old_n is None else torch.where(inputs.valid_n, inputs.old_n, zeros_n)
    return reference.sequence_log_weights(
        lp_n - old_n, inputs.valid_n, inputs.seq_n, inputs.num_sequences
    )


class _GRPOLossFunction(torch.autograd.Function):
    """Triton forward; backward ``d loss / d logp`` from the saved per-token derivatives."""

    @staticmethod
    def forward(ctx, logp_n, inputs: LossInputs, spec: GRPOLossSpec):
        lp_n = logp_n.detach().float().contiguous()
        seq_logw_s = seq_count_s = None
        if inputs.seq_n is not None:
            seq_logw_s, seq_count_s = sequence_weights(lp_n, inputs)
        loss_n, dlogw_n, dkl_n, partial_p5 = triton_module("grpo_loss_triton").grpo_loss_forward(
            lp_n,
            inputs.old_n,
            inputs.ref_n,
            inputs.adv_n,
            inputs.valid_n.to(torch.uint8),
            inputs.sampler_n,
            inputs.seq_n,
            seq_logw_s,
            seq_count_s,
            spec,
        )
        ctx.save_for_backward(dlogw_n, dkl_n, seq_count_s)
        ctx.inputs, ctx.spec, ctx.logp_dtype = inputs, spec, logp_n.dtype
        metrics = metrics_from_partials(partial_p5, inputs, spec)
        ctx.mark_non_differentiable(*[m for m in metrics if m is not None])
        return loss_n, *metrics

    @staticmethod
    def backward(ctx, grad_loss_n, *_):
        dlogw_n, dkl_n, seq_count_s = ctx.saved_tensors
        inputs, spec = ctx.inputs, ctx.spec
        grad_loss_n = grad_loss_n.float()
        if spec.importance_sampling_level == "sequence":
            # d logw_s / d logp_u = valid_u / count_s: gather the sequence's sum back to tokens.
            per_seq_s = torch.zeros_like(seq_count_s).index_add(
                0, inputs.seq_n, grad_loss_n * dlogw_n
            )
            scale_n = inputs.valid_n.float() / seq_count_s.clamp(min=1.0)[inputs.seq_n]
            grad_n = per_seq_s[inputs.seq_n] * scale_n
        else:
            grad_n = grad_loss_n * dlogw_n
        if dkl_n is not None:
            grad_n = grad_n + grad_loss_n * dkl_n
        return grad_n.to(ctx.logp_dtype), None, None


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    sampler_logp: torch.Tensor | None = None,
    tis_cap: float | None = None,
    importance_sampling_level: str = "token",
    seq_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    backend: str | None = None,
) -> GRPOLossOutput:
    """GRPO per-token loss and metrics (see the module docstring for the formulas).

    Args:
        logp: ``[...]`` log-probs of the policy being trained (the only input differentiated).
        old_logp: ``[...]`` log-probs of the policy that generated the data; None means on-policy
            (``logp.detach()``, as TRL does).
        ref_logp: ``[...]`` reference-policy log-probs, or None (then ``beta`` must be 0).
        advantages: ``[...]``, or ``[B]`` for ``[B, T]`` log-probs (one per sequence).
        mask: ``[...]``, non-zero = token takes part; None = all tokens.
        epsilon_low, epsilon_high, delta, beta, tis_cap, importance_sampling_level: see
            :class:`GRPOLossSpec`.
        sampler_logp: ``[...]`` the rollout engine's log-probs, for the truncated importance
            weight; None for no weight.
        seq_ids: ``[...]`` sequence index of each token (sequence levels; defaults to the row
            for ``[B, T]`` inputs). num_sequences: number of sequences (default max id + 1).
        backend: "triton", "torch" (reference, autograd) or None (Triton on CUDA).
    """
    spec = GRPOLossSpec(epsilon_low, epsilon_high, delta, beta, tis_cap, importance_sampling_level)
    if not isinstance(logp, torch.Tensor) or not logp.dtype.is_floating_point:
        raise TypeError(
            f"logp: expected a floating-point tensor, got "
            f"{getattr(logp, 'dtype', type(logp).__name__)}"
        )
    backend = resolve_backend(backend, logp)
    dtype = torch.float64 if backend == "torch" and logp.dtype == torch.float64 else torch.float32
    inputs = prepare_loss_inputs(
        logp.shape,
        logp.device,
        old_logp,
        ref_logp,
        advantages,
        mask,
        sampler_logp,
        seq_ids,
        num_sequences,
        spec,
        dtype,
    )
    logp_n = logp.reshape(-1)
    if backend == "triton":
        loss_n, *metrics = _GRPOLossFunction.apply(logp_n, inputs, spec)
    else:
        loss_n, metrics = reference.grpo_loss_reference(
            logp_n.to(dtype),
            inputs.old_n,
            inputs.ref_n,
            inputs.adv_n,
            inputs.valid_n,
            spec,
            inputs.sampler_n,
            inputs.seq_n,
            inputs.num_sequences,
        )
    return GRPOLossOutput(loss_n.reshape(logp.shape), *metrics)
