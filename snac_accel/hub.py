"""Export a trained generator as a Hub folder that `snac.SNAC.from_pretrained` loads, and push it.

A folder holds `config.json` (exactly `snac.SNAC`'s constructor arguments), `model.safetensors`,
`pytorch_model.bin` (the file `snac.SNAC.from_pretrained` reads), a `README.md` model card and,
when an example clip is at hand, `spectrogram.png` (original over reconstruction).

The source of an export is an accelerate checkpoint (`OUTPUT_DIR/checkpoints/checkpoint_N`): the
generator is the first prepared model (`model.safetensors`), the EMA weights and the `TrainState`
are custom objects (`custom_checkpoint_N.pkl`), recognised by their keys rather than their order
so that a run with or without EMA reads the same way.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from accelerate.logging import get_logger
from safetensors.torch import save_file

from .config import DATASET_PRESETS, MODEL_PRESETS, TrainConfig
from .model import (SnacGenerator, build_generator, generator_from_pretrained, load_state_dict,
                    resolve_pretrained_folder)

logger = get_logger(__name__)

FIGURE_NAME = "spectrogram.png"
WEIGHT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")


def ensure_accelerate_state() -> None:
    """accelerate's logger refuses to log before a state exists; entry points used outside a
    training run (scripts, notebooks) create the (idempotent, single-process) one here."""
    from accelerate import PartialState

    PartialState()


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked (missing files, no EMA, unknown architecture)."""


class HubTokenError(PermissionError):
    """No Hugging Face token: the push cannot happen, the local export stays."""


# ----------------------------------------------------------------------------- writing a folder


def save_pretrained(model: SnacGenerator, folder: str | os.PathLike, card: Optional[str] = None) -> Path:
    """Write config.json, model.safetensors and pytorch_model.bin (plus README.md when given)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    (folder / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    torch.save(state, folder / "pytorch_model.bin")
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


def export_folder(model: SnacGenerator, folder: str | os.PathLike, info: Optional[dict[str, Any]] = None,
                  example_audio: Optional[torch.Tensor] = None) -> Path:
    """The whole Hub folder: weights, the spectrogram figure (when a clip is given) and the card."""
    info = dict(info or {})
    folder = save_pretrained(model, folder)
    (folder / FIGURE_NAME).unlink(missing_ok=True)  # a re-export must not keep an older run's figure
    if example_audio is not None:
        try:
            info["figure"] = spectrogram_figure(model, example_audio, folder / FIGURE_NAME).name
        except Exception as err:  # a figure must never cost the export itself
            logger.warning(f"no spectrogram figure: {type(err).__name__}: {err}")
    (folder / "README.md").write_text(model_card(model, info))
    return folder


def load_codec(path_or_repo: str, device: str | torch.device = "cpu", use_ema: bool = False) -> SnacGenerator:
    """Any codec, in eval mode: our export folders (safetensors first), a released SNAC folder or Hub
    id (config.json + pytorch_model.bin), or a training checkpoint / output folder of this project."""
    ensure_accelerate_state()
    path = Path(path_or_repo)
    if path.is_dir() and not (path / "config.json").is_file():
        model, _ = model_from_checkpoint(resolve_checkpoint(path), use_ema=use_ema)
    else:
        model = generator_from_pretrained(str(path_or_repo))
    return model.to(device).eval()


# ----------------------------------------------------------------------------- model card


def codec_rates(config: dict[str, Any]) -> dict[str, Any]:
    """Token rate per level (coarse first), bits per token and the bitrate of a SNAC config."""
    hop = math.prod(config["encoder_rates"])
    rates = [config["sampling_rate"] / hop / stride for stride in config["vq_strides"]]
    bits = math.log2(config["codebook_size"])
    return {"tokens_per_second": rates, "bits_per_token": bits, "bitrate_bps": sum(rates) * bits}


def _metric_name(key: str) -> str:
    return key.split("/", 1)[-1]


METRIC_DEFINITIONS = ("Metrics as DAC computes them, so they compare with DAC's and SNAC's published figures: mel "
                      "distance is DAC's multi-scale mel loss (7 scales, log10 magnitudes), STFT distance the L1 of "
                      "log power and linear magnitude spectra at windows 2048 and 512, SI-SDR is measured on "
                      "zero-mean signals.")


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


def model_card(model: SnacGenerator, info: dict[str, Any]) -> str:
    """A model card with YAML metadata so the Hub lists the codec under `library_name: snac`.

    ``info`` keys (all optional): name, repo_id, steps, datasets (Hub ids), training_data (words),
    base_model, metrics, metrics_source, figure.
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
    if base_model:
        lines.append(f"- Initialised from: {base_model}")
    metrics = info.get("metrics") or {}
    if metrics:
        lines += ["", "## Validation", ""]
        if info.get("metrics_source"):
            lines += [info["metrics_source"], ""]
        quality = {k: v for k, v in metrics.items() if "codebook_" not in k and isinstance(v, (int, float))}
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {_metric_name(k)} | {v:.4f} |" for k, v in quality.items()]
        lines += ["", METRIC_DEFINITIONS]
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
    lines += ["", "## Usage", "", "```python", "import torch", "from snac import SNAC", "",
              f"model = SNAC.from_pretrained(\"{info.get('repo_id') or 'PATH_OR_REPO_ID'}\").eval()",
              f"audio = torch.randn(1, 1, {config['sampling_rate']})  # [batch, 1, samples] at "
              f"{config['sampling_rate']} Hz",
              "with torch.inference_mode():",
              "    codes = model.encode(audio)  # one tensor of token ids per level, coarse first",
              "    audio_hat = model.decode(codes)", "```", "",
              "Evaluate it on your own audio with `python -m snac_accel.evaluate MODEL DATA`.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- spectrogram figure

# Anchor colours of a dark-to-bright map (perceptually ordered, like magma), interpolated linearly.
_COLOURS = torch.tensor([[0, 0, 4], [59, 15, 112], [140, 41, 129], [222, 73, 104], [254, 159, 109],
                         [252, 253, 191]], dtype=torch.float32)


def _colourise(values: torch.Tensor) -> torch.Tensor:
    """[H, W] in [0, 1] -> [H, W, 3] uint8."""
    position = values.clamp(0, 1) * (len(_COLOURS) - 1)
    low = position.floor().long().clamp(max=len(_COLOURS) - 2)
    frac = (position - low)[..., None]
    return (_COLOURS[low] * (1 - frac) + _COLOURS[low + 1] * frac).round().to(torch.uint8)


def write_png(path: str | os.PathLike, rgb: torch.Tensor) -> Path:
    """A truecolour PNG from [H, W, 3] uint8, with the standard library only (no imaging package)."""
    height, width, _ = rgb.shape
    rows = rgb.contiguous().numpy()
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                           + chunk(b"IEND", b""))
    return Path(path)


@torch.inference_mode()
def reconstruct(model: SnacGenerator, audio: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Encode and decode [1, 1, T] (or [1, T]) audio, trimmed to its length; seeded decoder noise."""
    audio = audio.reshape(1, 1, -1).to(next(model.parameters()).device, torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.decode(model.encode(audio))
    return out[..., :audio.shape[-1]]


def spectrogram_figure(model: SnacGenerator, audio: torch.Tensor, path: str | os.PathLike) -> Path:
    """Log-mel spectrogram of ``audio`` (top) and its reconstruction (bottom) as a PNG.

    matplotlib draws it with axes when installed; otherwise the same picture is written directly.
    """
    from .losses import MultiScaleMelLoss

    was_training = model.training
    model.eval()
    fake = reconstruct(model, audio).cpu()
    model.train(was_training)
    real = audio.reshape(1, 1, -1).float().cpu()
    mel = MultiScaleMelLoss(model.sampling_rate)
    scale = mel.window_lengths.index(512) if 512 in mel.window_lengths else len(mel.window_lengths) // 2
    with torch.no_grad():
        spectra = [mel.log_mels(x, scale)[0].T.flip(0) for x in (real, fake)]  # [mels, frames], low at bottom
    low, high = spectra[0].max() - 4.0, spectra[0].max()  # log10 magnitude: 80 dB below the original's peak
    spectra = [((s - low) / (high - low)).clamp(0, 1) for s in spectra]
    path = Path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        gap = torch.ones(2, spectra[0].shape[1])
        image = torch.cat([spectra[0], gap, spectra[1]], dim=0)
        image = image.repeat_interleave(max(1, 320 // image.shape[0]), dim=0)
        return write_png(path, _colourise(image))
    seconds = real.shape[-1] / model.sampling_rate
    fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    for ax, spectrum, title in zip(axes, spectra, ("original", "reconstruction")):
        ax.imshow(spectrum.numpy(), aspect="auto", origin="upper", cmap="magma", extent=(0, seconds, 0, spectrum.shape[0]))
        ax.set_ylabel("mel bin")
        ax.set_title(title)
    axes[-1].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- checkpoints


def _is_checkpoint(folder: Path) -> bool:
    has_weights = (folder / "model.safetensors").is_file() or (folder / "pytorch_model.bin").is_file()
    return has_weights and not (folder / "config.json").is_file()


def _read_train_state(checkpoint: Path) -> tuple[Optional[dict[str, Any]], Optional[dict[str, torch.Tensor]]]:
    """(TrainState dict, EMA state dict) of a checkpoint, recognised by their keys; None when absent.

    Loaded with ``weights_only=True``: a checkpoint is a pickle, and nothing in ours needs more.
    """
    train_state, ema_state = None, None
    for path in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            logger.debug(f"skipping {path.name}: {err}")
            continue
        if not isinstance(state, dict):
            continue
        if "n_averaged" in state:
            ema_state = state
        elif "step" in state and "best_step" in state:
            train_state = state
    return train_state, ema_state


def resolve_checkpoint(path: str | os.PathLike, which: str = "best") -> Path:
    """A checkpoint folder as is; for a training output folder, its best (or latest) checkpoint."""
    from .trainer import list_checkpoints

    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path} is not a folder")
    if _is_checkpoint(path):
        return path
    checkpoints_dir = path if path.name == "checkpoints" else path / "checkpoints"
    found = list_checkpoints(checkpoints_dir)
    if not found:
        raise ExportError(f"{path} is neither a checkpoint folder (model.safetensors) nor a training output "
                          f"folder with checkpoints/checkpoint_N")
    latest = found[-1][1]
    if which == "latest":
        return latest
    if which != "best":
        raise ExportError(f"--checkpoint must be 'best' or 'latest', got {which!r}")
    state, _ = _read_train_state(latest)
    best_step = int(state.get("best_step", -1)) if state else -1
    best = checkpoints_dir / f"checkpoint_{best_step}"
    if best_step < 0 or not best.is_dir():
        logger.warning(f"no best checkpoint recorded in {latest} (was validation data given?): using the latest")
        return latest
    return best


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (DDP's 'module.', torch.compile's '_orig_mod.')."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def training_config(checkpoint: Path) -> Optional[TrainConfig]:
    """The run's effective config (OUTPUT_DIR/config.yaml, the checkpoint folder's grandparent)."""
    path = checkpoint.parent.parent / "config.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in known})


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def infer_model_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The preset whose parameter names and shapes match ``state`` exactly (noise on or off)."""
    wanted = _shapes(state)
    for name, preset in MODEL_PRESETS.items():
        for noise in (preset["noise"], not preset["noise"]):
            config = {**preset, "noise": noise}
            with torch.device("meta"):
                candidate = build_generator(config)
            if _shapes(candidate.state_dict()) == wanted:
                logger.info(f"architecture inferred from the weights: preset {name}, noise={noise}")
                return config
    raise ExportError("cannot tell the architecture: no OUTPUT_DIR/config.yaml next to the checkpoints and the "
                      "weights match no preset; export from the run's output folder")


def model_config_for(train_config: Optional[TrainConfig], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The generator's `snac.SNAC` arguments: from the training config (preset or init_from), else the weights."""
    if train_config is None:
        return infer_model_config(state)
    if train_config.init_from:
        try:
            folder = resolve_pretrained_folder(train_config.init_from)
            config = json.loads((folder / "config.json").read_text())
        except Exception as err:
            logger.warning(f"cannot read --init_from {train_config.init_from} ({err}); inferring the architecture")
            return infer_model_config(state)
        if train_config.model_noise is not None:
            config["noise"] = train_config.model_noise
        return config
    return train_config.model_config


def model_from_checkpoint(checkpoint: str | os.PathLike, use_ema: bool = False
                          ) -> tuple[SnacGenerator, dict[str, Any]]:
    """The generator of an accelerate checkpoint (or its EMA) and what the card needs to know about it."""
    checkpoint = Path(checkpoint)
    train_state, ema_state = _read_train_state(checkpoint)
    if use_ema:
        if ema_state is None:
            raise ExportError(f"--use_ema: {checkpoint} holds no EMA weights (train with --ema_decay)")
        state = {k: v for k, v in ema_state.items() if k != "n_averaged"}
    else:
        state = load_state_dict(checkpoint)
    state = _strip_prefixes(state)
    train_config = training_config(checkpoint)
    config = model_config_for(train_config, state)
    model = build_generator(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"{checkpoint} does not match the run's architecture: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    model.eval()
    info: dict[str, Any] = {"checkpoint": str(checkpoint), "ema": use_ema, "train_config": train_config,
                            "train_state": train_state}
    if train_state is not None:
        info["steps"] = int(train_state.get("step", 0))
    return model, info


def describe_training_data(config: Optional[TrainConfig]) -> tuple[list[str], str]:
    """(Hub dataset ids for the YAML metadata, words for the card) of a run's training data."""
    from .data import split_option

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


def _example_clip(train_config: Optional[TrainConfig], audio_file: Optional[str], sample_rate: int,
                  seconds: float = 4.0) -> Optional[torch.Tensor]:
    """The clip of the card's figure: ``audio_file``, else the first usable validation (or training)
    file, its first ``seconds`` unpadded, at the data's own level."""
    from . import data as data_lib
    from .evaluate import load_clip, rows

    try:
        if audio_file:
            source = [(audio_file, data_lib.files_dataset([audio_file]))]
        elif train_config is not None:
            source = (data_lib.load_sources(train_config, "validation", streaming=False)
                      or data_lib.load_sources(train_config, "train", streaming=False))
        else:
            return None
        for attempt, (name, raw) in enumerate(rows(source)):
            audio, problem = load_clip(raw, sample_rate, int(seconds * sample_rate), None)
            if audio is not None:
                return audio
            logger.warning(f"{name} unusable for the figure: {problem}")
            if attempt >= 7:
                break
    except Exception as err:  # the figure is optional; a missing or unreachable source costs only it
        logger.warning(f"no example clip for the figure: {type(err).__name__}: {err}")
    return None


def export_checkpoint(source: str | os.PathLike, export_dir: Optional[str | os.PathLike] = None,
                      which: str = "best", use_ema: bool = False, audio_file: Optional[str] = None,
                      repo_id: Optional[str] = None, evaluate_clips: int = 16) -> Path:
    """Checkpoint (or a run's best/latest) -> Hub folder; returns the folder.

    The card's validation metrics are measured on the exported weights (up to ``evaluate_clips``
    validation files) when the run had validation data, else taken from the checkpoint when it is
    the one they were recorded at.
    """
    ensure_accelerate_state()
    checkpoint = resolve_checkpoint(source, which)
    model, info = model_from_checkpoint(checkpoint, use_ema=use_ema)
    train_config: Optional[TrainConfig] = info["train_config"]
    if export_dir is None:
        export_dir = checkpoint.parent.parent / "export" / (checkpoint.name + ("_ema" if use_ema else ""))
    export_dir = Path(export_dir)
    datasets, words = describe_training_data(train_config)
    card: dict[str, Any] = {
        "name": repo_id.split("/")[-1] if repo_id else (checkpoint.parent.parent.name or "SNAC codec"),
        "repo_id": repo_id, "steps": info.get("steps", "unknown"), "datasets": datasets, "training_data": words,
        "base_model": train_config.init_from if train_config else None,
    }
    card.update(_card_metrics(model, info, train_config, evaluate_clips))
    example = _example_clip(train_config, audio_file, model.sampling_rate)
    export_folder(model, export_dir, card, example_audio=example)
    logger.info(f"exported {checkpoint}{' (EMA)' if use_ema else ''} to {export_dir}")
    return export_dir


def _card_metrics(model: SnacGenerator, info: dict[str, Any], train_config: Optional[TrainConfig],
                  evaluate_clips: int) -> dict[str, Any]:
    from . import data as data_lib

    source = None
    if train_config is not None and evaluate_clips > 0:
        try:
            source = data_lib.load_sources(train_config, "validation", streaming=False)
        except Exception as err:
            logger.warning(f"validation data unavailable for the card ({err})")
    if source:
        from .evaluate import evaluate

        result = evaluate(model, source, max_clips=evaluate_clips, max_seconds=train_config.validation_seconds,
                          target_loudness=train_config.target_loudness, timing=False)
        keys = ("mel_distance", "stft_distance", "si_sdr", "pesq_wb", "stoi")
        metrics = {k: result["metrics"][k] for k in keys if k in result["metrics"]}
        for level in result["codebooks"]:
            metrics[f"codebook_usage_level{level['level']}"] = level["usage"]
            metrics[f"codebook_efficiency_level{level['level']}"] = level["efficiency"]
        return {"metrics": metrics,
                "metrics_source": f"Measured on the exported weights: {result['clips']} validation clips, "
                                  f"at most {train_config.validation_seconds:g} s each (`snac_accel.evaluate`)."}
    state = info.get("train_state") or {}
    best = (state.get("extra") or {}).get("best_metrics")
    if best and state.get("step") == state.get("best_step"):
        return {"metrics": best, "metrics_source": f"Recorded during training at step {state['step']}."}
    return {}


# ----------------------------------------------------------------------------- push


def push_to_hub(folder: str | os.PathLike, repo_id: str, token: Optional[str] = None, private: bool = False,
                revision: Optional[str] = None, commit_message: str = "Upload SNAC codec") -> str:
    """Create the repo if needed and upload only the export folder; returns the commit URL.

    The token comes from the argument, HF_TOKEN or the login cache, goes only to `HfApi`, and is
    never logged or written.
    """
    from huggingface_hub import HfApi, get_token

    ensure_accelerate_state()
    folder = Path(folder)
    missing = [name for name in WEIGHT_FILES if not (folder / name).is_file()]
    if missing:
        raise ExportError(f"{folder} is not an export folder (missing {', '.join(missing)})")
    token = token or get_token()
    if not token:
        raise HubTokenError(f"no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again; "
                            f"the export stays in {folder}")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(repo, "repo_id", None) or repo_id
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                               commit_message=commit_message, ignore_patterns=[".*", "**/.*", "checkpoint*"])
    url = str(getattr(commit, "commit_url", None) or commit)
    logger.info(f"pushed {folder} to {repo_id}{f' ({revision})' if revision else ''}: {url}")
    return url
