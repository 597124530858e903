"""A run's progress: the bar, and the throughput and memory that each logging step reports.

Throughput is measured over a window, from one logging step to the next: the share of wall time
spent waiting for data, seconds of audio trained on per second (all processes together), optimizer
updates per second and, when the FLOPs of an update are known (counted once, `count_flops`), the
model FLOP utilisation: those FLOPs per second over the device's dense bf16 peak (`PEAK_BF16`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

# Dense bf16 tensor-core peak per device in FLOP/s, by a substring of the device's name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12,
             "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak (FLOP/s), None where unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


@contextmanager
def count_flops() -> Iterator[list[float]]:
    """FLOPs of the ops run inside the block (``torch.utils.flop_counter``), in a one-element list.

    A dispatch mode that only observes: the step computes exactly as without it. Meant for one
    update of an eager run, once: under it every op pays a Python call.
    """
    from torch.utils.flop_counter import FlopCounterMode

    result = [0.0]
    counter = FlopCounterMode(display=False)
    with counter:
        yield result
    result[0] = float(counter.get_total_flops())


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def start_summary(config: Any, train_clips: Optional[int], validation_clips: int, validation_words: str,
                  max_steps: int, processes: int, parameters: int) -> str:
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
            f"per update; {max_steps} updates, discriminators {disc}; writing {config.output_dir}")


class Progress:
    """The progress bar (local main process only) and the current logging window."""

    def __init__(self, accelerator: Accelerator, total: int, initial: int, seconds_per_batch: float,
                 flops_per_update: Optional[float] = None) -> None:
        self.accelerator, self.seconds_per_batch = accelerator, seconds_per_batch
        self.flops_per_update = flops_per_update  # per process
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

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    def trained_batch(self) -> None:
        self.audio_seconds += self.seconds_per_batch

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
        self.last = perf
        self.accelerator.log(logs, step=step)
        usage = "/".join(f"{100 * v:.0f}" for k, v in logs.items() if "/usage_" in k)
        extra = {"mfu": f"{100 * perf['perf/mfu']:.0f}%"} if "perf/mfu" in perf else {}
        self.bar.set_postfix(mel=f"{logs['loss/mel']:.3f}", codes_used=f"{usage}%",
                             audio_s_per_s=f"{perf['perf/audio_seconds_per_second']:.1f}",
                             updates_per_s=f"{perf['perf/updates_per_second']:.2f}", **extra)
        self._new_window()

    def close(self) -> None:
        self._redirect.__exit__(None, None, None)
        self.bar.close()
