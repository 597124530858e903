"""How fast the data pipeline feeds training, against torchcodec decoding the same files raw.

Run `python benchmarks/data.py [--data_dir DIR]`: without a folder it writes a mixed one (WAV at 8,
16 and 48 kHz, FLAC, MP3, Opus, OGG, 3 to 6 s each) into a temporary folder. It prints
1. raw decode: files per second of `torchcodec.decoders.AudioDecoder(...).get_all_samples()` at
   the model's rate, mono, one process;
2. loader: clips per second of `AudioClips` + `make_loader` (excerpt, salience, loudness) with 0
   and 2 workers, and their ratio to the raw rate;
3. the data-wait share of a short tiny training run with the default number of workers (target:
   under 5% of step time).

`python benchmarks/data.py --per_format` prints instead the loader's clips per CPU-second of one
process (0 workers, 0.8 s excerpts at 24 kHz) for each format: 24 kHz PCM WAV (the standard
library's path), 16 kHz WAV, 16 kHz FLAC, MP3 and Opus (torchcodec's).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from torchcodec.decoders import AudioDecoder
from torchcodec.encoders import AudioEncoder

from snac_accel import data as D
from snac_accel.config import TrainConfig

FORMATS = [("wav", 8000), ("wav", 16000), ("wav", 48000), ("flac", 24000), ("mp3", 44100), ("opus", 48000),
           ("ogg", 22050)]


def write_files(folder: Path, count: int) -> None:
    """``count`` speech-like files (tone sweeps under a syllable envelope, plus noise)."""
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        ext, rate = FORMATS[i % len(FORMATS)]
        seconds = 3.0 + 3.0 * float(torch.rand((), generator=g))
        t = torch.arange(int(rate * seconds)) / rate
        tone = 150 + 1500 * float(torch.rand((), generator=g))
        audio = (0.3 * (0.55 + 0.45 * torch.sin(2 * math.pi * 4 * t)) * torch.sin(2 * math.pi * tone * (1 + 0.1 * t) * t)
                 + 0.005 * torch.randn(t.shape, generator=g))
        channels = 2 if i % 5 == 0 else 1
        AudioEncoder(audio.expand(channels, -1).contiguous(), sample_rate=rate).to_file(str(folder / f"f{i:03d}.{ext}"))


def raw_decode_rate(files: list[str], rate: int, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        for path in files:
            AudioDecoder(path, sample_rate=rate, num_channels=1).get_all_samples()
    return repeats * len(files) / (time.perf_counter() - start)


def loader_rate(clips: D.AudioClips, batch_size: int, workers: int, epochs: int) -> float:
    sampler = D.EpochBatchSampler(len(clips), batch_size, seed=0)
    loader = D.make_loader(clips, sampler, workers, pin_memory=False)
    next(iter(loader))  # start the workers outside the timing
    count, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        for batch in loader:
            count += batch["good"]
    return count / (time.perf_counter() - start)


def training_wait_share(folder: Path, steps: int, output_dir: Path) -> tuple[float, float, int]:
    """Share of a tiny training run's wall time spent waiting for batches, default workers."""
    from snac_accel.trainer import SnacTrainer

    config = TrainConfig(preset="tiny", train_data_dir=str(folder), output_dir=str(output_dir), report_to="none",
                         train_batch_size=4, segment_seconds=0.5, max_train_steps=steps, model_noise=False)
    config.validate()
    trainer = SnacTrainer(config)
    batches = iter(trainer.train_loader)
    trainer.train_step(next(batches)["audio"])  # warm-up: worker start and first allocations
    wait = total = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            trainer.sampler.set_epoch(trainer.sampler.epoch + 1)
            batches = iter(trainer.train_loader)
            batch = next(batches)
        t1 = time.perf_counter()
        trainer.train_step(batch["audio"])
        wait, total = wait + t1 - t0, total + time.perf_counter() - t0
    return wait / total, total / steps, trainer.train_loader.num_workers


PER_FORMAT = [("wav", 24000), ("wav", 16000), ("flac", 16000), ("mp3", 24000), ("opus", 48000)]


def per_format(folder: Path, count: int, seconds: float, repeats: int) -> None:
    """Clips per CPU-second of `AudioClips` for each format, ``count`` files of ``seconds`` each."""
    g = torch.Generator().manual_seed(0)
    spec = D.ExcerptSpec(sample_rate=24000, length=19200)
    for ext, rate in PER_FORMAT:
        files = []
        for i in range(count):
            t = torch.arange(int(rate * seconds)) / rate
            tone = 150 + 1500 * float(torch.rand((), generator=g))
            audio = 0.3 * (0.55 + 0.45 * torch.sin(2 * math.pi * 4 * t)) * torch.sin(2 * math.pi * tone * t)
            path = folder / f"{ext}{rate}_{i:03d}.{ext}"
            AudioEncoder(audio[None].contiguous(), sample_rate=rate).to_file(str(path))
            files.append(str(path))
        clips = D.AudioClips(D.files_dataset(files), spec, seed=0)
        clips[0, 0]  # warm-up
        start = time.process_time()
        for epoch in range(repeats):
            for index in range(len(files)):
                assert clips[epoch, index]["audio"] is not None
        cpu = time.process_time() - start
        print(f"{ext:5s} {rate:6d} Hz: {repeats * len(files) / cpu:8.1f} clips per CPU-second")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None, help="folder of audio files (default: write 42 mixed files)")
    parser.add_argument("--files", type=int, default=42)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--train_steps", type=int, default=8)
    parser.add_argument("--per_format", action="store_true", help="clips per CPU-second for each format")
    args = parser.parse_args()
    from accelerate import PartialState

    PartialState()  # accelerate's logger needs a state
    if args.per_format:
        with tempfile.TemporaryDirectory() as tmp:
            torch.set_num_threads(1)
            return per_format(Path(tmp), 16, 4.0, args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.data_dir) if args.data_dir else Path(tmp) / "audio"
        if not args.data_dir:
            folder.mkdir()
            write_files(folder, args.files)
        files = D.list_audio_files(folder)
        seconds = sum(AudioDecoder(f).metadata.duration_seconds or 0 for f in files)
        print(f"{len(files)} files, {seconds / len(files):.1f} s on average, model rate 24000 Hz, "
              f"{torch.get_num_threads()} torch threads, default workers here: {D.default_num_workers()}")
        raw = raw_decode_rate(files, 24000, args.epochs)
        print(f"raw torchcodec decode (whole file):  {raw:8.1f} files/s")
        spec = D.ExcerptSpec(sample_rate=24000, length=12288)
        clips = D.AudioClips(D.files_dataset(files), spec, seed=0)
        for workers in (0, 2):
            rate = loader_rate(clips, args.batch_size, workers, args.epochs)
            print(f"loader, {workers} workers (0.5 s excerpts): {rate:8.1f} clips/s = {rate / raw:.2f} x raw decode")
        share, step_s, workers = training_wait_share(folder, args.train_steps, Path(tmp) / "run")
        verdict = "meets" if share < 0.05 else "misses"
        print(f"tiny training, batch 4 x 0.5 s, {workers} workers (default): {step_s * 1000:.0f} ms per step, "
              f"data wait {share:.1%} of step time ({verdict} the 5% target)")


if __name__ == "__main__":
    main()
