"""Reading audio datasets: ``(id, audio)`` rows from a ``datasets`` dataset on disk, a data file or the Hub.

Audio columns are read undecoded (paths or bytes), so our own loader decodes them later and no torchcodec is
needed; relative paths in a data file are resolved against the file's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_DATA_FILE_KINDS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DatasetReadError(ValueError):
    """A dataset that cannot be read as asked. ``argument`` names the parameter at fault (``"split"``,
    ``"audio_column"``, ``"id_column"``, or ``None`` for the source itself) and ``value`` its value."""

    def __init__(self, reason: str, argument: str | None = None, value: Any = None):
        super().__init__(f"{argument}={value!r}: {reason}" if argument else reason)
        self.reason = reason
        self.argument = argument
        self.value = value


def _load(source: str, split: str):
    import datasets

    path = Path(source)
    is_saved_dataset = path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")
    )
    if is_saved_dataset:
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise DatasetReadError(f"the dataset has splits {sorted(data)}.", "split", split)
            data = data[split]
        return data
    if path.is_file():
        kind = _DATA_FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise DatasetReadError(f"{source}: unsupported data file type (use csv, json, jsonl or parquet).")
        return datasets.load_dataset(kind, data_files=str(path), split=split)
    return datasets.load_dataset(str(path) if path.is_dir() else source, split=split)


def audio_dataset_rows(
    source: str, split: str = "train", audio_column: str = "audio", id_column: str | None = None
) -> list[tuple[Any, Any]]:
    """``(id, audio)`` pairs of a dataset: a ``save_to_disk`` directory, a csv/json/jsonl/parquet file, a dataset
    folder or a Hub id. ``id`` is the ``id_column`` value (the row index without one); ``audio`` is a path (made
    absolute for relative paths in local data) or the undecoded audio dict.

    Needs the ``datasets`` package (``pip install 'fun-audio-chat[train]'``); raises :class:`DatasetReadError`
    for a dataset that cannot be loaded or lacks the columns or split asked for."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "reading a dataset needs the `datasets` package (pip install 'fun-audio-chat[train]')."
        ) from err
    try:
        data = _load(source, split)
    except DatasetReadError:
        raise
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DatasetReadError(f"could not load the dataset {source!r}: {err}") from err
    for argument, column in (("audio_column", audio_column), ("id_column", id_column)):
        if column is not None and column not in data.column_names:
            raise DatasetReadError(f"not a column of the dataset (columns: {data.column_names}).", argument, column)
    if isinstance(data.features[audio_column], datasets.Audio):
        data = data.cast_column(audio_column, datasets.Audio(decode=False))
    path = Path(source)
    base_dir = path.parent if path.is_file() else path if path.is_dir() else None
    rows = []
    for index, row in enumerate(data):
        audio = row[audio_column]
        if (
            isinstance(audio, str)
            and base_dir is not None
            and not os.path.isabs(audio)
            and not audio.startswith(("http://", "https://"))
        ):
            audio = str(base_dir / audio)
        rows.append((row[id_column] if id_column else index, audio))
    return rows


__all__ = ["DatasetReadError", "audio_dataset_rows"]
