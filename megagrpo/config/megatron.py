"""megatron-core settings of the policy (and reference) model: parallel layout, FP8, recompute.

Names follow megatron-core's ``TransformerConfig`` / ``DistributedDataParallelConfig`` fields (the
``--tensor-model-parallel-size`` style flags of Megatron-LM, with underscores), defaults are
megatron-core's unless the help says otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from megagrpo.config.fields import option


@dataclass(frozen=True)
class RecomputeSettings:
    """Resolved activation recompute, ready for megatron's TransformerConfig (all None = off)."""

    recompute_granularity: str | None
    recompute_method: str | None
    recompute_num_layers: int | None


@dataclass
class MegatronConfig:
    """How the model is sharded and run by megatron-core."""

    # ---- parallel layout ----
    tensor_model_parallel_size: int = option(
        1, help="Tensor-parallel size (TP): must divide the attention heads and query groups."
    )
    pipeline_model_parallel_size: int = option(
        1, help="Pipeline-parallel size (PP): must divide the number of layers."
    )
    virtual_pipeline_model_parallel_size: int | None = option(
        None,
        help="Model chunks per pipeline stage for the interleaved 1F1B schedule; needs PP > 1 and "
        "layers divisible by PP x this.",
    )
    context_parallel_size: int = option(
        1,
        help="Context-parallel size (CP): each sequence split over CP ranks in megatron's "
        "load-balanced chunks (long sequences); Transformer Engine's ring attention on GPU, "
        "all-gathered keys and values on the local spec (docs/config.md).",
    )
    sequence_parallel: bool = option(
        False,
        help="Shard layer-norm / dropout activations along the sequence over TP; needs TP > 1.",
    )
    micro_batch_size: int | None = option(
        None,
        help="Completions per forward/backward micro-batch; None uses per_device_train_batch_size. "
        "Must divide per_device_train_batch_size x gradient_accumulation_steps.",
    )
    max_tokens_per_micro_batch: int | None = option(
        None,
        help="Token-budget micro-batches: each micro-batch packs whole prompt + completion "
        "sequences back to back (no padding; attention stays within a sequence) up to this many "
        "tokens, and the sequences are balanced over data-parallel ranks by tokens. The loss "
        "normalisers stay those of padded micro-batches of micro_batch_size. Must be >= "
        "max_prompt_length + max_completion_length. None: padded micro-batches of "
        "micro_batch_size completions.",
    )
    make_vocab_size_divisible_by: int = option(
        128,
        help="Pad the vocabulary to a multiple of this x TP (padded logits are masked out).",
    )

    world_size: int | None = option(
        None,
        help="Trainer processes the recipe is laid out for (nodes x GPUs per node, rollout-server "
        "nodes not counted); when set, a run with another WORLD_SIZE stops with an error, and "
        "--dry-run plans for it. None: whatever torchrun starts.",
    )

    # ---- implementation and precision ----
    transformer_impl: Literal["auto", "transformer_engine", "local"] = option(
        "auto",
        help="Layer implementation: Transformer Engine layers, megatron's local (plain torch) "
        "layers, or auto (Transformer Engine where it is importable on a GPU, local otherwise).",
    )
    fp8: Literal["e4m3", "hybrid"] | None = option(
        None,
        help="FP8 GEMMs through Transformer Engine: e4m3 everywhere, or hybrid (e4m3 forward, e5m2 "
        "gradients); None trains in bf16/fp16/fp32.",
    )
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] | None = option(
        None,
        help="FP8 scaling recipe (mxfp8 needs Blackwell); None with fp8 set uses megatron's "
        "default, delayed. Only valid together with fp8.",
    )
    fp8_margin: int = option(0, help="Scaling-factor margin of the delayed recipe.")
    fp8_amax_history_len: int = option(1, help="Length of the amax history of the delayed recipe.")
    fp8_amax_compute_algo: Literal["most_recent", "max"] = option(
        "most_recent", help="How the delayed recipe turns the amax history into a scale."
    )
    fp8_param_gather: bool = option(
        False,
        help="Keep parameters in FP8 and all-gather them in FP8; needs fp8 and "
        "use_distributed_optimizer.",
    )

    # ---- activation recompute ----
    recompute_granularity: Literal["full", "selective"] | None = option(
        None,
        help="full: recompute whole layers; selective: recompute only core attention. None "
        "follows gradient_checkpointing (true -> full / uniform / 1 layer).",
    )
    recompute_method: Literal["uniform", "block"] | None = option(
        None,
        help="full recompute only: uniform (checkpoint every chunk of recompute_num_layers "
        "layers) or block (recompute the first recompute_num_layers layers of each stage); None "
        "means uniform.",
    )
    recompute_num_layers: int | None = option(
        None, help="full recompute only: layers per recompute chunk / block; None means 1."
    )

    # ---- data-parallel communication ----
    use_distributed_optimizer: bool = option(
        False, help="Shard optimizer state over data-parallel ranks (ZeRO-1)."
    )
    overlap_grad_reduce: bool = option(
        False, help="Overlap the gradient reduce-scatter / all-reduce with backward."
    )
    overlap_param_gather: bool = option(
        False,
        help="Overlap the parameter all-gather with forward; needs use_distributed_optimizer and "
        "overlap_grad_reduce.",
    )
    distributed_timeout_minutes: int = option(
        10, help="Timeout of torch.distributed collectives, in minutes."
    )

    @property
    def fp8_scaling_recipe(self) -> str | None:
        """The FP8 recipe megatron runs: ``fp8_recipe``, or megatron's default (delayed) when
        fp8 is set; None without fp8."""
        if self.fp8 is None:
            return None
        return self.fp8_recipe or "delayed"

    def recompute(self, gradient_checkpointing: bool) -> RecomputeSettings:
        """The recompute megatron runs: the explicit recompute_* keys if any is set, else TRL's
        gradient_checkpointing mapped to full / uniform / 1 layer, else none."""
        granularity = self.recompute_granularity
        explicit = self.recompute_method is not None or self.recompute_num_layers is not None
        if granularity is None and (gradient_checkpointing or explicit):
            granularity = "full"
        if granularity is None:
            return RecomputeSettings(None, None, None)
        if granularity == "selective":
            return RecomputeSettings("selective", None, None)
        return RecomputeSettings(
            "full", self.recompute_method or "uniform", self.recompute_num_layers or 1
        )

    def resolved(self, gradient_checkpointing: bool) -> MegatronConfig:
        """A copy whose recompute_* fields hold what ``recompute`` resolves (for model builders
        that read those fields as megatron's TransformerConfig would)."""
        rc = self.recompute(gradient_checkpointing)
        return dataclasses.replace(
            self,
            recompute_granularity=rc.recompute_granularity,
            recompute_method=rc.recompute_method,
            recompute_num_layers=rc.recompute_num_layers,
        )
