"""Weight sync: HF-named tensors from one sender to every engine, in bounded buckets.

The sender (trainer rank 0, or the pool client living there) and the receivers (engine processes,
or the workers of a vLLM engine) join a process group of their own, ``StatelessGroup``: a TCP
store plus a gloo (CPU) or NCCL (GPU) group built directly from it, so it lives beside the
trainer's default group and megatron's groups instead of joining them.

One update is a sequence of buckets. Each bucket is a JSON header (names, dtypes, shapes, byte
offsets) and one flat byte buffer, both broadcast from rank 0; a header with ``last`` ends the
update. The sender copies tensors into one preallocated buffer of ``bucket_bytes`` as they come
out of the source iterator (``iter_hf_tensors`` for a live megatron model), so it holds one bucket
and one tensor at a time; a tensor larger than a bucket travels alone. Receivers view each tensor
out of the buffer byte for byte: what arrives is bit-identical to what was sent.

Legend: ``n`` bytes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch

_ALIGN = 64  # byte alignment of each tensor inside a bucket (any dtype can be viewed in place)
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    )
}


@dataclass
class WeightSyncConfig:
    """Settings of the weight broadcast from the trainer to the engines."""

    bucket_bytes: int = 512 * 2**20
    """Bytes per broadcast bucket (the sender's extra memory is about one bucket)."""
    backend: str = "auto"
    """``gloo``, ``nccl`` or ``auto`` (NCCL when the sender and the engines hold GPUs)."""
    host: str | None = None
    """Address of the sender's TCP store as the engines reach it; None: ``default_sync_host``."""
    timeout_s: float = 600.0
    """How long a collective of the sync group may wait before failing."""

    def __post_init__(self):
        if self.bucket_bytes < _ALIGN:
            raise ValueError(
                f"WeightSyncConfig.bucket_bytes must be >= {_ALIGN}, got {self.bucket_bytes}"
            )
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(
                f"WeightSyncConfig.backend must be auto, gloo or nccl, got {self.backend!r}"
            )


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def default_sync_host(engine_hosts: Iterable[str]) -> str:
    """Where engines on ``engine_hosts`` reach this process: 127.0.0.1 when they all run on this
    machine; otherwise torchrun's MASTER_ADDR (rank 0's node, where the sender runs), else this
    machine's fully qualified name."""
    if all(_is_loopback(h) for h in engine_hosts):
        return "127.0.0.1"
    import os
    import socket

    master = os.environ.get("MASTER_ADDR", "")
    return master if master and not _is_loopback(master) else socket.getfqdn()


@dataclass(frozen=True)
class GroupSpec:
    """Where and how to join one sync group (sent to the engines as JSON)."""

    host: str
    port: int
    world_size: int
    backend: str = "gloo"
    timeout_s: float = 600.0
    group_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GroupSpec:
        return cls(**d)


class StatelessGroup:
    """A torch.distributed group built from its own TCP store (rank 0 hosts the store)."""

    def __init__(self, spec: GroupSpec, rank: int, device: torch.device | str | None = None):
        import torch.distributed as dist

        if not 0 <= rank < spec.world_size:
            raise ValueError(f"sync group rank {rank} is outside world size {spec.world_size}")
        self.spec, self.rank = spec, rank
        timeout = timedelta(seconds=spec.timeout_s)
        self.store = dist.TCPStore(
            spec.host, spec.port, spec.world_size, rank == 0, timeout=timeout
        )
        prefixed = dist.PrefixStore(f"megagrpo/{spec.group_id}", self.store)
        if spec.backend == "gloo":
            self.pg = dist.ProcessGroupGloo(prefixed, rank, spec.world_size, timeout)
            self.device = torch.device("cpu")
        elif spec.backend == "nccl":
            self.device = torch.device(device or f"cuda:{torch.cuda.current_device()}")
            torch.cuda.set_device(self.device)  # NCCL binds the communicator to this GPU
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, spec.world_size, opts)
        else:
            raise ValueError(f"sync group backend must be gloo or nccl, got {spec.backend!r}")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()

    def broadcast_json(self, obj=None, src: int = 0):
        """Send ``obj`` (on ``src``) / receive it (elsewhere) as JSON bytes."""
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        payload = None
        if self.rank == src:
            payload = json.dumps(obj).encode()
            size.fill_(len(payload))
        self.broadcast(size, src)
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        if self.rank == src:
            buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        self.broadcast(buf, src)
        return obj if self.rank == src else json.loads(bytes(buf.cpu().numpy()))

    def barrier(self) -> None:
        self.broadcast(torch.zeros(1, device=self.device))

    def close(self) -> None:
        try:
            self.pg.shutdown()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _dtype_name(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"weight sync cannot send dtype {t.dtype}")
    return name


@dataclass
class SyncStats:
    """What one ``send_weights`` call did."""

    tensors: int = 0
    buckets: int = 0
    bytes: int = 0
    largest_bucket_bytes: int = 0


def send_weights(
    group: StatelessGroup,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    version: int,
    bucket_bytes: int,
    *,
    on_tensor: Callable[[str, torch.Tensor], None] | None = None,
) -> SyncStats:
    """Broadcast every (name, tensor) from rank 0 of ``group`` in buckets of ``bucket_bytes``.

    ``on_tensor`` sees each tensor as it passes (the pool keeps a copy for restarted engines).
    """
    if group.rank != 0:
        raise RuntimeError("send_weights runs on rank 0 of the sync group")
    stats = SyncStats()
    buf_n = torch.empty(bucket_bytes, dtype=torch.uint8, device=group.device)
    entries: list[list] = []
    used = 0

    def flush(data_n: torch.Tensor, items: list[list], size: int) -> None:
        header = {"version": version, "last": False, "nbytes": size, "entries": items}
        group.broadcast_json(header)
        group.broadcast(data_n[:size])
        stats.buckets += 1
        stats.bytes += size
        stats.largest_bucket_bytes = max(stats.largest_bucket_bytes, size)

    for name, tensor in named_tensors:
        if on_tensor is not None:
            on_tensor(name, tensor)
        raw_n = _as_bytes(tensor.to(group.device))
        entry = [name, _dtype_name(tensor), list(tensor.shape)]
        stats.tensors += 1
        if raw_n.numel() > bucket_bytes:  # travels alone, without a copy
            if entries:
                flush(buf_n, entries, entries[-1][3] + entries[-1][4])
                entries, used = [], 0
            flush(raw_n, [entry + [0, raw_n.numel()]], raw_n.numel())
            continue
        if used + raw_n.numel() > bucket_bytes:
            flush(buf_n, entries, entries[-1][3] + entries[-1][4])
            entries, used = [], 0
        buf_n[used : used + raw_n.numel()].copy_(raw_n)
        entries.append(entry + [used, raw_n.numel()])
        used = _aligned(used + raw_n.numel())
    if entries:
        flush(buf_n, entries, entries[-1][3] + entries[-1][4])
    group.broadcast_json({"version": version, "last": True, "nbytes": 0, "entries": []})
    return stats


def receive_weights(
    group: StatelessGroup, expected_version: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The receiving side of ``send_weights``: yields (name, tensor) views, bucket by bucket.

    The views share one bucket's buffer: copy them before asking for the next bucket's tensors.
    """
    while True:
        header = group.broadcast_json()
        if expected_version is not None and header["version"] != expected_version:
            raise RuntimeError(
                f"weight sync: expected version {expected_version}, the sender sends "
                f"{header['version']}"
            )
        if header["last"]:
            return
        buf_n = torch.empty(header["nbytes"], dtype=torch.uint8, device=group.device)
        group.broadcast(buf_n)
        for name, dtype, shape, offset, size in header["entries"]:
            yield name, buf_n[offset : offset + size].view(_DTYPES[dtype]).view(shape)


def tensor_digest(t: torch.Tensor) -> list:
    """[dtype, shape, sha256 of the bytes]: equal digests mean bit-identical tensors."""
    import hashlib

    raw = _as_bytes(t).cpu().numpy().tobytes()
    return [str(t.dtype), list(t.shape), hashlib.sha256(raw).hexdigest()]


def drain(named_tensors: Iterable) -> int:
    """Consume an iterator whose collectives other ranks take part in; returns the count."""
    return sum(1 for _ in named_tensors)


def sync_weights_from_megatron(
    chunks, arch, groups, engine, version: int, *, dtype: torch.dtype | None = None
) -> None:
    """Every trainer rank calls this after an optimizer step; ranks holding an engine update it.

    ``engine`` is the rank's RolloutEngine (a pool client on rank 0, a colocated engine, ...) or
    None. The HF-name iterator needs every TP / PP rank to iterate together, so ranks without an
    engine, and a rank whose engine fails part-way, still run it to the end.
    """
    from megagrpo.conversion.hf_weights import iter_hf_tensors

    stream = iter_hf_tensors(chunks, arch, groups, gather_pp=True, dtype=dtype)
    if engine is None:
        drain(stream)
        return
    try:
        engine.update_weights(stream, version)
    finally:
        drain(stream)
