"""The prompts of each step read lazily (``dataset_streaming``), and the exact data position.

``PromptStream`` is ``PromptSampler``'s streaming counterpart. Step k takes the next
``prompts_per_step`` good prompts of the epoch's order (``EpochOrder``: a seeded buffered
shuffle); each row is checked and tokenized when it is taken (``prepare(row)``), never before.
An epoch's tail shorter than a step is dropped and the next epoch starts with a new order (drop
last, as ``PromptSampler``). Bad rows and prompts over ``max_prompt_length`` follow
``on_bad_rows`` / ``long_prompts``: an error names the file, row and column when the row is
reached; skipped rows are counted in the first pass over the data only, so that after it
``skipped`` counts each row once, as the non-streaming path does.

Unlike ``PromptSampler.rows_at``, which step k takes depends on the rows before it (how many
were skipped), so the position is state: ``state_before(k)`` is the position before step k (the
epoch, the buffer slot and the offset in it, and the skip counts so far), JSON-serialisable for
``trainer_state.json``; ``load_state_dict`` continues from it, reading one buffer, and the steps
after it are those of an uninterrupted run. Steps are computed in order, each once; the last
``keep_steps`` steps' rows stay readable through ``rows`` (the rollout producer reads ahead of
the scorer). Thread-safe: the async producer and the trainer call it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from megagrpo.data.errors import DataError
from megagrpo.data.rows import FIRST_ROWS, SkippedRows
from megagrpo.data.stream_sources import EpochOrder, StreamMember


@dataclass
class _Step:
    ids: list[int]
    rows: dict[int, dict]


class StreamedRows:
    """``rows[id]``: a prompt row of a step the stream still holds (``PromptData.train``)."""

    def __init__(self, stream: PromptStream):
        self._stream = stream

    def __getitem__(self, row_id: int) -> dict:
        return self._stream.row(int(row_id))

    def __len__(self) -> int:
        raise TypeError("a streamed dataset has no length before a pass over it")

    def __iter__(self):
        raise TypeError("a streamed dataset is read through the steps' rows (rows_at)")


class PromptStream:
    def __init__(
        self,
        members: list[StreamMember],
        prepare: Callable[[dict], dict | tuple[str, str]],
        prompts_per_step: int,
        *,
        seed: int = 0,
        buffer_size: int = 10_000,
        on_bad_rows: str = "error",
        long_prompts: str = "skip",
        too_few: Callable[[int, SkippedRows], str] | None = None,
        keep_steps: int = 256,
    ):
        self.members, self.prepare = members, prepare
        self.prompts_per_step, self.seed, self.buffer_size = prompts_per_step, seed, buffer_size
        self.on_bad_rows, self.long_prompts = on_bad_rows, long_prompts
        self.too_few = too_few or (
            lambda kept, skipped: (
                f"{kept} prompt(s) in the data, fewer than the {prompts_per_step} one step needs"
            )
        )
        self.keep_steps = keep_steps
        self.rows = StreamedRows(self)
        self._lock = threading.RLock()
        self._order: EpochOrder | None = None
        self._buffer: tuple[tuple[int, int], list] | None = None
        self._reset(self._initial_state())

    # ---- position ---------------------------------------------------------------------------

    def _initial_state(self) -> dict:
        return {"step": 0, "epoch": 0, "slot": 0, "offset": 0, "good": 0, "skipped": {}}

    def _reset(self, state: dict) -> None:
        self._next = int(state["step"])
        self._epoch, self._slot, self._offset = state["epoch"], state["slot"], state["offset"]
        self._good = int(state["good"])  # good prompts so far in this epoch
        skipped = state.get("skipped") or {}
        first = {k: list(v) for k, v in skipped.get("first", {}).items()}
        self.skipped = SkippedRows(dict(skipped.get("counts", {})), first)
        self._steps: dict[int, _Step] = {}
        self._refs: Counter = Counter()
        self._row_cache: dict[int, dict] = {}
        self._before = {self._next: self._state()}

    def _state(self) -> dict:
        return {
            "step": self._next,
            "epoch": self._epoch,
            "slot": self._slot,
            "offset": self._offset,
            "good": self._good,
            "skipped": {
                "counts": dict(self.skipped.counts),
                "first": {k: list(v) for k, v in self.skipped.first.items()},
            },
        }

    def _fingerprint(self) -> dict:
        return {
            "seed": self.seed,
            "prompts_per_step": self.prompts_per_step,
            "buffer_size": self.buffer_size,
            "rows": [len(m) for m in self.members],
        }

    def state_before(self, step: int) -> dict:
        """The data position before step ``step`` (computing the steps up to it if needed)."""
        with self._lock:
            if step not in self._before:
                if step < self._next:
                    raise RuntimeError(f"the data position before step {step} is no longer held")
                self._advance_to(step)
            return {"streaming": True, **self._fingerprint(), **self._before[step]}

    def state_dict(self) -> dict:
        """The position before the next step to compute."""
        return self.state_before(self._next)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position of ``state_before``: the steps from ``state['step']`` on are
        those of an uninterrupted run."""
        if not state.get("streaming"):
            raise ValueError(
                "the checkpoint holds no streaming data position (it was written without "
                "dataset_streaming): resume with dataset_streaming: false"
            )
        mine = self._fingerprint()
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(
                    f"checkpoint's data position was saved with {key}={state.get(key)}, this run "
                    f"has {key}={value}: resuming would silently change the data order"
                )
        with self._lock:
            self._order = self._buffer = None
            self._reset(state)

    # ---- steps --------------------------------------------------------------------------------

    def rows_at(self, step: int) -> list[int]:
        """The prompt ids of step ``step`` (0-based); steps are computed in order."""
        with self._lock:
            if step not in self._steps:
                if step < self._next:
                    raise RuntimeError(
                        f"the prompts of step {step} are no longer held (the stream keeps the "
                        f"last {self.keep_steps} steps)"
                    )
                self._advance_to(step)
            return list(self._steps[step].ids)

    def row(self, row_id: int) -> dict:
        with self._lock:
            try:
                return self._row_cache[row_id]
            except KeyError:
                raise KeyError(f"row {row_id} is not in a step the stream holds") from None

    def _advance_to(self, step: int) -> None:
        while self._next <= step:
            ids, rows = self._take_step()
            self._steps[self._next] = _Step(ids, rows)
            for i in ids:
                self._refs[i] += 1
                self._row_cache[i] = rows[i]
            self._next += 1
            self._before[self._next] = self._state()
            self._forget(self._next - self.keep_steps)

    def _forget(self, before: int) -> None:
        for old in [s for s in self._steps if s < before]:
            for i in self._steps.pop(old).ids:
                self._refs[i] -= 1
                if not self._refs[i]:
                    del self._refs[i], self._row_cache[i]
        for old in [s for s in self._before if s < before]:
            del self._before[old]

    def _take_step(self) -> tuple[list[int], dict[int, dict]]:
        ids: list[int] = []
        rows: dict[int, dict] = {}
        while len(ids) < self.prompts_per_step:
            item = self._next_row()
            if item is None:  # the epoch's end: its tail shorter than a step is dropped
                if self._good < self.prompts_per_step:
                    raise DataError(self.too_few(self._good, self.skipped))
                self._epoch, self._slot, self._offset, self._good = self._epoch + 1, 0, 0, 0
                ids, rows = [], {}
                continue
            row_id, prepared = item
            if prepared is not None:
                self._good += 1
                ids.append(row_id)
                rows[row_id] = prepared
        return ids, rows

    def _next_row(self) -> tuple[int, dict | None] | None:
        """The next row of the epoch as ``(id, prompt row or None when skipped)``; None at the
        epoch's end."""
        if self._order is None or self._order_epoch != self._epoch:
            self._order = EpochOrder(self.members, self.seed, self._epoch, self.buffer_size)
            self._order_epoch = self._epoch
        while True:
            if self._slot >= self._order.buffers:
                return None
            key = (self._epoch, self._slot)
            if self._buffer is None or self._buffer[0] != key:
                self._buffer = (key, self._order.buffer(self._slot))
            rows = self._buffer[1]
            if self._offset < len(rows):
                break
            self._slot, self._offset = self._slot + 1, 0
        member, member_row, raw = rows[self._offset]
        self._offset += 1
        m = self.members[member]
        prepared = self.prepare(raw)
        if isinstance(prepared, tuple):
            self._bad(prepared, lambda: m.where(member_row))
            prepared = None
        return m.base + member_row, prepared

    def _bad(self, problem: tuple[str, str], where: Callable[[], str]) -> None:
        # counted in the first pass over the data only, so that each row counts once
        skipped = self.skipped if self._epoch == 0 else SkippedRows()
        skip_or_raise(problem, where, self.on_bad_rows, self.long_prompts, skipped)


def skip_or_raise(problem, where, on_bad_rows: str, long_prompts: str, skipped: SkippedRows):
    """A bad row (``problem = (reason, message)``, ``where()`` names it): raise a DataError, or
    count it in ``skipped`` (``on_bad_rows`` / ``long_prompts`` is ``skip``)."""
    reason, message = problem
    policy = long_prompts if reason == "prompt_too_long" else on_bad_rows
    if policy != "skip":
        hint = "" if reason == "prompt_too_long" else " (on_bad_rows: skip drops such rows)"
        raise DataError(f"{where()}: {message}{hint}")
    named = len(skipped.first.get(reason, [])) < FIRST_ROWS
    skipped.add(reason, 1, [where()] if named else [])


def take_in_order(
    member: StreamMember,
    prepare: Callable[[dict], dict | tuple[str, str]],
    limit: int | None,
    *,
    on_bad_rows: str,
    long_prompts: str,
    skipped: SkippedRows,
    buffer_size: int,
) -> list[dict]:
    """The first ``limit`` good prompt rows of ``member`` in file order (all when None), read a
    buffer at a time: a streamed test split."""
    out: list[dict] = []
    for start in range(0, len(member), buffer_size):
        for row, raw in member.read(start, min(start + buffer_size, len(member))):
            prepared = prepare(raw)
            if isinstance(prepared, tuple):
                where = lambda r=row: member.where(r)  # noqa: E731
                skip_or_raise(prepared, where, on_bad_rows, long_prompts, skipped)
                continue
            out.append(prepared)
            if limit is not None and len(out) >= limit:
                return out
    return out
