"""The reward pool: W spawned worker processes that score a step's completions and never hang it.

``RewardPool(functions, config).score(completions, columns, num_generations)`` returns a
``RewardScores`` [N, K] in input order. Samples go to workers in chunks (one pipe message per
chunk, for throughput); every reward call (one function on one sample) has a hard time limit,
checked by the parent against the call's start time that the worker publishes in shared memory.
A call past the limit gets its worker killed (SIGKILL) and replaced: that call scores NaN with
status TIMEOUT, the calls the worker had finished are kept (shared memory), the rest of its chunk
goes back to the queue. A worker that dies under a call (segfault, ``os._exit``, the OOM killer)
is handled the same way, with status CRASH. ``close()`` (or leaving the ``with`` block) stops every
worker. Nothing here relies on signals in the parent; math-verify's ``signal.alarm`` runs inside
the workers' main threads as a cheaper first line (``math_timeout_seconds``).
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from megagrpo.rewards.calls import CRASH, ERROR, PENDING, SCORED, TIMEOUT
from megagrpo.rewards.scores import (
    MAX_ERROR_MESSAGES,
    RewardScores,
    apply_combine,
    check_batch,
    make_scores,
)
from megagrpo.rewards.worker import BUSY, FUNC, POS, START, worker_main

#: Times the same sample may be re-queued after losing a worker that was not inside one of its
#: calls (no call to blame) before its remaining calls are marked CRASH.
MAX_UNBLAMED_RETRIES = 2


@dataclass
class RewardPoolConfig:
    """Settings of the reward worker pool."""

    num_workers: int = 4
    """Worker processes (each runs one reward call at a time)."""
    timeout_seconds: float = 10.0
    """Hard limit of one reward call (one function on one sample); past it the worker is killed."""
    max_chunk: int = 64
    """Most samples sent to a worker in one message (chunks shrink so every worker gets ~4)."""
    math_timeout_seconds: int | None = None
    """math-verify's in-worker ``signal.alarm`` per parse/verify, whole seconds; None: a third of
    timeout_seconds (at least 1), so most runaway verifications end cheaply before the kill;
    0: off."""
    memory_limit_mb: int | None = None
    """Address-space limit of each worker (RLIMIT_AS); a call that allocates past it raises
    MemoryError and scores NaN (ERROR). None: no limit (the OOM killer's kill counts as CRASH)."""
    startup_timeout_seconds: float = 120.0
    """Time a new worker may take to import and build the reward functions."""

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"num_workers={self.num_workers} must be >= 1")
        if not (self.timeout_seconds > 0):
            raise ValueError(f"timeout_seconds={self.timeout_seconds} must be > 0")
        if self.max_chunk < 1:
            raise ValueError(f"max_chunk={self.max_chunk} must be >= 1")

    @property
    def math_alarm(self) -> int:
        if self.math_timeout_seconds is not None:
            return int(self.math_timeout_seconds)
        return max(1, int(self.timeout_seconds / 3))

    @classmethod
    def from_script_args(cls, script_args, **overrides) -> RewardPoolConfig:
        """The pool settings of a ``GRPOScriptArguments``: num_reward_workers and
        reward_timeout_seconds; ``overrides`` set other fields."""
        kw = dict(
            num_workers=script_args.num_reward_workers,
            timeout_seconds=script_args.reward_timeout_seconds,
        )
        kw.update(overrides)
        return cls(**kw)


@dataclass
class _Task:
    task_id: int
    items: list  # [(sample index, tuple of function indices)]


class _Worker:
    """One worker process, its pipe, its shared progress/result buffers and its current task."""

    def __init__(self, ctx, functions, config: RewardPoolConfig):
        k = len(functions)
        self.progress = ctx.RawArray("d", 4)
        self.values = ctx.RawArray("d", config.max_chunk * k)
        self.status = ctx.RawArray("b", config.max_chunk * k)
        self.conn, child = ctx.Pipe(duplex=True)
        memory = config.memory_limit_mb * 2**20 if config.memory_limit_mb else None
        self.proc = ctx.Process(
            target=worker_main,
            args=(
                child,
                functions,
                self.progress,
                self.values,
                self.status,
                config.math_alarm,
                memory,
            ),
            name="megagrpo-reward-worker",
            daemon=True,
        )
        self.proc.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False
        self.task: _Task | None = None

    def stop(self, graceful: bool) -> None:
        """Stop the worker and everything it started (its process group), then reap it."""
        if graceful and self.proc.is_alive():
            try:
                self.conn.send(None)
                wait([self.proc.sentinel], 2.0)
            except (OSError, ValueError):
                pass
        # Until it is reaped, the worker (even as a zombie) keeps its pid and process group, so
        # the group kill cannot reach an unrelated process that reused the pid.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()


def _stop_all(workers: list) -> None:
    for w in workers:
        w.stop(graceful=True)
    workers.clear()


@dataclass
class _Batch:
    """The state of one ``score`` call."""

    completions: list
    rows: list
    k: int
    values: list = field(default_factory=list)
    status: list = field(default_factory=list)
    queue: deque = field(default_factory=deque)
    retries: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)
    restarts: int = 0

    def note(self, message: str) -> None:
        if len(self.messages) < MAX_ERROR_MESSAGES:
            self.messages.append(message)

    def record(self, i: int, k: int, status: int, value: float) -> None:
        self.status[i][k] = status
        self.values[i][k] = value if status == SCORED else math.nan


class RewardPool:
    """W reward worker processes with hard per-call timeouts; see the module docstring."""

    def __init__(self, functions, config: RewardPoolConfig | None = None):
        import multiprocessing as mp

        self.functions = list(functions)
        if not self.functions:
            raise ValueError("RewardPool needs at least one reward function")
        self.config = config or RewardPoolConfig()
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        self._next_task = 0
        self._startup_failures = 0
        self.total_restarts = 0
        for _ in range(self.config.num_workers):
            self._workers.append(_Worker(self._ctx, self.functions, self.config))

    # ---- lifecycle ----
    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (politely, then SIGKILL); the pool cannot be used afterwards."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def wait_ready(self) -> None:
        """Block until every worker has built its reward functions."""
        self._check_open()
        while not all(w.ready for w in self._workers):
            self._step(None)

    # ---- scoring ----
    def score(self, completions, columns: dict, num_generations: int | None = None) -> RewardScores:
        """Score every completion with every function; NaN where a call did not give a number."""
        self._check_open()
        start = time.perf_counter()
        completions = list(completions)
        rows = check_batch(completions, columns, num_generations)
        n, k = len(completions), len(self.functions)
        batch = _Batch(completions, rows, k)
        batch.values = [[math.nan] * k for _ in range(n)]
        batch.status = [[PENDING] * k for _ in range(n)]
        chunk = max(1, min(self.config.max_chunk, math.ceil(n / (4 * len(self._workers)))))
        every = tuple(range(k))
        for s in range(0, n, chunk):
            batch.queue.append([(i, every) for i in range(s, min(n, s + chunk))])
        try:
            while batch.queue or any(w.task is not None for w in self._workers):
                self._dispatch(batch)
                self._step(batch)
        except BaseException:
            # Interrupted (Ctrl-C, an error raised here): workers still busy with this batch
            # would answer into the next one, so they are replaced.
            if not self.closed:
                for idx, w in enumerate(self._workers):
                    if w.task is not None:
                        w.task = None
                        self._replace(idx, None, CRASH)
            raise
        apply_combine(
            self.functions, batch.values, batch.status, columns, num_generations, batch.messages
        )
        self.total_restarts += batch.restarts
        return make_scores(
            self.functions,
            batch.values,
            batch.status,
            time.perf_counter() - start,
            batch.restarts,
            batch.messages,
        )

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this RewardPool is closed")

    def _dispatch(self, batch: _Batch) -> None:
        for idx, w in enumerate(self._workers):
            if not batch.queue:
                return
            if not w.ready or w.task is not None:
                continue
            items = batch.queue.popleft()
            self._next_task += 1
            w.task = _Task(self._next_task, items)
            ctypes.memset(w.status, PENDING, ctypes.sizeof(w.status))
            w.progress[BUSY] = 0.0
            payload = [(i, batch.completions[i], batch.rows[i], funcs) for i, funcs in items]
            try:
                w.conn.send((w.task.task_id, payload))
            except (OSError, ValueError):
                self._replace(idx, batch, CRASH)

    def _deadline(self, now: float) -> float:
        deadline = math.inf
        for w in self._workers:
            if not w.ready:
                deadline = min(deadline, w.started + self.config.startup_timeout_seconds)
            elif w.task is not None:
                began = w.progress[START] if w.progress[BUSY] == 1.0 else now
                deadline = min(deadline, began + self.config.timeout_seconds)
        return deadline

    def _step(self, batch: _Batch | None) -> None:
        """Wait for a message, a death or a deadline, and handle what happened."""
        now = time.monotonic()
        timeout = max(0.0, self._deadline(now) - now) + 0.001
        objs = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
        ready = set(wait(objs, None if math.isinf(timeout) else timeout))
        for idx in range(len(self._workers)):
            w = self._workers[idx]
            dead = w.proc.sentinel in ready
            if w.conn in ready or dead:
                dead = self._drain(w, batch) or dead
            if dead:
                self._replace(idx, batch, CRASH)
        now = time.monotonic()
        for idx, w in enumerate(self._workers):
            if not w.ready and now > w.started + self.config.startup_timeout_seconds:
                self.close()
                raise RuntimeError(
                    f"a reward worker did not start within {self.config.startup_timeout_seconds}"
                    " s (importing and building the reward functions)"
                )
            if (
                w.task is not None
                and w.progress[BUSY] == 1.0
                and now - w.progress[START] > self.config.timeout_seconds
            ):
                self._replace(idx, batch, TIMEOUT)

    def _drain(self, w: _Worker, batch: _Batch | None) -> bool:
        """Handle every message waiting on ``w``'s pipe; True if the pipe is closed (dead)."""
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                    self._startup_failures = 0
                elif msg[0] == "done":
                    if batch is not None and w.task is not None and msg[1] == w.task.task_id:
                        self._harvest(w, batch, blame=None)
                        for m in msg[2]:
                            batch.note(m)
                    w.task = None
                elif msg[0] == "fatal":
                    self.close()
                    raise RuntimeError(
                        f"a reward worker could not build the reward functions:\n{msg[1]}"
                    )
        except (EOFError, OSError):
            return True
        return False

    def _harvest(self, w: _Worker, batch: _Batch, blame: int | None) -> list:
        """Take ``w``'s finished calls; blame the in-flight one; return the calls left to do."""
        k_total = batch.k
        in_flight = None
        if blame is not None and w.progress[BUSY] == 1.0:
            in_flight = (int(w.progress[POS]), int(w.progress[FUNC]))
        group = None if in_flight is None else self.functions[in_flight[1]].hang_group
        left = []
        for pos, (i, funcs) in enumerate(w.task.items):
            rest = []
            for k in funcs:
                st = w.status[pos * k_total + k]
                if st != PENDING:
                    batch.record(i, k, st, w.values[pos * k_total + k])
                elif (pos, k) == in_flight or (
                    in_flight is not None
                    and pos == in_flight[0]
                    and group is not None
                    and self.functions[k].hang_group == group
                ):
                    batch.record(i, k, blame, math.nan)
                    why = (
                        f"timed out after {self.config.timeout_seconds} s"
                        if blame == TIMEOUT
                        else f"worker died (exit code {w.proc.exitcode})"
                    )
                    if (pos, k) != in_flight:
                        why += f" ({self.functions[in_flight[1]].name}, same hang group)"
                    batch.note(f"{self.functions[k].name} on sample {i}: {why}")
                elif blame is None:
                    batch.record(i, k, ERROR, math.nan)
                    batch.note(f"{self.functions[k].name} on sample {i}: no result reported")
                else:
                    rest.append(k)
            if rest:
                left.append((i, tuple(rest)))
        return left

    def _replace(self, idx: int, batch: _Batch | None, blame: int) -> None:
        """Kill worker ``idx`` (if alive), keep its finished calls, requeue the rest, respawn."""
        w = self._workers[idx]
        w.stop(graceful=False)
        if not w.ready:
            self._startup_failures += 1
            if self._startup_failures > 3:
                self.close()
                raise RuntimeError(
                    f"reward workers keep dying while starting (exit code {w.proc.exitcode})"
                )
        if w.task is not None and batch is not None:
            self._requeue(batch, self._harvest(w, batch, blame), blamed=w.progress[BUSY] == 1.0)
        self._workers[idx] = _Worker(self._ctx, self.functions, self.config)
        if batch is not None:
            batch.restarts += 1

    def _requeue(self, batch: _Batch, left: list, blamed: bool) -> None:
        if not left:
            return
        if not blamed:  # lost outside any call: retry a few times, then give up on the sample
            keep = []
            for i, funcs in left:
                batch.retries[i] = batch.retries.get(i, 0) + 1
                if batch.retries[i] > MAX_UNBLAMED_RETRIES:
                    for k in funcs:
                        batch.record(i, k, CRASH, math.nan)
                else:
                    keep.append((i, funcs))
            left = keep
        if left:
            batch.queue.appendleft(left)
