"""Loading prompt datasets: HF hub names, local directories, files, weighted mixtures.

A source is named the way open-r1 users name it: a hub id (``AI-MO/NuminaMath-TIR``, needs the
network), a local directory (``save_to_disk`` output, or a directory of json / jsonl / parquet /
csv files), or one such file. A mixture (open-r1's ``dataset_mixture``) takes a fraction
``weight`` of each source, optionally a subset of its columns, concatenates and shuffles them and
can split off a test set.
"""

from __future__ import annotations

import os

from megagrpo.config.script_args import DatasetMixtureConfig

_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


class DataError(ValueError):
    """A dataset that cannot be used as asked; the message names the dataset and the field."""


def _builder_for(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FILE_BUILDERS:
        raise DataError(
            f"{path}: unsupported file type {ext!r}; expected one of {sorted(_FILE_BUILDERS)}"
        )
    return _FILE_BUILDERS[ext]


def _load_directory(path: str, split: str):
    import datasets

    if os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(
        os.path.join(path, "dataset_dict.json")
    ):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: no split {split!r}; splits: {sorted(loaded)}")
            return loaded[split]
        return loaded
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
    chosen = by_split or files
    builders = {_builder_for(f) for f in chosen}
    if len(builders) > 1:
        raise DataError(f"{path}: mixed file types {sorted(builders)} for split {split!r}")
    return datasets.load_dataset(builders.pop(), data_files=chosen, split="train")


def load_source(name: str, config: str | None = None, split: str = "train"):
    """One dataset split as a ``datasets.Dataset``."""
    import datasets

    if os.path.isdir(name):
        return _load_directory(name, split)
    if os.path.isfile(name):
        return datasets.load_dataset(_builder_for(name), data_files=name, split="train")
    if name.startswith((".", "/")) or name.endswith(tuple(_FILE_BUILDERS)):
        raise DataError(f"dataset_name={name!r}: no such file or directory")
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise DataError(
            f"dataset_name={name!r} (config={config!r}, split={split!r}) could not be loaded "
            f"from the Hugging Face hub: {type(e).__name__}: {e}. Offline? Point dataset_name "
            "at a local directory or a json/jsonl/parquet/csv file instead."
        ) from e


def load_mixture(mixture: DatasetMixtureConfig):
    """``{"train": Dataset[, "test": Dataset]}`` from a mixture."""
    import datasets

    if not mixture.datasets:
        raise DataError("dataset_mixture.datasets is empty")
    parts = []
    for i, spec in enumerate(mixture.datasets):
        if not 0 < spec.weight <= 1:
            raise DataError(
                f"dataset_mixture.datasets[{i}] ({spec.id}): weight={spec.weight} must be in (0, 1]"
            )
        ds = load_source(spec.id, spec.config, spec.split)
        if spec.columns:
            missing = [c for c in spec.columns if c not in ds.column_names]
            if missing:
                raise DataError(
                    f"dataset_mixture.datasets[{i}] ({spec.id}): columns {missing} not found; "
                    f"columns present: {ds.column_names}"
                )
            ds = ds.select_columns(spec.columns)
        if spec.weight < 1:
            ds = ds.shuffle(seed=mixture.seed).select(range(int(len(ds) * spec.weight)))
        parts.append(ds)
    columns = [p.column_names for p in parts]
    if any(sorted(c) != sorted(columns[0]) for c in columns):
        raise DataError(
            f"dataset_mixture: datasets have different columns {columns}; "
            "select common ones with 'columns'"
        )
    combined = datasets.concatenate_datasets(parts).shuffle(seed=mixture.seed)
    if mixture.test_split_size:
        split = combined.train_test_split(test_size=mixture.test_split_size, seed=mixture.seed)
        return {"train": split["train"], "test": split["test"]}
    return {"train": combined}
