"""One GRPO policy update over a step's micro-batches.

The loss of a micro-batch comes from logits through the fused log-prob + GRPO loss kernel
(``megagrpo_kernels.logprob_grpo_loss``: Triton on GPU, the chunked torch reference on CPU;
vocab-parallel over TP), then the loss type (grpo / bnpo / dr_grpo / dapo) reduces the per-token
losses the way megatron's schedules and DP reduction expect. Metrics are summed per micro-batch
on the last stage (token-weighted) and reduced over data-parallel ranks by ``reduce_metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megagrpo.algorithms.loss_aggregation import BatchContext, LossType
from megagrpo.training.forward_backward import forward_backward

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
)


@dataclass(frozen=True)
class LossSettings:
    """GRPOConfig's loss knobs, as the kernel takes them."""

    temperature: float
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    beta: float
    tis_cap: float | None
    importance_sampling_level: str

    @classmethod
    def from_config(cls, training) -> LossSettings:
        return cls(
            temperature=training.temperature,
            epsilon_low=training.epsilon,
            epsilon_high=training.epsilon_high
            if training.epsilon_high is not None
            else training.epsilon,
            delta=training.delta,
            beta=training.beta,
            tis_cap=(
                training.vllm_importance_sampling_cap
                if training.vllm_importance_sampling_correction
                else None
            ),
            importance_sampling_level=training.importance_sampling_level,
        )


def grpo_update(
    chunks, micro_batches, groups, loss: LossSettings, loss_type: LossType, ctx: BatchContext
) -> list[torch.Tensor]:
    """Forward and backward of every micro-batch; returns per-micro-batch metric sums [K]."""
    from megagrpo_kernels import logprob_grpo_loss

    tp_group = groups.tp if groups.tp_size > 1 else None

    def loss_fn(mb, logits):
        out = logprob_grpo_loss(
            logits,
            mb.targets_bl,
            mb.old_logp_bl,
            mb.ref_logp_bl,
            mb.advantages_b,
            mb.mask_bl,
            temperature=loss.temperature,
            epsilon_low=loss.epsilon_low,
            epsilon_high=loss.epsilon_high,
            delta=loss.delta,
            beta=loss.beta,
            sampler_logp=mb.sampler_logp_bl if loss.tis_cap is not None else None,
            tis_cap=loss.tis_cap,
            importance_sampling_level=loss.importance_sampling_level,
            tp_group=tp_group,
            return_entropy=True,
        )
        value = loss_type.loss(out.loss, mb.mask_bl, ctx)
        return value, {"sums": _metric_sums(mb, out, loss_type, ctx)}

    outputs = forward_backward(chunks, micro_batches, loss_fn, forward_only=False)
    return [o["sums"] for o in outputs]


@torch.no_grad()
def _metric_sums(mb, out, loss_type: LossType, ctx: BatchContext) -> torch.Tensor:
    mask = mb.mask_bl
    tokens = mask.sum()
    sampler_gap = sampler_tokens = torch.zeros((), device=mask.device)
    if mb.sampler_logp_bl is not None:
        gap = (out.logp - mb.sampler_logp_bl).abs() * mask
        sampler_gap, sampler_tokens = gap.sum(), tokens
    kl = out.kl_mean * tokens if out.kl_mean is not None else torch.zeros((), device=mask.device)
    values = [
        tokens,
        kl,
        (out.entropy * mask).sum(),
        out.clip_low * tokens,
        out.clip_high * tokens,
        out.clip_region * tokens,
        sampler_gap,
        sampler_tokens,
        loss_type.objective(out.loss.detach(), mask, ctx),
        torch.tensor(float(mask.shape[0])),
    ]
    device = mask.device
    return torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=device) for v in values]
    ).cpu()


def reduce_metrics(
    sums: list[torch.Tensor], groups, num_microbatches: int, loss_type: LossType
) -> dict[str, float]:
    """Sum over micro-batches and data-parallel ranks; every rank gets the same dict.

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
    metrics = {
        # k3 = exp(r) - r - 1 with r = ref_logp - logp, the mean over completion tokens (TRL's
        # estimator). It estimates KL(policy || reference) only on samples of the current policy.
        # With num_iterations > 1 (or async rollouts) the samples come from an older policy, and
        # k3 on them is heavy-tailed: a few tokens that lost several nats carry most of it, so it
        # can be far above the true KL. A poor health signal there; watch reward and entropy.
        "kl": s["kl"] / tokens,
        "entropy": s["entropy"] / tokens,
        "clip_ratio/low_mean": s["clip_low"] / tokens,
        "clip_ratio/high_mean": s["clip_high"] / tokens,
        "clip_ratio/region_mean": s["clip_region"] / tokens,
        "loss": loss_type.combine(s["objective"], num_microbatches * groups.dp_size),
        "num_tokens": s["tokens"],
    }
    if s["sampler_tokens"] > 0:
        metrics["sampler_logprob_gap"] = s["sampler_gap"] / s["sampler_tokens"]
    return metrics
