"""How good and how fast is a codec: ``python -m snac_accel.evaluate MODEL DATA``.

MODEL is anything `snac_accel.hub.load_codec` reads (an export folder, a released SNAC folder or Hub
id, a training checkpoint). DATA is anything the data pipeline reads: a folder of audio files, one
audio file, a CSV/JSONL manifest, or a Hub dataset id / local dataset folder (with ``--split``).

Every file is encoded and decoded whole (up to ``--max_seconds``), one at a time, so metrics are not
diluted by padding. Per file, computed as DAC computes them so that figures compare with DAC's and
SNAC's published ones: multi-scale mel distance (DAC's mel loss), multi-scale STFT distance (log
power and linear magnitude, windows 2048 and 512) and SI-SDR on zero-mean signals; plus ViSQOL, wide-band
PESQ and STOI (`snac_accel.perceptual`: definitions and resampling there).
Over the whole set: codebook usage, entropy and bitrate efficiency (entropy / log2 codebook size)
per level, bitrate, and encode/decode real-time factors (seconds of compute per second of audio;
below 1 is faster than real time). Unusable files are skipped, named once in the log and counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Optional

import datasets
import torch
from accelerate.logging import get_logger

from . import data as data_lib
from . import perceptual
from .paper import codec_rates, format_text, markdown_table, paper_row, published_row
from .codebook import code_counts, collapse_warnings, histogram_statistics
from .hub import ensure_accelerate_state, load_codec
from .losses import MultiScaleMelLoss, MultiScaleSTFTLoss, si_sdr
from .perceptual import PerceptualMetrics

logger = get_logger(__name__)



def _codec_config(model: torch.nn.Module) -> dict[str, Any]:
    """The fields the rates need, from a `SnacGenerator` or a plain `snac.SNAC`."""
    return {"sampling_rate": int(model.sampling_rate), "encoder_rates": list(model.encoder_rates),
            "vq_strides": list(model.vq_strides), "codebook_size": int(model.codebook_size)}


Sources = list[tuple[str, Any]]


def open_source(data: str, split: str = "test", dataset_config_name: Optional[str] = None,
                audio_column: str = "audio", path_column: str = "path", streaming: bool = False,
                revision: Optional[str] = None) -> Sources:
    """(name, dataset of undecoded audio rows) pairs for DATA, through `snac_accel.data.load_sources`."""
    path = Path(data)
    if path.is_file() and path.suffix.lower() in data_lib.AUDIO_EXTENSIONS:
        return [(str(path), data_lib.files_dataset([str(path)]))]
    has_audio_files = path.is_dir() and any(
        p.suffix.lower() in data_lib.AUDIO_EXTENSIONS for p in path.rglob("*") if p.is_file())
    config = SimpleNamespace(
        train_data_dir=str(path) if has_audio_files else None,
        train_file=str(path) if path.is_file() else None,
        dataset_name=None if has_audio_files or path.is_file() else data,
        dataset_config_name=dataset_config_name, dataset_revision=revision, train_split=split,
        audio_column=audio_column, path_column=path_column, streaming=streaming)
    sources = data_lib.load_sources(config, "train")
    if not sources:
        raise data_lib.DataError(f"{data} is not a source the data pipeline reads (audio folder or file, "
                                 "CSV/JSONL manifest, Hub dataset id or dataset folder)")
    return sources


def _as_sources(source: Any) -> Sources:
    if isinstance(source, list) and all(isinstance(item, tuple) for item in source):
        return source
    items = source if isinstance(source, (list, tuple)) else [source]
    return [(f"source {i}", ds) for i, ds in enumerate(items)]


def rows(source: Any) -> Iterator[tuple[str, Any]]:
    """(file name, undecoded audio) per row of every source; nothing is decoded here."""
    for source_name, ds in _as_sources(source):
        for index, row in enumerate(data_lib.audio_column(ds)):
            yield data_lib.row_name(row["audio"], f"{source_name} row {index}"), row["audio"]


def load_clip(raw: Any, sample_rate: int, max_samples: int, target_loudness: Optional[float]
              ) -> tuple[Optional[torch.Tensor], str]:
    """A whole file (up to ``max_samples``, never padded) as [1, 1, T], or None and why it is unusable."""
    feature = datasets.Audio(sampling_rate=sample_rate, num_channels=1)
    try:
        if raw is None or isinstance(raw, dict) and not raw.get("bytes") and not raw.get("path"):
            return None, "no audio in the row"
        clip = data_lib.decode_excerpt(feature.decode_example(raw), max_samples, sample_rate, None)
    except Exception as err:  # torchcodec/FFmpeg raise many types for truncated or non-audio input
        return None, data_lib.decode_problem(err)
    if clip.audio is None:
        return None, clip.problem
    if clip.audio.abs().max() < data_lib.SILENCE_PEAK:
        return None, "silent"
    audio = data_lib.normalize_loudness(clip.audio, sample_rate, target_loudness)
    return audio.reshape(1, 1, -1), ""


def _perceptual(mode: Optional[bool], sample_rate: int, visqol_mode: str) -> Optional[PerceptualMetrics]:
    """ViSQOL / PESQ-WB / STOI of each file, or None: ``mode`` None = when their packages import, True =
    required (ImportError naming them otherwise), False = off."""
    if mode is False:
        return None
    missing = perceptual.available()
    if missing and mode is True:
        raise ImportError(missing)
    return None if missing else PerceptualMetrics(sample_rate, visqol_mode)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Running:
    """Mean of each metric over the clips that produced it."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: float) -> None:
        if math.isfinite(value):
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


@torch.inference_mode()
def evaluate(model: torch.nn.Module, source: Any, max_clips: Optional[int] = None, max_seconds: float = 30.0,
             target_loudness: Optional[float] = None, speech_metrics: Optional[bool] = None, timing: bool = True,
             seed: int = 0, visqol_mode: str = "auto") -> dict[str, Any]:
    """Metrics of ``model`` (a `snac.SNAC`) over ``source``: a dataset with an `audio` column (decoded
    or not, map-style or streaming), a list of them, or `open_source`'s (name, dataset) pairs.

    ``target_loudness`` (LUFS) normalises each file first, as training does; None keeps the data's
    level. ``speech_metrics`` switches ViSQOL, PESQ-WB and STOI (None: on when their packages import);
    ``visqol_mode`` is `snac_accel.perceptual.visqol_mode`'s. The decoder's noise is re-seeded per file,
    so two runs give the same numbers. The model is left in eval mode.
    """
    ensure_accelerate_state()
    model.eval()
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG stays
        return _evaluate(model, source, device, max_clips, max_seconds, target_loudness, speech_metrics, timing,
                         seed, visqol_mode)


def _evaluate(model: torch.nn.Module, source: Any, device: torch.device, max_clips: Optional[int],
              max_seconds: float, target_loudness: Optional[float], speech_metrics: Optional[bool], timing: bool,
              seed: int, visqol_mode: str) -> dict[str, Any]:
    config = _codec_config(model)
    sample_rate, hop, strides, size = (config["sampling_rate"], math.prod(config["encoder_rates"]),
                                       config["vq_strides"], config["codebook_size"])
    mel_loss = MultiScaleMelLoss(sample_rate).to(device)
    stft_loss = MultiScaleSTFTLoss().to(device)
    quality = _perceptual(speech_metrics, sample_rate, visqol_mode)
    bad = data_lib.BadFileTracker(max_fraction=1.0)
    counts = torch.zeros(len(strides), size, dtype=torch.float64)
    running, files = _Running(), []
    seconds_total = encode_seconds = decode_seconds = 0.0
    warmed_up = not timing
    max_samples = int(max_seconds * sample_rate)
    min_samples = max(mel_loss.window_lengths + stft_loss.window_lengths)

    for name, raw in rows(source):
        if max_clips is not None and len(files) >= max_clips:
            break
        real, problem = load_clip(raw, sample_rate, max_samples, target_loudness)
        if real is None:
            bad.update([f"{name}: {problem}"], 0)
            continue
        real = real.to(device)
        length = real.shape[-1]
        if length < min_samples:  # the coarsest spectral scale needs one window of signal
            bad.update([f"{name}: shorter than {min_samples} samples"], 0)
            continue
        if not warmed_up:  # first calls pay for allocations and kernel choice: keep them out of the RTF
            model.decode(model.encode(real))
            warmed_up = True
        torch.manual_seed(seed)
        _sync(device)
        start = time.perf_counter()
        codes = model.encode(real)
        _sync(device)
        middle = time.perf_counter()
        fake = model.decode(codes)[..., :length]
        _sync(device)
        end = time.perf_counter()
        seconds = length / sample_rate
        seconds_total += seconds
        encode_seconds += middle - start
        decode_seconds += end - middle
        # the padding's tokens are not the file's
        counts += code_counts([c[0, :math.ceil(length / (hop * stride))].cpu() for c, stride in zip(codes, strides)],
                              size)

        row = {"name": name, "samples": length, "seconds": round(seconds, 4),
               **clip_metrics(fake, real, mel_loss, stft_loss, quality)}
        for key, value in row.items():
            if key not in ("name", "samples", "seconds"):
                running.add(key, value)
        files.append(row)

    if not files:
        raise data_lib.DataError(f"no usable audio among the files evaluated ({bad.total} unusable, e.g. "
                                 + "; ".join(sorted(bad.seen)[:3]) + ")")
    rates = codec_rates(config)
    stats = histogram_statistics(counts)
    levels = []
    for level, (stride, rate) in enumerate(zip(strides, rates["tokens_per_second"])):
        entropy = float(stats["entropy_bits"][level]) + 0.0  # + 0.0: one used code gives 0, not -0
        levels.append({"level": level, "stride": stride, "tokens_per_second": rate, "tokens": int(counts[level].sum()),
                       "used_codes": int((counts[level] > 0).sum()), "usage": float(stats["usage"][level]),
                       "entropy_bits": entropy, "perplexity": 2 ** entropy,
                       "efficiency": float(stats["efficiency"][level])})
    for line in collapse_warnings([lv["usage"] for lv in levels], size, f"these {len(files)} files",
                                  [lv["tokens"] for lv in levels]):
        logger.warning(line)
    entropy_bound = sum(lv["tokens_per_second"] * lv["entropy_bits"] for lv in levels)
    result = {
        "codec_config": config, "clips": len(files), "audio_seconds": seconds_total, "bad_files": bad.total,
        "bad_examples": sorted(bad.seen)[:20], "sample_rate": sample_rate,
        "metrics": running.means(), "metric_failures": dict(quality.failures) if quality else {},
        "bitrate": {**rates, "entropy_bound_bps": entropy_bound, "efficiency": entropy_bound / rates["bitrate_bps"]},
        "codebooks": levels,
        "settings": {"max_seconds": max_seconds, "target_loudness": target_loudness, "seed": seed,
                     "perceptual_metrics": list(quality.metrics) if quality else [],
                     "visqol_mode": quality.mode if quality else None},
        "files": files,
    }
    if timing:
        result["speed"] = {"device": str(device), "threads": torch.get_num_threads(),
                           "encode_rtf": encode_seconds / seconds_total, "decode_rtf": decode_seconds / seconds_total,
                           "codec_rtf": (encode_seconds + decode_seconds) / seconds_total}
    return result


def clip_metrics(fake: torch.Tensor, real: torch.Tensor, mel_loss: MultiScaleMelLoss, stft_loss: MultiScaleSTFTLoss,
                 quality: Optional[PerceptualMetrics] = None) -> dict[str, float]:
    """The per-file metrics of a reconstruction ``fake`` of ``real`` (both [1, 1, T]): DAC's spectral
    distances and SI-SDR, and with ``quality`` ViSQOL, PESQ-WB and STOI (`snac_accel.perceptual`)."""
    scores = {"mel_distance": mel_loss(fake, real).item(), "stft_distance": stft_loss(fake, real).item(),
              "si_sdr": si_sdr(fake, real).mean().item()}
    if quality is not None:
        scores.update(quality(fake, real))
    return scores


def evaluation_row(result: dict[str, Any], codec: str, data: str) -> dict[str, Any]:
    """The paper row (`snac_accel.paper`) of an `evaluate` result."""
    metrics = dict(result["metrics"])
    for level in result["codebooks"]:
        metrics[f"codebook_usage_level{level['level']}"] = level["usage"]
        metrics[f"codebook_efficiency_level{level['level']}"] = level["efficiency"]
    return paper_row(codec, data, result["codec_config"], metrics, result["settings"]["visqol_mode"])


def format_table(result: dict[str, Any]) -> str:
    """The summary a person reads; the JSON holds everything, per file too."""
    lines = [f"{result['clips']} clips, {result['audio_seconds']:.1f} s of audio, "
             f"{result['bad_files']} unusable files skipped", "", f"{'metric':<28}{'value':>12}"]
    names = {"mel_distance": "mel distance (lower better)", "stft_distance": "STFT distance (lower better)",
             "si_sdr": "SI-SDR dB (higher better)", "pesq_wb": "PESQ wide-band", "stoi": "STOI",
             "visqol": "ViSQOL MOS-LQO"}
    for key, value in result["metrics"].items():
        lines.append(f"{names.get(key, key):<28}{value:>12.4f}")
    rate = result["bitrate"]
    lines.append(f"{'bitrate kbps':<28}{rate['bitrate_bps'] / 1000:>12.3f}")
    lines.append(f"{'entropy bound kbps':<28}{rate['entropy_bound_bps'] / 1000:>12.3f}")
    lines.append(f"{'bitrate efficiency':<28}{rate['efficiency']:>12.3f}")
    if "speed" in result:
        speed = result["speed"]
        lines.append(f"{'encode RTF':<28}{speed['encode_rtf']:>12.4f}")
        lines.append(f"{'decode RTF':<28}{speed['decode_rtf']:>12.4f}")
    lines += ["", f"{'level':<7}{'stride':>7}{'tokens/s':>10}{'used':>8}{'usage':>8}{'entropy':>9}{'perplexity':>12}"
              f"{'efficiency':>12}"]
    for lv in result["codebooks"]:
        lines.append(f"{lv['level']:<7}{lv['stride']:>7}{lv['tokens_per_second']:>10.2f}{lv['used_codes']:>8}"
                     f"{lv['usage']:>8.3f}{lv['entropy_bits']:>9.3f}{lv['perplexity']:>12.1f}{lv['efficiency']:>12.3f}")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m snac_accel.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="export folder, released SNAC folder or Hub id, or a training checkpoint")
    parser.add_argument("data", help="audio folder or file, CSV/JSONL manifest, or a Hub dataset id / folder")
    parser.add_argument("--split", default="test", help="split of a Hub dataset (default: test)")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--revision", default=None, help="revision of a Hub dataset")
    parser.add_argument("--audio_column", default="audio")
    parser.add_argument("--path_column", default="path", help="manifest column holding file paths")
    parser.add_argument("--streaming", action="store_true", help="stream a Hub dataset instead of downloading it")
    parser.add_argument("--max_clips", type=int, default=None, help="evaluate at most this many usable files")
    parser.add_argument("--max_seconds", type=float, default=30.0, help="cut longer files to this length")
    parser.add_argument("--target_loudness", type=float, default=None,
                        help="normalise each file to this LUFS first (training uses -16); default keeps the level")
    parser.add_argument("--speech_metrics", choices=["auto", "on", "off"], default="auto",
                        help="ViSQOL, PESQ-WB and STOI (installed with snac-accel; most of the evaluation's time): "
                             "auto computes them when their packages import")
    parser.add_argument("--visqol_mode", choices=list(perceptual.VISQOL_MODES), default="auto",
                        help="ViSQOL speech mode (16 kHz) or audio mode (48 kHz); auto: speech for codecs at "
                             "24 kHz or below, audio above")
    parser.add_argument("--use_ema", action="store_true", help="with a training checkpoint: its EMA weights")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default=None,
                        help="write the full results (per file, per level) to this JSON file; without it, none")
    parser.add_argument("--output_markdown", default=None,
                        help="also write the paper row (and the published SNAC row) as a Markdown table here")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    import logging

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ensure_accelerate_state()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_codec(args.model, device=device, use_ema=args.use_ema)
        source = open_source(args.data, args.split, args.dataset_config_name, args.audio_column,
                             args.path_column, args.streaming, args.revision)
        result = evaluate(model, source, max_clips=args.max_clips, max_seconds=args.max_seconds,
                          target_loudness=args.target_loudness, seed=args.seed, visqol_mode=args.visqol_mode,
                          speech_metrics={"auto": None, "on": True, "off": False}[args.speech_metrics])
    except (OSError, ValueError, ImportError, RuntimeError) as err:
        sys.stderr.write(f"error: {type(err).__name__}: {err}\n")
        return 1
    result = {"model": args.model, "data": args.data, **result}
    row = evaluation_row(result, Path(args.model.rstrip("/")).name or args.model,
                         f"{Path(args.data.rstrip('/')).name or args.data} ({result['clips']} files)")
    published = published_row(result["sample_rate"])
    result.update(paper_row=row, published_row=published)
    if args.output_markdown:
        Path(args.output_markdown).write_text(markdown_table([row] + ([published] if published else [])) + "\n")
    lines = [format_table(result), "", "paper row:", format_text(row)]
    if published:
        lines += ["published (SNAC paper, other data):", format_text(published)]
    sys.stdout.write("\n".join(lines) + "\n")
    if args.output_json:
        output = Path(args.output_json)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        sys.stdout.write(f"\nfull results: {os.fspath(output)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
