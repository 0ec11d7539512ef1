"""Colocated engines: each trainer rank's engine generates its share of a batch.

With colocated vLLM every trainer rank holds an engine; ``tensor_parallel_size`` consecutive
ranks form one vLLM instance (they all receive the same prompts). A batch of requests is cut
into contiguous shares, one per instance (a group never straddles two), each instance generates
its share locally, and the instances' leaders send their groups to global rank 0, which scores
the whole batch. Only the gather is a collective; it runs on the trainer's main thread, in the
same order on every rank, on a gloo group of its own (the groups are Python objects).

A single engine on rank 0 (the embedded transformers engine, an engine pool) is the trivial
layout: one share, nothing to gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def contiguous_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``range(n)``, sizes differing by at most one."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        bounds.append((start, start + size))
        start += size
    return bounds


@dataclass
class EngineShare:
    """Which part of every batch this rank's engine generates, and where the groups go."""

    index: int = 0
    """This rank's engine instance (global rank // tensor_parallel_size)."""
    count: int = 1
    """Engine instances over the trainer's ranks."""
    leader: bool = True
    """Whether this rank sends its instance's groups (the instance's first rank)."""
    is_root: bool = True
    """Global rank 0: it receives every group and scores the batch."""
    group: Any = None
    """The gloo process group of the gather (None: a single engine, nothing to gather)."""

    @classmethod
    def over_ranks(cls, rank: int, world_size: int, tensor_parallel_size: int) -> EngineShare:
        """The share of trainer rank ``rank`` (every rank calls this: it builds a group)."""
        import torch.distributed as dist

        if world_size % tensor_parallel_size:
            raise ValueError(
                f"vllm_tensor_parallel_size={tensor_parallel_size} must divide the "
                f"{world_size} trainer ranks of colocated vLLM"
            )
        group = dist.new_group(backend="gloo") if world_size > 1 else None
        return cls(
            index=rank // tensor_parallel_size,
            count=world_size // tensor_parallel_size,
            leader=rank % tensor_parallel_size == 0,
            is_root=rank == 0,
            group=group,
        )

    def mine(self, requests: Sequence | None) -> list:
        """This instance's contiguous share of a batch's requests."""
        if requests is None:
            return []
        a, b = contiguous_bounds(len(requests), self.count)[self.index]
        return list(requests[a:b])

    def agree(self, value):
        """Global rank 0's ``value`` on every rank of the share (a decision only rank 0 can
        make, e.g. whether a step generates another round)."""
        if self.group is None:
            return value
        import torch.distributed as dist

        box = [value if self.is_root else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, groups: list) -> list | None:
        """The whole batch's groups, in request order, on global rank 0 (None elsewhere)."""
        if self.group is None:
            return groups
        import torch.distributed as dist

        received = [None] * dist.get_world_size(self.group) if self.is_root else None
        dist.gather_object(groups if self.leader else None, received, dst=0, group=self.group)
        if not self.is_root:
            return None
        return [g for part in received if part is not None for g in part]
