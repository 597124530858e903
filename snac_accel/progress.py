"""A run's progress: the bar, and the throughput and memory that each logging step reports.

Throughput is measured over a window, from one logging step to the next: the share of wall time
spent waiting for data, seconds of audio trained on per second (all processes together), optimizer
updates per second and, when the FLOPs of an update are known (counted once, `count_flops`), the
model FLOP utilisation: those FLOPs per second over the device's dense bf16 peak (`PEAK_BF16`).
A loop that waits on its loader for a fifth of a window or more is told, once, how many workers
would keep up (`DataAdvice`).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

# Dense bf16 tensor-core peak per device in FLOP/s, by a substring of the device's name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12,
             "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}

logger = get_logger(__name__)


def peak_flops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak (FLOP/s), None where unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


@contextmanager
def count_flops() -> Iterator[list[float]]:
    """FLOPs of the ops run inside the block (``torch.utils.flop_counter``), in a one-element list.

    A dispatch mode that only observes: the step computes exactly as without it. Compiled models
    run eagerly inside the block (compiled graphs hide their ops from the counter), so a compiled
    run compiles on its second update. Meant for one update, once: under it every op pays a Python call.
    """
    from torch.utils.flop_counter import FlopCounterMode

    result = [0.0]
    counter = FlopCounterMode(display=False)
    with torch.compiler.set_stance("force_eager"), counter:
        yield result
    result[0] = float(counter.get_total_flops())


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@dataclass
class DataAdvice:
    """What the loader was sized from, for the advice given when the loop waits on it."""

    workers: int  # loader workers per process
    decode_seconds: Optional[float] = None  # one clip, measured on the pre-flight probes
    clips_per_batch: int = 1

    def words(self) -> str:
        decode = "" if self.decode_seconds is None else f", {1000 * self.decode_seconds:.1f} ms to decode a clip"
        return f"{self.workers} loader workers per process{decode}"

    def message(self, share: float, updates: int, step_seconds: float) -> str:
        """One line: how long the loop waited, how many workers would keep up, what else helps."""
        text = f"the training loop waited for data {100 * share:.0f}% of the time of its last {updates} updates " \
               f"({self.words()}"
        if self.decode_seconds is not None:
            batch = self.clips_per_batch * self.decode_seconds
            text += (f"; a batch takes one worker {1000 * batch:.0f} ms and a step {1000 * step_seconds:.0f} ms, "
                     f"so about {max(self.workers + 1, math.ceil(batch / max(step_seconds, 1e-6)))} workers keep up")
        return text + ("): raise --dataloader_num_workers, or store the audio as WAV at the model's rate or FLAC "
                       "(python benchmarks/data.py --per_format measures each format)")


def start_summary(config: Any, train_clips: Optional[int], validation_clips: int, validation_words: str,
                  max_steps: int, processes: int, parameters: int, loader_words: str = "") -> str:
    """The run in one line at its start: data, model, recipe, batch, length, GAN start, output."""
    per_update = config.train_batch_size * processes * config.gradient_accumulation_steps
    clips = "a stream" if train_clips is None else f"{train_clips} clips"
    model = config.init_from or config.preset
    disc = "from step 0" if not config.disc_start else f"from step {config.disc_start}"
    if config.disc_start and config.disc_start >= max_steps:
        disc = f"off (--disc_start {config.disc_start} >= {max_steps} steps)"
    return (f"training {model} ({parameters / 1e6:.2f}M parameters) on {clips}, validating on "
            f"{validation_clips} clips{f': {validation_words}' if validation_words else ''}; recipe {config.recipe}: "
            f"lr {config.learning_rate:g}, {config.train_batch_size} x {config.segment_seconds:g} s per process x "
            f"{processes} process(es) x {config.gradient_accumulation_steps} accumulation = {per_update} excerpts "
            f"per update; {max_steps} updates, discriminators {disc}; {loader_words + '; ' if loader_words else ''}"
            f"writing {config.output_dir}")


class Progress:
    """The progress bar (local main process only) and the current logging window."""

    # Share of a window spent waiting on the loader from which the run is told to feed it faster.
    SLOW_DATA_SHARE = 0.2

    def __init__(self, accelerator: Accelerator, total: int, initial: int, seconds_per_batch: float,
                 flops_per_update: Optional[float] = None, data_advice: Optional[DataAdvice] = None) -> None:
        self.accelerator, self.seconds_per_batch = accelerator, seconds_per_batch
        self.flops_per_update = flops_per_update  # per process
        self.data_advice, self.windows = data_advice, 0  # the first window holds the workers' start
        self.peak = peak_flops(accelerator.device)
        self.last: dict[str, float] = {}  # the last window's throughput, for the model card
        self.bar = tqdm(total=total, initial=initial, disable=not accelerator.is_local_main_process, desc="training",
                        dynamic_ncols=True)
        # Log lines go above the bar (through tqdm.write), not into it.
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()
        self._new_window()

    def _new_window(self) -> None:
        self.window_start, self.data_wait, self.audio_seconds, self.updates = time.monotonic(), 0.0, 0.0, 0
        self.batches = 0

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    def trained_batch(self) -> None:
        self.audio_seconds += self.seconds_per_batch
        self.batches += 1

    def updated(self) -> None:
        self.updates += 1

    def log(self, logs: dict[str, float], step: int) -> None:
        """Add the window's throughput and the peak memory to ``logs``, send them to the trackers, show a
        summary on the bar, and start a new window."""
        elapsed = max(time.monotonic() - self.window_start, 1e-9)
        perf = {"perf/audio_seconds_per_second": self.audio_seconds / elapsed,
                "perf/updates_per_second": self.updates / elapsed,
                "perf/peak_memory_gb": peak_memory_gb(self.accelerator.device)}
        if self.flops_per_update:
            perf["perf/tflops_per_second"] = self.flops_per_update * self.updates / elapsed / 1e12
            if self.peak:
                perf["perf/mfu"] = self.flops_per_update * self.updates / elapsed / self.peak
        logs.update({"data/wait_share": self.data_wait / elapsed, **perf})
        self._advise_on_data(elapsed)
        self.last = perf
        self.accelerator.log(logs, step=step)
        usage = "/".join(f"{100 * v:.0f}" for k, v in logs.items() if "/usage_" in k)
        extra = {"mfu": f"{100 * perf['perf/mfu']:.0f}%"} if "perf/mfu" in perf else {}
        self.bar.set_postfix(mel=f"{logs['loss/mel']:.3f}", codes_used=f"{usage}%",
                             audio_s_per_s=f"{perf['perf/audio_seconds_per_second']:.1f}",
                             updates_per_s=f"{perf['perf/updates_per_second']:.2f}", **extra)
        self._new_window()

    def _advise_on_data(self, elapsed: float) -> None:
        """Once per run, from the second window on: a loop that waits on its loader says what would feed it."""
        self.windows += 1
        share = self.data_wait / elapsed
        if self.data_advice is None or self.windows < 2 or share < self.SLOW_DATA_SHARE or not self.batches:
            return
        step_seconds = (elapsed - self.data_wait) / self.batches
        logger.warning(self.data_advice.message(share, self.updates, step_seconds), main_process_only=True)
        self.data_advice = None

    def close(self) -> None:
        self._redirect.__exit__(None, None, None)
        self.bar.close()
