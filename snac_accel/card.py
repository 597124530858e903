"""The model card of an exported codec and its figures, drawn with matplotlib.

The card (``README.md``) carries YAML metadata so the Hub lists the codec under ``library_name:
snac``, the codec's rates and bitrate, its training, validation metrics and codebook health.
Two figures go with it, and to TensorBoard at every validation: ``spectrogram.png``, the log-mel
spectrogram of a clip (original above reconstruction, time in seconds, frequency in Hz, a colour
bar in dB below the original's peak), and ``codebook_usage.png``, each level's share of codes used
and bitrate efficiency.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import yaml
from accelerate.logging import get_logger
from matplotlib.figure import Figure

from .codebook import COLLAPSE_USAGE, code_counts, histogram_statistics
from .config import DATASET_PRESETS, TrainConfig
from .data import split_option
from .losses import MultiScaleMelLoss
from .model import SnacGenerator, seeded_noise
from .paper import codec_rates, markdown_table, paper_row, published_row
from .perceptual import visqol_mode

logger = get_logger(__name__)

FIGURE_NAME = "spectrogram.png"
USAGE_FIGURE_NAME = "codebook_usage.png"
FIGURE_WINDOW = 512  # the mel scale drawn: 512-sample windows (80 bands), hop 128
DB_RANGE = 80.0  # the colour scale: from the original's peak down to 80 dB below it


# ----------------------------------------------------------------------------- text


def _metric_name(key: str) -> str:
    return key.split("/", 1)[-1]


METRIC_DEFINITIONS = ("Metrics as DAC computes them, so they compare with DAC's and SNAC's published figures: mel "
                      "distance is DAC's multi-scale mel loss (7 scales, log10 magnitudes), STFT distance the L1 of "
                      "log power and linear magnitude spectra at windows 2048 and 512, SI-SDR is measured on "
                      "zero-mean signals; ViSQOL, PESQ-WB and STOI as `snac_accel.perceptual` defines them.")


def codebook_rows(metrics: dict[str, Any]) -> list[tuple[int, float, float]]:
    """(level, usage, efficiency) from ``codebook_usage_levelN`` / ``codebook_efficiency_levelN`` metrics."""
    rows = []
    for level in itertools.count():
        usage = next((v for k, v in metrics.items() if _metric_name(k) == f"codebook_usage_level{level}"), None)
        efficiency = next((v for k, v in metrics.items() if _metric_name(k) == f"codebook_efficiency_level{level}"),
                          None)
        if usage is None or efficiency is None:
            return rows
        rows.append((level, usage, efficiency))
    return rows


def throughput_words(perf: dict[str, float]) -> str:
    """The last logging window's speed (`snac_accel.progress`) in one line."""
    words = [f"{perf['perf/audio_seconds_per_second']:.1f} audio seconds per second",
             f"{perf['perf/updates_per_second']:.2f} updates per second"]
    if "perf/mfu" in perf:
        words.append(f"model FLOP utilisation {100 * perf['perf/mfu']:.1f}%")
    words.append(f"peak memory {perf['perf/peak_memory_gb']:.2f} GiB")
    return ", ".join(words)


def describe_device(accelerator: Any) -> str:
    """The processes and device kind a run trained on, for the card."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"{accelerator.num_processes} x {name}"


def paper_section(codec: str, data: str, config: dict[str, Any], metrics: dict[str, Any],
                  mode: Optional[str] = None) -> list[str]:
    """The card's paper row (`snac_accel.paper`) beside the SNAC paper's published row for the sample rate."""
    mode = mode or visqol_mode("auto", config["sampling_rate"])
    rows = [paper_row(codec, data, config, metrics, mode if any(_metric_name(k) == "visqol" for k in metrics) else None)]
    published = published_row(config["sampling_rate"])
    lines = ["", "## Paper row", "", "The figures codec papers print, for this codec on " + data + ". "
             + ("The second row is the SNAC paper's (arXiv 2410.14411) as published: other data, a released-size "
                "model trained for 800k iterations, so a reference point, not a like-for-like comparison."
                if published else f"The SNAC paper publishes no row at {config['sampling_rate']} Hz."),
             "", markdown_table(rows + ([published] if published else [])), "",
             "ViSQOL v3 (speech mode at 16 kHz or audio mode at 48 kHz), PESQ wide-band (16 kHz) and STOI (16 kHz "
             "signals, 10 kHz inside) come from `snac_accel.perceptual`; '-' marks a figure not measured (or not "
             "published). Codebook usage: share of each level's codes used, coarse first; efficiency: entropy bound "
             "over the bitrate."]
    return lines


def model_card(model: SnacGenerator, info: dict[str, Any]) -> str:
    """A model card with YAML metadata so the Hub lists the codec under `library_name: snac`.

    ``info`` keys (all optional): name, repo_id, steps, datasets (Hub ids), training_data (words), rollbacks,
    base_model, throughput (`Progress.last`), device (`describe_device`), metrics, metrics_source, paper_data and
    visqol_mode (the paper row's), and the figures `draw_figures` returns (figure, usage_figure, usage_source).
    """
    config = model.config
    rates = codec_rates(config)
    n_params = sum(p.numel() for p in model.parameters())
    datasets = [d for d in info.get("datasets") or [] if d]
    metadata: dict[str, Any] = {"library_name": "snac", "license": "mit",
                                "tags": ["audio", "audio-codec", "neural-audio-codec", "snac", "snac-accel"],
                                "pipeline_tag": "audio-to-audio"}
    if datasets:
        metadata["datasets"] = datasets
    base_model = info.get("base_model")
    if base_model and not os.path.isdir(base_model):
        metadata["base_model"] = base_model
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "",
             f"# {info.get('name') or 'SNAC codec'}", "",
             "A Multi-Scale Neural Audio Codec ([SNAC](https://github.com/hubertsiuzdak/snac)) trained with "
             "snac-accel. It loads with `snac.SNAC.from_pretrained`.", "",
             "## Codec", "",
             "| property | value |", "| --- | --- |",
             f"| sample rate | {config['sampling_rate']} Hz, mono |",
             f"| levels | {len(config['vq_strides'])} (strides {', '.join(map(str, config['vq_strides']))}) |",
             f"| token rates | {', '.join(f'{r:.2f}' for r in rates['tokens_per_second'])} Hz "
             f"({sum(rates['tokens_per_second']):.2f} tokens/s in all) |",
             f"| codebook | {config['codebook_size']} entries ({rates['bits_per_token']:g} bits), "
             f"dimension {config['codebook_dim']} |",
             f"| bitrate | {rates['bitrate_bps'] / 1000:.3f} kbps |",
             f"| parameters | {n_params / 1e6:.2f}M ({n_params:,}) |",
             f"| attention window | {config.get('attn_window_size') or 'none'} |", "",
             "## Training", "",
             f"- Steps: {info.get('steps', 'unknown')}",
             f"- Data: {info.get('training_data') or ', '.join(datasets) or 'unknown'}"]
    if info.get("validation_data"):
        lines.append(f"- Validation: {info['validation_data']}")
    if base_model:
        lines.append(f"- Initialised from: {base_model}")
    if info.get("throughput"):
        lines.append(f"- Throughput: {throughput_words(info['throughput'])}"
                     + (f" on {info['device']}" if info.get("device") else ""))
    for event in info.get("rollbacks") or []:  # --on_divergence rollback
        lines.append(f"- Rolled back: the {' and the '.join(event['models'])} diverged at step {event['diverged_at']}; "
                     f"resumed from step {event['back_to']} with its learning rate x{event['lr_factor']}")
    metrics = info.get("metrics") or {}
    if metrics:
        lines += ["", "## Validation", ""]
        if info.get("metrics_source"):
            lines += [info["metrics_source"], ""]
        quality = {k: v for k, v in metrics.items() if "codebook_" not in k and isinstance(v, (int, float))}
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {_metric_name(k)} | {v:.4f} |" for k, v in quality.items()]
        lines += ["", METRIC_DEFINITIONS]
        lines += paper_section(info.get("name") or "this codec", info.get("paper_data") or "the validation clips",
                               config, metrics, info.get("visqol_mode"))
        levels = codebook_rows(metrics)
        if levels:
            lines += ["", "## Codebook health", "",
                      "Share of each level's codes used and its bitrate efficiency (entropy of the code histogram "
                      "/ log2 codebook size) on the same clips; a level below 10% usage carries little information.",
                      "", "| level | usage | efficiency |", "| --- | --- | --- |"]
            lines += [f"| {level} | {usage:.1%} | {efficiency:.3f} |" for level, usage, efficiency in levels]
    if info.get("figure"):
        lines += ["", "## Original and reconstruction", "",
                  f"![log-mel spectrogram: original (top) and reconstruction (bottom)]({info['figure']})", "",
                  "Log-mel spectrogram of an example clip: the original on top, the codec's reconstruction below."]
    if info.get("usage_figure"):
        lines += ["", "## Codebook usage", "", f"![codebook usage and efficiency per level]({info['usage_figure']})",
                  "", f"Share of each level's codes used and its bitrate efficiency on {info.get('usage_source')}."]
    lines += ["", "## Usage", "", "```python", "import torch", "from snac import SNAC", "",
              f"model = SNAC.from_pretrained(\"{info.get('repo_id') or 'PATH_OR_REPO_ID'}\").eval()",
              f"audio = torch.randn(1, 1, {config['sampling_rate']})  # [batch, 1, samples] at "
              f"{config['sampling_rate']} Hz",
              "with torch.inference_mode():",
              "    codes = model.encode(audio)  # one tensor of token ids per level, coarse first",
              "    audio_hat = model.decode(codes)", "```", "",
              "Evaluate it on your own audio with `python -m snac_accel.evaluate MODEL DATA`.", ""]
    return "\n".join(lines)


def describe_training_data(config: Optional[TrainConfig]) -> tuple[list[str], str]:
    """(Hub dataset ids for the YAML metadata, words for the card) of a run's training data."""
    if config is None:
        return [], "unknown"
    preset = DATASET_PRESETS.get(config.dataset or "", {})
    names = split_option(config.dataset_name) or split_option(preset.get("dataset_name"))
    hub_ids = [name for name in names if not os.path.isdir(name)]
    suffix = "".join(f", {k} {v}" for k, v in (("config", config.dataset_config_name),
                                                ("split", config.train_split)) if v)
    words = [f"[{name}](https://huggingface.co/datasets/{name}){suffix}" for name in hub_ids]
    words += [f"local dataset `{Path(name).name}`" for name in names if os.path.isdir(name)]
    demo = Path(DATASET_PRESETS["demo"]["train_data_dir"]).resolve()
    for folder in split_option(config.train_data_dir):
        words.append("the snac-accel demo clips (synthetic speech)" if Path(folder).resolve() == demo
                     else f"local audio folder `{Path(folder).name}`")
    words += [f"local manifest `{Path(manifest).name}`" for manifest in split_option(config.train_file)]
    return hub_ids, "; ".join(words) or "unknown"


# ----------------------------------------------------------------------------- figures


@torch.inference_mode()
def reconstruct(model: SnacGenerator, audio: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Encode and decode [1, 1, T] (or [1, T]) audio, trimmed to its length; seeded decoder noise."""
    audio = audio.reshape(1, 1, -1).to(next(model.parameters()).device, torch.float32)
    with seeded_noise(seed):
        out = model.decode(model.encode(audio))
    return out[..., :audio.shape[-1]]


def mel_band_centres(sample_rate: int, n_mels: int) -> np.ndarray:
    """Centre frequencies in Hz of the slaney mel bands `MultiScaleMelLoss` uses (0 Hz to Nyquist):
    linear below 1 kHz, logarithmic above, as torchaudio's ``melscale_fbanks(mel_scale="slaney")``."""
    f_sp, log_step = 200.0 / 3, math.log(6.4) / 27.0
    top = sample_rate / 2
    top_mel = top / f_sp if top < 1000 else 15.0 + math.log(top / 1000) / log_step
    mels = np.linspace(0.0, top_mel, n_mels + 2)[1:-1]
    return np.where(mels < 15.0, f_sp * mels, 1000.0 * np.exp(log_step * (mels - 15.0)))


@dataclass
class Spectra:
    """What the spectrogram figure shows: log-mel magnitudes in dB relative to the original's peak,
    [bands, frames] with the lowest band first, clipped at -`DB_RANGE`."""

    original: np.ndarray
    reconstruction: np.ndarray
    band_hz: np.ndarray  # centre frequency of each band
    seconds: float


def spectra(real: torch.Tensor, fake: torch.Tensor, sample_rate: int) -> Spectra:
    """The spectra of a clip and its reconstruction, on one scale fixed by the original alone."""
    mel = MultiScaleMelLoss(sample_rate)
    windows = mel.window_lengths
    scale = windows.index(FIGURE_WINDOW) if FIGURE_WINDOW in windows else len(windows) // 2
    with torch.no_grad():
        decibels = [20.0 * mel.log_mels(x.detach().reshape(1, 1, -1).float().cpu(), scale)[0].T for x in (real, fake)]
    peak = decibels[0].max()
    original, reconstruction = ((x - peak).clamp(min=-DB_RANGE).numpy() for x in decibels)
    return Spectra(original, reconstruction, mel_band_centres(sample_rate, original.shape[0]),
                   real.shape[-1] / sample_rate)


def spectrogram_plot(spec: Spectra) -> Figure:
    """Original above reconstruction, each with its axes and colour bar (both panels drawn alike)."""
    figure = Figure(figsize=(10, 6.4), layout="constrained")
    bands = spec.original.shape[0]
    ticks = [hz for hz in (250, 500, 1000, 2000, 4000, 8000, 16000) if spec.band_hz[0] <= hz <= spec.band_hz[-1]]
    positions = np.interp(ticks, spec.band_hz, np.arange(bands))
    for ax, values, title in zip(figure.subplots(2, 1), (spec.original, spec.reconstruction),
                                 ("original", "reconstruction")):
        image = ax.imshow(values, origin="lower", aspect="auto", cmap="magma", vmin=-DB_RANGE, vmax=0.0,
                          interpolation="nearest", extent=(0.0, spec.seconds, -0.5, bands - 0.5))
        ax.set_yticks(positions, [f"{hz / 1000:g}k" if hz >= 1000 else str(hz) for hz in ticks])
        ax.set(title=f"{title}: log-mel spectrogram", xlabel="time (s)", ylabel="frequency (Hz)")
        figure.colorbar(image, ax=ax, label="dB below the original's peak")
    return figure


def codebook_usage_plot(usage: Sequence[float], efficiency: Sequence[float], codebook_size: int,
                        where: str) -> Figure:
    """Per level (coarse first): share of its codes used and bitrate efficiency, with the collapse line."""
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    ax = figure.subplots()
    levels, width = np.arange(len(usage)), 0.38
    for offset, values, label in ((-width / 2, usage, "usage: share of codes used"),
                                  (width / 2, efficiency, "efficiency: entropy / log2 codebook size")):
        bars = ax.bar(levels + offset, [100 * v for v in values], width, label=label)
        ax.bar_label(bars, fmt="{:.0f}%", fontsize="small")
    ax.axhline(100 * COLLAPSE_USAGE, color="0.4", linestyle="--", linewidth=1,
               label=f"collapse warning below {COLLAPSE_USAGE:.0%} usage")
    ax.set_xticks(levels, [f"level {level}" for level in levels])
    ax.set(ylim=(0, 110), ylabel="percent", title=f"Codebook use on {where} ({codebook_size} codes a level)")
    figure.legend(loc="outside lower center", ncols=2, fontsize="small")
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    figure.savefig(path, dpi=100)
    return Path(path)


def spectrogram_figure(model: SnacGenerator, audio: torch.Tensor, path: str | os.PathLike) -> Path:
    """``spectrogram.png`` of ``audio`` and the codec's reconstruction of it (decoder noise seeded)."""
    was_training = model.training
    model.eval()
    fake = reconstruct(model, audio).cpu()
    model.train(was_training)
    return save_figure(spectrogram_plot(spectra(audio, fake, model.sampling_rate)), path)


@torch.inference_mode()
def clip_code_usage(model: SnacGenerator, audio: torch.Tensor) -> tuple[list[float], list[float]]:
    """(usage, efficiency) per level of the codes of one clip."""
    codes = model.encode(audio.reshape(1, 1, -1).to(next(model.parameters()).device, torch.float32))
    stats = histogram_statistics(code_counts(codes, model.codebook_size))
    return stats["usage"].tolist(), stats["efficiency"].tolist()


def draw_figures(model: SnacGenerator, folder: Path, metrics: dict[str, Any],
                 example_audio: Optional[torch.Tensor]) -> dict[str, str]:
    """The card's figures in ``folder``, as `model_card`'s info keys; a figure never costs the export.

    Codebook usage comes from the validation metrics when they have it, else from the example clip.
    """
    drawn: dict[str, str] = {}
    if example_audio is not None:
        try:
            drawn["figure"] = spectrogram_figure(model, example_audio, folder / FIGURE_NAME).name
        except Exception as err:
            logger.warning(f"no spectrogram figure: {type(err).__name__}: {err}")
    rows = codebook_rows(metrics)
    if not rows and example_audio is None:
        return drawn
    try:
        if rows:
            usage, efficiency, where = [u for _, u, _ in rows], [e for _, _, e in rows], "the validation clips"
        else:
            (usage, efficiency), where = clip_code_usage(model, example_audio), "the example clip"
        plot = codebook_usage_plot(usage, efficiency, model.codebook_size, where)
        drawn.update(usage_figure=save_figure(plot, folder / USAGE_FIGURE_NAME).name, usage_source=where)
    except Exception as err:
        logger.warning(f"no codebook usage figure: {type(err).__name__}: {err}")
    return drawn

