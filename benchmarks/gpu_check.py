"""The GPU figures nobody has yet, one part per call (run through benchmarks/gpu_check.sh).

    python benchmarks/gpu_check.py throughput [--compile]  # bf16: audio-s/s, updates/s, MFU, peak memory
    python benchmarks/gpu_check.py max_batch               # the largest batch of 0.8 s clips that fits (bf16)
    python benchmarks/gpu_check.py precision               # fp16 with accumulation 2: skips, loss scales
    python benchmarks/gpu_check.py train --minutes 3       # snac_24khz on synthetic speech: usage, mel distance

Batches of the step parts are synthetic speech made here (fixed seed) and already on the device, so
decoding stays out of the figures; ``train`` writes the same kind of speech as 16-bit WAV files and
trains on them through the real loader (PCM WAV needs no FFmpeg). FLOPs per update are counted once
with ``torch.utils.flop_counter`` on a step; MFU is those FLOPs per second over the device's dense
bf16 peak (`snac_accel.progress.PEAK_BF16`, known devices only).

``--cpu --preset tiny`` runs the same code on the CPU: a dry run of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snac_accel.compile import eager  # noqa: E402
from snac_accel.config import TrainConfig  # noqa: E402
from snac_accel.progress import count_flops, peak_flops  # noqa: E402
from snac_accel.trainer import SnacTrainer  # noqa: E402

# Vowel formants (Hz) of an adult voice: /a/, /e/, /i/, /o/, /u/.
FORMANTS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410], [300, 870, 2240]])


def synthetic_speech(seconds: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Speech-like audio: syllables of a glottal pulse train through vowel formants, fricative noise,
    a falling pitch contour and pauses; float32 in [-1, 1]."""
    total = int(seconds * sample_rate)
    out = np.zeros(total, np.float32)
    f0_base = rng.uniform(90, 230)
    position = int(rng.uniform(0, 0.1) * sample_rate)
    while position < total:
        length = int(rng.uniform(0.12, 0.32) * sample_rate)
        n = min(length, total - position)
        t = np.arange(n) / sample_rate
        if rng.random() < 0.25:  # a fricative: shaped noise
            noise = np.fft.rfft(rng.standard_normal(n))
            freqs = np.fft.rfftfreq(n, 1 / sample_rate)
            segment = np.fft.irfft(noise * (freqs > rng.uniform(2500, 4500)), n) * 0.3
        else:  # a voiced vowel: pulses at a drifting f0, filtered by three formants
            f0 = f0_base * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * t)) * (1 - 0.2 * t / max(t[-1], 1e-3))
            phase = np.cumsum(f0 / sample_rate)
            pulses = np.diff(np.floor(phase), prepend=0.0) + 0.01 * rng.standard_normal(n)
            spectrum = np.fft.rfft(pulses)
            freqs = np.fft.rfftfreq(n, 1 / sample_rate)
            formants = FORMANTS[rng.integers(len(FORMANTS))] * rng.uniform(0.9, 1.15)
            envelope = sum(1 / (1 + ((freqs - f) / (60 + 0.05 * f)) ** 2) * g for f, g in zip(formants, (1, .5, .25)))
            segment = np.fft.irfft(spectrum * envelope, n)
        segment = segment * np.hanning(n) ** 0.5
        out[position:position + n] += segment / max(np.abs(segment).max(), 1e-6) * rng.uniform(0.2, 0.6)
        position += n + (int(rng.uniform(0.05, 0.3) * sample_rate) if rng.random() < 0.3 else 0)
    return np.clip(out, -1, 1)


def write_speech(folder: Path, count: int, seconds: float, sample_rate: int, seed: int) -> Path:
    """``count`` clips of synthetic speech as 16-bit mono WAV files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        samples = (synthetic_speech(seconds, sample_rate, rng) * 32767).astype("<i2")
        with wave.open(str(folder / f"speech_{i:04d}.wav"), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(sample_rate)
            out.writeframes(samples.tobytes())
    return folder


def speech_batch(batch: int, samples: int, sample_rate: int, device: torch.device, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    clips = [synthetic_speech(samples / sample_rate, sample_rate, rng)[:samples] for _ in range(batch)]
    return torch.from_numpy(np.stack(clips))[:, None].to(device)


def make_trainer(args: argparse.Namespace, output_dir: str, **overrides) -> SnacTrainer:
    data = Path(output_dir) / "data"
    if not data.exists():
        write_speech(data, 16, 1.0, TrainConfig(preset=args.preset).sampling_rate, 0)
    values = dict(preset=args.preset, train_data_dir=str(data), output_dir=output_dir + "/run",
                  train_batch_size=args.batch, segment_seconds=args.seconds, report_to="none",
                  dataloader_num_workers=0, codebook_init="none", seed=0, max_train_steps=10_000)
    values.update(overrides)
    return SnacTrainer(TrainConfig(**values))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def update_flops(trainer: SnacTrainer, real: torch.Tensor) -> float:
    """FLOPs of one optimizer update (forwards and backwards), counted on one step."""
    with count_flops() as flops:
        trainer.train_step(real)
    return flops[0]


def throughput(args: argparse.Namespace) -> None:
    """bf16 updates of the trainer's step, eager or compiled: audio-s/s, updates/s, MFU, peak memory."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = dict(mixed_precision="bf16")
        if args.compile:
            overrides.update(torch_compile=True, torch_compile_backend=args.backend)
        trainer = make_trainer(args, tmp, **overrides)
        device, config = trainer.accelerator.device, trainer.config
        batches = [speech_batch(args.batch, config.segment_samples, config.sampling_rate, device, s) for s in range(2)]
        with eager():  # counted on the plain modules, once
            flops = update_flops(trainer, batches[0])
        reset_peak(device)
        start = time.perf_counter()
        trainer.train_step(batches[1])  # warm-up: compile, cuDNN autotuning, allocator
        sync(device)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(args.updates):
            trainer.train_step(batches[i % 2])
        sync(device)
        elapsed = (time.perf_counter() - start) / args.updates
        seconds = args.batch * config.segment_samples / config.sampling_rate
        mfu = flops / elapsed / (peak_flops(device) or math.nan)
        kind = f"compiled ({args.backend})" if args.compile else "eager"
        print(f"bf16 {kind}: {args.preset} batch {args.batch} x {args.seconds} s: {elapsed * 1e3:.1f} ms per update, "
              f"{1 / elapsed:.2f} updates/s, {seconds / elapsed:.1f} audio s/s, first update {first:.1f} s, "
              f"{flops / 1e12:.3f} TFLOP per update, MFU {mfu:.1%}, peak {peak_gib(device):.2f} GiB", flush=True)


def precision(args: argparse.Namespace) -> None:
    """fp16 with accumulation 2: updates taken and skipped, loss scales and back-offs, finite losses."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(args, tmp, mixed_precision="fp16", gradient_accumulation_steps=2)
        device, config = trainer.accelerator.device, trainer.config
        reset_peak(device)
        batches = [speech_batch(args.batch, config.segment_samples, config.sampling_rate, device, s) for s in range(4)]
        finite, mels = True, []
        trainer.train_step(batches[0])  # warm-up micro-batch
        sync(device)
        start = time.perf_counter()
        for i in range(2 * args.updates - 1):
            logs = trainer.train_step(batches[(i + 1) % len(batches)])
            values = torch.stack([v.float() for v in logs.values()]).cpu()
            finite &= bool(torch.isfinite(values).all())
            mels.append(float(logs["loss/mel"]))
        sync(device)
        elapsed = time.perf_counter() - start
        state = trainer.state
        seconds = (2 * args.updates - 1) * args.batch * config.segment_samples / config.sampling_rate
        scales = {name: scaler.get_scale() for name, scaler in trainer.scalers.items()}
        print(f"fp16: {args.preset} batch {args.batch} x {args.seconds} s, accumulation 2: {state.step} updates, "
              f"skipped {dict(state.skipped_updates)}, scaler back-offs {dict(state.scaler_backoffs)}, loss scales "
              f"{scales}, losses finite: {finite}, mel {mels[0]:.3f} -> {mels[-1]:.3f}, "
              f"{seconds / elapsed:.1f} audio s/s, peak {peak_gib(device):.2f} GiB", flush=True)


def fits(trainer: SnacTrainer, batch: int) -> bool:
    """One training micro-batch of ``batch`` clips; False on out-of-memory (the trainer is left usable)."""
    config, device = trainer.config, trainer.accelerator.device
    try:
        trainer.train_step(speech_batch(batch, config.segment_samples, config.sampling_rate, device, batch))
        sync(device)
        return True
    except RuntimeError as err:  # torch.OutOfMemoryError, or cuFFT/cuDNN failing to allocate their workspace
        if isinstance(err, torch.OutOfMemoryError) or "ALLOC_FAILED" in str(err) or "out of memory" in str(err):
            return False
        raise
    finally:
        trainer.opt_g.zero_grad(set_to_none=True)
        trainer.opt_d.zero_grad(set_to_none=True)
        trainer.accelerator.unwrap_model(trainer.discriminator).requires_grad_(True)
        reset_peak(device)


def max_batch(args: argparse.Namespace) -> None:
    """Doubling until out of memory (or ``--max_try``), then bisection to within an eighth."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(args, tmp, mixed_precision="bf16")
        device = trainer.accelerator.device
        good, bad, batch = 0, None, args.batch
        while batch <= args.max_try and bad is None:
            start = time.perf_counter()
            ok = fits(trainer, batch)
            print(f"  batch {batch}: {'fits' if ok else 'out of memory'} ({time.perf_counter() - start:.1f} s)",
                  flush=True)
            good, bad = (batch, None) if ok else (good, batch)
            batch *= 2
        while bad is not None and bad - good > max(1, good // 8):
            middle = (good + bad) // 2
            good, bad = (middle, bad) if fits(trainer, middle) else (good, middle)
        limit = f"out of memory at {bad}" if bad is not None else f"--max_try {args.max_try} reached"
        print(f"largest batch of {args.seconds} s clips (bf16, eager, {args.preset}): {good} ({limit})", flush=True)


def train(args: argparse.Namespace) -> None:
    """A timed run on synthetic speech WAV files through the real loader; the last validation's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        rate = TrainConfig(preset=args.preset).sampling_rate
        train_dir = write_speech(Path(tmp) / "train", args.clips, 3.0, rate, 1)
        val_dir = write_speech(Path(tmp) / "val", 8, 2.0, rate, 2)
        config = TrainConfig(preset=args.preset, train_data_dir=str(train_dir), validation_data_dir=str(val_dir),
                             output_dir=f"{tmp}/run", mixed_precision="bf16", report_to="none",
                             max_train_minutes=args.minutes, max_train_steps=1_000_000, checkpointing_steps=0,
                             logging_steps=50, train_batch_size=args.batch, segment_seconds=args.seconds)
        trainer = SnacTrainer(config)
        start = time.perf_counter()
        trainer.fit()
        metrics = trainer.state.extra.get("last_metrics", {})
        usage = "/".join(f"{100 * v:.0f}" for k, v in metrics.items() if "codebook_usage" in k)
        print(f"train: {args.preset}, {trainer.state.step} updates in {time.perf_counter() - start:.0f} s "
              f"(--max_train_minutes {args.minutes}); validation mel distance "
              f"{metrics.get('val/mel_distance', math.nan):.3f}, "
              f"codebook usage {usage}% per level", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["throughput", "precision", "max_batch", "train"])
    parser.add_argument("--preset", default="snac_24khz")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=0.8)
    parser.add_argument("--updates", type=int, default=5, help="timed optimizer updates")
    parser.add_argument("--compile", action="store_true", help="throughput with --torch_compile")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend with --compile")
    parser.add_argument("--max_try", type=int, default=1024, help="largest batch the search tries")
    parser.add_argument("--minutes", type=float, default=3.0, help="train: --max_train_minutes")
    parser.add_argument("--clips", type=int, default=64, help="train: synthetic speech files (3 s each)")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU (use with --preset tiny)")
    args = parser.parse_args()
    if args.cpu:
        os.environ["ACCELERATE_USE_CPU"] = "1"
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is false); --cpu for a dry run")
    {"throughput": throughput, "precision": precision, "max_batch": max_batch, "train": train}[args.part](args)


if __name__ == "__main__":
    main()
