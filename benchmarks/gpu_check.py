"""The GPU figures nobody has yet, in a few minutes (run through benchmarks/gpu_check.sh).

    python benchmarks/gpu_check.py precision   # bf16 and fp16 runs with accumulation 2
    python benchmarks/gpu_check.py max_batch   # the largest batch of 0.8 s clips that fits (bf16, eager)

Precision: SnacTrainer's own step (`SnacTrainer.train_step`) on the demo data's shapes, with
accumulation 2: per run the updates taken and skipped, fp16 loss scales and back-offs, whether every
loss stayed finite, the mel loss first and last, audio seconds per second and peak memory. Batches
are synthetic (tones, noise, silence; fixed seed) and on the device, so decoding stays out of the figures.

``--cpu --preset tiny`` runs the same code on the CPU: a dry run of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snac_accel.config import TrainConfig  # noqa: E402
from snac_accel.trainer import SnacTrainer  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "snac_accel" / "demo_data"


def synthetic_batch(batch: int, samples: int, sample_rate: int, device: torch.device, seed: int) -> torch.Tensor:
    """Tones with noise at speech-like levels; the first clip starts with silence (exact zeros)."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / sample_rate
    freqs = 80 + 2000 * torch.rand(batch, 1, generator=generator)
    audio = 0.2 * torch.sin(2 * math.pi * freqs * t) + 0.02 * torch.randn(batch, samples, generator=generator)
    audio[0, :samples // 8] = 0.0
    return audio[:, None].to(device)


def make_trainer(args: argparse.Namespace, output_dir: str, **overrides) -> SnacTrainer:
    values = dict(preset=args.preset, train_data_dir=str(DEMO / "train"), output_dir=output_dir,
                  train_batch_size=args.batch, segment_seconds=args.seconds, report_to="none",
                  dataloader_num_workers=0, codebook_init="none", seed=0)
    values.update(overrides)
    if args.cpu:
        import os

        os.environ["ACCELERATE_USE_CPU"] = "1"
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


def precision(args: argparse.Namespace) -> None:
    for mixed_precision in ("bf16", "fp16"):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer(args, tmp, mixed_precision=mixed_precision, gradient_accumulation_steps=2)
            device, config = trainer.accelerator.device, trainer.config
            reset_peak(device)
            batches = [synthetic_batch(args.batch, config.segment_samples, config.sampling_rate, device, seed)
                       for seed in range(4)]
            finite, mels = True, []
            trainer.train_step(batches[0])  # warm-up micro-batch (cuDNN autotuning, allocator)
            sync(device)
            start = time.perf_counter()
            for i in range(2 * args.updates - 1):
                logs = trainer.train_step(batches[(i + 1) % len(batches)])
                finite &= all(bool(torch.isfinite(v).all()) for v in logs.values())
                mels.append(logs["loss/mel"].item())
            sync(device)
            elapsed = time.perf_counter() - start
            state = trainer.state
            seconds = (2 * args.updates - 1) * args.batch * config.segment_samples / config.sampling_rate
            scales = {name: scaler.get_scale() for name, scaler in trainer.scalers.items()}
            print(f"{mixed_precision}: {args.preset} batch {args.batch} x {args.seconds} s, accumulation 2: "
                  f"{state.step} updates, skipped {dict(state.skipped_updates)}, scaler back-offs "
                  f"{dict(state.scaler_backoffs) if scales else 'n/a'}, loss scales {scales or 'n/a'}, "
                  f"losses finite: {finite}, mel {mels[0]:.3f} -> {mels[-1]:.3f}, "
                  f"{seconds / elapsed:.1f} audio s/s, peak {peak_gib(device):.2f} GiB", flush=True)
            del trainer
            reset_peak(device)


def fits(trainer: SnacTrainer, batch: int) -> bool:
    """One training micro-batch of ``batch`` clips; False on out-of-memory (the trainer is left usable)."""
    config, device = trainer.config, trainer.accelerator.device
    try:
        trainer.train_step(synthetic_batch(batch, config.segment_samples, config.sampling_rate, device, batch))
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
        total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0.0
        print(f"largest batch of {args.seconds} s clips (bf16, eager, {args.preset}): {good} ({limit}; "
              f"device memory {total:.0f} GiB)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["precision", "max_batch"])
    parser.add_argument("--preset", default="snac_24khz")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=0.8)
    parser.add_argument("--updates", type=int, default=5, help="optimizer updates per precision run")
    parser.add_argument("--max_try", type=int, default=1024, help="largest batch the search tries")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU (use with --preset tiny)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is false): nothing to measure")
        return
    {"precision": precision, "max_batch": max_batch}[args.part](args)


if __name__ == "__main__":
    main()
