"""Where training audio comes from: Hub datasets, local dataset folders, audio folders, manifests.

Every source becomes a `datasets` dataset of undecoded audio rows (``Audio(decode=False)``, one
column named ``audio``); decoding happens per row in `snac_accel.data.clips`, so a broken file
fails inside a ``try`` for that row instead of inside the dataset's iterator, and a streamed run
can skip rows it has already trained on without decoding them. Several sources are listed in the
order ``--source_weights`` follows: Hub datasets, then folders, then manifests.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import datasets

AUDIO_EXTENSIONS = {
    ".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aif", ".aiff", ".wma", ".webm", ".mka", ".au",
}
MAX_LOCAL_SHARDS = 1024


class DataError(RuntimeError):
    """The data cannot feed a training run (no usable clip, too many broken files)."""


def split_option(value: Optional[str]) -> list[str]:
    """A comma-separated option (``--train_data_dir a,b``) as a list; empty entries are dropped."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]



def list_audio_files(folder: str | os.PathLike) -> list[str]:
    """Audio files under ``folder`` (recursive), sorted so that every machine sees the same order."""
    root = Path(folder)
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise DataError(f"{folder} holds no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))}); "
                        "point the option at a folder of audio")
    return files


def read_manifest(path: str | os.PathLike, path_column: str = "path") -> list[str]:
    """Paths from a CSV or JSONL manifest; relative paths are taken from the manifest's folder."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    if not rows or path_column not in rows[0]:
        raise DataError(f"{path} has no column '{path_column}'; set --path_column to the column holding file paths")
    return [str((path.parent / row[path_column]).resolve()) if not os.path.isabs(row[path_column])
            else row[path_column] for row in rows]


def audio_column(ds: Any, column: str = "audio") -> Any:
    """Only the audio column, named ``audio`` and left undecoded (decoding happens per row, see above)."""
    names = ds.column_names
    if names is not None and column not in names:
        raise DataError(f"the dataset has no column '{column}' (columns: {names}); set --audio_column")
    if column != "audio":
        ds = ds.rename_column(column, "audio")
    if names is not None and len(names) > 1:
        ds = ds.select_columns(["audio"])
    return ds.cast_column("audio", datasets.Audio(decode=False))


def audio_dataset_from_files(files: Sequence[str], sampling_rate: int) -> datasets.Dataset:
    """An HF dataset with one `Audio` column over local files, decoded lazily by torchcodec."""
    ds = datasets.Dataset.from_dict({"audio": list(files)})
    return ds.cast_column("audio", datasets.Audio(sampling_rate=sampling_rate, num_channels=1))


def files_dataset(files: Sequence[str]) -> datasets.Dataset:
    """Undecoded rows over local files (the form `AudioClips` and `StreamingClips` read)."""
    return audio_column(datasets.Dataset.from_dict({"audio": list(files)}))


def load_hub_dataset(name: str, config_name: Optional[str], split: str, streaming: bool,
                     revision: Optional[str] = None) -> Any:
    """A Hub id, a local dataset folder (audiofolder, parquet...) or a ``save_to_disk`` folder."""
    local = Path(name)
    if (local / "state.json").is_file() or (local / split / "state.json").is_file():
        loaded = datasets.load_from_disk(str(local))
        ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return ds.to_iterable_dataset(num_shards=min(len(ds), MAX_LOCAL_SHARDS) or 1) if streaming else ds
    try:
        return datasets.load_dataset(name, config_name, split=split, streaming=streaming, revision=revision)
    except ValueError as err:
        if "split" in str(err).lower():
            raise DataError(f"{name} has no split '{split}': {err}") from err
        raise


def load_sources(config: Any, split: str, streaming: Optional[bool] = None) -> list[tuple[str, Any]]:
    """Every source the config names for ``split`` ('train' or 'validation'), as (name, dataset).

    The order is the one ``--source_weights`` follows: Hub datasets, then folders, then manifests.
    With ``streaming`` the datasets are `datasets.IterableDataset` (local files in many shards so
    that processes and loader workers can split them).
    """
    train = split == "train"
    streaming = config.streaming if streaming is None else streaming
    sources: list[tuple[str, Any]] = []
    hub_split = config.train_split if train else config.eval_split
    if hub_split is not None:
        for name in split_option(config.dataset_name):
            ds = load_hub_dataset(name, config.dataset_config_name, hub_split, streaming,
                                  getattr(config, "dataset_revision", None))
            sources.append((f"{name}[{hub_split}]", audio_column(ds, config.audio_column)))
    for folder in split_option(config.train_data_dir if train else config.validation_data_dir):
        sources.append((folder, files_dataset(list_audio_files(folder))))
    for manifest in split_option(config.train_file if train else config.validation_file):
        sources.append((manifest, files_dataset(read_manifest(manifest, config.path_column))))
    if streaming:
        sources = [(name, ds if isinstance(ds, datasets.IterableDataset)
                    else ds.to_iterable_dataset(num_shards=max(1, min(len(ds), MAX_LOCAL_SHARDS))))
                   for name, ds in sources]
    return sources


def source_weights(config: Any, count: int) -> Optional[list[float]]:
    """``--source_weights`` as probabilities, or None (sources used in proportion to their size)."""
    weights = [float(w) for w in split_option(getattr(config, "source_weights", None))]
    if not weights:
        return None
    if len(weights) != count or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"--source_weights {config.source_weights} needs {count} non-negative weights, one per "
                        "source (Hub datasets, then folders, then manifests)")
    return [w / sum(weights) for w in weights]

