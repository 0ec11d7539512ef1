"""Rows of one JSON Lines or Parquet file, read on demand (``dataset_streaming``).

``RowFile.open(path)`` costs one pass that reads no row: a JSON Lines file is scanned for the byte
offset of each non-blank line (8 bytes a row), a Parquet file's footer gives its row groups.
``read(start, stop)`` then parses only rows ``start .. stop - 1``, seeking straight to them, so a
stream can start (or resume) anywhere. A line that is not a JSON object raises a ``DataError``
naming the file and line when it is read; rows are named as ``RowLocator`` names them
(``path: row r (0-based), line n``), the line counted only when a row is named.
"""

from __future__ import annotations

import json
import os

import numpy as np

from megagrpo.data.errors import DataError
from megagrpo.data.locations import unreadable

#: File types the streaming reader takes (extension -> kind).
STREAMED_FILES = {".jsonl": "jsonl", ".parquet": "parquet"}

_SCAN_BYTES = 1 << 24


def _line_offsets(path: str) -> np.ndarray:
    """Byte offset of each non-blank line of ``path`` (int64), in one buffered binary pass."""
    starts, maybe_blank, position, at_line_start = [], [], 0, True
    with open(path, "rb") as f:
        while chunk := f.read(_SCAN_BYTES):
            data = np.frombuffer(chunk, dtype=np.uint8)
            after = np.flatnonzero(data == 10) + 1
            local = np.concatenate(([0] if at_line_start else [], after[after < len(chunk)]))
            local = local.astype(np.int64)
            starts.append(local + position)
            # a line starting with whitespace may be blank: looked at below (rare)
            maybe_blank.append(local[np.isin(data[local], (9, 10, 13, 32))] + position)
            position += len(chunk)
            at_line_start = chunk[-1:] == b"\n"
    if not starts:
        return np.zeros(0, dtype=np.int64)
    offsets = np.concatenate(starts)
    blank = []
    with open(path, "rb") as f:
        for start in np.concatenate(maybe_blank).tolist():
            f.seek(start)
            if not f.readline().strip():
                blank.append(start)
    return offsets[~np.isin(offsets, blank)] if blank else offsets


class RowFile:
    """One file's rows as dicts, read by range; ``len(file)`` rows."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind = path, kind
        self._offsets: np.ndarray | None = None
        self._parquet = None
        self._group_starts: list[int] = []
        self._group_cache: tuple[int, object] | None = None

    @classmethod
    def open(cls, path: str) -> RowFile:
        kind = STREAMED_FILES.get(os.path.splitext(path)[1].lower())
        if kind is None:
            raise DataError(
                f"{path}: dataset_streaming reads JSON Lines (.jsonl) and Parquet (.parquet) "
                "files; convert it, or set dataset_streaming: false"
            )
        problem = unreadable(path)
        if problem:
            raise DataError(problem)
        f = cls(path, kind)
        if kind == "jsonl":
            f._offsets = _line_offsets(path)
        else:
            import pyarrow.parquet as pq

            try:
                f._parquet = pq.ParquetFile(path)
            except Exception as e:  # noqa: BLE001 - pyarrow reports damage in several types
                raise DataError(f"{path}: not a readable Parquet file ({e})") from e
            meta = f._parquet.metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            f._group_starts = np.concatenate(([0], np.cumsum(sizes))).tolist()
        return f

    def __len__(self) -> int:
        if self._offsets is not None:
            return len(self._offsets)
        return int(self._group_starts[-1])

    def columns(self) -> list[str]:
        """The columns: a Parquet file's schema, a JSON Lines file's first row's keys."""
        if self._parquet is not None:
            return list(self._parquet.schema_arrow.names)
        return list(self.read(0, 1)[0]) if len(self) else []

    def line(self, row: int) -> int | None:
        """The 1-based line of ``row`` (JSON Lines), counted when asked."""
        if self._offsets is None:
            return None
        offset, count = int(self._offsets[row]), 0
        with open(self.path, "rb") as f:
            while offset > 0:
                chunk = f.read(min(_SCAN_BYTES, offset))
                count += chunk.count(b"\n")
                offset -= len(chunk)
        return count + 1

    def where(self, row: int) -> str:
        line = self.line(row)
        return f"{self.path}: row {row} (0-based)" + (f", line {line}" if line else "")

    def read(self, start: int, stop: int) -> list[dict]:
        """Rows ``start .. stop - 1`` as dicts."""
        return self.take(range(start, stop))

    def take(self, rows) -> list[dict]:
        """Rows ``rows`` (ascending) as dicts."""
        rows = list(rows)
        if not rows:
            return []
        if self._offsets is not None:
            return self._take_lines(rows)
        return self._take_groups(rows)

    def _take_lines(self, rows: list[int]) -> list[dict]:
        out, previous = [], None
        with open(self.path, "rb") as f:
            for row in rows:
                if row != previous:  # not the next one: seek (rows follow each other mostly)
                    f.seek(int(self._offsets[row]))
                raw = f.readline()
                while raw and not raw.strip():  # blank lines between rows
                    raw = f.readline()
                previous = row + 1
                try:
                    value = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    what = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                    col = f" at column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
                    raise DataError(
                        f"{self.path}: line {self.line(row)}: not valid JSON ({what}{col})"
                    ) from e
                if not isinstance(value, dict):
                    raise DataError(
                        f"{self.path}: line {self.line(row)}: a JSON {type(value).__name__} "
                        "where an object (one row) was expected"
                    )
                out.append(value)
        return out

    def _take_groups(self, rows: list[int]) -> list[dict]:
        """Rows of a Parquet file, a row group at a time (the last one read stays as Arrow)."""
        import bisect

        out: list[dict] = []
        k = 0
        while k < len(rows):
            g = bisect.bisect_right(self._group_starts, rows[k]) - 1
            end = bisect.bisect_left(rows, self._group_starts[g + 1], k)
            if self._group_cache is None or self._group_cache[0] != g:
                self._group_cache = (g, self._parquet.read_row_group(g))
            first = self._group_starts[g]
            out.extend(self._group_cache[1].take([r - first for r in rows[k:end]]).to_pylist())
            k = end
        return out
