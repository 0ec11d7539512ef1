"""Loading prompt datasets: HF hub names, local directories, files, weighted mixtures.

A source is named the way open-r1 users name it: a hub id (``AI-MO/NuminaMath-TIR``, needs the
network), a local directory (``save_to_disk`` output, or a directory of json / jsonl / parquet /
csv files), or one such file. A mixture (open-r1's ``dataset_mixture``) takes a fraction
``weight`` of each source, optionally a subset of its columns, concatenates and shuffles them and
can split off a test set.

``open_source`` gives the dataset with a ``RowLocator`` (which file and row a row came from) so
that a bad row can be named; a file that does not load is re-read to name its bad line, and the
files of a directory are loaded one by one and must hold each column with one type. A
mixture member is subset by its weight first, then handed to ``prepare`` (checked, formatted and
tokenized) before the members are concatenated, so that its rows are still named in its own
file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

from megagrpo.config.script_args import DatasetMixtureConfig
from megagrpo.data.errors import DataError
from megagrpo.data.locations import RowLocator, file_problem, unreadable

_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


@dataclass
class Source:
    """One loaded dataset split and how to name its rows."""

    dataset: object
    """The ``datasets.Dataset``."""
    locate: RowLocator
    """Row of the file(s) as loaded -> ``path: row r (0-based)[, line n]``."""
    rows: list[int] | None = None
    """Row of the file(s) of each row of ``dataset`` when it is a subset (None: the same)."""

    def where(self, i: int) -> str:
        """Where row ``i`` of ``dataset`` lives."""
        return self.locate(i if self.rows is None else self.rows[i])


@contextmanager
def _datasets_errors_unlogged():
    """``datasets`` logs a failed file before raising; megagrpo reports it as one line itself."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_file(path: str, builder: str):
    import datasets

    problem = unreadable(path)
    if problem:
        raise DataError(problem)
    try:
        with _datasets_errors_unlogged():
            return datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as e:  # noqa: BLE001 - re-read the file to name the bad line
        problem = file_problem(path, builder, e)
        if problem:
            raise DataError(problem) from e
        raise  # nothing wrong found in the file: not a data problem


def _load_files(files: list[str], builder: str, name: str) -> Source:
    """The files one by one, then concatenated: ``datasets`` loading them at once would cast a
    column to the first file's type silently (a JSON value becomes its JSON text)."""
    import datasets

    parts = [_load_file(path, builder) for path in files]
    for path, part in zip(files[1:], parts[1:]):
        for column, feature in part.features.items():
            first = parts[0].features.get(column)
            if first is not None and feature != first:
                raise DataError(
                    f"{path}: column {column!r} holds {feature} but {first} in {files[0]}; "
                    "store it with one type in every file"
                )
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return Source(ds, RowLocator(name, files, builder, [len(p) for p in parts]))


def _builder_for(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FILE_BUILDERS:
        raise DataError(
            f"{path}: unsupported file type {ext!r}; expected one of {sorted(_FILE_BUILDERS)}"
        )
    return _FILE_BUILDERS[ext]


def is_saved_dataset(path: str) -> bool:
    """Whether directory ``path`` holds a ``save_to_disk`` dataset."""
    return os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(
        os.path.join(path, "dataset_dict.json")
    )


def split_files(path: str, split: str) -> list[str]:
    """The dataset files of directory ``path`` for ``split``: those whose name holds the split's
    name, else all of them."""
    files = sorted(
        os.path.join(root, f)
        for root, _, names in os.walk(path)
        for f in names
        if os.path.splitext(f)[1].lower() in _FILE_BUILDERS
    )
    if not files:
        raise DataError(
            f"{path}: no dataset files (json, jsonl, parquet, csv) and no save_to_disk dataset"
        )
    by_split = [f for f in files if split in os.path.basename(f)]
    return by_split or files


def _load_directory(path: str, split: str) -> Source:
    import datasets

    if is_saved_dataset(path):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: no split {split!r}; splits: {sorted(loaded)}")
            return Source(loaded[split], RowLocator(f"{path} (split {split!r})"))
        return Source(loaded, RowLocator(path))
    chosen = split_files(path, split)
    builders = {_builder_for(f) for f in chosen}
    if len(builders) > 1:
        raise DataError(f"{path}: mixed file types {sorted(builders)} for split {split!r}")
    return _load_files(chosen, builders.pop(), path)


def open_source(name: str, config: str | None = None, split: str = "train") -> Source:
    """One dataset split, with where its rows come from."""
    import datasets

    if os.path.isdir(name):
        return _load_directory(name, split)
    if os.path.isfile(name):
        return _load_files([name], _builder_for(name), name)
    if name.startswith((".", "/")) or name.endswith(tuple(_FILE_BUILDERS)):
        raise DataError(f"dataset_name={name!r}: no such file or directory")
    try:
        ds = datasets.load_dataset(name, config, split=split)
        return Source(ds, RowLocator(f"{name} (config {config!r}, split {split!r})"))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise DataError(
            f"dataset_name={name!r} (config={config!r}, split={split!r}) could not be loaded "
            f"from the Hugging Face hub: {type(e).__name__}: {e}. Offline? Point dataset_name "
            "at a local directory or a json/jsonl/parquet/csv file instead."
        ) from e


def load_source(name: str, config: str | None = None, split: str = "train"):
    """One dataset split as a ``datasets.Dataset``."""
    return open_source(name, config, split).dataset


def load_mixture(mixture: DatasetMixtureConfig, prepare: Callable[[Source], object] | None = None):
    """``{"train": Dataset[, "test": Dataset]}`` from a mixture; ``prepare(source) -> Dataset``
    turns each member (after its weight's subset) into the rows to concatenate."""
    import datasets
    import numpy as np

    if not mixture.datasets:
        raise DataError("dataset_mixture.datasets is empty")
    parts, columns = [], []
    for i, spec in enumerate(mixture.datasets):
        if not 0 < spec.weight <= 1:
            raise DataError(
                f"dataset_mixture.datasets[{i}] ({spec.id}): weight={spec.weight} must be in (0, 1]"
            )
        source = open_source(spec.id, spec.config, spec.split)
        ds = source.dataset
        if spec.columns:
            missing = [c for c in spec.columns if c not in ds.column_names]
            if missing:
                raise DataError(
                    f"dataset_mixture.datasets[{i}] ({spec.id}): columns {missing} not found; "
                    f"columns present: {ds.column_names}"
                )
            ds = ds.select_columns(spec.columns)
        columns.append(ds.column_names)
        if spec.weight < 1:  # the rows ds.shuffle(seed).select(range(k)) takes, kept by number
            rows = np.random.default_rng(mixture.seed).permutation(len(ds))
            source.rows = rows[: int(len(ds) * spec.weight)].tolist()
            ds = ds.select(source.rows)
        source.dataset = ds
        parts.append(source)
    if any(sorted(c) != sorted(columns[0]) for c in columns):
        raise DataError(
            f"dataset_mixture: datasets have different columns {columns}; "
            "select common ones with 'columns'"
        )
    parts = [prepare(p) if prepare else p.dataset for p in parts]
    _check_same_features(parts, mixture)
    combined = datasets.concatenate_datasets(parts).shuffle(seed=mixture.seed)
    if mixture.test_split_size:
        split = combined.train_test_split(test_size=mixture.test_split_size, seed=mixture.seed)
        return {"train": split["train"], "test": split["test"]}
    return {"train": combined}


def _check_same_features(parts: list, mixture: DatasetMixtureConfig) -> None:
    """Members whose columns hold different types cannot be concatenated: name them."""
    first = parts[0].features
    for i, part in enumerate(parts[1:], 1):
        for column, feature in part.features.items():
            if column in first and feature != first[column]:
                raise DataError(
                    f"dataset_mixture: column {column!r} holds {first[column]} in datasets[0] "
                    f"({mixture.datasets[0].id}) but {feature} in datasets[{i}] "
                    f"({mixture.datasets[i].id}); store it with one type in every dataset"
                )
