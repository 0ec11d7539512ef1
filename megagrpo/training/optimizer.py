"""Gradient reduction and the optimizer: megatron-core's, on GPU and CPU alike.

The model chunks are wrapped in megatron's DistributedDataParallel (contiguous fp32 gradient
buffers, reduced over data-parallel ranks, tied-embedding gradients synchronised over the first
and last pipeline stage by ``finalize_model_grads``). The optimizer is
``get_megatron_optimizer``'s: on GPU bf16 parameters with fp32 master weights, optionally the
DistributedOptimizer (ZeRO-1); on CPU fp32 parameters with megatron's FP32Optimizer over torch
AdamW (megatron's bf16 and distributed optimizers require CUDA tensors). Gradient clipping by the
global norm over all model-parallel ranks is megatron's. The learning rate is set from
``LRSchedule`` before every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megagrpo.config.megatron import MegatronConfig


def ddp_config(megatron: MegatronConfig, *, on_gpu: bool):
    """megatron's DistributedDataParallelConfig for the recipe (on CPU without the overlaps and
    the distributed optimizer, which need CUDA)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=megatron.overlap_grad_reduce and on_gpu,
        overlap_param_gather=megatron.overlap_param_gather and on_gpu,
        use_distributed_optimizer=megatron.use_distributed_optimizer and on_gpu,
        fp8_param_gather=megatron.fp8_param_gather,
    )


def wrap_ddp(chunks, megatron: MegatronConfig) -> list:
    """megatron DDP around each model chunk; sets the config's gradient-finalisation hooks."""
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

    config = chunks[0].config
    ddp = ddp_config(megatron, on_gpu=torch.cuda.is_available())
    wrapped = [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp,
            module=chunk,
            # only the first chunk overlaps its gradient reduction with the others' backward
            disable_bucketing=(i > 0),
        )
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def finish_param_gather(ddp_chunks) -> None:
    """Make every parameter hold the weights of the last optimizer step, on every rank.

    With the distributed optimizer and ``overlap_param_gather``, megatron's optimizer step only
    updates each rank's shard; the all-gather of the new weights is deferred to forward pre-hooks
    of the next forward pass. Anything that reads parameters outside a forward pass (the weight
    push to the rollout engines, checkpoints, the final export) would read the other ranks'
    shards from before the step. megatron's own trainer forces the gather before saving and
    evaluating; megagrpo pushes weights after every step, so it forces it right after every
    optimizer step (the overlap then only helps the forwards of ``num_iterations`` > 1). A no-op
    without overlapped param gathering, where the optimizer step gathers synchronously.
    """
    for chunk in ddp_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is None:
            continue
        if ddp_config.use_distributed_optimizer and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and clipping settings (GRPOConfig's names)."""

    learning_rate: float
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0

    @classmethod
    def from_config(cls, training) -> OptimizerSettings:
        return cls(
            learning_rate=training.learning_rate,
            weight_decay=training.weight_decay,
            adam_beta1=training.adam_beta1,
            adam_beta2=training.adam_beta2,
            adam_epsilon=training.adam_epsilon,
            max_grad_norm=training.max_grad_norm,
        )


def build_optimizer(ddp_chunks, settings: OptimizerSettings, megatron: MegatronConfig):
    """megatron's optimizer over the DDP-wrapped chunks."""
    from megatron.core.optimizer import get_megatron_optimizer

    params_dtype = ddp_chunks[0].config.params_dtype
    on_gpu = torch.cuda.is_available()
    if not on_gpu and params_dtype != torch.float32:
        raise RuntimeError(
            "on CPU megagrpo trains fp32 parameters (megatron's bf16 optimizer needs CUDA); "
            "set bf16: false and fp16: false"
        )
    config = optimizer_config(settings, megatron, params_dtype=params_dtype, on_gpu=on_gpu)
    return get_megatron_optimizer(config, ddp_chunks)


def optimizer_config(
    settings: OptimizerSettings, megatron: MegatronConfig, *, params_dtype, on_gpu: bool
):
    """megatron's OptimizerConfig: AdamW, clipping, precision and the FP8 recipe (the distributed
    optimizer treats FP8 parameters differently under the delayed recipe)."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam",
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_epsilon,
        clip_grad=settings.max_grad_norm,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=megatron.use_distributed_optimizer and on_gpu,
        overlap_param_gather_with_optimizer_step=False,
        fp8_recipe=megatron.fp8_scaling_recipe,
    )


def set_learning_rate(optimizer, lr: float, weight_decay: float) -> None:
    """Set every parameter group's learning rate and weight decay for the next step.

    megatron's param groups carry ``wd_mult`` (0 for biases and 1-D parameters such as norms;
    megatron's own scheduler applies it): the decay of a group is ``weight_decay x wd_mult``.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
