"""Loss types: how per-token losses become the scalar a micro-batch backpropagates.

Legend: B completions in the micro-batch, T completion positions.

Each aggregation is a small named piece with TRL's semantics; ``LOSS_TYPES`` maps every
``loss_type`` to its aggregation (its per-token objective is in
``megagrpo.algorithms.loss_variants``):

- ``sequence_mean`` (grpo, sapo): mean over completions of each completion's token mean
  (DeepSeekMath's GRPO; long completions' tokens weigh less).
- ``token_mean`` (bnpo): token mean over the micro-batch.
- ``max_length`` (dr_grpo): token sum over the micro-batch / (B x max_completion_length)
  (Dr. GRPO: no length bias).
- ``global_token_mean`` (dapo, cispo, vespo): token sum / the number of completion tokens in
  the whole generation batch, over all data-parallel ranks and gradient-accumulation
  micro-batches (DAPO's token-level loss).
- ``sequence_sum`` (luspo): mean over completions of each completion's token sum (LUSPO:
  length-unbiased sequence policy optimisation).

megatron-core's schedules divide each micro-batch loss by the number of micro-batches, and the
data-parallel gradient reduction averages over DP ranks. ``loss`` returns the value to hand to
megatron so that, after both, the gradient is the gradient of the loss type's objective;
``objective`` is the micro-batch's value of the objective, for metrics.

Token-budget micro-batches (``training/token_budget.py``) hold a varying number of sequences,
balanced over DP ranks by tokens. Every aggregation is linear in the per-token losses, so the
step's objective is a weighted token sum: ``token_weights`` gives each token its weight as the
padded per-sample micro-batches of ``micro_batch_size`` define it, and ``TokenWeighted`` sums
those weighted losses, whatever micro-batch or rank a sequence trains on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchContext:
    """What a loss type may need beyond the micro-batch itself."""

    num_microbatches: int
    """Micro-batches per optimizer step on this rank (gradient accumulation)."""
    dp_size: int
    """Data-parallel ranks the gradient is averaged over."""
    max_completion_length: int
    """The configured maximum completion length (dr_grpo's constant normaliser)."""
    global_num_tokens: float
    """dapo's normaliser: completion tokens of the whole generation batch over all DP ranks,
    divided by the optimizer steps the batch is split into (steps_per_generation; TRL's)."""


class LossType:
    """A loss aggregation: reduces per-token losses [B, T] under a mask [B, T] to the loss of
    one micro-batch."""

    name = ""

    def objective(self, loss_bt: torch.Tensor, mask_bt: torch.Tensor, ctx: BatchContext):
        """This micro-batch's loss as the loss type defines it for one micro-batch."""
        raise NotImplementedError

    def loss(self, loss_bt, mask_bt, ctx: BatchContext) -> torch.Tensor:
        """The scalar to return to megatron's schedule (which divides by num_microbatches;
        the DP reduction averages): per-micro-batch means as TRL averages them over
        gradient-accumulation steps and processes."""
        return self.objective(loss_bt, mask_bt, ctx)

    def combine(self, objective_sum: float, num_parts: int) -> float:
        """The step's loss from the sum of ``objective`` over its micro-batches and DP ranks:
        their mean, as megatron averages them."""
        return objective_sum / max(num_parts, 1)

    def bonus_parts(self, num_parts: int) -> int:
        """What the summed entropy bonus is divided by for the step's value (its mean over the
        micro-batches and DP ranks)."""
        return max(num_parts, 1)

    def token_weights(self, mask_bt: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """``[B, T]``: each token's weight in the step's objective when ``mask_bt`` is one of
        the step's micro-batches (this aggregation being linear in the per-token losses): what
        megatron's schedules and the DP average make of ``loss``."""
        loss_bt = torch.zeros_like(mask_bt, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            (grad_bt,) = torch.autograd.grad(self.loss(loss_bt, mask_bt.double(), ctx), loss_bt)
        return grad_bt / (ctx.num_microbatches * ctx.dp_size)


class TokenWeighted(LossType):
    """Token-budget micro-batches: the per-token losses times each token's weight in the step's
    objective (``token_weights`` of the run's loss type), summed. ``ctx.num_microbatches`` is
    this rank's number of micro-batches (ranks may differ)."""

    name = "token_weighted"

    def objective(self, loss_bt, weight_bt, ctx):
        return (loss_bt * weight_bt.to(loss_bt.dtype)).sum()

    def loss(self, loss_bt, weight_bt, ctx):
        # undo megatron's division by this rank's micro-batches and the DP average
        return self.objective(loss_bt, weight_bt, ctx) * (ctx.num_microbatches * ctx.dp_size)

    def combine(self, objective_sum, num_parts):
        return objective_sum  # each part is already the micro-batch's share of the step's loss

    def bonus_parts(self, num_parts):
        return 1


class SequenceMean(LossType):
    name = "sequence_mean"

    def objective(self, loss_bt, mask_bt, ctx):
        m = mask_bt.to(loss_bt.dtype)
        per_seq_b = (loss_bt * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_seq_b.mean()


class TokenMean(LossType):
    name = "token_mean"

    def objective(self, loss_bt, mask_bt, ctx):
        m = mask_bt.to(loss_bt.dtype)
        return (loss_bt * m).sum() / m.sum().clamp(min=1.0)


class MaxLength(LossType):
    name = "max_length"

    def objective(self, loss_bt, mask_bt, ctx):
        m = mask_bt.to(loss_bt.dtype)
        return (loss_bt * m).sum() / (loss_bt.shape[0] * ctx.max_completion_length)


class GlobalTokenMean(LossType):
    name = "global_token_mean"

    def objective(self, loss_bt, mask_bt, ctx):
        m = mask_bt.to(loss_bt.dtype)
        return (loss_bt * m).sum() / max(ctx.global_num_tokens, 1)

    def loss(self, loss_bt, mask_bt, ctx):
        # The objective is already normalised by the global token count: undo megatron's
        # division by the micro-batches and the DP average so the tokens are summed.
        return self.objective(loss_bt, mask_bt, ctx) * (ctx.num_microbatches * ctx.dp_size)

    def combine(self, objective_sum, num_parts):
        return objective_sum  # each part is already divided by the global token count


class SequenceSum(LossType):
    name = "sequence_sum"

    def objective(self, loss_bt, mask_bt, ctx):
        m = mask_bt.to(loss_bt.dtype)
        return (loss_bt * m).sum(-1).mean()


#: ``loss_type`` -> its aggregation (TRL's ``_compute_loss``).
LOSS_TYPES: dict[str, type[LossType]] = {
    "grpo": SequenceMean,
    "bnpo": TokenMean,
    "dr_grpo": MaxLength,
    "dapo": GlobalTokenMean,
    "luspo": SequenceSum,
    "cispo": GlobalTokenMean,
    "sapo": SequenceMean,
    "vespo": GlobalTokenMean,
}


def get_loss_type(name: str) -> LossType:
    """The aggregation of ``loss_type`` ``name``."""
    if name not in LOSS_TYPES:
        raise ValueError(f"loss_type={name!r}; expected one of {sorted(LOSS_TYPES)}")
    return LOSS_TYPES[name]()
