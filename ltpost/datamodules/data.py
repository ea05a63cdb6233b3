"""Dataset loading shared by every datamodule: built-in tasks, local files, or the Hugging Face hub."""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from ltpost import assets

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def load_split(name: str, split: str, config: str | None = None, max_rows: int | None = None) -> datasets.Dataset:
    """One split of ``name``: a built-in task (``ltpost:arithmetic``), a local file/folder, or a hub id.

    A single local file is the ``train`` split; a folder may hold one file per split (``train.jsonl``,
    ``test.jsonl``...) or be a dataset saved with ``save_to_disk``.
    """
    if assets.is_builtin(name):
        task = name[len(assets.BUILTIN_PREFIX) :]
        if task not in assets.TASKS:
            raise ValueError(
                f"Unknown built-in dataset {name!r}. Available: {', '.join(assets.BUILTIN_PREFIX + t for t in assets.TASKS)}."
            )
        dataset = assets.load_task(task, split)
    elif os.path.exists(name):
        try:
            dataset = _load_local(Path(name), split)
        except (StopIteration, datasets.exceptions.DatasetGenerationError) as error:  # a 0-byte json file
            raise _empty(name, split) from error
        except ValueError as error:
            if "corresponds to no data" not in str(error):  # datasets' words for a header-only csv or `[]`
                raise
            raise _empty(name, split) from error
    else:
        dataset = datasets.load_dataset(name, config, split=split)
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    return dataset


def _empty(name: str, split: str) -> ValueError:
    return ValueError(f"Split {split!r} of dataset {name!r} is empty: it has no rows to train on. Check the file.")


def _load_local(path: Path, split: str) -> datasets.Dataset:
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            return _pick(loaded, split, path)
        return loaded
    if path.is_file():
        builder = _builder_for(path)
        return _pick(datasets.load_dataset(builder, data_files={"train": str(path)}), split, path)
    files = {f.stem: str(f) for f in sorted(path.iterdir()) if f.suffix in FILE_BUILDERS}
    if not files:
        raise ValueError(f"Folder {path} holds no .json/.jsonl/.parquet/.csv/.arrow files and no saved dataset.")
    builders = {_builder_for(Path(f)) for f in files.values()}
    if len(builders) > 1:
        raise ValueError(f"Folder {path} mixes file types {sorted(builders)}; keep one type per dataset folder.")
    return _pick(datasets.load_dataset(builders.pop(), data_files=files), split, path)


def _builder_for(path: Path) -> str:
    if path.suffix not in FILE_BUILDERS:
        raise ValueError(
            f"Cannot load {path}: unknown file type {path.suffix!r}. Use one of {', '.join(FILE_BUILDERS)}."
        )
    return FILE_BUILDERS[path.suffix]


def _pick(loaded: datasets.DatasetDict, split: str, path: Path) -> datasets.Dataset:
    if split not in loaded:
        raise ValueError(
            f"{path} has no split {split!r}; it has {list(loaded)}. A single file is the 'train' split; "
            f"for held-out data put a '{split}' file beside it or set the eval split to None."
        )
    return loaded[split]
