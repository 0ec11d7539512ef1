"""Choosing and building the rollout engine from one config (names follow GRPOConfig / TRL).

| setting | engine |
|---|---|
| ``use_vllm=False``, ``rollout_num_engines=0`` | ``TransformersEngine`` in this process |
| ``use_vllm=False``, ``rollout_num_engines=E`` | ``RolloutPool`` of E transformers processes |
| ``use_vllm=True``, ``vllm_mode="colocate"`` | ``VLLMEngine`` in this trainer process |
| ``use_vllm=True``, ``vllm_mode="server"`` | ``RolloutPool`` over vLLM rollout-servers |
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RolloutConfig:
    """Which rollout engine the trainer uses and how it is set up."""

    use_vllm: bool = False
    """Generate with vLLM (GPU) instead of the embedded transformers engine."""
    vllm_mode: str = "colocate"
    """``colocate``: vLLM inside each trainer process; ``server``: separate rollout-servers."""
    vllm_gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory vLLM may take (colocate: leave room for training)."""
    vllm_tensor_parallel_size: int = 1
    """vLLM tensor parallelism (colocate: consecutive trainer ranks form one vLLM TP group)."""
    vllm_enable_sleep_mode: bool = True
    """colocate: release vLLM's GPU memory while the trainer trains."""
    vllm_server_host: str = "127.0.0.1"
    """server mode: host of the (first) rollout-server."""
    vllm_server_port: int = 8000
    """server mode: port of the (first) rollout-server."""
    vllm_server_addresses: list[str] = field(default_factory=list)
    """server mode: ``host:port`` of every rollout-server (overrides host / port)."""
    rollout_num_engines: int = 0
    """Transformers engine processes; 0 runs the engine inside the trainer process."""
    rollout_threads_per_engine: int | None = None
    """CPU threads per engine process (None: the cores split evenly)."""
    rollout_max_batch_size: int = 1024
    """Rows the transformers engine decodes together."""
    rollout_dtype: str = "float32"
    """Dtype of the transformers engine."""
    weight_sync_bucket_mb: int = 512
    """Bucket size of the weight broadcast to engine processes."""
    weight_sync_host: str = "127.0.0.1"
    """Address of the trainer's sync store as the engine processes reach it."""

    def __post_init__(self):
        if self.vllm_mode not in ("colocate", "server"):
            raise ValueError(
                f"RolloutConfig.vllm_mode must be colocate or server, got {self.vllm_mode!r}"
            )
        if self.rollout_num_engines < 0:
            raise ValueError(
                f"RolloutConfig.rollout_num_engines must be >= 0, got {self.rollout_num_engines}"
            )


def build_rollout_engine(cfg: RolloutConfig, model_dir: str, *, device: str = "cpu"):
    """The RolloutEngine the settings ask for (see the module table)."""
    from megagrpo.rollout.weight_sync import WeightSyncConfig

    sync = WeightSyncConfig(
        bucket_bytes=cfg.weight_sync_bucket_mb * 2**20, host=cfg.weight_sync_host
    )
    if cfg.use_vllm and cfg.vllm_mode == "colocate":
        from megagrpo.rollout.vllm_engine import VLLMConfig, VLLMEngine

        return VLLMEngine.from_config(
            VLLMConfig(
                model=model_dir,
                mode="colocate",
                tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                enable_sleep_mode=cfg.vllm_enable_sleep_mode,
            )
        )
    from megagrpo.rollout.pool import RolloutPool, RolloutPoolConfig

    if cfg.use_vllm:  # server mode
        addresses = cfg.vllm_server_addresses or [f"{cfg.vllm_server_host}:{cfg.vllm_server_port}"]
        return RolloutPool(RolloutPoolConfig(server_addresses=addresses, weight_sync=sync))
    if cfg.rollout_num_engines == 0:
        from megagrpo.rollout.hf_engine import TransformersEngine, TransformersEngineConfig

        return TransformersEngine.from_pretrained(
            TransformersEngineConfig(
                model=model_dir,
                dtype=cfg.rollout_dtype,
                device=device,
                max_batch_size=cfg.rollout_max_batch_size,
            )
        )
    return RolloutPool(
        RolloutPoolConfig(
            model=model_dir,
            num_engines=cfg.rollout_num_engines,
            threads_per_engine=cfg.rollout_threads_per_engine,
            dtype=cfg.rollout_dtype,
            max_batch_size=cfg.rollout_max_batch_size,
            weight_sync=sync,
        )
    )
