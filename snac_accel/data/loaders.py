"""Batches of clips: the epoch sampler of map-style clips, the DataLoader, and a source's first check.

`EpochBatchSampler` hands out ``(epoch, index)`` keys, a seeded permutation per epoch split by
rank, and resumes in the middle of an epoch; `make_loader` decodes in worker processes with a
generator of its own, so creating an iterator never draws from the global RNG.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Sampler

from accelerate.logging import get_logger

from .clips import AudioClips, sample_seed
from .sources import DataError

logger = get_logger(__name__)


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


# The fastest optimizer update the loader must keep up with: snac_24khz (16 x 0.8 s, snac recipe) at 40%
# of an H200's bf16 peak is 4.87 TFLOP in about 15 ms.
FASTEST_UPDATE_SECONDS = 0.015


def default_num_workers(processes_per_machine: int = 1, batch_decode_seconds: Optional[float] = None) -> int:
    """Loader workers of one process, from the cores it may use (less one for the training loop) and,
    when measured, the time one worker takes to decode a batch.

    Unmeasured: every spare core, at most 8. Measured: enough workers to decode a batch per
    `FASTEST_UPDATE_SECONDS`, at least 2 (one decodes while another's batch waits) and at most the
    spare cores: cheap formats leave the cores to the training step, slow ones may use all of them.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    spare = max(0, cores // max(1, processes_per_machine) - 1)
    if batch_decode_seconds is None:
        return min(8, spare)
    return min(spare, max(2, math.ceil(batch_decode_seconds / FASTEST_UPDATE_SECONDS)))


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


def probe_rows(length: int, probes: int) -> list[int]:
    """Rows probed in a source of ``length`` rows: all of a small one, else ``probes`` spread evenly."""
    if length <= probes:
        return list(range(length))
    return sorted({round(i * (length - 1) / (probes - 1)) for i in range(probes)})


def check_source(clips: AudioClips, name: str, probes: int = 16) -> float:
    """Refuse a source with no usable clip before training starts, naming why the probes failed;
    warn when the probed clips are mostly shorter than an excerpt (it would be mostly padding).
    Returns the median seconds one usable probe took to read, decode and cut (loader sizing).

    Each source of a mix is probed on its own: every row of a small source, else rows spread over it.
    """
    if len(clips) == 0:
        raise DataError(f"the {name} data is empty")
    length_needed = clips.spec.length
    seconds: list[float] = []
    for source, length in enumerate(clips.lengths):
        if length == 0:
            raise DataError(f"the {name} source {clips.names[source]} is empty")
        problems, contents = [], []
        for row in probe_rows(length, probes):
            started = time.perf_counter()
            clip = clips.load_row(source, row, None)
            if clip.audio is None:
                problems.append(f"{clips.describe(source, row)}: {clip.problem}")
            else:
                contents.append(clip.content)
                seconds.append(time.perf_counter() - started)
        if not contents:
            raise DataError(f"the {name} source {clips.names[source]} has no usable clip among {len(problems)} "
                            "probed: " + "; ".join(problems[:3]))
        if clips.spec.short_clips == "pad" and sum(contents) < 0.5 * len(contents) * length_needed:
            rate = clips.spec.sample_rate
            logger.warning(f"the {name} clips of {clips.names[source]} are shorter than an excerpt "
                           f"({length_needed / rate:.2f} s): the {len(contents)} probed hold "
                           f"{sum(contents) / len(contents) / rate:.2f} s on average (longest "
                           f"{max(contents) / rate:.2f} s), so excerpts are mostly zero padding; use a shorter "
                           "--segment_seconds (training) or --validation_seconds (validation)",
                           main_process_only=True)
    return statistics.median(seconds)
