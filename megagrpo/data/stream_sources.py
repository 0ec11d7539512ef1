"""What ``dataset_streaming`` reads, and in which order: members of files, and an epoch's order.

A ``StreamMember`` is one dataset (``dataset_name``, or one entry of ``dataset_mixture``): local
JSON Lines / Parquet files (a file, or a directory's files of the split) read on demand through
``RowFile``, optionally a subset of columns and a fraction ``weight`` of its rows (the same rows
as without streaming: ``permutation(rows, seed=mixture.seed)[:k]``). Each row has a global id,
the member's first id plus its row, stable over epochs and resumes.

``EpochOrder`` is the buffered, seeded shuffle of one epoch (seed and epoch give it, nothing
else): the members' rows are interleaved at random (every order of the member sequences equally
likely, each member's rows in file order), that sequence is cut into buffers of
``buffer_size`` rows, and the epoch visits the buffers in a seeded order and each buffer's rows
in a seeded order. A position is ``(buffer slot, offset)``: reading can start at any position by
reading one buffer, which makes resuming exact and cheap. Memory: one buffer of rows, plus a few
bytes a row (the interleave, the JSON Lines offsets).
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field

import numpy as np

from megagrpo.data.errors import DataError
from megagrpo.data.row_files import STREAMED_FILES, RowFile
from megagrpo.data.sources import is_saved_dataset, split_files


@dataclass
class StreamMember:
    name: str
    """The dataset as the recipe names it (messages)."""
    files: list[RowFile]
    columns: list[str]
    """The columns of a row (the selected ones when the mixture selects some)."""
    kept: np.ndarray | None = None
    """The member's rows used (ascending), when ``weight`` < 1; None: all."""
    base: int = 0
    """Global id of the member's row 0."""
    select: bool = False
    """Whether rows keep ``columns`` only (a mixture's ``columns``)."""
    _starts: list[int] = field(default_factory=list)

    def __post_init__(self):
        self._starts = np.concatenate(([0], np.cumsum([len(f) for f in self.files]))).tolist()

    @property
    def raw_rows(self) -> int:
        return int(self._starts[-1])

    def __len__(self) -> int:
        return self.raw_rows if self.kept is None else len(self.kept)

    def _file_of(self, row: int) -> tuple[int, int]:
        i = bisect.bisect_right(self._starts, row) - 1
        return i, row - self._starts[i]

    def where(self, row: int) -> str:
        """Where member row ``row`` (of the files, not of ``kept``) lives."""
        i, r = self._file_of(row)
        return self.files[i].where(r)

    def read(self, start: int, stop: int) -> list[tuple[int, dict]]:
        """Used rows ``start .. stop - 1`` as ``(member row, row)``."""
        rows = range(start, stop) if self.kept is None else self.kept[start:stop].tolist()
        out: list[tuple[int, dict]] = []
        by_file: dict[int, list[int]] = {}
        for row in rows:
            i, r = self._file_of(row)
            by_file.setdefault(i, []).append(r)
        for i, file_rows in sorted(by_file.items()):
            for r, value in zip(file_rows, self.files[i].take(file_rows)):
                if self.select:
                    value = {c: value.get(c) for c in self.columns}
                out.append((self._starts[i] + r, value))
        return out


def _files(name: str, split: str) -> list[str]:
    if os.path.isdir(name):
        if is_saved_dataset(name):
            raise DataError(
                f"{name}: a save_to_disk dataset; dataset_streaming reads JSON Lines and Parquet "
                "files (ds.to_json(path, lines=True) or ds.to_parquet(path)), or set "
                "dataset_streaming: false"
            )
        return split_files(name, split)
    if os.path.isfile(name):
        return [name]
    if name.startswith((".", "/")) or os.path.splitext(name)[1].lower() in (
        ".json",
        ".jsonl",
        ".parquet",
        ".csv",
    ):
        raise DataError(f"dataset_name={name!r}: no such file or directory")
    raise DataError(
        f"dataset_name={name!r}: dataset_streaming reads local JSON Lines and Parquet files "
        "(a file or a directory of them), not hub datasets; download it (e.g. "
        "huggingface-cli download --repo-type dataset) and name the local files, or set "
        "dataset_streaming: false"
    )


def open_member(
    name: str,
    split: str = "train",
    *,
    columns: list[str] | None = None,
    weight: float = 1.0,
    seed: int = 0,
    label: str | None = None,
) -> StreamMember:
    """A dataset read on demand; ``label`` names it in messages about its columns."""
    paths = _files(name, split)
    for path in paths:
        if os.path.splitext(path)[1].lower() not in STREAMED_FILES:
            raise DataError(
                f"{path}: dataset_streaming reads JSON Lines (.jsonl) and Parquet (.parquet) "
                "files; convert it, or set dataset_streaming: false"
            )
    files = [RowFile.open(p) for p in paths]
    present = next((f.columns() for f in files if len(f)), [])
    if columns:
        missing = [c for c in columns if c not in present]
        if missing:
            raise DataError(
                f"{label or name}: columns {missing} not found; columns present: {present}"
            )
    member = StreamMember(name, files, list(columns or present), select=bool(columns))
    if weight < 1:  # the rows load_mixture keeps: ds.shuffle(seed).select(range(k)), by number
        rows = np.random.default_rng(seed).permutation(member.raw_rows)
        member.kept = np.sort(rows[: int(member.raw_rows * weight)])
    return member


def open_members(script) -> list[StreamMember]:
    """The members of ``dataset_name`` or ``dataset_mixture`` (train split), ids numbered."""
    mix = script.dataset_mixture
    if mix is None:
        members = [open_member(script.dataset_name, script.dataset_train_split)]
    else:
        if not mix.datasets:
            raise DataError("dataset_mixture.datasets is empty")
        members = []
        for i, spec in enumerate(mix.datasets):
            if spec.config is not None:
                raise DataError(
                    f"dataset_mixture.datasets[{i}] ({spec.id}): config={spec.config!r} names a "
                    "hub dataset's configuration; dataset_streaming reads local files"
                )
            label = f"dataset_mixture.datasets[{i}] ({spec.id})"
            members.append(
                open_member(
                    spec.id,
                    spec.split,
                    columns=spec.columns,
                    weight=spec.weight,
                    seed=mix.seed,
                    label=label,
                )
            )
        columns = [sorted(m.columns) for m in members]
        if any(c != columns[0] for c in columns):
            raise DataError(
                f"dataset_mixture: datasets have different columns {[m.columns for m in members]}; "
                "select common ones with 'columns'"
            )
    base = 0
    for m in members:
        m.base, base = base, base + m.raw_rows
    return members


class EpochOrder:
    """The rows of one epoch: ``buffer(slot)`` -> the ``(member, member row, row)`` of the
    slot-th buffer visited, in its shuffled order."""

    def __init__(self, members: list[StreamMember], seed: int, epoch: int, buffer_size: int):
        self.members, self.buffer_size = members, buffer_size
        sizes = [len(m) for m in members]
        self.rows = sum(sizes)
        self._seed = (seed, epoch)
        rng = np.random.default_rng([seed, epoch, 0])
        # the interleave: which member each position of the epoch's sequence reads from
        self._labels = None
        if len(members) > 1:
            dtype = np.int16 if len(members) < 2**15 else np.int32
            self._labels = rng.permutation(np.repeat(np.arange(len(members), dtype=dtype), sizes))
        n_buffers = -(-self.rows // buffer_size)
        self.order = rng.permutation(n_buffers)
        # rows of each member before each buffer of the sequence
        bounds = np.arange(n_buffers + 1, dtype=np.int64) * buffer_size
        bounds[-1] = self.rows
        if self._labels is None:
            self._before = bounds[:, None]
        else:
            self._before = np.stack(
                [
                    np.concatenate(([0], np.cumsum(self._labels == j)))[bounds]
                    for j in range(len(members))
                ],
                axis=1,
            )

    @property
    def buffers(self) -> int:
        return len(self.order)

    def buffer(self, slot: int) -> list[tuple[int, int, dict]]:
        b = int(self.order[slot])
        lo, hi = b * self.buffer_size, min((b + 1) * self.buffer_size, self.rows)
        read = [
            iter(m.read(int(self._before[b, j]), int(self._before[b + 1, j])))
            for j, m in enumerate(self.members)
        ]
        labels = [0] * (hi - lo) if self._labels is None else self._labels[lo:hi].tolist()
        rows = [(j, *next(read[j])) for j in labels]
        perm = np.random.default_rng([*self._seed, 1, b]).permutation(len(rows))
        return [rows[k] for k in perm.tolist()]
