"""The rollout engine a recipe asks for, built from its settings in one place.

| settings | engine | where |
|---|---|---|
| ``use_vllm=False``, ``rollout_num_engines=0`` | ``TransformersEngine`` | global rank 0 |
| ``use_vllm=False``, ``rollout_num_engines=E`` | ``RolloutPool`` of E processes | rank 0 |
| ``use_vllm=True``, ``vllm_mode="colocate"`` | ``VLLMEngine`` (external launcher) | every rank |
| ``use_vllm=True``, ``vllm_mode="server"`` | ``RolloutPool`` over vLLM rollout-servers | rank 0 |

Colocated vLLM derives what TRL's colocate mode derives: ``max_num_seqs`` is the completions one
engine generates per step, ``max_model_len`` is ``vllm_max_model_length`` or else prompt +
completion lengths, the engine seed is ``seed`` plus the engine's index. On a machine without
CUDA the KV cache gets ``vllm_kv_cache_memory_bytes``, or else room for ``max_num_seqs`` full
sequences (vLLM would otherwise take a fraction of the machine's memory).
"""

from __future__ import annotations

import math

from megagrpo.rollout.colocated import EngineShare
from megagrpo.rollout.vllm_engine import VLLMConfig
from megagrpo.rollout.weight_sync import WeightSyncConfig

_MIN_CPU_KV_BYTES = 16 * 2**20


def is_colocated_vllm(training) -> bool:
    return training.use_vllm and training.vllm_mode == "colocate"


def engine_share(training, groups) -> EngineShare | None:
    """This rank's share of generation, or None when this rank holds no engine."""
    if is_colocated_vllm(training):
        return EngineShare.over_ranks(
            groups.rank, groups.world_size, training.vllm_tensor_parallel_size
        )
    return EngineShare() if groups.rank == 0 else None


def _dtype(recipe, on_gpu: bool) -> str:
    """The recipe's ``torch_dtype``, else the trainer's parameter dtype (fp32 on CPU)."""
    t = recipe.training
    if recipe.model.torch_dtype != "auto":
        return recipe.model.torch_dtype
    if not on_gpu:
        return "float32"
    return "float16" if t.fp16 else "bfloat16" if t.bf16 else "float32"


def _max_model_len(training) -> int | None:
    if training.vllm_max_model_length is not None:
        return training.vllm_max_model_length
    if training.max_prompt_length is not None:
        return training.max_prompt_length + training.max_completion_length
    return None


def _kv_bytes_for(arch, dtype: str, tokens: int) -> int:
    """Bytes of keys and values for ``tokens`` tokens of every layer, twice over (blocks are
    allocated whole), at least 16 MiB."""
    per_token = 2 * arch.num_layers * arch.num_query_groups * arch.head_dim
    per_token *= 4 if dtype == "float32" else 2
    return max(_MIN_CPU_KV_BYTES, 2 * per_token * tokens)


def vllm_config(
    recipe, model_dir: str, arch, *, share: EngineShare, completions_per_step: int, on_gpu: bool
) -> VLLMConfig:
    """The ``VLLMConfig`` of this rank's colocated engine."""
    t = recipe.training
    max_num_seqs = max(1, math.ceil(completions_per_step / share.count))
    dtype = _dtype(recipe, on_gpu)
    max_len = _max_model_len(t)
    kv_bytes = t.vllm_kv_cache_memory_bytes
    if kv_bytes is None and not on_gpu:
        tokens = max_num_seqs * (max_len or arch.max_position_embeddings)
        kv_bytes = _kv_bytes_for(arch, dtype, tokens)
    return VLLMConfig(
        model=model_dir,
        mode="colocate",
        tensor_parallel_size=t.vllm_tensor_parallel_size,
        gpu_memory_utilization=t.vllm_gpu_memory_utilization,
        kv_cache_memory_bytes=kv_bytes,
        dtype=dtype,
        max_model_len=max_len,
        max_num_seqs=max_num_seqs,
        seed=t.seed + share.index,
        enable_sleep_mode=t.vllm_enable_sleep_mode,
        enforce_eager=not on_gpu,
        enable_prefix_caching=t.vllm_enable_prefix_caching,
        trust_remote_code=recipe.model.trust_remote_code,
    )


def build_rollout_engine(
    recipe, model_dir: str, arch, share: EngineShare, *, completions_per_step: int, on_gpu: bool
):
    """This rank's engine (see the module table); ``share`` from ``engine_share``."""
    t = recipe.training
    sync = WeightSyncConfig(bucket_bytes=t.weight_sync_bucket_mb * 2**20, host=t.weight_sync_host)
    if is_colocated_vllm(t):
        from megagrpo.rollout.vllm_engine import VLLMEngine

        config = vllm_config(
            recipe, model_dir, arch, share=share, completions_per_step=completions_per_step,
            on_gpu=on_gpu,
        )  # fmt: skip
        return VLLMEngine.from_config(config)
    from megagrpo.rollout.pool import RolloutPool, RolloutPoolConfig

    if t.use_vllm:  # server mode
        addresses = t.vllm_server_addresses or [f"{t.vllm_server_host}:{t.vllm_server_port}"]
        return RolloutPool(
            RolloutPoolConfig(
                server_addresses=addresses,
                connect_timeout_s=t.vllm_server_timeout,
                weight_sync=sync,
            )
        )
    if t.rollout_num_engines == 0:
        from megagrpo.rollout.hf_engine import TransformersEngine, TransformersEngineConfig

        return TransformersEngine.from_pretrained(
            TransformersEngineConfig(
                model=model_dir,
                dtype=_dtype(recipe, on_gpu),
                device="cuda" if on_gpu else "cpu",
                max_batch_size=t.rollout_max_batch_size,
                trust_remote_code=recipe.model.trust_remote_code,
            )
        )
    return RolloutPool(
        RolloutPoolConfig(
            model=model_dir,
            num_engines=t.rollout_num_engines,
            threads_per_engine=t.rollout_threads_per_engine,
            dtype=_dtype(recipe, on_gpu),
            max_batch_size=t.rollout_max_batch_size,
            weight_sync=sync,
        )
    )
