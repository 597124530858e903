"""How fast `snac_accel.encode` tokenizes, against a plain loop of `snac.SNAC.encode` over the same files.

Run `python benchmarks/encode.py [--presets tiny,snac_24khz] [--processes 1,2] [--copies 1]`. The files
are the 36 demo clips written at 16 kHz (so both sides resample to the codec's 24 kHz), repeated
``--copies`` times. Codecs are random-init presets (speed does not depend on training), saved with
`snac_accel.hub.save_pretrained`. For each preset it prints audio seconds encoded per second of:
1. the plain loop: one file at a time, torchcodec decode and resample, `SNAC.encode`;
2. `python -m snac_accel.encode` with 1 process, and `accelerate launch` with 2 CPU processes
   (ACCELERATE_USE_CPU=1, one thread each), timed from the codec load to the last shard (the
   figure the run records in snac_codes.json), and its ratio to the plain loop;
   also per CPU second (the encoders' and the decoding workers' CPU time), a figure that a busy
   shared machine disturbs less than wall time;
and the share of its codes equal to the loop's. Each figure is the best of ``--repeats`` interleaved
runs. With a GPU it adds a bf16 run; its "codes equal" column is its agreement with float32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_files(folder: Path, copies: int, count: int, rate: int = 16000) -> list[Path]:
    import torchaudio
    from torchcodec.decoders import AudioDecoder
    from torchcodec.encoders import AudioEncoder

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for copy in range(copies):
        for clip in sorted((ROOT / "snac_accel" / "demo_data" / "train").glob("*.flac"))[:count]:
            samples = AudioDecoder(str(clip)).get_all_samples()
            audio = torchaudio.functional.resample(samples.data, samples.sample_rate, rate)
            path = folder / f"{clip.stem}_{copy}.flac"
            AudioEncoder(audio, sample_rate=rate).to_file(str(path))
            paths.append(path)
    return paths


def save_codec(preset: str, folder: Path) -> Path:
    from snac_accel.config import MODEL_PRESETS
    from snac_accel.hub import save_pretrained
    from snac_accel.model import build_generator

    torch.manual_seed(0)
    return save_pretrained(build_generator(MODEL_PRESETS[preset]), folder)


@torch.inference_mode()
def plain_loop(codec: Path, files: list[Path]) -> tuple[float, float, dict[str, list[torch.Tensor]]]:
    """Audio seconds per second and per CPU second of the one-file-at-a-time loop, and its codes per file.

    torchcodec resamples while decoding (FFmpeg's resampler), as `datasets.Audio` does for the
    encoder, so both sides encode the same samples."""
    import snac
    from torchcodec.decoders import AudioDecoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = snac.SNAC.from_pretrained(str(codec)).eval().to(device)
    codes, seconds = {}, 0.0
    start, cpu = time.perf_counter(), time.process_time()
    for path in files:
        audio = AudioDecoder(str(path), sample_rate=model.sampling_rate, num_channels=1).get_all_samples().data
        codes[str(path)] = [c[0].cpu() for c in model.encode(audio[None].to(device))]
        seconds += audio.shape[-1] / model.sampling_rate
    return seconds / (time.perf_counter() - start), seconds / (time.process_time() - cpu), codes


def ours(codec: Path, data: Path, out: Path, processes: int, extra: list[str]) -> tuple[float, float]:
    """Audio seconds per second and per CPU second of one snac_accel.encode run (as it records them)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    args = ["-m", "snac_accel.encode", str(codec), str(data), "--output_dir", str(out), *extra]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // processes)))
        cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
        if torch.cuda.is_available():
            env.pop("ACCELERATE_USE_CPU")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    run = json.loads((out / "snac_codes.json").read_text())["runs"][-1]
    return run["audio_seconds"] / run["seconds"], run["audio_seconds"] / run["cpu_seconds"]


def agreement(folder: Path, reference: dict[str, list[torch.Tensor]]) -> float:
    """Share of the folder's codes equal to the reference codes of the same files."""
    from snac_accel.tokenizer.codes import load_codes, read_info, row_codes

    info, same, total = read_info(folder), 0, 0
    for row in load_codes(folder):
        for mine, ref in zip(row_codes(row, info), reference[row["id"]]):
            same += int((mine == ref.cpu()).sum())
            total += ref.numel()
    return same / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,snac_24khz")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--copies", type=int, default=1, help="repeat the demo clips this many times")
    parser.add_argument("--files", type=int, default=36, help="use the first N demo clips (default all 36)")
    parser.add_argument("--repeats", type=int, default=2, help="best of N interleaved runs (shared machines vary)")
    args = parser.parse_args()
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_files(tmp / "data", args.copies, args.files)
        print(f"{len(files)} files at 16 kHz; torch threads {torch.get_num_threads()}; "
              f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
        print(f"{'preset':<12}{'run':<24}{'audio s/s':>10}{'vs loop':>9}{'per CPU s':>11}{'vs loop':>9}"
              f"{'codes equal':>13}")
        for preset in args.presets.split(","):
            codec = save_codec(preset, tmp / preset)
            counts = [n for n in map(int, args.processes.split(","))
                      if not torch.cuda.is_available() or n <= torch.cuda.device_count()]
            runs = [("plain SNAC.encode loop", None, [])] + [(f"snac_accel.encode x{n}", n, []) for n in counts]
            if torch.cuda.is_available():
                runs.append(("snac_accel.encode bf16", 1, ["--mixed_precision", "bf16"]))
            best: dict[str, tuple[float, float]] = {}
            folders: dict[str, Path] = {}
            reference = {}
            for repeat in range(args.repeats):  # interleaved, so that a busy spell hits every run alike
                for name, processes, extra in runs:
                    if processes is None:
                        wall, cpu, reference = plain_loop(codec, files)
                    else:
                        folders[name] = tmp / f"{preset}_{processes}_{'_'.join(extra)}_{repeat}"
                        wall, cpu = ours(codec, tmp / "data", folders[name], processes, extra)
                    old = best.get(name, (0.0, 0.0))
                    best[name] = (max(wall, old[0]), max(cpu, old[1]))
            loop_wall, loop_cpu = best[runs[0][0]]
            for name, processes, _ in runs:
                wall, cpu = best[name]
                equal = f"{agreement(folders[name], reference):>13.4f}" if processes else ""
                print(f"{preset:<12}{name:<24}{wall:>10.1f}{wall / loop_wall:>9.2f}{cpu:>11.1f}{cpu / loop_cpu:>9.2f}"
                      f"{equal}", flush=True)


if __name__ == "__main__":
    main()
