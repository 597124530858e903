"""Codes back to audio: ``python -m snac_accel.decode CODES_DIR --rows N --output_dir WAVS [--check N]``.

CODES_DIR is a folder written by `snac_accel.encode`. The first ``--rows`` rows (in source order)
are decoded with the codec recorded in its ``snac_codes.json`` (or ``--codec``), cut to their
source length and written as WAV files for listening. ``--check N`` measures the first N rows
against their sources with `snac_accel.evaluate`'s metrics (mel and STFT distance, SI-SDR, and
PESQ/STOI when installed), and how many stored codes equal a one-pass ``encode`` of the source.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Optional

import torch
from accelerate.logging import get_logger

from .evaluate import _perceptual, _Running, clip_metrics
from .hub import ensure_accelerate_state, load_codec
from .losses import MultiScaleMelLoss, MultiScaleSTFTLoss
from .tokenizer import codes as codes_lib
from .tokenizer.source_rows import MapRows, RowReader, StreamRows, open_rows

logger = get_logger(__name__)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m snac_accel.decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("codes_dir", help="a folder written by snac_accel.encode")
    parser.add_argument("--rows", type=int, default=4, help="decode this many rows to WAV files (default 4)")
    parser.add_argument("--output_dir", default=None, help="where the WAV files go (needed with --rows > 0)")
    parser.add_argument("--check", type=int, default=0, help="measure this many rows against their sources")
    parser.add_argument("--codec", default=None, help="default: the codec recorded in snac_codes.json")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the decoder's noise, per row")
    parser.add_argument("--output_json", default=None, help="where the check's results go (default: printed only)")
    args = parser.parse_args(argv)
    if args.rows > 0 and not args.output_dir:
        parser.error("--output_dir is required to write decoded rows (or pass --rows 0)")
    return args


@torch.inference_mode()
def decode_row(model: torch.nn.Module, row: dict[str, Any], info: dict[str, Any], seed: int = 0) -> torch.Tensor:
    """One row's audio [1, 1, num_samples]; the decoder's noise is seeded so a row always decodes the same."""
    device = next(model.parameters()).device
    codes = [c.reshape(1, -1).to(device) for c in codes_lib.row_codes(row, info)]
    torch.manual_seed(seed)
    return model.decode(codes)[..., :row["num_samples"]].float().cpu()


def write_wav(path: Path, audio: torch.Tensor, sample_rate: int) -> Path:
    from torchcodec.encoders import AudioEncoder

    path.parent.mkdir(parents=True, exist_ok=True)
    AudioEncoder(audio.reshape(1, -1), sample_rate=sample_rate).to_file(str(path))
    return path


def source_clips(info: dict[str, Any], indices: list[int]) -> Iterator[dict[str, Any]]:
    """The source rows ``indices`` (sorted), decoded as the encoder decoded them."""
    data, encoding = info["data"], info["encoding"]
    config = SimpleNamespace(**{k: v for k, v in data.items() if k not in ("id_description", "keep_columns")},
                             keep_columns=None, streaming=info.get("read", {}).get("streaming", False))
    sample_rate = info["codec"]["sample_rate"]
    max_samples = int(encoding["max_seconds"] * sample_rate) if encoding["max_seconds"] else 1 << 62
    reader = RowReader(sample_rate, max_samples, data["id_column"], [])
    sources = open_rows(config)
    if all(hasattr(ds, "__len__") for _, ds in sources):
        rows = MapRows(sources, indices, reader)
        yield from (rows[i] for i in range(len(rows)))
        return
    wanted, found = set(indices), 0
    for item in StreamRows(sources, wanted.__contains__, reader):
        if "end" in item or found == len(wanted):
            return
        found += 1
        yield item


def check(model: torch.nn.Module, info: dict[str, Any], rows: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Metrics of the stored codes' audio against the sources, and the codes' agreement with a one-pass encode."""
    sample_rate = info["codec"]["sample_rate"]
    device = next(model.parameters()).device
    mel_loss, stft_loss = MultiScaleMelLoss(sample_rate).to(device), MultiScaleSTFTLoss().to(device)
    quality, running = _perceptual(None, sample_rate, "auto"), _Running()
    by_index = {row["index"]: row for row in rows}
    files, same, total = [], 0, 0
    for clip in source_clips(info, sorted(by_index)):
        row = by_index[clip["index"]]
        if clip["audio"] is None:
            logger.warning(f"row {row['index']}: the source is now unusable ({clip['problem']})")
            continue
        real = clip["audio"].reshape(1, 1, -1).to(device)
        fake = decode_row(model, row, info, seed).to(device)
        with torch.inference_mode():
            scores = clip_metrics(fake, real, mel_loss, stft_loss, quality)
            reference = model.encode(real)
        stored = codes_lib.row_codes(row, info)
        for level_codes, ref in zip(stored, reference):
            same += int((level_codes == ref[0].cpu()).sum())
            total += ref.shape[-1]
        for key, value in scores.items():
            running.add(key, value)
        files.append({"index": row["index"], "id": row["id"], **scores})
    return {"clips": len(files), "metrics": running.means(),
            "metric_failures": dict(quality.failures) if quality else {},
            "code_agreement": same / total if total else None, "files": files}


def output_names(rows: list[dict[str, Any]]) -> list[str]:
    """A WAV name per row, after its source file (``speech_01.wav``); rows of one source (chunks of a
    long file, or Hub rows without a file name) get their row index too (``speech_01_000003.wav``)."""
    stems = [re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(row["id"])).stem).strip("._") or "row" for row in rows]
    return [f"{stem}.wav" if stems.count(stem) == 1 else f"{stem}_{row['index']:06d}.wav"
            for stem, row in zip(stems, rows)]


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    ensure_accelerate_state()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        info = codes_lib.read_info(args.codes_dir)
        codec = args.codec or info["codec"]["source"]
        model = load_codec(codec, device=device)
        if codes_lib.weights_sha256(codes_lib.codec_folder(codec))[1] != info["codec"]["sha256"]:
            logger.warning(f"{codec} is not the codec these codes were made with (sha256 differs)")
        dataset = codes_lib.load_codes(args.codes_dir)
        wanted = min(len(dataset), max(args.rows, args.check))
        rows = [dataset[i] for i in range(wanted)]
        names = output_names(rows[:args.rows])
        for row, name in zip(rows[:args.rows], names):
            path = write_wav(Path(args.output_dir) / name, decode_row(model, row, info, args.seed),
                             info["codec"]["sample_rate"])
            sys.stdout.write(f"{path}  ({row['id']}, {row['duration']:.2f} s)\n")
        if args.check > 0:
            result = check(model, info, rows[:args.check], args.seed)
            agreement = result["code_agreement"]
            agreement = "n/a" if agreement is None else f"{agreement:.4f}"
            lines = [f"{result['clips']} rows checked against their sources",
                     f"{'codes equal to a one-pass encode':<36}{agreement:>10}"]
            lines += [f"{name:<36}{value:>10.4f}" for name, value in result["metrics"].items()]
            sys.stdout.write("\n".join(lines) + "\n")
            if args.output_json:
                Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")
    except (OSError, ValueError, RuntimeError) as err:
        sys.stderr.write(f"error: {type(err).__name__}: {err}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
