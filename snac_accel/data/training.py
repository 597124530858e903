"""What a training run reads, built from its config: excerpt specs, the training loader, the validation clips.

The training loader is map-style (`AudioClips` over an `EpochBatchSampler`) or, with
``--streaming``, a `StreamingLoader` whose position the trainer registers for checkpointing.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Optional

import datasets
import torch

from ..config import ConfigError
from .clips import AudioClips, ExcerptSpec, excerpt_from_row
from .holdout import HeldOut, split_sources
from .loaders import EpochBatchSampler, check_source, collate_clips, default_num_workers, make_loader
from .sources import DataError, audio_column, files_dataset, list_audio_files, load_sources, source_weights
from .streaming import StreamingClips, StreamingLoader, check_stream, mix_streams


def train_spec(config: Any) -> ExcerptSpec:
    return ExcerptSpec(sample_rate=config.sampling_rate, length=config.segment_samples, short_clips=config.short_clips,
                       salience_threshold=config.salience_threshold, salience_retries=config.salience_retries,
                       target_loudness=config.target_loudness)


def validation_spec(config: Any) -> ExcerptSpec:
    """Fixed excerpts from each file's start, padded, no salience retries."""
    length = max(1, round(config.validation_seconds * config.sampling_rate / config.pad_multiple)) * config.pad_multiple
    return ExcerptSpec(sample_rate=config.sampling_rate, length=length, short_clips="pad", salience_threshold=None,
                       target_loudness=config.target_loudness)


@dataclass
class RunSources:
    """The training and validation sources of a run; ``held_out`` says what was held out of training."""

    train: list[tuple[str, Any]]
    validation: list[tuple[str, Any]]
    held_out: Optional[HeldOut] = None


def run_sources(config: Any, world_size: int = 1) -> RunSources:
    """The run's sources; without validation data (and not streaming), a few training clips are held out."""
    train, validation = load_sources(config, "train"), load_sources(config, "validation")
    if validation or config.streaming or not train:
        return RunSources(train, validation)
    fraction = getattr(config, "validation_split", 0.0)
    train, validation, held = split_sources(train, fraction, config.max_validation_clips,
                                            config.train_batch_size * world_size, config.seed)
    return RunSources(train, validation, held)


def validation_batch(config: Any, sources: Optional[list[tuple[str, Any]]] = None) -> Optional[torch.Tensor]:
    """The fixed validation clips [N, 1, T] (the first usable ones of every source), or None."""
    sources = load_sources(config, "validation") if sources is None else sources
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


class AudioDataset(torch.utils.data.Dataset):
    """Training excerpts [1, T] of a folder of audio files, under the earlier SNAC training scripts' name.

    The same decoding, salience retries, loudness and broken-file replacement as a training run
    (`AudioClips`); ``epoch`` changes the excerpts drawn. Its items are the audio tensors alone.
    """

    def __init__(self, dataset_path: str, sample_rate: int = 24000, segment_seconds: float = 1.0, train: bool = True,
                 seed: int = 0) -> None:
        spec = ExcerptSpec(sample_rate=sample_rate, length=round(segment_seconds * sample_rate))
        self.clips = AudioClips([files_dataset(list_audio_files(dataset_path))], spec, seed=seed, train=train,
                                names=[dataset_path])
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.clips[(self.epoch, index)]
        if item["audio"] is None:
            raise DataError(f"no usable clip near row {index}: " + "; ".join(item["bad"][:3]))
        return item["audio"]


@dataclass
class TrainingData:
    """The training batches of one process and the run's length in optimizer updates."""

    loader: Any  # iterable of collated batches: a DataLoader, or the StreamingLoader
    sampler: Any  # set_epoch(epoch, start_batch): the EpochBatchSampler, or the StreamingLoader itself
    clips: Optional[AudioClips]  # the map-style clips; None when streaming
    max_steps: int
    workers: int = 0  # loader worker processes
    decode_seconds: Optional[float] = None  # one clip's read, decode and cut, measured on the probes


def training_data(config: Any, rank: int, world_size: int, pin_memory: bool,
                  sources: Optional[list[tuple[str, Any]]] = None) -> TrainingData:
    """The training loader of process ``rank``; refuses, before training, data that cannot fill a batch."""
    sources = load_sources(config, "train") if sources is None else sources
    if not sources:
        raise ConfigError("no training data source: give --dataset, --dataset_name, --train_data_dir or --train_file")
    names, train_sets = (list(x) for x in zip(*sources))
    weights = source_weights(config, len(sources))
    spec = train_spec(config)
    workers, local = config.dataloader_num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if config.streaming:
        # a stream's position is counted per worker: the count must not depend on a measurement
        workers = default_num_workers(local) if workers is None else workers
        for name, stream in sources:
            check_stream(stream, name, spec)
        clips = StreamingClips(mix_streams(train_sets, weights, config.seed), spec, seed=config.seed, rank=rank,
                               world_size=world_size, shuffle_buffer_size=config.shuffle_buffer_size)
        # Endless per process; its position (rows read per loader worker) goes into checkpoints.
        loader = StreamingLoader(clips, config.train_batch_size, workers, pin_memory, world_size=world_size)
        return TrainingData(loader, loader, None, config.max_train_steps, workers)
    map_clips = AudioClips(train_sets, spec, seed=config.seed, train=True, weights=weights, names=names)
    decode_seconds = check_source(map_clips, "training")
    if workers is None:  # the worker count never changes what is trained on (resume tests, 0 and 1 workers)
        workers = default_num_workers(local, config.train_batch_size * decode_seconds)
    sampler = EpochBatchSampler(len(map_clips), config.train_batch_size, seed=config.seed, num_replicas=world_size,
                                rank=rank)
    if len(sampler) == 0:
        raise ConfigError(f"the training data has {len(map_clips)} clips, fewer than one batch of "
                          f"{config.train_batch_size} per process; lower --train_batch_size")
    updates_per_epoch = max(1, len(sampler) // config.gradient_accumulation_steps)
    return TrainingData(make_loader(map_clips, sampler, workers, pin_memory), sampler, map_clips,
                        config.max_train_steps or config.num_train_epochs * updates_per_epoch, workers, decode_seconds)


def seeding_excerpts(data: TrainingData, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` usable training excerpts off the training stream, for codebook seeding.

    Map-style sources give the same excerpts whatever the number of processes (their own keys,
    negative epochs, in an order fixed by ``seed``); a stream gives this process's first rows.
    """
    if data.clips is None:
        stream = iter(data.loader.clips)
        return [item["audio"] for item in itertools.islice(
            (item for item in stream if item["audio"] is not None), count)]
    clips, found = data.clips, []
    for rounds in itertools.count():
        order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(seed + rounds))
        for index in order.tolist():
            item = clips[(-1 - rounds, index)]  # negative epochs: keys training never uses
            if item["audio"] is not None:
                found.append(item["audio"])
            if len(found) == count:
                return found
        if not found:  # not one usable clip in a whole pass: training reports the source itself
            return found
    return found
