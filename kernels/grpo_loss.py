"""The GRPO per-token loss, with TRL's semantics, and its clip / KL metrics.

    spec = GRPOLossSpec(epsilon_low=0.2, epsilon_high=0.28, beta=0.04)
    out = grpo_loss(logp, old_logp, ref_logp, advantages, mask, spec=spec)
    out.loss         # per-token loss, zero on masked tokens, differentiable w.r.t. logp
    out.clip_region  # fraction of clipped tokens, from the same pass

Per token (TRL ``GRPOTrainer._compute_loss``; ``A`` the advantage):

    logw    = logp - old_logp                        (importance_sampling_level="token")
            = masked mean over the sequence of (logp - old_logp)          ("sequence", GSPO)
            = logp - sg(logp) + sg(sequence mean)                   ("sequence_token", GSPO-token)
    r       = exp(logw)
    loss    = policy(r, logp, A) * w + beta * k3 [* r]

``policy`` is the spec's objective (clip / cispo / sapo / vespo, see
:class:`loss_spec.GRPOLossSpec`); ``w`` the constant policy weight of
:func:`policy_weights.policy_weight`: the sampler importance weight ``is_weight`` (computed by
the caller in TRL's four modes), the off-policy mask and the top-entropy mask, or VESPO's
``phi``. ``k3 = exp(ref - logp) - (ref - logp) - 1``, times ``r`` with ``kl_bias_correction``.

Metrics as TRL logs them: ``clip_low`` = share of tokens with ``coef1 < 1 - epsilon_low`` and
``A < 0``, ``clip_high`` = ``coef1 > 1 + epsilon_high`` and ``A > 0`` (cispo: ``r >
epsilon_high`` and ``A > 0``; sapo and vespo: none, zeros), ``clip_region`` = either, over
masked-in tokens (over sequences at the sequence levels, like TRL); ``kl_mean`` = masked mean of
the (corrected) k3 (None without ``ref_logp``); ``phi_mean`` = VESPO's mean ``phi`` over
sequences. Loss-type aggregation (grpo, bnpo, dr_grpo, dapo, luspo, ...) is not here: it belongs
to the library, which sums ``loss`` as it sees fit.

Shapes: ``_n`` flattened tokens, ``_s`` sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference
from .backend import resolve_backend, triton_module
from .loss_spec import GRPOLossSpec
from .policy_weights import policy_weight, sequence_sums


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
    """Masked mean of the k3 KL (times the ratio with ``kl_bias_correction``); None without
    ``ref_logp``."""
    phi_mean: torch.Tensor | None = None
    """VESPO only: the mean of ``phi`` over sequences."""
    entropy_mask: torch.Tensor | None = None
    """``top_entropy_quantile < 1`` only: the tokens that took part in the policy term (bool)."""
    logp: torch.Tensor | None = None
    """Logits-side wrapper only: the log-probs (detached)."""
    entropy: torch.Tensor | None = None
    """Logits-side wrapper only, on request: the entropies (detached unless asked otherwise)."""


@dataclass
class LossInputs:
    """Flattened, validated loss inputs (``valid_n`` bool; ``seq_n`` only when the spec
    ``needs_sequences``)."""

    old_n: torch.Tensor | None
    ref_n: torch.Tensor | None
    adv_n: torch.Tensor
    valid_n: torch.Tensor
    is_n: torch.Tensor | None
    """The sampler importance weight (already truncated / masked by the caller)."""
    sampler_n: torch.Tensor | None
    """The sampler's log-probs (the off-policy mask's behaviour policy)."""
    entropy_n: torch.Tensor | None
    """The tokens' entropies (the top-entropy mask)."""
    seq_n: torch.Tensor | None
    num_sequences: int


def _sequence_reason(spec: GRPOLossSpec) -> str:
    if spec.importance_sampling_level != "token":
        return f"importance_sampling_level={spec.importance_sampling_level!r}"
    if spec.objective == "vespo":
        return "objective='vespo'"
    return "off_policy_mask_threshold"


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


def _sequence_ids(seq_ids, num_sequences, shape, device, spec: GRPOLossSpec):
    if not spec.needs_sequences:
        return None, 0
    if seq_ids is None:
        if len(shape) != 2:
            raise ValueError(
                f"seq_ids: {_sequence_reason(spec)} needs seq_ids for log-probs of shape "
                f"{tuple(shape)} (only [B, T] rows are sequences by default)"
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
    spec: GRPOLossSpec,
    dtype,
    *,
    old_logp,
    ref_logp,
    advantages,
    mask,
    is_weight=None,
    sampler_logp=None,
    entropy=None,
    seq_ids=None,
    num_sequences=None,
) -> LossInputs:
    """Validates the loss inputs against the log-probs' ``shape``; flattens them to ``[N]``."""
    if not isinstance(spec, GRPOLossSpec):
        raise TypeError(f"spec: expected a GRPOLossSpec, got {type(spec).__name__}")
    shape = torch.Size(shape)
    if spec.beta != 0.0 and ref_logp is None:
        raise ValueError(f"ref_logp: required when beta != 0 (beta={spec.beta})")
    if spec.needs_entropy and entropy is None:
        raise ValueError(
            f"entropy: required when top_entropy_quantile < 1 "
            f"(top_entropy_quantile={spec.top_entropy_quantile})"
        )
    if mask is None:
        valid_n = torch.ones(shape.numel(), dtype=torch.bool, device=device)
    else:
        _same_shape("mask", mask, shape, device)
        valid_n = (mask.detach() != 0).reshape(-1).contiguous()
    seq_n, n_seq = _sequence_ids(seq_ids, num_sequences, shape, device, spec)
    is_n = _float_input("is_weight", is_weight, shape, device, dtype)
    if is_n is not None and bool((is_n[valid_n] < 0).any()):
        raise ValueError("is_weight: expected weights >= 0")
    return LossInputs(
        old_n=_float_input("old_logp", old_logp, shape, device, dtype),
        ref_n=_float_input("ref_logp", ref_logp, shape, device, dtype),
        adv_n=_advantages(advantages, shape, device, dtype),
        valid_n=valid_n,
        is_n=is_n,
        sampler_n=_float_input("sampler_logp", sampler_logp, shape, device, dtype),
        entropy_n=_float_input("entropy", entropy, shape, device, dtype)
        if spec.needs_entropy
        else None,
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


def phi_mean(phi_n, inputs: LossInputs):
    """VESPO's ``phi`` averaged over sequences (TRL's metric ``vespo/phi_seq_mean``)."""
    if phi_n is None:
        return None
    valid_f = inputs.valid_n.to(phi_n.dtype)
    count_s = sequence_sums(valid_f, inputs.seq_n, inputs.num_sequences)
    per_token_n = phi_n * valid_f / count_s.clamp(min=1.0)[inputs.seq_n]
    return per_token_n.sum() / max(inputs.num_sequences, 1)


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
    def forward(ctx, logp_n, inputs: LossInputs, spec: GRPOLossSpec, weight_n):
        lp_n = logp_n.detach().float().contiguous()
        seq_logw_s = seq_count_s = None
        if spec.importance_sampling_level != "token":
            seq_logw_s, seq_count_s = sequence_weights(lp_n, inputs)
        loss_n, dlogw_n, dlogp_n, partial_p5 = triton_module("grpo_loss_triton").grpo_loss_forward(
            lp_n, inputs, weight_n, seq_logw_s, seq_count_s, spec
        )
        ctx.save_for_backward(dlogw_n, dlogp_n, seq_count_s)
        ctx.inputs, ctx.spec, ctx.logp_dtype = inputs, spec, logp_n.dtype
        metrics = metrics_from_partials(partial_p5, inputs, spec)
        ctx.mark_non_differentiable(*[m for m in metrics if m is not None])
        return loss_n, *metrics

    @staticmethod
    def backward(ctx, grad_loss_n, *_):
        dlogw_n, dlogp_n, seq_count_s = ctx.saved_tensors
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
        grad_n = grad_n + grad_loss_n * dlogp_n
        return grad_n.to(ctx.logp_dtype), None, None, None


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    spec: GRPOLossSpec | None = None,
    is_weight: torch.Tensor | None = None,
    sampler_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    backend: str | None = None,
) -> GRPOLossOutput:
    """GRPO per-token loss and metrics (see the module docstring for the formulas).

    Args:
        logp: ``[...]`` log-probs of the policy being trained (the only input differentiated).
        old_logp: ``[...]`` log-probs of the policy that generated the data; None means on-policy
            (``logp.detach()``, as TRL does).
        ref_logp: ``[...]`` reference-policy log-probs, or None (then ``spec.beta`` must be 0).
        advantages: ``[...]``, or ``[B]`` for ``[B, T]`` log-probs (one per sequence).
        mask: ``[...]``, non-zero = token takes part; None = all tokens.
        spec: the loss's knobs (:class:`GRPOLossSpec`; None = its defaults).
        is_weight: ``[...]`` the sampler importance weight of each token (>= 0), or None.
        sampler_logp: ``[...]`` the sampler's log-probs, for the off-policy mask (None: the old
            policy's).
        entropy: ``[...]`` the tokens' entropies, needed when ``top_entropy_quantile < 1``.
        seq_ids: ``[...]`` sequence index of each token (when the spec needs sequences; defaults
            to the row for ``[B, T]`` inputs). num_sequences: number of sequences (default max
            id + 1).
        backend: "triton", "torch" (reference, autograd) or None (Triton on CUDA).
    """
    spec = GRPOLossSpec() if spec is None else spec
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
        spec,
        dtype,
        old_logp=old_logp,
        ref_logp=ref_logp,
        advantages=advantages,
        mask=mask,
        is_weight=is_weight,
        sampler_logp=sampler_logp,
        entropy=entropy,
        seq_ids=seq_ids,
        num_sequences=num_sequences,
    )
    logp_n = logp.reshape(-1)
    weight_n, entropy_mask_n, phi_n = policy_weight(logp_n.to(dtype), inputs, spec)
    if backend == "triton":
        loss_n, *metrics = _GRPOLossFunction.apply(logp_n, inputs, spec, weight_n)
    else:
        loss_n, metrics = reference.grpo_loss_reference(logp_n.to(dtype), inputs, spec, weight_n)
    return GRPOLossOutput(
        loss_n.reshape(logp.shape),
        *metrics,
        phi_mean=phi_mean(phi_n, inputs),
        entropy_mask=None if entropy_mask_n is None else entropy_mask_n.reshape(logp.shape),
    )
