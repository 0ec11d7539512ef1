"""One GRPO policy update over a step's micro-batches.

The loss of a padded micro-batch comes from logits through the fused log-prob + GRPO loss kernel
(``megagrpo_kernels.logprob_grpo_loss`` with the run's ``GRPOLossSpec``: Triton on GPU, the chunked
torch reference on CPU; vocab-parallel over TP). Packed micro-batches and context parallelism
run the output layer on the positions the loss reads only (``model_io.logit_rows``), take
their log-probs (``model_io.token_logprobs``) and run the loss kernel (``grpo_loss``) on them in
the micro-batch's [b, L] layout, the same values as the unfused chain of ``logprob_grpo_loss``.
Then the loss type's aggregation (``algorithms/loss_aggregation.py``) reduces the per-token losses
the way megatron's schedules and DP reduction expect, and the entropy bonus
(``algorithms/entropy_bonus.py``) is subtracted.
Metrics are summed per micro-batch on the last stage (token-weighted) and reduced over
data-parallel ranks by ``reduce_metrics``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megagrpo.algorithms.entropy_bonus import EntropyBonus
from megagrpo.algorithms.loss_aggregation import BatchContext, LossType
from megagrpo.distributed.context_parallel import ContextParallel
from megagrpo.training.forward_backward import forward_backward
from megagrpo.training.model_io import logit_rows, token_logprobs

# Token-weighted sums collected per micro-batch, in this order.
SUM_KEYS = (
    "tokens",
    "kl",
    "entropy",
    "clip_low",
    "clip_high",
    "clip_region",
    "sampler_gap",
    "sampler_tokens",
    "objective",
    "sequences",
    "phi",
    "trained_entropy",
    "trained_tokens",
    "bonus",
)


def grpo_update(
    chunks,
    micro_batches,
    groups,
    spec,
    loss_type: LossType,
    ctx: BatchContext,
    entropy_coef: float = 0.0,
) -> list[torch.Tensor]:
    """Forward and backward of every micro-batch with the loss ``spec``
    (``megagrpo_kernels.GRPOLossSpec``) and an entropy bonus of ``entropy_coef``; returns
    per-micro-batch metric sums [K]."""
    from megagrpo_kernels import grpo_loss, logprob_grpo_loss

    tp_group = groups.tp if groups.tp_size > 1 else None
    cp = ContextParallel.of(groups)
    entropy_grad = entropy_coef != 0.0

    def fused(mb) -> bool:  # the kernel that takes the logits: all of them
        return cp is None and mb.packed is None

    def loss_fn(mb, logits, rows):
        loss_inputs = dict(
            old_logp=mb.old_logp_bl,
            ref_logp=mb.ref_logp_bl,
            advantages=mb.advantages_b,
            mask=mb.mask_bl,
            is_weight=mb.is_weight_bl,
            sampler_logp=mb.sampler_logp_bl,
        )
        if fused(mb):
            out = logprob_grpo_loss(
                logits,
                mb.targets_bl,
                spec=spec,
                tp_group=tp_group,
                return_entropy=True,
                entropy_grad=entropy_grad,
                **loss_inputs,
            )
        else:  # per-token values in the [b, L] layout (the logits stay in the model's)
            logp, entropy = token_logprobs(
                logits,
                mb,
                cp,
                temperature=spec.temperature,
                tp_group=tp_group,
                with_entropy=True,
                rows=rows,
            )
            out = grpo_loss(logp, spec=spec, entropy=entropy, **loss_inputs)
            out.logp, out.entropy = logp.detach(), (entropy if entropy_grad else entropy.detach())
        value, bonus = micro_batch_loss(
            out,
            mb.mask_bl,
            loss_type,
            ctx,
            entropy_coef,
            loss_weight_bl=mb.loss_weight_bl,
            entropy_weight_bl=mb.entropy_weight_bl,
        )
        return value, {"sums": _metric_sums(mb, out, loss_type, ctx, bonus)}

    def rows_of(mb):  # the output layer over the positions the loss reads only
        return None if fused(mb) else logit_rows(mb, cp)

    outputs = forward_backward(
        chunks, micro_batches, loss_fn, forward_only=False, cp=cp, rows_of=rows_of
    )
    return [o["sums"] for o in outputs]


def micro_batch_loss(
    out,
    mask_bl,
    loss_type: LossType,
    ctx: BatchContext,
    entropy_coef: float,
    *,
    loss_weight_bl=None,
    entropy_weight_bl=None,
):
    """``(value, bonus)``: the scalar a micro-batch hands to megatron's schedule (the loss type's
    aggregation of ``out.loss`` minus the entropy bonus) and the bonus (None without one).
    A token-budget micro-batch (``loss_weight_bl`` given; ``loss_type`` is ``TokenWeighted``)
    weighs its tokens as the step's padded micro-batches would, its bonus too."""
    if loss_weight_bl is not None:
        value = loss_type.loss(out.loss, loss_weight_bl, ctx)
        if entropy_coef == 0.0:
            return value, None
        bonus = entropy_coef * (out.entropy * entropy_weight_bl.to(out.entropy.dtype)).sum()
        return value - bonus * (ctx.num_microbatches * ctx.dp_size), bonus
    value = loss_type.loss(out.loss, mask_bl, ctx)
    if entropy_coef == 0.0:
        return value, None
    bonus = entropy_coef * EntropyBonus.mean_entropy(out.entropy, mask_bl, out.entropy_mask)
    return value - bonus, bonus


@torch.no_grad()
def _metric_sums(mb, out, loss_type: LossType, ctx: BatchContext, bonus) -> torch.Tensor:
    mask = mb.mask_bl
    tokens = mask.sum()
    zero = torch.zeros((), device=mask.device)
    sampler_gap = sampler_tokens = zero
    if mb.sampler_logp_bl is not None:
        gap = torch.nan_to_num((out.logp - mb.sampler_logp_bl).abs(), nan=0.0) * mask
        sampler_gap, sampler_tokens = gap.sum(), tokens
    kl = out.kl_mean * tokens if out.kl_mean is not None else zero
    entropy = out.entropy.detach()
    trained = mask if out.entropy_mask is None else mask * out.entropy_mask.to(mask.dtype)
    sequences = float(mask.shape[0])
    values = [
        tokens,
        kl,
        (entropy * mask).sum(),
        out.clip_low * tokens,
        out.clip_high * tokens,
        out.clip_region * tokens,
        sampler_gap,
        sampler_tokens,
        loss_type.objective(
            out.loss.detach(), mask if mb.loss_weight_bl is None else mb.loss_weight_bl, ctx
        ),
        sequences,
        zero if out.phi_mean is None else out.phi_mean * sequences,
        (entropy * trained).sum(),
        trained.sum(),
        zero if bonus is None else bonus.detach(),
    ]
    device = mask.device
    return torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=device) for v in values]
    ).cpu()


def reduce_metrics(
    sums: list[torch.Tensor], groups, num_microbatches: int, loss_type: LossType, objective: str
) -> dict[str, float]:
    """Sum over micro-batches and data-parallel ranks; every rank gets the same dict, with
    TRL's metric names for the loss ``objective`` ("clip", "cispo", "sapo" or "vespo").

    Only the last stage's TP rank 0 contributes (other ranks hold zeros), so one SUM all-reduce
    over the world group adds up the data-parallel replicas exactly once.
    """
    total = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
    if sums and groups.is_last_stage and groups.tp_rank == 0 and groups.cp_rank == 0:
        total = torch.stack(sums).sum(0)
    if dist.is_initialized() and groups.world_size > 1:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        total = total.to(device)
        dist.all_reduce(total)
        total = total.cpu()
    s = dict(zip(SUM_KEYS, total.tolist()))
    tokens = max(s["tokens"], 1.0)
    parts = loss_type.bonus_parts(num_microbatches * groups.dp_size)
    policy_loss = loss_type.combine(s["objective"], num_microbatches * groups.dp_size)
    metrics = {
        # k3 = exp(r) - r - 1 with r = ref_logp - logp, the mean over completion tokens (TRL's
        # estimator), times the ratio pi / pi_old with use_bias_correction_kl. It estimates
        # KL(policy || reference) only on samples of the current policy. With num_iterations > 1
        # (or async rollouts) the samples come from an older policy, and k3 on them is
        # heavy-tailed: a few tokens that lost several nats carry most of it, so it can be far
        # above the true KL. A poor health signal there; watch reward and entropy.
        "kl": s["kl"] / tokens,
        "entropy": s["entropy"] / tokens,
        "loss": policy_loss - s["bonus"] / parts,
        "num_tokens": s["tokens"],
        # the entropy over the tokens the policy loss trained on (the adaptive bonus's input)
        "entropy/trained": s["trained_entropy"] / max(s["trained_tokens"], 1.0),
    }
    if objective == "clip":
        metrics["clip_ratio/low_mean"] = s["clip_low"] / tokens
        metrics["clip_ratio/high_mean"] = s["clip_high"] / tokens
        metrics["clip_ratio/region_mean"] = s["clip_region"] / tokens
    elif objective == "cispo":
        metrics["cispo_clip_ratio"] = s["clip_high"] / tokens
    elif objective == "vespo":
        metrics["vespo/phi_seq_mean"] = s["phi"] / max(s["sequences"], 1.0)
    if s["bonus"] != 0.0:
        metrics["policy_loss"] = policy_loss
    if s["sampler_tokens"] > 0:
        metrics["sampler_logprob_gap"] = s["sampler_gap"] / s["sampler_tokens"]
    return metrics
