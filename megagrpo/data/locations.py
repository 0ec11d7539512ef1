"""Where a row of a loaded source lives, and what is wrong with a file that does not load.

``RowLocator`` names row ``r`` of a dataset loaded from files (in order) as
``path: row r (0-based), line n`` for JSON Lines and CSV files and ``path: row r (0-based)`` for
the others, or ``<dataset>: row r (0-based)`` for a hub dataset or a ``save_to_disk`` directory.
The lines are counted only when a row is named (a bad or a skipped row), never on the way of a
clean dataset. ``file_problem`` re-reads a file that ``datasets`` could not load and returns its
first problem as one line (the line, what was found, what was expected), or None.
"""

from __future__ import annotations

import bisect
import csv
import json


def _jsonl_row_lines(path: str) -> list[int]:
    """1-based line of each row of a JSON Lines file (blank lines hold no row)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]


def _csv_row_lines(path: str) -> list[int]:
    """1-based first line of each record of a CSV file after the header (quoted fields may span
    lines; blank lines hold no record)."""
    out, header_seen, previous = [], False, 0
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        for record in reader:
            start, previous = previous + 1, reader.line_num
            if not record:
                continue
            if header_seen:
                out.append(start)
            header_seen = True
    return out


class RowLocator:
    """``locate(row) -> str``: the file (or dataset) and row of a source, for messages."""

    def __init__(
        self,
        name: str,
        files: list[str] | None = None,
        builder: str | None = None,
        lengths: list[int] | None = None,
    ):
        self.name = name
        self.files = files or []
        self.builder = builder
        # the row where each file starts in the concatenation (lengths: rows per file)
        self._starts = [sum((lengths or [])[:k]) for k in range(len(self.files))]
        self._lines: dict[str, list[int]] = {}

    def _file_of(self, row: int) -> tuple[str, int]:
        if len(self.files) == 1:
            return self.files[0], row
        i = bisect.bisect_right(self._starts, row) - 1
        return self.files[i], row - self._starts[i]

    def _line(self, path: str, row: int) -> int | None:
        if path.endswith(".jsonl"):
            count = _jsonl_row_lines
        elif self.builder == "csv":
            count = _csv_row_lines
        else:
            return None
        if path not in self._lines:
            self._lines[path] = count(path)
        lines = self._lines[path]
        return lines[row] if row < len(lines) else None

    def __call__(self, row: int) -> str:
        if not self.files:
            return f"{self.name}: row {row} (0-based)"
        path, r = self._file_of(row)
        line = self._line(path, r)
        return f"{path}: row {r} (0-based)" + (f", line {line}" if line else "")


def unreadable(path: str) -> str | None:
    """Why ``path`` cannot be read at all (permissions, not a file, empty), or None."""
    try:
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror or type(e).__name__})"
    if not first:
        return f"{path}: the file is empty"
    return None


def _json_lines_problem(path: str, text: str) -> str | None:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{path}: line {n}: not valid JSON ({e.msg} at column {e.colno})"
        if not isinstance(value, dict):
            return (
                f"{path}: line {n}: a JSON {type(value).__name__} where an object (one row) "
                "was expected"
            )
    return None


def _json_problem(path: str, text: str) -> str | None:
    if path.endswith(".jsonl"):
        return _json_lines_problem(path, text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        # a .json file may hold JSON Lines: judge it line by line when its first line parses
        first = next((line for line in text.splitlines() if line.strip()), "")
        try:
            json.loads(first)
        except json.JSONDecodeError:
            return f"{path}: line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
        return _json_lines_problem(path, text)
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                return (
                    f"{path}: item {i} (0-based) of the top-level list is a "
                    f"{type(item).__name__}; expected an object (one row)"
                )
    return None


def _csv_problem(path: str) -> str | None:
    width, previous = None, 0
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for record in reader:
            start, previous = previous + 1, reader.line_num
            if not record:
                continue
            if width is None:
                width = len(record)
            elif len(record) > width:
                return (
                    f"{path}: line {start}: {len(record)} fields where the header has {width} "
                    "(an unquoted comma?)"
                )
    return None


def file_problem(path: str, builder: str, error: BaseException) -> str | None:
    """The first problem of a file ``datasets`` failed to load with ``error``, or None."""
    problem = unreadable(path)
    if problem:
        return problem
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow reports damage in several types
            return f"{path}: not a readable Parquet file ({e})"
        return None
    try:
        if builder == "csv":
            problem = _csv_problem(path)
            cause = error.__cause__ or error
            if problem is None and type(cause).__name__ == "ParserError":  # pandas' own words
                problem = f"{path}: not a valid CSV file ({str(cause).strip()})"
            return problem
        with open(path, encoding="utf-8") as f:
            return _json_problem(path, f.read())
    except UnicodeDecodeError as e:
        return f"{path}: not UTF-8 text (byte {e.start}: {e.reason})"
