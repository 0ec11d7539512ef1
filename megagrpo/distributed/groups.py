"""Start torch.distributed from torchrun's environment and build megatron's parallel groups.

``init_distributed`` is called once per trainer process. It reads RANK / WORLD_SIZE / LOCAL_RANK
/ MASTER_ADDR / MASTER_PORT (set by torchrun; a single process without them runs as world size
1), picks NCCL on GPU and gloo on CPU, turns on the CPU redirection only where no CUDA device
exists, initialises megatron-core's parallel_state (TP, PP, virtual PP, CP; DP is what remains)
and returns the groups as a ``ParallelGroups`` value that callers pass on explicitly.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megagrpo.config.megatron import MegatronConfig
from megagrpo.distributed import cpu_shim


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the TP x PP x CP x DP grid and the process groups that go with it."""

    world_size: int
    rank: int
    tp_size: int
    pp_size: int
    cp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    vpp_size: int | None
    tp: Any
    """Tensor-parallel group."""
    pp: Any
    """Pipeline-parallel group."""
    cp: Any
    """Context-parallel group."""
    dp: Any
    """Data-parallel group (without context parallelism)."""
    dp_cp: Any
    """Data- and context-parallel group (gradients are reduced over it)."""
    mp: Any
    """Model-parallel group (TP x PP)."""
    pg_collection: Any
    """megatron-core's ProcessGroupCollection of the same groups, for its modules."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for single-process and test runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(
    par: MegatronConfig,
    *,
    seed: int = 42,
    timeout_minutes: int = 30,
) -> ParallelGroups:
    """Start torch.distributed and megatron's parallel state for the layout in ``par``
    (a ``MegatronConfig``: tensor / pipeline / virtual pipeline / context parallel sizes)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    vpp, cp = par.virtual_pipeline_model_parallel_size, par.context_parallel_size

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    else:
        cpu_shim.enable()
    if not dist.is_initialized():
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        init_method = None  # torchrun's env:// rendezvous
        if "MASTER_ADDR" not in os.environ:
            if world != 1:
                raise RuntimeError(
                    f"WORLD_SIZE={world} but MASTER_ADDR is not set; launch with torchrun"
                )
            # A lone process: its own port, without touching the environment that child
            # processes (rollout engines, reward workers) inherit.
            init_method = f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=timeout_minutes),
        )
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size={tp} x "
            f"pipeline_model_parallel_size={pp} x context_parallel_size={cp}"
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelGroups(
        world_size=world,
        rank=dist.get_rank(),
        tp_size=tp,
        pp_size=pp,
        cp_size=cp,
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        vpp_size=vpp,
        tp=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        cp=ps.get_context_parallel_group(),
        dp=ps.get_data_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
        mp=ps.get_model_parallel_group(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


def destroy_distributed() -> None:
    """Tear down megatron's parallel state, the default process group and the CPU redirection."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    cpu_shim.disable()
