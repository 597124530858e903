"""A run's progress: the bar, and the throughput and memory that each logging step reports.

Throughput is measured over a window, from one logging step to the next: the share of wall time
spent waiting for data, and seconds of audio trained on per second (all processes together).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


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

    def __init__(self, accelerator: Accelerator, total: int, initial: int, seconds_per_batch: float) -> None:
        self.accelerator, self.seconds_per_batch = accelerator, seconds_per_batch
        self.bar = tqdm(total=total, initial=initial, disable=not accelerator.is_local_main_process, desc="training",
                        dynamic_ncols=True)
        # Log lines go above the bar (through tqdm.write), not into it.
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()
        self._new_window()

    def _new_window(self) -> None:
        self.window_start, self.data_wait, self.audio_seconds = time.monotonic(), 0.0, 0.0

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    def trained_batch(self) -> None:
        self.audio_seconds += self.seconds_per_batch

    def log(self, logs: dict[str, float], step: int) -> None:
        """Add the window's throughput and the peak memory to ``logs``, send them to the trackers, show a
        summary on the bar, and start a new window."""
        elapsed = max(time.monotonic() - self.window_start, 1e-9)
        logs.update({"data/wait_share": self.data_wait / elapsed,
                     "perf/audio_seconds_per_second": self.audio_seconds / elapsed,
                     "perf/peak_memory_gb": peak_memory_gb(self.accelerator.device)})
        self.accelerator.log(logs, step=step)
        usage = "/".join(f"{100 * v:.0f}" for k, v in logs.items() if "/usage_" in k)
        self.bar.set_postfix(mel=f"{logs['loss/mel']:.3f}", codes_used=f"{usage}%",
                             audio_s_per_s=f"{logs['perf/audio_seconds_per_second']:.1f}")
        self._new_window()

    def close(self) -> None:
        self._redirect.__exit__(None, None, None)
        self.bar.close()
