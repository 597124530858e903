"""A run's checkpoints, ``OUTPUT_DIR/checkpoints/checkpoint_N``: listing, writing, rotating, reading.

Writing: ``accelerator.save_state`` into ``.partial_checkpoint_N``, renamed when every file is
there, so a kill during a save never leaves a half checkpoint under a name that resume would pick.

Reading: the generator is the first prepared model (``model.safetensors``); the EMA weights and the
`TrainState` are custom objects (``custom_checkpoint_N.pkl``), recognised by their keys rather than
their order so that a run with or without EMA reads the same way; the architecture comes from the
run's ``OUTPUT_DIR/config.yaml``, else from the weights' names and shapes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger

from .config import MODEL_PRESETS, ConfigError, TrainConfig
from .model import SnacGenerator, build_generator, load_state_dict, resolve_pretrained_folder

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)$")
MODELS = ("generator", "discriminator")


class CheckpointError(RuntimeError):
    """The checkpoint cannot be read as asked (missing files, no EMA, unknown architecture)."""


@dataclass
class TrainState:
    """Counters saved with every checkpoint (registered with ``accelerator.register_for_checkpointing``)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    # Per model (generator, discriminator): updates skipped, non-finite ones in a row (what stops a
    # run), and fp16 loss-scale back-offs (overflows at a scale above 1: the scaler's normal search).
    skipped_updates: dict = field(default_factory=lambda: dict.fromkeys(MODELS, 0))
    nonfinite_in_row: dict = field(default_factory=lambda: dict.fromkeys(MODELS, 0))
    scaler_backoffs: dict = field(default_factory=lambda: dict.fromkeys(MODELS, 0))
    bad_files: int = 0
    best_val_mel: float = math.inf
    best_step: int = -1
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        for key in ("skipped_updates", "nonfinite_in_row"):  # earlier checkpoints: one count for both models
            if isinstance(state.get(key), int):
                state[key] = {"generator": state[key], "discriminator": 0}
        self.__dict__.update(state)


# ----------------------------------------------------------------------------- finding


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Partial saves live under another name and never match."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return sorted(found)


def resolve_resume_path(config: TrainConfig) -> Optional[Path]:
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint != "latest":
        return Path(config.resume_from_checkpoint)
    found = list_checkpoints(Path(config.output_dir) / "checkpoints")
    return found[-1][1] if found else None


def _is_checkpoint(folder: Path) -> bool:
    has_weights = (folder / "model.safetensors").is_file() or (folder / "pytorch_model.bin").is_file()
    return has_weights and not (folder / "config.json").is_file()


def resolve_checkpoint(path: str | os.PathLike, which: str = "best") -> Path:
    """A checkpoint folder as is; for a training output folder, its best (or latest) checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder")
    if _is_checkpoint(path):
        return path
    checkpoints_dir = path if path.name == "checkpoints" else path / "checkpoints"
    found = list_checkpoints(checkpoints_dir)
    if not found:
        raise CheckpointError(f"{path} is neither a checkpoint folder (model.safetensors) nor a training output "
                              f"folder with checkpoints/checkpoint_N")
    latest = found[-1][1]
    if which == "latest":
        return latest
    if which != "best":
        raise CheckpointError(f"--checkpoint must be 'best' or 'latest', got {which!r}")
    state, _ = read_train_state(latest)
    best_step = int(state.get("best_step", -1)) if state else -1
    best = checkpoints_dir / f"checkpoint_{best_step}"
    if best_step < 0 or not best.is_dir():
        logger.warning(f"no best checkpoint recorded in {latest} (was validation data given?): using the latest")
        return latest
    return best


# ----------------------------------------------------------------------------- writing


class _QuietCheckpointLogs(logging.Filter):
    """Drops accelerate's INFO lines; a failed random-state load (only INFO there) becomes a warning,
    since a resume without them is not exact."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and "Could not load random states" in record.getMessage():
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return record.levelno >= logging.WARNING


@contextmanager
def quiet_checkpoint_logs(quiet: bool = True) -> Iterator[None]:
    """accelerate logs each file of a save or load at INFO (eight lines); the trainer says it in one.
    ``quiet=False`` (``--log_level debug``) shows them."""
    if not quiet:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("accelerate.checkpointing", "accelerate.accelerator")]
    filter_ = _QuietCheckpointLogs()
    for each in loggers:
        each.addFilter(filter_)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(filter_)


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: Path, step: int, total_limit: Optional[int] = None,
                    best_step: int = -1, quiet: bool = True) -> Path:
    """Write into a temporary folder, then rename: a kill mid-save never leaves a 'latest' to pick.

    Every process calls it (``save_state`` gathers from all); the main process renames and rotates.
    """
    final = checkpoint_dir / f"checkpoint_{step}"
    partial = checkpoint_dir / f".partial_checkpoint_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with quiet_checkpoint_logs(quiet):
        accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        rotate_checkpoints(checkpoint_dir, total_limit, best_step)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(checkpoint_dir: Path, total_limit: Optional[int], best_step: int = -1) -> None:
    """Keep the newest ``total_limit`` checkpoints, the best one (``best_step``) counted among them."""
    if not total_limit:
        return
    found = [(step, path) for step, path in list_checkpoints(checkpoint_dir) if step != best_step]
    keep = total_limit - (1 if best_step >= 0 and (checkpoint_dir / f"checkpoint_{best_step}").is_dir() else 0)
    for _, path in found[:max(0, len(found) - max(keep, 1))]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(accelerator: Accelerator, path: Path, quiet: bool = True) -> None:
    """Restore everything registered with ``accelerator`` from ``path``."""
    if not path.is_dir() or not any(path.glob("model*.safetensors")) and not any(path.glob("*.bin")):
        raise ConfigError(f"{path} is not a checkpoint folder written by snac-accel (no model files)")
    with quiet_checkpoint_logs(quiet):
        accelerator.load_state(str(path))


# ----------------------------------------------------------------------------- reading


def read_train_state(checkpoint: Path) -> tuple[Optional[dict[str, Any]], Optional[dict[str, torch.Tensor]]]:
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
    raise CheckpointError("cannot tell the architecture: no OUTPUT_DIR/config.yaml next to the checkpoints and the "
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
    train_state, ema_state = read_train_state(checkpoint)
    if use_ema:
        if ema_state is None:
            raise CheckpointError(f"--use_ema: {checkpoint} holds no EMA weights (train with --ema_decay)")
        state = {k: v for k, v in ema_state.items() if k != "n_averaged"}
    else:
        state = load_state_dict(checkpoint)
    state = _strip_prefixes(state)
    train_config = training_config(checkpoint)
    config = model_config_for(train_config, state)
    model = build_generator(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint} does not match the run's architecture: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    model.eval()
    info: dict[str, Any] = {"checkpoint": str(checkpoint), "ema": use_ema, "train_config": train_config,
                            "train_state": train_state}
    if train_state is not None:
        info["steps"] = int(train_state.get("step", 0))
    return model, info
