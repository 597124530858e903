"""Audio data: sources -> `datasets.Audio` decoding -> salient, loudness-normalised excerpts -> batches.

Every training sample is a pure function of (seed, epoch, index): the sampler hands out
``(epoch, index)`` keys and the excerpt's randomness is seeded from them, so a resumed run (or a
run with more workers) sees exactly the same stream. Several sources are mixed by weight through a
per-epoch index map that is itself a function of (seed, epoch). A file that cannot be used (empty,
truncated, not audio, NaN or inf, silent) is replaced by another one, counted and named once in
the log.

Rows are read undecoded (``Audio(decode=False)``) and decoded here with the same ``datasets.Audio``
feature (torchcodec, at the model's rate, mixed down to mono): a broken file then fails inside a
``try`` for that row instead of inside the dataset's iterator, and a streamed run can skip rows it
has already trained on without decoding them.

Streaming (``--streaming``) uses a `datasets.IterableDataset`, split across processes with
``split_dataset_by_node`` and shuffled with a buffer; `StreamingLoader` records how many rows each
loader worker has consumed, and registered with ``accelerator.register_for_checkpointing`` it puts
that position into checkpoints.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import datasets
import numpy as np
import torch
from accelerate.logging import get_logger
from torch.utils.data import DataLoader, Sampler

logger = get_logger(__name__)

AUDIO_EXTENSIONS = {
    ".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aif", ".aiff", ".wma", ".webm", ".mka", ".au",
}
SILENCE_PEAK = 1e-4  # -80 dBFS: nothing to learn from
MAX_REPLACEMENTS = 8
MAX_LOCAL_SHARDS = 1024


class DataError(RuntimeError):
    """The data cannot feed a training run (no usable clip, too many broken files)."""


def sample_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part (unlike a sum, (1, 2) and (2, 1) differ)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def split_option(value: Optional[str]) -> list[str]:
    """A comma-separated option (``--train_data_dir a,b``) as a list; empty entries are dropped."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


# ----------------------------------------------------------------------------- sources


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


# ----------------------------------------------------------------------------- excerpts


@dataclass
class Clip:
    audio: Optional[torch.Tensor]  # [1, T] float32, or None when the file was unusable
    problem: str = ""


def _biquad_response(b: Sequence[float], a: Sequence[float], bins: int, n_fft: int) -> torch.Tensor:
    """Complex response of a biquad at the rfft bins of an ``n_fft``-point transform."""
    z = torch.exp(-2j * math.pi * torch.arange(bins, dtype=torch.float64) / n_fft)
    return (b[0] + b[1] * z + b[2] * z * z) / (a[0] + a[1] * z + a[2] * z * z)


_K_RESPONSES: dict[tuple[int, int], np.ndarray] = {}


def k_weighting(audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """BS.1770 K-weighting (the shelf and high-pass torchaudio's loudness applies), in the frequency domain.

    torchaudio runs the two biquads sample by sample (about 30 ms per 0.5 s clip on a CPU core, most
    of an excerpt's cost); one FFT with the filters' exact response, zero-padded by 0.1 s so their
    decaying tails (under 1e-4 after 60 ms) do not wrap around, gives the same result in about a
    millisecond. NumPy's FFT: torch's MKL one is ten times slower on a busy machine with few cores.
    """
    length = audio.shape[-1]
    n_fft = 1 << math.ceil(math.log2(length + sample_rate // 10))
    key = (sample_rate, n_fft)
    if key not in _K_RESPONSES:
        w0 = 2 * math.pi * 1500.0 / sample_rate  # high shelf, +4 dB at 1.5 kHz, Q 1/sqrt(2)
        gain, alpha, cos = 10 ** (4.0 / 40), math.sin(w0) / 2 * math.sqrt(2), math.cos(w0)
        root = 2 * math.sqrt(gain) * alpha
        shelf_b = [gain * ((gain + 1) + (gain - 1) * cos + root), -2 * gain * ((gain - 1) + (gain + 1) * cos),
                   gain * ((gain + 1) + (gain - 1) * cos - root)]
        shelf_a = [(gain + 1) - (gain - 1) * cos + root, 2 * ((gain - 1) - (gain + 1) * cos),
                   (gain + 1) - (gain - 1) * cos - root]
        w0 = 2 * math.pi * 38.0 / sample_rate  # high-pass at 38 Hz, Q 0.5
        alpha, cos = math.sin(w0), math.cos(w0)
        high_b, high_a = [(1 + cos) / 2, -(1 + cos), (1 + cos) / 2], [1 + alpha, -2 * cos, 1 - alpha]
        bins = n_fft // 2 + 1
        _K_RESPONSES[key] = (_biquad_response(shelf_b, shelf_a, bins, n_fft)
                             * _biquad_response(high_b, high_a, bins, n_fft)).numpy()
    spectrum = np.fft.rfft(audio.detach().cpu().double().numpy(), n=n_fft) * _K_RESPONSES[key]
    return torch.from_numpy(np.fft.irfft(spectrum, n=n_fft)[..., :length])


def loudness(audio: torch.Tensor, sample_rate: int) -> float:
    """Integrated loudness of a mono clip [1, T] in LUFS (ITU-R BS.1770-4, gated as torchaudio's
    ``loudness`` does, which it matches to 0.05 LU while torchaudio's K-weighted signal stays within
    [-1, 1], where torchaudio clips it); RMS dBFS for clips under one 0.4 s block."""
    block = int(round(0.4 * sample_rate))
    if audio.shape[-1] >= block:
        energy = k_weighting(audio, sample_rate).square().unfold(-1, block, int(round(block * 0.25))).mean(-1).flatten()
        levels = -0.691 + 10 * torch.log10(energy)
        kept = levels > -70.0
        if kept.any():
            relative = -0.691 + 10 * math.log10(float(energy[kept].mean())) - 10.0
            kept &= levels > relative
            value = -0.691 + 10 * math.log10(float(energy[kept].mean()))
            if math.isfinite(value):
                return value
    rms = audio.pow(2).mean().sqrt().item()
    return 20 * math.log10(rms) - 0.691 if rms > 0 else -math.inf


def normalize_loudness(audio: torch.Tensor, sample_rate: int, target: Optional[float],
                       current: Optional[float] = None) -> torch.Tensor:
    """Gain to ``target`` LUFS, then scaled down if needed so the peak stays within [-1, 1].

    ``current`` is the clip's loudness when already measured (loudness shifts exactly with gain).
    """
    if target is not None:
        current = loudness(audio, sample_rate) if current is None else current
        if math.isfinite(current):
            audio = audio * 10 ** ((target - current) / 20)
    peak = audio.abs().max()
    return audio / peak if peak > 1 else audio


def decode_excerpt(decoder: Any, length: int, sample_rate: int, generator: Optional[torch.Generator]) -> Clip:
    """``length`` samples from a random start (or the start when ``generator`` is None).

    Long files are decoded only around the excerpt (a seek), short ones whole; a long file's NaN or
    inf is therefore caught only when an excerpt covers it.
    """
    duration = decoder.metadata.duration_seconds
    seconds = length / sample_rate
    if duration is not None and duration > seconds + 1.0:
        start = 0.0 if generator is None else float(torch.rand((), generator=generator)) * (duration - seconds)
        audio = decoder.get_samples_played_in_range(start, start + seconds + 0.05).data
    else:
        audio = decoder.get_all_samples().data
        if not torch.isfinite(audio).all():  # the whole file is at hand: check all of it, not just the excerpt
            return Clip(None, "contains NaN or inf")
        if audio.shape[-1] > length and generator is not None:
            start = int(torch.randint(0, audio.shape[-1] - length + 1, (), generator=generator))
            audio = audio[..., start:]
    audio = audio[..., :length].float()
    if audio.numel() == 0:
        return Clip(None, "empty")
    if not torch.isfinite(audio).all():
        return Clip(None, "contains NaN or inf")
    return Clip(audio)


@dataclass
class ExcerptSpec:
    """How training and validation excerpts are cut; see the data options of `TrainConfig`."""

    sample_rate: int
    length: int
    short_clips: str = "pad"
    salience_threshold: Optional[float] = -40.0
    salience_retries: int = 4
    target_loudness: Optional[float] = -16.0


def make_excerpt(decoder: Any, spec: ExcerptSpec, generator: Optional[torch.Generator]) -> Clip:
    """A salient excerpt: retried while quieter than the threshold, then loudness normalised."""
    best, best_loudness = None, -math.inf
    attempts = max(1, spec.salience_retries) if generator is not None else 1
    for _ in range(attempts):
        clip = decode_excerpt(decoder, spec.length, spec.sample_rate, generator)
        if clip.audio is None:
            return clip
        value = loudness(clip.audio, spec.sample_rate)
        if value > best_loudness or best is None:
            best, best_loudness = clip.audio, value
        if spec.salience_threshold is None or value >= spec.salience_threshold:
            break
    audio = best
    if audio.abs().max() < SILENCE_PEAK:
        return Clip(None, "silent")
    if audio.shape[-1] < spec.length:
        if spec.short_clips == "skip":
            return Clip(None, f"shorter than a segment ({audio.shape[-1]} < {spec.length} samples)")
        audio = torch.nn.functional.pad(audio, (0, spec.length - audio.shape[-1]))
    return Clip(normalize_loudness(audio, spec.sample_rate, spec.target_loudness, best_loudness))


def _reason(err: Exception) -> str:
    """One short line for the log: FFmpeg/torchcodec messages carry a C++ source location first."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = re.sub(r"^[\w:]+, \S+\.(?:cpp|h):\d+, ", "", text)
    return f"cannot be decoded ({type(err).__name__}: {text[:120]})"


def row_name(raw: Any, fallback: str) -> str:
    """A file's name for the log, from an undecoded row."""
    if isinstance(raw, dict) and raw.get("path"):
        return str(raw["path"])
    return fallback


def excerpt_from_row(feature: datasets.Audio, raw: Any, spec: ExcerptSpec, generator: Optional[torch.Generator]) -> Clip:
    """Decode one undecoded row with ``feature`` and cut the excerpt; any decoding failure is a `Clip` problem."""
    try:
        if raw is None or isinstance(raw, dict) and not raw.get("bytes") and not raw.get("path"):
            return Clip(None, "no audio in the row")
        return make_excerpt(feature.decode_example(raw), spec, generator)
    except Exception as err:  # torchcodec/FFmpeg raise many types for truncated or non-audio input
        return Clip(None, _reason(err))


def mixing_map(lengths: Sequence[int], weights: Sequence[float], seed: int, epoch: int) -> torch.Tensor:
    """Global row indices for one epoch of weighted mixing, a pure function of (seed, epoch).

    The epoch keeps the total size; source ``s`` fills ``weights[s]`` of it, drawing its rows
    without replacement within each pass (a small source repeats, a large one is subsampled anew
    every epoch).
    """
    total = sum(lengths)
    quotas = [w * total for w in weights]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda s: (counts[s] - quotas[s], s))
    for s in by_remainder[:total - sum(counts)]:
        counts[s] += 1
    offsets = [0]
    for n in lengths[:-1]:
        offsets.append(offsets[-1] + n)
    parts = []
    for s, (n, count) in enumerate(zip(lengths, counts)):
        if count == 0 or n == 0:
            continue
        generator = torch.Generator().manual_seed(sample_seed(seed, epoch, s, "mix"))
        passes = [torch.randperm(n, generator=generator) for _ in range(math.ceil(count / n))]
        parts.append(torch.cat(passes)[:count] + offsets[s])
    return torch.cat(parts)


class AudioClips(torch.utils.data.Dataset):
    """Map-style clips keyed by ``(epoch, index)`` over one or several sources; broken rows are replaced.

    ``sources`` is a dataset with an audio column (decoded or not) or a list of them; with
    ``weights`` the sources are mixed by those shares through `mixing_map`, otherwise concatenated.
    """

    def __init__(self, sources: Any, spec: ExcerptSpec, seed: int = 0, train: bool = True,
                 weights: Optional[Sequence[float]] = None, names: Optional[Sequence[str]] = None) -> None:
        sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        self.sources = [audio_column(ds) for ds in sources]
        self.names = list(names) if names is not None else [f"source {i}" for i in range(len(sources))]
        self.spec = spec
        self.seed = seed
        self.train = train
        self.weights = list(weights) if weights is not None else None
        self.lengths = [len(ds) for ds in self.sources]
        self.offsets = [0]
        for n in self.lengths[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.feature = datasets.Audio(sampling_rate=spec.sample_rate, num_channels=1)
        self._map: tuple[int, Optional[torch.Tensor]] = (-1, None)

    def __len__(self) -> int:
        return sum(self.lengths)

    def locate(self, epoch: int, index: int) -> tuple[int, int]:
        """(source, row) of position ``index`` in ``epoch``."""
        if self.weights is not None and self.train:
            if self._map[0] != epoch:
                self._map = (epoch, mixing_map(self.lengths, self.weights, self.seed, epoch))
            index = int(self._map[1][index])
        source = bisect.bisect_right(self.offsets, index) - 1
        return source, index - self.offsets[source]

    def describe(self, source: int, row: int) -> str:
        try:
            return row_name(self.sources[source][row]["audio"], f"{self.names[source]} row {row}")
        except Exception:  # naming a broken row must never raise
            return f"{self.names[source]} row {row}"

    def load_row(self, source: int, row: int, generator: Optional[torch.Generator]) -> Clip:
        return excerpt_from_row(self.feature, self.sources[source][row]["audio"], self.spec, generator)

    def load(self, epoch: int, index: int) -> Clip:
        """One excerpt at position ``index``; a pure function of (seed, epoch, index) for training."""
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index)) if self.train else None
        return self.load_row(*self.locate(epoch, index), generator)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        bad: list[str] = []
        for attempt in range(MAX_REPLACEMENTS):
            candidate = index if attempt == 0 else sample_seed(self.seed, epoch, index, attempt) % len(self)
            clip = self.load(epoch, candidate)
            if clip.audio is not None:
                return {"audio": clip.audio, "bad": bad, "index": candidate}
            bad.append(f"{self.describe(*self.locate(epoch, candidate))}: {clip.problem}")
        return {"audio": None, "bad": bad, "index": index}


def collate_clips(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack usable clips [B, 1, T]; carry the broken files' descriptions for counting."""
    audio = [item["audio"] for item in items if item["audio"] is not None]
    batch = {
        "audio": torch.stack(audio) if audio else None,
        "bad": [problem for item in items for problem in item["bad"]],
        "good": len(audio),
    }
    if items and "position" in items[-1]:
        batch["position"] = items[-1]["position"]
    return batch


class EpochBatchSampler(Sampler):
    """Batches of ``(epoch, index)`` keys for one rank: a seeded permutation per epoch, split by rank.

    Every rank gets the same number of full batches (the tail is dropped), no index is given to two
    ranks within an epoch, and ``set_epoch(epoch, start_batch)`` resumes in the middle of an epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True) -> None:
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.num_replicas, self.rank, self.shuffle = num_replicas, rank, shuffle
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.num_samples // self.num_replicas // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(
                sample_seed(self.seed, self.epoch))).tolist()
        else:
            order = list(range(self.num_samples))
        mine = order[self.rank::self.num_replicas]
        for b in range(self.start_batch, len(self)):
            yield [(self.epoch, i) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]


def default_num_workers(processes_per_machine: int = 1) -> int:
    """The cores this process may use, less one for the training loop itself; at most 8 decoders."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // max(1, processes_per_machine) - 1))


def make_loader(clips: torch.utils.data.Dataset, batch_sampler: Optional[Sampler], num_workers: Optional[int],
                pin_memory: bool, batch_size: int = 1, persistent: bool = True) -> DataLoader:
    """A loader with worker decoding, prefetch, pinned memory on GPU and a private generator."""
    workers = default_num_workers() if num_workers is None else num_workers
    # Its own generator: creating an iterator draws a worker base seed, which must not consume the
    # global RNG (the decoder noise and quantizer dropout live there), or resume would not be exact.
    kwargs: dict[str, Any] = dict(num_workers=workers, collate_fn=collate_clips, pin_memory=pin_memory,
                                  generator=torch.Generator().manual_seed(0))
    if workers > 0:
        kwargs.update(persistent_workers=persistent, prefetch_factor=4)
    if batch_sampler is not None:
        return DataLoader(clips, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(clips, batch_size=batch_size, shuffle=False, **kwargs)


def check_source(clips: AudioClips, name: str, probes: int = 16) -> None:
    """Refuse a source with no usable clip before training starts, naming why the probes failed.

    Each source of a mix is probed on its own, at rows spread over it.
    """
    if len(clips) == 0:
        raise DataError(f"the {name} data is empty")
    for source, length in enumerate(clips.lengths):
        if length == 0:
            raise DataError(f"the {name} source {clips.names[source]} is empty")
        rows = sorted({round(i * (length - 1) / max(1, probes - 1)) for i in range(min(probes, length))})
        problems = []
        for row in rows:
            clip = clips.load_row(source, row, None)
            if clip.audio is not None:
                break
            problems.append(f"{clips.describe(source, row)}: {clip.problem}")
        else:
            raise DataError(f"the {name} source {clips.names[source]} has no usable clip among {len(problems)} "
                            "probed: " + "; ".join(problems[:3]))


# ----------------------------------------------------------------------------- streaming


def check_stream(source: Any, name: str, spec: ExcerptSpec, probes: int = 16) -> None:
    """Refuse a streamed source whose first rows hold no usable clip (streams cannot be probed at random)."""
    feature = datasets.Audio(sampling_rate=spec.sample_rate, num_channels=1)
    problems = []
    for row, example in enumerate(source.take(probes)):
        clip = excerpt_from_row(feature, example["audio"], spec, None)
        if clip.audio is not None:
            return
        problems.append(f"{row_name(example['audio'], f'row {row}')}: {clip.problem}")
    raise DataError(f"the streamed source {name} has no usable clip among its first {len(problems)} rows"
                    + (": " + "; ".join(problems[:3]) if problems else " (it is empty)"))


def mix_streams(sources: Sequence[Any], weights: Optional[Sequence[float]], seed: int) -> Any:
    """One stream from several: by ``weights`` when given, else alternating.

    ``all_exhausted`` rather than the default ``first_exhausted``: an epoch ends when every source
    has given each of its rows at least once (small sources repeat as their weight asks), so no
    row of a large but lightly weighted source is silently never trained on.
    """
    if len(sources) == 1:
        return sources[0]
    return datasets.interleave_datasets(list(sources), probabilities=list(weights) if weights else None, seed=seed,
                                        stopping_strategy="all_exhausted")


class StreamingClips(torch.utils.data.IterableDataset):
    """Excerpts from a `datasets.IterableDataset` for one process: split by node, shuffled, endless.

    Each loader worker reads its own shards (datasets splits them), decodes inside the worker and
    goes on to the next epoch when its part runs out, so every process yields batches for as long
    as training asks (no rank waits at an epoch end). Items carry ``position`` = (worker, epoch,
    rows read in that epoch); starting from ``positions`` skips rows without decoding them. The
    row stream of (seed, epoch, rank, worker) is fixed, and an excerpt's randomness is seeded from
    (seed, rank, worker, epoch, row), so a resumed run continues the same stream.
    """

    def __init__(self, stream: Any, spec: ExcerptSpec, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer_size: int = 1000) -> None:
        from datasets.distributed import split_dataset_by_node

        stream = audio_column(stream)
        if shuffle_buffer_size > 1:
            stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        self.stream = split_dataset_by_node(stream, rank=rank, world_size=world_size) if world_size > 1 else stream
        self.spec, self.seed, self.rank = spec, seed, rank
        self.positions: dict[int, tuple[int, int]] = {}

    def rows(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The undecoded rows this process (and, inside a loader worker, this worker) reads in ``epoch``."""
        self.stream.set_epoch(epoch)
        return iter(self.stream)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        feature = datasets.Audio(sampling_rate=self.spec.sample_rate, num_channels=1)
        epoch, skip = self.positions.get(worker, (0, 0))
        bad: list[str] = []
        while True:
            read = 0
            for example in self.rows(epoch):
                read += 1
                if read <= skip:
                    continue
                raw = example["audio"]
                generator = torch.Generator().manual_seed(sample_seed(self.seed, self.rank, worker, epoch, read))
                clip = excerpt_from_row(feature, raw, self.spec, generator)
                if clip.audio is None:
                    bad.append(f"{row_name(raw, f'row {read} of epoch {epoch}')}: {clip.problem}")
                    if len(bad) >= MAX_REPLACEMENTS:
                        yield {"audio": None, "bad": bad, "position": (worker, epoch, read)}
                        bad = []
                    continue
                yield {"audio": clip.audio, "bad": bad, "position": (worker, epoch, read)}
                bad = []
            if read == 0:  # this worker was given no shard: the others carry the stream
                return
            epoch, skip = epoch + 1, 0


class StreamingLoader:
    """Batches from `StreamingClips` plus their position, for ``accelerator.register_for_checkpointing``.

    A torch loader takes batches from its workers in turn, always starting with worker 0; after a
    resume the next batch is due from another worker, so batches are handed out in the saved turn
    order (at most one batch per worker waits). ``state_dict`` gathers every process's positions
    (each process reads other rows), so it must be called on all processes, as
    ``accelerator.save_state`` does. Resuming with a different number of processes or workers
    restarts the saved epoch from its beginning.
    """

    def __init__(self, clips: StreamingClips, batch_size: int, num_workers: Optional[int], pin_memory: bool,
                 world_size: int = 1) -> None:
        self.clips = clips
        self.batch_size, self.pin_memory, self.world_size = batch_size, pin_memory, world_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.positions: dict[int, tuple[int, int]] = {}
        self.last_worker = -1

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Nothing to do: the stream is endless and its position is restored by `load_state_dict`."""

    def _active_workers(self) -> int:
        """Workers that get rows: datasets gives each worker whole shards, none to those beyond them."""
        shards = getattr(self.clips.stream, "n_shards", None) or 1
        return max(1, min(max(1, self.num_workers), shards))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.clips.positions = dict(self.positions)
        loader = make_loader(self.clips, None, self.num_workers, self.pin_memory, batch_size=self.batch_size,
                             persistent=False)
        active = self._active_workers()
        due = (self.last_worker + 1) % active
        waiting: dict[int, list[dict[str, Any]]] = {}
        for batch in loader:
            waiting.setdefault(batch["position"][0], []).append(batch)
            if sum(map(len, waiting.values())) > 4 * active:  # a worker stopped early: take what has come
                logger.warning("a streaming worker stopped yielding; batch order no longer follows the saved turns")
                due = next(w for w, queue in waiting.items() if queue)
            while waiting.get(due):
                ready = waiting[due].pop(0)
                worker, epoch, read = ready.pop("position")
                self.positions[worker], self.last_worker = (epoch, read), worker
                due = (due + 1) % active
                yield ready

    def state_dict(self) -> dict[str, Any]:
        mine = {"rank": self.clips.rank, "positions": dict(self.positions), "last_worker": self.last_worker}
        if self.world_size > 1:
            from accelerate.utils import gather_object

            ranks = gather_object([mine])
        else:
            ranks = [mine]
        return {"num_workers": max(1, self.num_workers), "world_size": self.world_size,
                "ranks": {entry["rank"]: entry for entry in ranks}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = state["ranks"].get(self.clips.rank, {})
        positions, self.last_worker = mine.get("positions", {}), int(mine.get("last_worker", -1))
        if state["num_workers"] != max(1, self.num_workers) or state["world_size"] != self.world_size:
            epoch = min((e for r in state["ranks"].values() for e, _ in r["positions"].values()), default=0)
            logger.warning(f"the checkpoint streamed with {state['world_size']} processes x {state['num_workers']} "
                           f"workers, this run has {self.world_size} x {max(1, self.num_workers)}: restarting "
                           f"epoch {epoch} of the stream from its beginning")
            positions, self.last_worker = {w: (epoch, 0) for w in range(max(1, self.num_workers))}, -1
        self.positions = {int(w): (int(e), int(r)) for w, (e, r) in positions.items()}


# ----------------------------------------------------------------------------- bad input


@dataclass
class BadFileTracker:
    """Counts unusable files, names each once, and stops the run when most recent samples are bad."""

    max_fraction: float = 0.5
    window: int = 200
    total: int = 0
    seen: set = field(default_factory=set)
    recent: list = field(default_factory=list)

    def update(self, bad: list[str], good: int) -> None:
        for problem in bad:
            if problem not in self.seen:
                self.seen.add(problem)
                logger.warning(f"skipped unusable audio: {problem}")
        self.total += len(bad)
        self.recent.extend([1] * len(bad) + [0] * good)
        self.recent = self.recent[-self.window:]
        if len(self.recent) >= min(self.window, 20) and sum(self.recent) / len(self.recent) > self.max_fraction:
            examples = "; ".join(bad[:3] or sorted(self.seen)[:3])
            raise DataError(f"{sum(self.recent)} of the last {len(self.recent)} samples were unusable "
                            f"(more than {self.max_fraction:.0%}), e.g. {examples}. Fix or remove those files, "
                            "or raise --max_bad_fraction")


# ----------------------------------------------------------------------------- building


def train_spec(config: Any) -> ExcerptSpec:
    return ExcerptSpec(sample_rate=config.sampling_rate, length=config.segment_samples, short_clips=config.short_clips,
                       salience_threshold=config.salience_threshold, salience_retries=config.salience_retries,
                       target_loudness=config.target_loudness)


def validation_spec(config: Any) -> ExcerptSpec:
    """Fixed excerpts from each file's start, padded, no salience retries."""
    length = max(1, round(config.validation_seconds * config.sampling_rate / config.pad_multiple)) * config.pad_multiple
    return ExcerptSpec(sample_rate=config.sampling_rate, length=length, short_clips="pad", salience_threshold=None,
                       target_loudness=config.target_loudness)


def validation_batch(config: Any) -> Optional[torch.Tensor]:
    """The fixed validation clips [N, 1, T] (the first usable ones of every source), or None."""
    sources = load_sources(config, "validation")
    if not sources:
        return None
    spec = validation_spec(config)
    if config.streaming:
        feature = datasets.Audio(sampling_rate=spec.sample_rate, num_channels=1)
        clips = []
        for name, ds in sources:
            check_stream(ds, name, spec)
            for example in audio_column(ds).take(config.max_validation_clips):
                clip = excerpt_from_row(feature, example["audio"], spec, None)
                if clip.audio is not None:
                    clips.append(clip.audio)
        return torch.stack(clips[:config.max_validation_clips])
    names, datasets_ = zip(*sources)
    clips = AudioClips(list(datasets_), spec, seed=config.seed, train=False, names=list(names))
    check_source(clips, "validation")
    items = [clips[i] for i in range(min(len(clips), config.max_validation_clips))]
    return collate_clips(items)["audio"]
