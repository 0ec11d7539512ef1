"""The parallel layout of a run: rules that need the world size and the model's shape.

``validate_layout`` is called once the world size (torchrun's WORLD_SIZE) and the model config
(layers, attention heads, query groups) are known; it returns the TP x PP x CP x DP split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megagrpo.config.errors import ConfigError
from megagrpo.config.validate import check_sequence_parallel

if TYPE_CHECKING:
    from megagrpo.config.recipe import Recipe


@dataclass(frozen=True)
class ParallelLayout:
    """How ``world_size`` ranks split into tensor x pipeline x context x data parallel groups."""

    tp: int
    pp: int
    cp: int
    dp: int
    world_size: int

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the model: tp x pp x cp."""
        return self.tp * self.pp * self.cp


def validate_layout(
    recipe: Recipe,
    *,
    world_size: int,
    num_layers: int,
    num_attention_heads: int,
    num_query_groups: int,
) -> ParallelLayout:
    """Check the recipe's parallel sizes against the world and the model; raise ConfigError
    listing every broken rule, else return the layout."""
    mc, t = recipe.megatron, recipe.training
    tp, pp, cp = (
        mc.tensor_model_parallel_size,
        mc.pipeline_model_parallel_size,
        mc.context_parallel_size,
    )
    errors: list[str] = []
    if min(tp, pp, cp) < 1 or world_size < 1:
        raise ConfigError(
            f"world_size={world_size}, tensor_model_parallel_size={tp}, "
            f"pipeline_model_parallel_size={pp} and context_parallel_size={cp} must all be >= 1"
        )
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        errors.append(
            f"world_size={world_size} must be divisible by tensor_model_parallel_size={tp} x "
            f"pipeline_model_parallel_size={pp} x context_parallel_size={cp} = {model_parallel}"
        )
    dp = max(world_size // model_parallel, 1)
    if mc.world_size is not None and mc.world_size != world_size:
        errors.append(
            f"world_size={mc.world_size} in the recipe, but the run has {world_size} processes "
            "(torchrun's WORLD_SIZE): launch it on the layout it was written for"
        )

    for what, count in (
        ("num_attention_heads", num_attention_heads),
        ("num_query_groups", num_query_groups),
    ):
        if count % tp:
            errors.append(
                f"tensor_model_parallel_size={tp} must divide {what}={count}: each TP rank holds "
                f"whole {'attention heads' if what == 'num_attention_heads' else 'KV groups'}"
            )
    vllm_tp = t.vllm_tensor_parallel_size
    if t.use_vllm and t.vllm_mode == "colocate" and vllm_tp >= 1 and world_size % vllm_tp:
        errors.append(
            f"vllm_tensor_parallel_size={vllm_tp} must divide world_size={world_size}: colocated "
            "vLLM engines are made of consecutive trainer ranks"
        )
    _check_pipeline(recipe, num_layers, errors)
    check_sequence_parallel(mc.sequence_parallel, tp, errors)

    _check_generation_batch(t, dp, errors)
    if errors:
        raise ConfigError(errors)
    return ParallelLayout(tp=tp, pp=pp, cp=cp, dp=dp, world_size=world_size)


def _check_generation_batch(t, dp: int, errors: list[str]) -> None:
    """TRL's generation_batch_size rule, and whole groups on every data-parallel rank."""
    step_batch = t.per_device_train_batch_size * dp
    gbs = t.generation_batch_size
    if gbs is not None and gbs >= 1 and gbs % step_batch:
        errors.append(
            f"generation_batch_size={gbs} must be divisible by per_device_train_batch_size="
            f"{t.per_device_train_batch_size} x DP={dp} = {step_batch} (TRL's rule)"
        )
        return
    spg = t.steps_per_generation_for(dp)
    if gbs is not None and spg % t.gradient_accumulation_steps:
        errors.append(
            f"generation_batch_size={gbs} gives steps_per_generation={gbs} / {step_batch} = {spg}, "
            f"which must be a multiple of gradient_accumulation_steps="
            f"{t.gradient_accumulation_steps}: megagrpo trains each generation batch as whole "
            "optimizer steps"
        )
    per_rank = t.per_device_train_batch_size * spg
    defaulted = t.steps_per_generation is None and t.generation_batch_size is None
    steps = f"{'gradient_accumulation_steps' if defaulted else 'steps_per_generation'}={spg}"
    if per_rank % t.num_generations:
        errors.append(
            f"the generation batch per_device_train_batch_size={t.per_device_train_batch_size} x "
            f"{steps} x DP={dp} = {per_rank * dp} completions must be "
            f"divisible by num_generations={t.num_generations} x DP={dp} = "
            f"{t.num_generations * dp}: every data-parallel rank must hold whole groups"
        )


def _check_pipeline(recipe: Recipe, num_layers: int, errors: list[str]) -> None:
    mc, t = recipe.megatron, recipe.training
    pp, vpp = mc.pipeline_model_parallel_size, mc.virtual_pipeline_model_parallel_size
    if num_layers % pp:
        errors.append(
            f"pipeline_model_parallel_size={pp} must divide num_layers={num_layers}: every "
            "pipeline stage holds the same number of layers"
        )
        return
    chunks = pp * (vpp or 1)
    if vpp is not None and num_layers % chunks:
        errors.append(
            f"pipeline_model_parallel_size={pp} x virtual_pipeline_model_parallel_size={vpp} = "
            f"{chunks} must divide num_layers={num_layers}: every model chunk holds the same "
            "number of layers"
        )
        return
    if vpp is not None and pp > 1:
        micro = mc.micro_batch_size or t.per_device_train_batch_size
        num_micro = t.per_device_train_batch_size * t.gradient_accumulation_steps // micro
        if num_micro % pp:
            errors.append(
                f"the interleaved schedule (virtual_pipeline_model_parallel_size={vpp}) needs the "
                f"micro-batches per step, per_device_train_batch_size="
                f"{t.per_device_train_batch_size} x gradient_accumulation_steps="
                f"{t.gradient_accumulation_steps} / micro_batch_size={micro} = {num_micro}, to be "
                f"a multiple of pipeline_model_parallel_size={pp}"
            )
    recompute = mc.recompute(t.gradient_checkpointing)
    layers_per_chunk = num_layers // chunks
    if recompute.recompute_num_layers is not None and (
        recompute.recompute_num_layers > layers_per_chunk
    ):
        errors.append(
            f"recompute_num_layers={recompute.recompute_num_layers} must be <= the layers of one "
            f"model chunk, num_layers={num_layers} / (pipeline_model_parallel_size={pp}"
            f"{f' x virtual_pipeline_model_parallel_size={vpp}' if vpp else ''}) = "
            f"{layers_per_chunk}"
        )
