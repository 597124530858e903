"""Source rows for `snac_accel.encode`: the audio column undecoded plus the id and the kept columns,
decoded one row at a time (in loader workers) with the trainer's readers.

Audio folders, files and manifests go through `snac_accel.evaluate.open_source` (the trainer's
`snac_accel.data.load_sources`) unless columns must be kept: a manifest is then read as a CSV/JSON
dataset, and a folder through datasets' audiofolder (which reads its metadata.csv). Hub ids and
dataset folders go through `snac_accel.data.load_hub_dataset`. Rows are decoded by
`snac_accel.evaluate.load_clip` (whole files, resampled, mono; broken, empty, NaN and silent files
come back as a problem, never as an exception).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from .. import data as data_lib
from ..evaluate import load_clip, open_source

RESERVED = ("index", "id", "duration", "num_samples", "codes")


class SourceError(ValueError):
    """The data does not have what the options ask for (a column, a name)."""


def local_path(data: str) -> Optional[Path]:
    """``data`` as an absolute path when it exists here, else None (a Hub id)."""
    path = Path(data)
    return path.resolve() if path.exists() else None


def _select(ds: Any, audio_column: str, keep: list[str], id_column: str) -> Any:
    """The audio column (undecoded, named ``audio``), the id column when present, and ``keep``.

    A stream that does not announce its columns is taken as it comes (a missing column then fails
    on the first row)."""
    import datasets

    names = ds.column_names or list(ds.features or [])
    missing = [c for c in [audio_column, *keep] if c not in names]
    if missing and names:
        raise SourceError(f"the data has no column {', '.join(missing)} (columns: {names}); "
                          "check --audio_column / --path_column / --keep_columns")
    wanted = list(dict.fromkeys([audio_column, *keep] + ([id_column] if id_column in names else [])))
    ds = ds.select_columns(wanted)
    if audio_column != "audio":
        ds = ds.rename_column(audio_column, "audio")
    if isinstance((ds.features or {}).get("audio"), datasets.Value):  # paths: large_string does not cast to Audio
        ds = ds.cast_column("audio", datasets.Value("string"))
    return ds.cast_column("audio", datasets.Audio(decode=False))


def open_rows(config: Any) -> list[tuple[str, Any]]:
    """(name, dataset) pairs whose rows hold ``audio`` undecoded plus the id and kept columns; ``config``
    is an `EncodeConfig` (data, split, columns, streaming)."""
    import datasets

    keep = data_lib.split_option(config.keep_columns)
    taken = [c for c in keep if c in RESERVED or c.startswith("codes_")]
    if taken:
        raise SourceError(f"--keep_columns {','.join(taken)}: the tokenized dataset uses these names itself")
    path = local_path(config.data)
    manifest = path is not None and path.is_file() and path.suffix.lower() in (".csv", ".json", ".jsonl")
    audio_file = path is not None and path.is_file() and path.suffix.lower() in data_lib.AUDIO_EXTENSIONS
    is_dataset = path is None or (path.is_dir() and not any(
        p.suffix.lower() in data_lib.AUDIO_EXTENSIONS for p in path.rglob("*") if p.is_file()))
    if audio_file or (not keep and not is_dataset):
        return open_source(config.data, config.split, config.dataset_config_name, config.audio_column,
                           config.path_column, config.streaming, config.revision)
    if manifest:
        builder = "csv" if path.suffix.lower() == ".csv" else "json"
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=config.streaming)
        column, folder = config.path_column, path.parent
        ds = ds.map(lambda row: {column: str(folder / row[column])})  # relative paths: from the manifest's folder
        return [(str(path), _select(ds, column, keep, config.id_column))]
    sources = []
    for name in data_lib.split_option(config.data):  # several Hub datasets, comma-separated, as the trainer reads
        ds = data_lib.load_hub_dataset(name, config.dataset_config_name, config.split, config.streaming,
                                       config.revision)
        sources.append((f"{name}[{config.split}]", _select(ds, config.audio_column, keep, config.id_column)))
    return sources


class RowReader:
    """Decodes one source row into an item: index, id, name, audio [T] (or why not), kept values.

    With ``encoder`` (a `snac_accel.tokenizer.chunks.RowEncoder`, on a CPU) the item carries the row's codes
    (``codes``, per level) and its ``length`` instead of its audio.
    """

    def __init__(self, sample_rate: int, max_samples: int, id_column: str, keep: list[str],
                 encoder: Optional[Callable[[torch.Tensor], list[torch.Tensor]]] = None) -> None:
        self.sample_rate, self.max_samples, self.id_column, self.keep = sample_rate, max_samples, id_column, keep
        self.encoder = encoder

    def __call__(self, index: int, source: str, row: int, record: dict[str, Any]) -> dict[str, Any]:
        raw = record["audio"]
        name = data_lib.row_name(raw, f"{source} row {row}")
        ident = record.get(self.id_column)
        audio, problem = load_clip(raw, self.sample_rate, self.max_samples, None)
        item = {"index": index, "id": name if ident is None else str(ident), "name": name,
                "audio": None if audio is None else audio.reshape(-1), "problem": problem,
                "columns": {c: record[c] for c in self.keep}}
        if self.encoder is not None and audio is not None:
            item.update(codes=self.encoder(item["audio"]), length=audio.shape[-1], audio=None)
        return item


class MapRows(torch.utils.data.Dataset):
    """The rows ``indices`` of map-style sources (concatenated), decoded in loader workers."""

    def __init__(self, sources: list[tuple[str, Any]], indices: list[int], reader: RowReader) -> None:
        self.sources, self.indices, self.reader = sources, indices, reader
        self.starts = np.cumsum([0] + [len(ds) for _, ds in sources])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        source = int(np.searchsorted(self.starts, index, side="right")) - 1
        row = index - int(self.starts[source])
        name, ds = self.sources[source]
        return self.reader(index, name, row, ds[row])


class StreamRows(torch.utils.data.IterableDataset):
    """Every row of the streams in order; only those ``wanted`` are decoded. Ends with the row count."""

    def __init__(self, sources: list[tuple[str, Any]], wanted: Any, reader: RowReader) -> None:
        self.sources, self.wanted, self.reader = sources, wanted, reader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index = 0
        for name, ds in self.sources:
            for row, record in enumerate(ds):
                if self.wanted(index):
                    yield self.reader(index, name, row, record)
                index += 1
        yield {"end": index}


def identity(item: Any) -> Any:
    return item
