"""Asynchronous rollout: generate batch k+1 while the trainer updates on batch k.

``AsyncRollout`` runs the engine in a producer thread over a stream of batches. Batch ``k`` may
start once the trainer has pushed at least ``k - max_staleness`` weight updates, so a batch is
at most ``max_staleness`` updates behind the policy that trains on it (the trainer pushes one
update per batch); ``max_staleness = 0`` is the synchronous loop. Generation and weight updates
never overlap on the engine: an update waits for the generation in flight, and the next
generation waits for the update. Every sample records the weight version that produced it, so
the trainer can correct the sampler / learner mismatch (importance sampling).

    rollout = AsyncRollout(engine, batches, AsyncRolloutConfig(max_staleness=1))
    for step in range(steps):
        batch = rollout.get()                      # RolloutBatch: groups, versions, staleness
        ... train on batch ...
        rollout.update_weights(named_tensors, version=step + 1)
    rollout.close()
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from megagrpo.data.errors import DataError
from megagrpo.rollout.protocol import RolloutRequest, Sample, SamplingParams


@dataclass
class AsyncRolloutConfig:
    """Overlap of generation and training."""

    max_staleness: int = 1
    """Weight updates a batch may lag behind the policy that trains on it; 0 = synchronous."""

    def __post_init__(self):
        if not isinstance(self.max_staleness, int) or self.max_staleness < 0:
            raise ValueError(
                f"AsyncRolloutConfig.max_staleness must be an int >= 0, got {self.max_staleness!r}"
            )


@dataclass
class RolloutBatch:
    """One generated batch, as the trainer receives it."""

    index: int
    """Position in the stream of batches (0, 1, ...)."""
    groups: list[list[Sample]]
    updates_before: int
    """Weight updates the engine had received when this batch started."""
    weight_version: int
    """Engine weight version that generated the batch."""

    def staleness(self, updates_now: int) -> int:
        return updates_now - self.updates_before


class AsyncRollout:
    """Staleness-bounded producer of rollout batches (see the module docstring)."""

    def __init__(
        self,
        engine,
        batches: Iterable[tuple[list[RolloutRequest], SamplingParams]],
        config: AsyncRolloutConfig | None = None,
    ):
        self.engine = engine
        self.config = config or AsyncRolloutConfig()
        self._batches: Iterator = iter(batches)
        self._engine_lock = threading.Lock()
        self._cond = threading.Condition()
        self._ready: deque[RolloutBatch] = deque()
        self._updates = 0
        self._consumed = 0
        self._error: BaseException | None = None
        self._exhausted = False
        self._closed = False
        self.timeline: list[tuple[str, int, float]] = []
        """(event, index, time.monotonic()): gen_start / gen_end per batch, update_start /
        update_end per update (update index = updates done before it)."""
        self._thread = threading.Thread(target=self._produce, daemon=True, name="async-rollout")
        self._thread.start()

    def _event(self, name: str, index: int) -> None:
        self.timeline.append((name, index, time.monotonic()))

    def _may_start(self, k: int) -> bool:
        s = self.config.max_staleness
        fresh_enough = self._updates >= k - s
        room = k - self._consumed <= s  # at most s + 1 batches generated and not yet taken
        return self._closed or (fresh_enough and room)

    def _produce(self) -> None:
        k = 0
        try:
            for requests, sampling in self._batches:
                with self._cond:
                    self._cond.wait_for(lambda k=k: self._may_start(k))
                    if self._closed:
                        return
                    updates_before = self._updates
                with self._engine_lock:
                    self._event("gen_start", k)
                    version = self.engine.weight_version
                    groups = self.engine.generate(requests, sampling)
                    self._event("gen_end", k)
                with self._cond:
                    self._ready.append(RolloutBatch(k, groups, updates_before, version))
                    self._cond.notify_all()
                k += 1
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            with self._cond:
                self._error = e
                self._cond.notify_all()
            return
        with self._cond:
            self._exhausted = True
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> RolloutBatch:
        """The next batch, in order; raises StopIteration when the stream of batches ends."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._ready or self._error or self._exhausted or self._closed, timeout
            )
            if not ok:
                raise TimeoutError(f"no rollout batch within {timeout}s")
            if self._ready:
                batch = self._ready.popleft()
                self._consumed += 1
                self._cond.notify_all()
                return batch
            if isinstance(self._error, DataError):  # a bad row met while streaming: the user's
                raise self._error
            if self._error is not None:
                raise RuntimeError("the rollout producer failed") from self._error
            raise StopIteration("no more rollout batches")

    def update_weights(self, named_tensors, version: int) -> None:
        """Push new weights (waits for the generation in flight, then lets the next one start)."""
        with self._engine_lock:
            self._event("update_start", self._updates)
            self.engine.update_weights(named_tensors, version)
            self._event("update_end", self._updates)
        with self._cond:
            self._updates += 1
            self._cond.notify_all()

    def generate_now(self, requests, sampling: SamplingParams) -> list[list[Sample]]:
        """Generate outside the stream (evaluation), between the producer's generations."""
        with self._engine_lock:
            if self._error is not None:  # the engine may be broken: report why, do not use it
                raise RuntimeError("the rollout producer failed") from self._error
            return self.engine.generate(requests, sampling)

    @property
    def updates(self) -> int:
        return self._updates

    def close(self, timeout: float = 30.0) -> None:
        """Stop producing (a generation in flight finishes first)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
