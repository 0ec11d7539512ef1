"""The training path: logits straight to the GRPO per-token loss, with its gradient w.r.t. logits.

    spec = GRPOLossSpec(temperature=0.7, epsilon_high=0.28, beta=0.04)
    out = logprob_grpo_loss(logits, targets, old_logp, ref_logp, advantages, mask, spec=spec)
    (out.loss.sum() / n_tokens).backward()   # aggregation is the caller's (grpo, bnpo, ...)

On Triton with the whole vocab on this rank and a spec whose loss depends on nothing but the
token itself (``GRPOLossSpec.unfused_reason() is None``: token level, clip / cispo / sapo, no
off-policy or entropy mask), one forward kernel computes log-prob, loss, ``d loss / d logp`` and
the metrics; the backward is one kernel writing ``grad_logits`` (rows of masked tokens are
written as zeros without being read). Otherwise (vocab-parallel, GSPO's sequence levels, VESPO,
the masks, a differentiable entropy, or the torch backend) the log-prob and loss autograd
functions are chained, which still holds no ``N x V`` fp32 tensor; on Triton that fallback is
logged once per reason. Both give the same values (tested).

Shapes: ``_n`` flattened tokens, ``_v`` local vocab.
"""

from __future__ import annotations

import logging

import torch

from .backend import resolve_backend, triton_module
from .grpo_loss import GRPOLossOutput, grpo_loss, metrics_from_partials, prepare_loss_inputs
from .logprobs import _check_target_range, as_rows, backward_rows, check_logprob_inputs, logprobs
from .loss_spec import GRPOLossSpec


class _FusedLogprobLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_nv, targets_n, inputs, spec, with_entropy, block_size):
        loss_n, logp_n, entropy_n, max_n, lse_n, coef_n, partial_n5 = triton_module(
            "fused_logprob_loss_triton"
        ).fused_forward(logits_nv, targets_n, inputs, spec, with_entropy, block_size)
        ctx.save_for_backward(logits_nv, targets_n, max_n, lse_n, coef_n)
        ctx.args = (spec.temperature, block_size)
        metrics = metrics_from_partials(partial_n5, inputs, spec)
        ctx.mark_non_differentiable(logp_n, *[t for t in (entropy_n, *metrics) if t is not None])
        return loss_n, logp_n, entropy_n, *metrics

    @staticmethod
    def backward(ctx, grad_loss_n, *_):
        logits_nv, targets_n, max_n, lse_n, coef_n = ctx.saved_tensors
        temperature, block_size = ctx.args
        grad_logp_n = grad_loss_n.float() * coef_n
        grad_nv = backward_rows(
            logits_nv,
            targets_n,
            0,
            temperature,
            max_n,
            lse_n,
            grad_logp_n,
            None,
            None,
            "triton",
            block_size=block_size,
        )
        return grad_nv, *([None] * 5)


def logprob_grpo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    spec: GRPOLossSpec | None = None,
    is_weight: torch.Tensor | None = None,
    sampler_logp: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    tp_group=None,
    vocab_start_index: int | None = None,
    return_entropy: bool = False,
    entropy_grad: bool = False,
    backend: str | None = None,
    validate: bool = True,
    chunk_size: int | None = None,
    block_size: int | None = None,
) -> GRPOLossOutput:
    """GRPO per-token loss from logits; ``loss`` is differentiable w.r.t. ``logits``.

    Arguments as :func:`logprobs.logprobs` (logits side; the temperature is
    ``spec.temperature``) and :func:`grpo_loss.grpo_loss` (loss side; the log-probs' shape is
    ``targets.shape``). Returns a :class:`GRPOLossOutput` whose ``logp`` (detached) and, on
    request, ``entropy`` are filled; ``entropy_grad=True`` makes ``entropy`` differentiable
    w.r.t. ``logits`` (an entropy bonus), which implies ``return_entropy``.
    """
    spec = GRPOLossSpec() if spec is None else spec
    if not isinstance(spec, GRPOLossSpec):
        raise TypeError(f"spec: expected a GRPOLossSpec, got {type(spec).__name__}")
    temperature = spec.temperature
    return_entropy = return_entropy or entropy_grad
    backend = resolve_backend(backend, logits)
    check_logprob_inputs(logits, targets, temperature, backend)
    loss_inputs = dict(
        old_logp=old_logp,
        ref_logp=ref_logp,
        advantages=advantages,
        mask=mask,
        is_weight=is_weight,
        sampler_logp=sampler_logp,
        seq_ids=seq_ids,
        num_sequences=num_sequences,
    )
    if backend == "triton" and tp_group is None:
        if vocab_start_index not in (None, 0):
            raise ValueError(
                f"vocab_start_index: must be 0 or None without tp_group, got {vocab_start_index}"
            )
        reason = spec.unfused_reason() or ("entropy_grad=True" if entropy_grad else None)
        if reason is None:
            return _fused(logits, targets, spec, loss_inputs, return_entropy, validate, block_size)
        _log_unfused_once(reason)
    out_logp = logprobs(
        logits,
        targets,
        temperature,
        tp_group,
        return_entropy or spec.needs_entropy,
        vocab_start_index,
        backend=backend,
        validate=validate,
        chunk_size=chunk_size,
        block_size=block_size,
    )
    logp, entropy = out_logp if isinstance(out_logp, tuple) else (out_logp, None)
    out = grpo_loss(logp, spec=spec, entropy=entropy, backend=backend, **loss_inputs)
    out.logp = logp.detach()
    if return_entropy:
        out.entropy = entropy if entropy_grad else entropy.detach()
    return out


_LOGGED_UNFUSED: set[str] = set()


def _log_unfused_once(reason: str) -> None:
    if reason not in _LOGGED_UNFUSED:
        _LOGGED_UNFUSED.add(reason)
        # a warning, so that it shows without any logging set-up (once per reason)
        logging.getLogger("megagrpo_kernels").warning(
            "logprob_grpo_loss: %s needs the unfused path (the log-prob kernel, then the loss "
            "kernel; same values, one more pass over the logits)",
            reason,
        )


def _fused(logits, targets, spec, loss_inputs, return_entropy, validate, block_size):
    """The single-kernel path (Triton, unsharded vocab, a fusable spec)."""
    shape = targets.shape
    inputs = prepare_loss_inputs(shape, logits.device, spec, torch.float32, **loss_inputs)
    logits_nv, targets_n = as_rows(logits, targets)
    if validate:
        _check_target_range(targets_n, logits_nv.shape[1])
    loss_n, logp_n, entropy_n, *metrics = _FusedLogprobLossFunction.apply(
        logits_nv, targets_n, inputs, spec, bool(return_entropy), block_size
    )
    return GRPOLossOutput(
        loss_n.reshape(shape),
        *metrics,
        logp=logp_n.reshape(shape),
        entropy=None if entropy_n is None else entropy_n.reshape(shape),
    )
