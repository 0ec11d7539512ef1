"""Everything a GRPO run holds, built from a recipe (open-r1 grpo.py's initialization, dataset
preparation and model setup).

``build_run(recipe)`` starts the distributed groups, resolves the model directory, loads the
tokenizer and the prompt data (on the ranks that hold a rollout engine), builds the megatron
policy (DDP-wrapped) and its optimizer, the frozen reference model when beta > 0, the rollout
engine (rank 0, or every rank with colocated vLLM) and the reward pool (rank 0), the metrics
logger, and resumes from the newest complete checkpoint when there is one.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import torch

from megagrpo.algorithms.entropy_bonus import EntropyBonus
from megagrpo.algorithms.importance_sampling import ImportanceSampling
from megagrpo.algorithms.loss_aggregation import LossType, get_loss_type
from megagrpo.algorithms.loss_variants import loss_spec
from megagrpo.config import Recipe, recipe_to_dict, validate_layout, validate_recipe
from megagrpo.conversion.hf_weights import load_hf_weights
from megagrpo.conversion.safetensors_io import SafetensorsDir
from megagrpo.distributed import ParallelGroups, init_distributed
from megagrpo.models.arch import ModelArch, load_arch
from megagrpo.models.builder import build_model
from megagrpo.monitoring.log_levels import apply_log_level
from megagrpo.monitoring.metrics_log import MetricsLogger, WandbSettings
from megagrpo.training.checkpoint import (
    TrainerState,
    load_checkpoint,
    load_reference,
    remove_interrupted_saves,
    resolve_resume,
)
from megagrpo.training.generation_steps import GenerationSchedule
from megagrpo.training.lr_schedule import LRSchedule, schedule_from_config
from megagrpo.training.optimizer import OptimizerSettings, build_optimizer, wrap_ddp
from megagrpo.training.prompt_data import share_prompt_data
from megagrpo.training.reference import ReferenceModel
from megagrpo.training.rollout_engines import engine_share
from megagrpo.training.token_budget import TokenBudget


@dataclass
class Run:
    recipe: Recipe
    groups: ParallelGroups
    arch: ModelArch
    model_dir: str
    tokenizer: Any
    modules: list
    """The policy's megatron model chunks (unwrapped)."""
    policy: list
    """The same chunks wrapped in megatron DDP."""
    optimizer: Any
    schedule: LRSchedule
    loss_type: LossType
    """How per-token losses aggregate (``loss_type``)."""
    loss_spec: Any
    """The per-token loss (``megagrpo_kernels.GRPOLossSpec``), handed as is to the kernels."""
    importance_sampling: ImportanceSampling | None
    """The sampler importance weight; None when ``vllm_importance_sampling_correction`` is off."""
    entropy_bonus: EntropyBonus | None
    """The entropy bonus and its adaptive state; None without one."""
    reference: ReferenceModel | None
    logger: MetricsLogger
    total_steps: int
    """Optimizer steps of the run (TRL's count)."""
    start_step: int
    micro_batch_size: int
    token_budget: TokenBudget | None
    """Token-budget micro-batches (``max_tokens_per_micro_batch``); None: padded ones."""
    steps_per_epoch: int
    """Optimizer steps per pass over the prompts."""
    generation: GenerationSchedule
    data: Any = None
    """Ranks holding an engine: the prompt data (``megagrpo.training.prompt_data.PromptData``)."""
    rollout: Any = None
    """Ranks holding an engine (rank 0; every rank with colocated vLLM): the rollout driver
    (``megagrpo.training.rollout_driver.RolloutDriver``)."""

    @property
    def device(self):
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )

    @property
    def needs_old_logprobs(self) -> bool:
        t = self.recipe.training
        return (
            self.generation.updates_per_generation > 1  # num_iterations / steps_per_generation
            or t.async_max_staleness > 0
            or self.importance_sampling is not None
        )


def resolve_model_dir(name: str, revision: str = "main") -> str:
    """A local model directory, or a download of the hub repository (needs the network)."""
    if os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            name,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"],
        )
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise FileNotFoundError(
            f"model_name_or_path={name!r}: not a local directory, and the download from the "
            f"Hugging Face hub failed ({type(e).__name__}: {e})"
        ) from e


def _seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _params_dtype(training) -> torch.dtype:
    if not torch.cuda.is_available():
        return torch.float32  # megatron's bf16 optimizer needs CUDA; CPU trains fp32
    if training.fp16:
        return torch.float16
    return torch.bfloat16 if training.bf16 else torch.float32


def _broadcast_from_rank0(value, groups):
    if groups.world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def _resume(t, modules, optimizer, arch, groups, resolved, reference) -> TrainerState | None:
    """Load the checkpoint to resume from, if any (removing interrupted saves first), and a
    synced reference model saved with it; returns its trainer state (None: start at step 0)."""
    if groups.rank == 0:
        for name in remove_interrupted_saves(t.output_dir):
            print(f"removed {name}: a checkpoint save that was interrupted", flush=True)
    checkpoint = resolve_resume(t.output_dir, t.resume_from_checkpoint)
    if not checkpoint:
        return None
    state = load_checkpoint(
        checkpoint,
        modules,
        optimizer,
        arch,
        groups,
        distributed_optimizer=resolved.use_distributed_optimizer and torch.cuda.is_available(),
    )
    if reference is not None and load_reference(checkpoint, reference.chunks, arch, groups):
        reference.synced = True
    return state


def _metrics_logger(recipe: Recipe, groups, data) -> MetricsLogger:
    t = recipe.training
    return MetricsLogger(
        t.output_dir,
        report_to=t.report_to,
        wandb=WandbSettings(
            project=t.wandb_project,
            entity=t.wandb_entity,
            group=t.wandb_run_group,
            run_name=t.run_name,
            config=recipe_to_dict(recipe),
        ),
        enabled=groups.rank == 0,
        first_record=data.skipped.metrics() if data else None,
    )


def build_run(recipe: Recipe) -> Run:
    """Assemble a run; every rank calls it."""
    validate_recipe(recipe)
    t, mc = recipe.training, recipe.megatron
    _seed_everything(t.seed)
    groups = init_distributed(mc, seed=t.seed, timeout_minutes=mc.distributed_timeout_minutes)
    if groups.rank == 0:
        apply_log_level(t.log_level)
    model_dir = resolve_model_dir(recipe.model.model_name_or_path, recipe.model.model_revision)
    arch = load_arch(model_dir)
    validate_layout(recipe, world_size=groups.world_size, **arch.layout_dims())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_dir, trust_remote_code=recipe.model.trust_remote_code
    )
    share = engine_share(t, groups)  # collective with colocated vLLM: every rank, in order
    # the prompts before the model: a data error stops every rank in seconds (prompt_data.py);
    # ranks that hold an engine make their own requests from them
    data, total_steps, steps_per_epoch = share_prompt_data(
        recipe, tokenizer, groups, _broadcast_from_rank0, load=share is not None
    )
    resolved = mc.resolved(t.gradient_checkpointing)
    dtype = _params_dtype(t)
    source = SafetensorsDir(model_dir)
    modules = build_model(arch, resolved, pg_collection=groups.pg_collection, params_dtype=dtype)
    load_hf_weights(modules, source, arch, groups)
    policy = wrap_ddp(modules, resolved)
    optimizer = build_optimizer(policy, OptimizerSettings.from_config(t), resolved)
    reference = None
    if t.beta > 0:
        ref = build_model(arch, resolved, pg_collection=groups.pg_collection, params_dtype=dtype)
        load_hf_weights(ref, source, arch, groups)
        reference = ReferenceModel(ref, offload=t.ref_model_offload)

    resumed = _resume(t, modules, optimizer, arch, groups, resolved, reference)
    start_step = resumed.step if resumed is not None else 0
    entropy_bonus = EntropyBonus.from_config(t)
    if entropy_bonus is not None and resumed is not None and "entropy_bonus" in resumed.extra:
        entropy_bonus.load_state_dict(resumed.extra["entropy_bonus"])
    generation = GenerationSchedule.from_config(t, groups.dp_size)
    if start_step % generation.updates_per_generation and start_step < total_steps:
        raise ValueError(
            f"resuming after optimizer step {start_step}, inside a generation batch of "
            f"{generation.updates_per_generation} steps (steps_per_generation / "
            "gradient_accumulation_steps x num_iterations): resume with the settings the "
            "checkpoint was written with"
        )
    if resumed is not None and data is not None:  # streaming: the exact data position
        data.resume(resumed.sampler, generation.generation_of(start_step))
    run = Run(
        recipe=recipe,
        groups=groups,
        arch=arch,
        model_dir=model_dir,
        tokenizer=tokenizer,
        modules=modules,
        policy=policy,
        optimizer=optimizer,
        schedule=schedule_from_config(t, total_steps),
        loss_type=get_loss_type(t.loss_type),
        loss_spec=loss_spec(t),
        importance_sampling=ImportanceSampling.from_config(t),
        entropy_bonus=entropy_bonus,
        reference=reference,
        logger=_metrics_logger(recipe, groups, data),
        total_steps=total_steps,
        start_step=start_step,
        micro_batch_size=mc.micro_batch_size or t.per_device_train_batch_size,
        token_budget=None
        if mc.max_tokens_per_micro_batch is None
        else TokenBudget(
            max_tokens=mc.max_tokens_per_micro_batch,
            micro_batch_size=mc.micro_batch_size or t.per_device_train_batch_size,
            pad_to_budget=mc.pipeline_model_parallel_size > 1,
        ),
        steps_per_epoch=steps_per_epoch,
        generation=generation,
        data=data,
    )
    if share is not None:
        from megagrpo.training.rollout_driver import RolloutDriver

        run.rollout = RolloutDriver.create(run, share)
    return run
