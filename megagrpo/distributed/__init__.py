"""Process start-up: torch.distributed, megatron-core's parallel groups, the CPU redirection."""

from megagrpo.distributed.groups import (
    ParallelGroups,
    destroy_distributed,
    free_port,
    init_distributed,
)

__all__ = ["ParallelGroups", "destroy_distributed", "free_port", "init_distributed"]
