"""The training path: logits straight to the GRPO per-token loss, with its gradient w.r.t. logits.

    out = logprob_grpo_loss(logits, targets, old_logp, ref_logp, advantages, mask,
                            temperature=0.7, epsilon_high=0.28, beta=0.04)
    (out.loss.sum() / n_tokens).backward()   # aggregation is the caller's (grpo, bnpo, ...)

On Triton with the whole vocab on this rank and ``importance_sampling_level="token"``, one forward
kernel computes log-prob, loss, ``d loss / d logp`` and the metrics; the backward is one kernel
writing ``grad_logits`` (rows of masked tokens are written as zeros without being read).
Otherwise (vocab-parallel, GSPO's sequence levels, or the torch backend) the log-prob and loss
autograd functions are chained; that still holds no ``N x V`` fp32 tensor. Both give the same
values (tested).

Shapes: ``_n`` flattened tokens, ``_v`` local vocab.
"""

from __future__ import annotations

import torch

from .backend import resolve_backend, triton_module
from .grpo_loss import GRPOLossOutput, grpo_loss, metrics_from_partials, prepare_loss_inputs
from .logprobs import _check_target_range, as_rows, backward_rows, check_logprob_inputs, logprobs
from .loss_spec import GRPOLossSpec


class _FusedLogprobLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_nv, targets_n, inputs, spec, temperature, with_entropy, block_size):
        loss_n, logp_n, entropy_n, max_n, lse_n, coef_n, partial_n5 = triton_module(
            "fused_logprob_loss_triton"
        ).fused_forward(logits_nv, targets_n, temperature, inputs, spec, with_entropy, block_size)
        ctx.save_for_backward(logits_nv, targets_n, max_n, lse_n, coef_n)
        ctx.args = (temperature, block_size)
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
        return grad_nv, *([None] * 6)


def logprob_grpo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    sampler_logp: torch.Tensor | None = None,
    tis_cap: float | None = None,
    importance_sampling_level: str = "token",
    seq_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    tp_group=None,
    vocab_start_index: int | None = None,
    return_entropy: bool = False,
    backend: str | None = None,
    validate: bool = True,
    chunk_size: int | None = None,
    block_size: int | None = None,
) -> GRPOLossOutput:
    """GRPO per-token loss from logits; ``loss`` is differentiable w.r.t. ``logits``.

    Arguments as :func:`logprobs.logprobs` (logits side) and :func:`grpo_loss.grpo_loss` (loss
    side; the log-probs' shape is ``targets.shape``). Returns a :class:`GRPOLossOutput` whose
    ``logp`` (and ``entropy`` on request) are filled, detached.
    """
    spec = GRPOLossSpec(epsilon_low, epsilon_high, delta, beta, tis_cap, importance_sampling_level)
    backend = resolve_backend(backend, logits)
    check_logprob_inputs(logits, targets, temperature, backend)
    loss_inputs = dict(
        old_logp=old_logp,
        ref_logp=ref_logp,
        advantages=advantages,
        mask=mask,
        sampler_logp=sampler_logp,
        seq_ids=seq_ids,
        num_sequences=num_sequences,
    )
    if backend == "triton" and tp_group is None and importance_sampling_level == "token":
        if vocab_start_index not in (None, 0):
            raise ValueError(
                f"vocab_start_index: must be 0 or None without tp_group, got {vocab_start_index}"
            )
        return _fused(
            logits, targets, temperature, spec, loss_inputs, return_entropy, validate, block_size
        )
    out_logp = logprobs(
        logits,
        targets,
        temperature,
        tp_group,
        return_entropy,
        vocab_start_index,
        backend=backend,
        validate=validate,
        chunk_size=chunk_size,
        block_size=block_size,
    )
    logp, entropy = out_logp if return_entropy else (out_logp, None)
    out = grpo_loss(
        logp,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        delta=delta,
        beta=beta,
        tis_cap=tis_cap,
        importance_sampling_level=importance_sampling_level,
        backend=backend,
        **loss_inputs,
    )
    out.logp = logp.detach()
    out.entropy = None if entropy is None else entropy.detach()
    return out


def _fused(logits, targets, temperature, spec, loss_inputs, return_entropy, validate, block_size):
    """The single-kernel path (Triton, unsharded vocab, token level)."""
    shape = targets.shape
    inputs = prepare_loss_inputs(
        shape, logits.device, spec=spec, dtype=torch.float32, **loss_inputs
    )
    logits_nv, targets_n = as_rows(logits, targets)
    if validate:
        _check_target_range(targets_n, logits_nv.shape[1])
    loss_n, logp_n, entropy_n, *metrics = _FusedLogprobLossFunction.apply(
        logits_nv, targets_n, inputs, spec, float(temperature), bool(return_entropy), block_size
    )
    return GRPOLossOutput(
        loss_n.reshape(shape),
        *metrics,
        logp=logp_n.reshape(shape),
        entropy=None if entropy_n is None else entropy_n.reshape(shape),
    )
