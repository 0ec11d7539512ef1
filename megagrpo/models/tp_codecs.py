"""How Hugging Face tensors become megatron tensor-parallel shards, and back.

Each codec turns the HF tensor(s) behind one megatron parameter into the shard a given TP rank
holds (``shard``), and the TP shards of that parameter back into the HF tensor(s) (``merge``).
``shard`` reads its inputs through a ``TensorSource`` by row or column ranges only, so a rank (or
the offline converter) reads exactly its slice from a memory-mapped safetensors file and never
materialises the full tensor unless the codec needs it (replicated norms).

Legend: H hidden, G query groups, hpg heads per group, d head dim, F ffn hidden, V vocab,
Vp padded vocab, r a TP rank, T the TP size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class TensorSource(Protocol):
    """Read-only access to named tensors, by slices along one dimension."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor: ...


def _part(n: int, rank: int, size: int, what: str) -> tuple[int, int]:
    if n % size:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {size}")
    step = n // size
    return rank * step, (rank + 1) * step


def _full(src: TensorSource, name: str) -> torch.Tensor:
    return src.slice(name, 0, 0, src.shape(name)[0])


class Codec:
    """One megatron parameter <-> its HF tensor(s)."""

    def shard(self, src: TensorSource, names: tuple[str, ...], rank: int, size: int):
        raise NotImplementedError

    def merge(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def shard_shape(self, hf_shapes: list[tuple[int, ...]], size: int) -> tuple[int, ...]:
        """Shape of one rank's shard, from the HF shapes alone (for file headers)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Replicated(Codec):
    """Same tensor on every TP rank (norm weights)."""

    def shard(self, src, names, rank, size):
        return _full(src, names[0])

    def merge(self, shards):
        return [shards[0]]

    def shard_shape(self, hf_shapes, size):
        return hf_shapes[0]


@dataclass(frozen=True)
class Split(Codec):
    """Split along ``dim``: 1 for row-parallel weights (o_proj, down_proj)."""

    dim: int

    def shard(self, src, names, rank, size):
        start, stop = _part(src.shape(names[0])[self.dim], rank, size, f"{names[0]} dim {self.dim}")
        return src.slice(names[0], self.dim, start, stop)

    def merge(self, shards):
        return [torch.cat(shards, dim=self.dim)]

    def shard_shape(self, hf_shapes, size):
        shape = list(hf_shapes[0])
        shape[self.dim] //= size
        return tuple(shape)


@dataclass(frozen=True)
class VocabSplit(Codec):
    """Embedding / output rows split over TP; rows from ``vocab`` to ``padded`` are zeros."""

    vocab: int
    padded: int

    def shard(self, src, names, rank, size):
        start, stop = _part(self.padded, rank, size, "padded vocab size")
        (v, h) = src.shape(names[0])
        if v != self.vocab:
            raise ValueError(f"{names[0]} has {v} rows, the config's vocab_size is {self.vocab}")
        real = src.slice(names[0], 0, min(start, v), min(stop, v))
        if real.shape[0] == stop - start:
            return real
        pad = torch.zeros(stop - start - real.shape[0], h, dtype=real.dtype)
        return torch.cat([real, pad], dim=0)

    def merge(self, shards):
        return [torch.cat(shards, dim=0)[: self.vocab]]

    def shard_shape(self, hf_shapes, size):
        return (self.padded // size, *hf_shapes[0][1:])


@dataclass(frozen=True)
class FusedQKV(Codec):
    """q, k, v projections (weights [*, H] or biases [*]) fused per query group.

    megatron's linear_qkv rows are ordered group by group: for group g, its hpg query heads,
    then its key head, then its value head; TP splits whole groups.
    """

    groups: int
    heads_per_group: int
    head_dim: int

    def shard(self, src, names, rank, size):
        g0, g1 = _part(self.groups, rank, size, "num_query_groups")
        d, hpg = self.head_dim, self.heads_per_group
        q = src.slice(names[0], 0, g0 * hpg * d, g1 * hpg * d)
        k = src.slice(names[1], 0, g0 * d, g1 * d)
        v = src.slice(names[2], 0, g0 * d, g1 * d)
        rest = q.shape[1:]
        gl = g1 - g0
        fused = torch.cat(
            [q.reshape(gl, hpg * d, *rest), k.reshape(gl, d, *rest), v.reshape(gl, d, *rest)], 1
        )
        return fused.reshape(gl * (hpg + 2) * d, *rest)

    def merge(self, shards):
        d, hpg = self.head_dim, self.heads_per_group
        full = torch.cat(shards, dim=0)
        rest = full.shape[1:]
        grouped = full.reshape(self.groups, (hpg + 2) * d, *rest)
        q, k, v = torch.split(grouped, [hpg * d, d, d], dim=1)
        return [
            q.reshape(self.groups * hpg * d, *rest).contiguous(),
            k.reshape(self.groups * d, *rest).contiguous(),
            v.reshape(self.groups * d, *rest).contiguous(),
        ]

    def shard_shape(self, hf_shapes, size):
        rows = self.groups // size * (self.heads_per_group + 2) * self.head_dim
        return (rows, *hf_shapes[0][1:])


@dataclass(frozen=True)
class FusedGateUp(Codec):
    """SwiGLU gate and up projections: each TP shard is [gate rows of r; up rows of r]."""

    def shard(self, src, names, rank, size):
        start, stop = _part(src.shape(names[0])[0], rank, size, "intermediate_size")
        gate = src.slice(names[0], 0, start, stop)
        up = src.slice(names[1], 0, start, stop)
        return torch.cat([gate, up], dim=0)

    def merge(self, shards):
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], 0), torch.cat([h[1] for h in halves], 0)]

    def shard_shape(self, hf_shapes, size):
        return (2 * hf_shapes[0][0] // size, *hf_shapes[0][1:])


class DictSource:
    """A ``TensorSource`` over an in-memory ``{name: tensor}`` mapping."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def dtype(self, name):
        return self.tensors[name].dtype

    def slice(self, name, dim, start, stop):
        return self.tensors[name].narrow(dim, start, stop - start)
