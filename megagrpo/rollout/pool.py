"""A pool of rollout engines in their own processes, used like one engine.

``RolloutPool`` starts ``num_engines`` ``megagrpo rollout-server`` processes on this machine
(CPU threads split between them), or connects to servers already running elsewhere
(``server_addresses``: the GPU pool mode, one server per GPU group). It is a ``RolloutEngine``:

- ``generate``: seeds are fixed for the whole batch first (``resolve_seeds``), the requests are
  cut into contiguous shards, one per engine (a group never straddles two engines), the shards
  run in parallel and the groups come back in request order. An engine that dies or stops
  answering is restarted (spawned pools), given the current weights, and its shard re-issued.
- ``update_weights``: one broadcast to every engine over the sync group (``weight_sync.py``);
  the group is built once and rebuilt after a restart. A pool that spawned its engines keeps the
  last weights in host memory (``keep_weights_copy``) so a restarted engine can be brought to the
  current version; a pool of servers it did not start cannot restart them and keeps no copy.

Spawned vLLM engines get one GPU group each (``CUDA_VISIBLE_DEVICES``: ``devices[i]``, else GPUs
``i*tp .. i*tp+tp-1``) and their ``VLLMConfig`` as ``--vllm-*`` flags. Servers named in
``server_addresses`` may still be starting: the pool retries each for ``connect_timeout_s``,
then fails naming the address.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from megagrpo.rollout import wire
from megagrpo.rollout.colocated import contiguous_bounds
from megagrpo.rollout.protocol import RolloutRequest, Sample, SamplingParams, resolve_seeds
from megagrpo.rollout.vllm_engine import VLLMConfig, vllm_flags
from megagrpo.rollout.weight_sync import (
    GroupSpec,
    StatelessGroup,
    SyncStats,
    WeightSyncConfig,
    default_sync_host,
    send_weights,
)


@dataclass
class RolloutPoolConfig:
    """A pool of rollout-server processes."""

    model: str = ""
    """Hugging Face model directory every engine starts from."""
    num_engines: int = 1
    """Engine processes to start (ignored when ``server_addresses`` is given)."""
    engine: str = "transformers"
    """``transformers`` or ``vllm`` (spawned servers)."""
    threads_per_engine: int | None = None
    """torch threads of each engine; None: the machine's cores split evenly between engines."""
    dtype: str = "float32"
    """Model dtype of the engines."""
    devices: list[str] = field(default_factory=list)
    """Per spawned engine: its device (transformers: ``cuda:0``, ...; empty: CPU), or its GPUs
    (vLLM: ``CUDA_VISIBLE_DEVICES`` such as ``"2,3"``; empty: ``tensor_parallel_size`` GPUs per
    engine in order when CUDA is available)."""
    vllm: VLLMConfig | None = None
    """Settings of spawned vLLM engines (``engine="vllm"``): TP, memory, lengths, seed."""
    max_batch_size: int = 1024
    """Rows decoded together by each transformers engine."""
    server_addresses: list[str] = field(default_factory=list)
    """``host:port`` of running ``megagrpo rollout-server`` processes to use instead of spawning."""
    start_timeout_s: float = 300.0
    """How long a spawned engine may take to load its model."""
    connect_timeout_s: float = 240.0
    """How long to keep trying a server of ``server_addresses`` (``vllm_server_timeout``)."""
    request_timeout_s: float = 3600.0
    """How long one shard may take before its engine counts as hung."""
    max_restarts: int = 3
    """Restarts per engine within one ``generate`` call before giving up."""
    keep_weights_copy: bool = True
    """Spawned engines: keep the last broadcast weights in host memory to bring restarted
    engines up to date (servers the pool did not start are never restarted: no copy)."""
    record_weight_digests: bool = False
    """Spawned vLLM engines hash every update's tensors so ``weights_digests`` can check them."""
    log_dir: str | None = None
    """Where the engines' stdout / stderr go (default: a temporary directory)."""
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)

    def __post_init__(self):
        if not self.server_addresses:
            if not self.model:
                raise ValueError("RolloutPoolConfig.model is required to spawn engines")
            if self.num_engines < 1:
                raise ValueError(
                    f"RolloutPoolConfig.num_engines must be >= 1, got {self.num_engines}"
                )
        for a in self.server_addresses:
            host, _, port = a.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"RolloutPoolConfig.server_addresses: {a!r} is not host:port")
        if self.engine not in ("transformers", "vllm"):
            raise ValueError(
                f"RolloutPoolConfig.engine must be transformers or vllm, got {self.engine!r}"
            )


class EngineCrashed(RuntimeError):
    """An engine process died or stopped answering."""


@dataclass
class _Engine:
    index: int
    sock: socket.socket | None = None
    proc: subprocess.Popen | None = None
    address: tuple[str, int] | None = None
    receivers: int = 1
    restarts: int = 0
    busy: bool = False


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill an engine process and everything it started (vLLM's engine-core and worker
    processes): each engine runs in a session of its own, so its process group holds exactly
    those, and they outlive a server killed alone. Once per process: its group id is not
    reused for another group while this leader is unreaped, and it is reaped here."""
    if getattr(proc, "_megagrpo_group_killed", False):
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    proc._megagrpo_group_killed = True


def _kill_all(procs: list) -> None:
    for p in procs:
        if p is not None:
            _kill_group(p)


class RolloutPool:
    """``RolloutEngine`` over engine processes; see the module docstring."""

    def __init__(self, config: RolloutPoolConfig):
        self.config = config
        self.weight_version = 0
        self._updated = False  # whether update_weights ever ran (restarts then need weights)
        self._weights_copy: dict | None = None
        self._group: StatelessGroup | None = None
        self._lock = threading.RLock()
        self._restart_lock = threading.Lock()
        self._own_log_dir = config.log_dir is None
        self.log_dir = config.log_dir or tempfile.mkdtemp(prefix="megagrpo-rollout-")
        self.spawned = not config.server_addresses
        n = config.num_engines if self.spawned else len(config.server_addresses)
        self.engines = [_Engine(i) for i in range(n)]
        self.restart_count = 0
        self._procs: list = []
        self._finalizer = weakref.finalize(self, _kill_all, self._procs)
        try:
            if self.spawned:
                for e in self.engines:
                    self._spawn(e)
                for e in self.engines:
                    self._await_ready(e)
            else:
                for e, a in zip(self.engines, config.server_addresses):
                    host, _, port = a.rpartition(":")
                    e.address = (host, int(port))
                    self._connect(e)
        except BaseException:
            self.close()
            raise

    # -- processes -----------------------------------------------------------------------------

    def _threads(self) -> int:
        if self.config.threads_per_engine:
            return self.config.threads_per_engine
        return max(1, (os.cpu_count() or 1) // len(self.engines))

    def _spawn(self, e: _Engine) -> None:
        c = self.config
        ready = os.path.join(self.log_dir, f"engine{e.index}.ready")
        if os.path.exists(ready):
            os.remove(ready)
        threads = self._threads()
        cmd = [
            sys.executable, "-m", "megagrpo.cli", "rollout-server",
            "--model", c.model, "--engine", c.engine, "--dtype", c.dtype,
            "--port", "0", "--ready-file", ready, "--num-threads", str(threads),
            "--max-batch-size", str(c.max_batch_size), "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if c.engine == "vllm":
            cmd += vllm_flags(c.vllm or VLLMConfig(mode="server"))
            if c.record_weight_digests:
                cmd.append("--record-weight-digests")
            gpus = self._vllm_gpus(e.index)
            if gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpus
        elif c.devices:
            cmd += ["--device", c.devices[e.index % len(c.devices)]]
        log = open(os.path.join(self.log_dir, f"engine{e.index}.log"), "ab")
        e.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self._procs.append(e.proc)
        e.address = None

    def _vllm_gpus(self, index: int) -> str | None:
        """CUDA_VISIBLE_DEVICES of spawned vLLM engine ``index`` (None: leave it alone)."""
        if self.config.devices:
            return self.config.devices[index].removeprefix("cuda:")
        if not torch.cuda.is_available():
            return None
        tp = (self.config.vllm or VLLMConfig()).tensor_parallel_size
        first = index * tp
        if first + tp > torch.cuda.device_count():
            raise ValueError(
                f"vLLM engine {index} needs GPUs {first}..{first + tp - 1}, this machine has "
                f"{torch.cuda.device_count()}"
            )
        return ",".join(str(first + g) for g in range(tp))

    def _log_tail(self, e: _Engine, chars: int = 3000) -> str:
        try:
            with open(os.path.join(self.log_dir, f"engine{e.index}.log"), errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def _await_ready(self, e: _Engine) -> None:
        ready = os.path.join(self.log_dir, f"engine{e.index}.ready")
        deadline = time.monotonic() + self.config.start_timeout_s
        while not os.path.exists(ready):
            if e.proc.poll() is not None:
                raise EngineCrashed(
                    f"rollout engine {e.index} exited with code {e.proc.returncode} while "
                    f"starting; its log ends with:\n{self._log_tail(e)}"
                )
            if time.monotonic() > deadline:
                raise EngineCrashed(
                    f"rollout engine {e.index} did not start in {self.config.start_timeout_s}s; "
                    f"its log ends with:\n{self._log_tail(e)}"
                )
            time.sleep(0.05)
        with open(ready) as f:
            e.address = ("127.0.0.1", int(json.load(f)["port"]))
        self._connect(e)

    def _connect(self, e: _Engine) -> None:
        """Connect and ask for ``info``; a server given by address is retried until
        ``connect_timeout_s`` (it may still be loading its model)."""
        wait = self.config.start_timeout_s if self.spawned else self.config.connect_timeout_s
        deadline = time.monotonic() + wait
        while True:
            try:
                left = max(0.1, deadline - time.monotonic())
                e.sock = socket.create_connection(e.address, timeout=left)
                e.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                info = wire.call(e.sock, {"cmd": "info"})
                break
            except (OSError, ConnectionError) as err:
                if e.sock is not None:
                    e.sock.close()
                    e.sock = None
                if time.monotonic() >= deadline:
                    host, port = e.address
                    raise EngineCrashed(
                        f"rollout server {host}:{port} did not answer within {wait:g}s "
                        f"({type(err).__name__}: {err}); is megagrpo rollout-server running "
                        "there (vllm_server_addresses / vllm_server_host, vllm_server_timeout)?"
                    ) from err
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        e.receivers = int(info["receivers"])
        e.sock.settimeout(self.config.request_timeout_s)

    def _restart(self, e: _Engine, why: str) -> None:
        with self._restart_lock:
            self._restart_locked(e, why)

    def _restart_locked(self, e: _Engine, why: str) -> None:
        if not self.spawned:
            raise EngineCrashed(
                f"rollout server {e.address} failed ({why}); it was not started "
                "by this pool, so it cannot be restarted"
            )
        if e.restarts >= self.config.max_restarts:
            raise EngineCrashed(
                f"rollout engine {e.index} failed {e.restarts + 1} times ({why}); its log ends "
                f"with:\n{self._log_tail(e)}"
            )
        e.restarts += 1
        self.restart_count += 1
        if e.sock is not None:
            e.sock.close()
        if e.proc is not None:
            _kill_group(e.proc)  # also what a killed server left running
        self._spawn(e)
        self._await_ready(e)
        if self._updated:
            self._resync(e)
        # The sync group had the old process as a member: build a new one at the next update.
        self._drop_group()

    def _resync(self, e: _Engine) -> None:
        if self._weights_copy is None:
            raise EngineCrashed(
                f"rollout engine {e.index} was restarted after weight updates (version "
                f"{self.weight_version}) but the pool keeps no copy of the weights "
                "(keep_weights_copy=False)"
            )
        spec = self._new_spec(1 + e.receivers)
        wire.send_msg(
            e.sock, {"cmd": "update_weights", "group": spec.to_dict(), "rank": 1,
                     "version": self.weight_version}
        )  # fmt: skip
        group = StatelessGroup(spec, 0)
        try:
            send_weights(group, self._weights_copy.items(), self.weight_version,
                         self.config.weight_sync.bucket_bytes)  # fmt: skip
            wire.check_reply(wire.recv_msg(e.sock))
        finally:
            group.close()

    # -- generation ----------------------------------------------------------------------------

    def engine_pids(self) -> list[int | None]:
        return [e.proc.pid if e.proc is not None else None for e in self.engines]

    def _run_shard(self, e: _Engine, requests, sampling) -> list[list[Sample]]:
        msg = wire.generate_message(requests, sampling)
        while True:
            try:
                e.busy = True
                wire.send_msg(e.sock, msg)
                reply = wire.recv_msg(e.sock)
            except (OSError, ConnectionError) as err:  # died, or hung past the timeout
                e.busy = False
                self._restart(e, f"{type(err).__name__}: {err}")
                continue
            e.busy = False
            return wire.decode_groups(wire.check_reply(reply)["groups"])

    def generate(
        self, requests: Sequence[RolloutRequest], sampling: SamplingParams
    ) -> list[list[Sample]]:
        requests = resolve_seeds(list(requests), sampling)
        with self._lock:
            for e in self.engines:
                e.restarts = 0
            bounds = contiguous_bounds(len(requests), len(self.engines))
            work = [(e, requests[a:b]) for e, (a, b) in zip(self.engines, bounds)]
            work = [(e, shard) for e, shard in work if shard]
            with ThreadPoolExecutor(max_workers=max(1, len(work))) as ex:
                futures = [ex.submit(self._run_shard, e, shard, sampling) for e, shard in work]
                results = [f.result() for f in futures]
        return [g for shard in results for g in shard]

    # -- weights -------------------------------------------------------------------------------

    def _new_spec(self, world_size: int) -> GroupSpec:
        from megagrpo.distributed import free_port

        ws = self.config.weight_sync
        return GroupSpec(
            host=ws.host or default_sync_host(e.address[0] for e in self.engines),
            port=free_port(),
            world_size=world_size,
            backend=self._backend(),
            timeout_s=ws.timeout_s,
        )

    def _backend(self) -> str:
        """NCCL only when both ends hold GPUs: vLLM or CUDA engines and a CUDA sender."""
        c = self.config
        if c.weight_sync.backend != "auto":
            return c.weight_sync.backend
        gpu_engines = (
            not self.spawned or c.engine == "vllm" or any(d.startswith("cuda") for d in c.devices)
        )
        return "nccl" if gpu_engines and torch.cuda.is_available() else "gloo"

    def _drop_group(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def update_weights(self, named_tensors: Iterable, version: int) -> SyncStats:
        """Broadcast HF-named tensors to every engine; later samples carry ``version``."""
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"update_weights: version must be an int >= 0, got {version!r}")
        with self._lock:
            for e in self.engines:  # an engine that died since the last call is replaced first
                if e.proc is not None and e.proc.poll() is not None:
                    e.restarts = 0
                    self._restart(e, f"exited with code {e.proc.returncode} before an update")
            new_group = self._group is None
            spec = (
                self._new_spec(1 + sum(e.receivers for e in self.engines))
                if new_group
                else (self._group.spec)
            )
            rank = 1
            for e in self.engines:
                wire.send_msg(e.sock, {"cmd": "update_weights", "group": spec.to_dict(),
                                       "rank": rank, "version": version})  # fmt: skip
                rank += e.receivers
            if new_group:
                self._group = StatelessGroup(spec, 0)
            copy = {} if self.config.keep_weights_copy and self.spawned else None

            def keep(name, tensor):
                copy[name] = tensor.detach().to("cpu", copy=True)

            try:
                stats = send_weights(
                    self._group, named_tensors, version, self.config.weight_sync.bucket_bytes,
                    on_tensor=keep if copy is not None else None,
                )  # fmt: skip
            except BaseException:
                self._drop_group()
                raise
            for e in self.engines:
                wire.check_reply(wire.recv_msg(e.sock))
            self._weights_copy = copy
            self.weight_version = version
            self._updated = True
        return stats

    def weights_digests(self) -> list[dict]:
        """Per engine: {name: [dtype, shape, sha256]} of its current weights."""
        with self._lock:
            return [wire.call(e.sock, {"cmd": "weights_digest"})["digests"] for e in self.engines]

    # -- shutdown ------------------------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every engine this pool started (asking first, then killing) and free the group."""
        for e in self.engines:
            if e.sock is not None:
                if self.spawned:
                    try:
                        e.sock.settimeout(timeout_s)
                        wire.call(e.sock, {"cmd": "shutdown"})
                    except (OSError, ConnectionError, wire.ServerError):
                        pass
                e.sock.close()
                e.sock = None
        for e in self.engines:
            if e.proc is not None:
                try:
                    e.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    pass
        _kill_all(self._procs)  # stragglers, and what each server started
        self._drop_group()
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
