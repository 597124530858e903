"""Audio data: sources -> `datasets.Audio` decoding -> salient, loudness-normalised excerpts -> batches.

Every training sample is a pure function of (seed, epoch, index): the sampler hands out
``(epoch, index)`` keys and the excerpt's randomness is seeded from them, so a resumed run (or a
run with more workers) sees exactly the same stream. A file that cannot be used (empty, truncated,
not audio, NaN or inf, silent) is replaced by another one, counted and named once in the log.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import datasets
import torch
import torchaudio
from accelerate.logging import get_logger
from torch.utils.data import DataLoader, Sampler

logger = get_logger(__name__)

AUDIO_EXTENSIONS = {
    ".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aif", ".aiff", ".wma", ".webm", ".mka", ".au",
}
SILENCE_PEAK = 1e-4  # -80 dBFS: nothing to learn from
MAX_REPLACEMENTS = 8


class DataError(RuntimeError):
    """The data cannot feed a training run (no usable clip, too many broken files)."""


def sample_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (unlike a sum, (1, 2) and (2, 1) differ)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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


def _cast(ds: Any, audio_column: str, sampling_rate: int) -> Any:
    if audio_column not in ds.column_names:
        raise DataError(f"the dataset has no column '{audio_column}' (columns: {ds.column_names}); "
                        "set --audio_column")
    if audio_column != "audio":
        ds = ds.rename_column(audio_column, "audio")
    ds = ds.select_columns(["audio"])
    return ds.cast_column("audio", datasets.Audio(sampling_rate=sampling_rate, num_channels=1))


def audio_dataset_from_files(files: Sequence[str], sampling_rate: int) -> datasets.Dataset:
    """An HF dataset with one `Audio` column over local files, decoded lazily by torchcodec."""
    ds = datasets.Dataset.from_dict({"audio": list(files)})
    return _cast(ds, "audio", sampling_rate)


def load_source(config: Any, split: str) -> Optional[Any]:
    """The dataset for ``split`` ('train' or 'validation') from whichever source the config names."""
    train = split == "train"
    folder = config.train_data_dir if train else config.validation_data_dir
    manifest = config.train_file if train else config.validation_file
    if folder:
        return audio_dataset_from_files(list_audio_files(folder), config.sampling_rate)
    if manifest:
        return audio_dataset_from_files(read_manifest(manifest, config.path_column), config.sampling_rate)
    if config.dataset_name:
        hub_split = config.train_split if train else config.eval_split
        if hub_split is None:
            return None
        try:
            ds = datasets.load_dataset(config.dataset_name, config.dataset_config_name, split=hub_split,
                                       streaming=config.streaming)
        except ValueError as err:
            if "split" in str(err).lower():
                raise DataError(f"{config.dataset_name} has no split '{hub_split}': {err}") from err
            raise
        return _cast(ds, config.audio_column, config.sampling_rate)
    return None


# ----------------------------------------------------------------------------- excerpts


@dataclass
class Clip:
    audio: Optional[torch.Tensor]  # [1, T] float32, or None when the file was unusable
    problem: str = ""


def loudness(audio: torch.Tensor, sample_rate: int) -> float:
    """Integrated loudness (LUFS, ITU-R BS.1770 via torchaudio); RMS dBFS for clips under 0.4 s."""
    if audio.shape[-1] >= int(0.4 * sample_rate):
        value = float(torchaudio.functional.loudness(audio, sample_rate))
        if math.isfinite(value):
            return value
    rms = audio.pow(2).mean().sqrt().item()
    return 20 * math.log10(rms) - 0.691 if rms > 0 else -math.inf


def normalize_loudness(audio: torch.Tensor, sample_rate: int, target: Optional[float]) -> torch.Tensor:
    """Gain to ``target`` LUFS, then scaled down if needed so the peak stays within [-1, 1]."""
    if target is not None:
        current = loudness(audio, sample_rate)
        if math.isfinite(current):
            audio = audio * 10 ** ((target - current) / 20)
    peak = audio.abs().max()
    return audio / peak if peak > 1 else audio


def decode_excerpt(decoder: Any, length: int, sample_rate: int, generator: Optional[torch.Generator]) -> Clip:
    """``length`` samples from a random start (or the start when ``generator`` is None)."""
    duration = decoder.metadata.duration_seconds
    seconds = length / sample_rate
    if duration is not None and duration > seconds + 1.0:
        start = 0.0 if generator is None else float(torch.rand((), generator=generator)) * (duration - seconds)
        audio = decoder.get_samples_played_in_range(start, start + seconds + 0.05).data
    else:
        audio = decoder.get_all_samples().data
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
    return Clip(normalize_loudness(audio, spec.sample_rate, spec.target_loudness))


def _describe(ds: Any, index: int) -> str:
    """A file's name for the log, read without decoding it."""
    try:
        raw = ds.with_format(None).cast_column("audio", datasets.Audio(decode=False))[index]["audio"]
        return raw.get("path") or f"row {index}"
    except Exception:  # naming a broken row must never raise
        return f"row {index}"


class AudioClips(torch.utils.data.Dataset):
    """Map-style clips keyed by ``(epoch, index)``; broken rows are replaced and reported."""

    def __init__(self, source: Any, spec: ExcerptSpec, seed: int = 0, train: bool = True) -> None:
        self.source = source
        self.spec = spec
        self.seed = seed
        self.train = train

    def __len__(self) -> int:
        return len(self.source)

    def load(self, epoch: int, index: int) -> Clip:
        """One excerpt of row ``index``; a pure function of (seed, epoch, index) for training."""
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index)) if self.train else None
        try:
            decoder = self.source[index]["audio"]
            return make_excerpt(decoder, self.spec, generator)
        except Exception as err:  # torchcodec/FFmpeg raise many types for truncated or non-audio input
            return Clip(None, f"cannot be decoded ({type(err).__name__}: {str(err).splitlines()[0][:120]})")

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        bad: list[str] = []
        for attempt in range(MAX_REPLACEMENTS):
            candidate = index if attempt == 0 else sample_seed(self.seed, epoch, index, attempt) % len(self)
            clip = self.load(epoch, candidate)
            if clip.audio is not None:
                return {"audio": clip.audio, "bad": bad, "index": candidate}
            bad.append(f"{_describe(self.source, candidate)}: {clip.problem}")
        return {"audio": None, "bad": bad, "index": index}


def collate_clips(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack usable clips [B, 1, T]; carry the broken files' descriptions for counting."""
    audio = [item["audio"] for item in items if item["audio"] is not None]
    return {
        "audio": torch.stack(audio) if audio else None,
        "bad": [problem for item in items for problem in item["bad"]],
        "good": len(audio),
    }


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


def default_num_workers() -> int:
    """Leave one core to the training process; at most 8 decoders."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(clips: AudioClips, batch_sampler: Optional[Sampler], num_workers: Optional[int], pin_memory: bool,
                batch_size: int = 1) -> DataLoader:
    workers = default_num_workers() if num_workers is None else num_workers
    # Its own generator: creating an iterator draws a worker base seed, which must not consume the
    # global RNG (the decoder noise and quantizer dropout live there), or resume would not be exact.
    kwargs: dict[str, Any] = dict(num_workers=workers, collate_fn=collate_clips, pin_memory=pin_memory,
                                  generator=torch.Generator().manual_seed(0))
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    if batch_sampler is not None:
        return DataLoader(clips, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(clips, batch_size=batch_size, shuffle=False, **kwargs)


def check_source(clips: AudioClips, name: str, probes: int = 32) -> None:
    """Refuse a source with no usable clip before training starts, naming why the probes failed."""
    problems = []
    for index in range(min(probes, len(clips))):
        clip = clips.load(0, index)
        if clip.audio is not None:
            return
        problems.append(f"{_describe(clips.source, index)}: {clip.problem}")
    if len(clips) == 0:
        raise DataError(f"the {name} data is empty")
    raise DataError(f"the {name} data has no usable clip among the first {len(problems)}: "
                    + "; ".join(problems[:3]))


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
