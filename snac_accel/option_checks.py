"""Option checks: every bad option or combination is refused in one clear line before anything is built."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .presets import RECIPES


class ConfigError(ValueError):
    """A bad option or option combination, raised before any training starts."""


def check_options(config: Any) -> None:
    """Refuse a bad combination of options of a `TrainConfig` (one clear line each, joined by "; ")."""
    errors = []
    sources = [s for s in ("dataset_name", "train_data_dir", "train_file") if getattr(config, s)]
    if not sources:
        errors.append("no training data: give --dataset PRESET, --dataset_name, --train_data_dir or --train_file")
    listed = {name: [p.strip() for p in (getattr(config, name) or "").split(",") if p.strip()]
              for name in ("dataset_name", "train_data_dir", "validation_data_dir", "train_file", "validation_file")}
    for name in ("train_data_dir", "validation_data_dir"):
        errors += [f"--{name} {path} is not a folder" for path in listed[name] if not Path(path).is_dir()]
    for name in ("train_file", "validation_file"):
        errors += [f"--{name} {path} does not exist" for path in listed[name] if not Path(path).is_file()]
    if config.source_weights:
        count = len(listed["dataset_name"]) + len(listed["train_data_dir"]) + len(listed["train_file"])
        try:
            weights = [float(w) for w in config.source_weights.split(",") if w.strip()]
        except ValueError:
            weights = []
        if not weights or len(weights) != count or min(weights) < 0 or sum(weights) <= 0:
            errors.append(f"--source_weights {config.source_weights} needs {count} non-negative numbers, one per "
                          "training source (Hub datasets, then folders, then manifests)")
    if Path(config.output_dir).exists() and not Path(config.output_dir).is_dir():
        errors.append(f"--output_dir {config.output_dir} is a file; give a folder (new or of an earlier run)")
    if not 0.0 <= config.validation_split < 0.5:
        errors.append("--validation_split must lie in [0, 0.5) (0: no clips held out)")
    if config.streaming and config.max_train_steps is None:
        errors.append("--streaming needs --max_train_steps (a stream has no known epoch length)")
    if config.shuffle_buffer_size < 1:
        errors.append("--shuffle_buffer_size must be at least 1")
    if not 0.0 < config.max_bad_fraction <= 1.0:
        errors.append("--max_bad_fraction must lie in (0, 1]")
    min_seconds = config.pad_multiple / config.sampling_rate
    if config.segment_samples < config.pad_multiple or config.segment_seconds < min_seconds:
        errors.append(f"--segment_seconds {config.segment_seconds} is shorter than the model's padding "
                      f"multiple ({config.pad_multiple} samples = {min_seconds:.3f} s); use at least that")
    if config.recipe not in RECIPES:
        errors.append(f"--recipe {config.recipe} is not one of {', '.join(RECIPES)}")
    if min(config.max_grad_norm or 0.0, config.disc_max_grad_norm or 0.0) < 0:
        errors.append("--max_grad_norm and --disc_max_grad_norm must be positive, or 0 for no clipping")
    if config.codebook_init_clips is not None and config.codebook_init_clips < 1:
        errors.append("--codebook_init_clips must be at least 1")
    if config.train_batch_size < 1 or config.gradient_accumulation_steps < 1:
        errors.append("--train_batch_size and --gradient_accumulation_steps must be at least 1")
    if config.max_train_steps is not None and config.max_train_steps < 1:
        errors.append("--max_train_steps must be at least 1")
    if config.quality_metrics_steps < -1:
        errors.append("--quality_metrics_steps must be -1 (never), 0 (the last validation only) or a count N")
    if config.logging_steps < 1:
        errors.append("--logging_steps must be at least 1 (the last update is always logged too)")
    if config.max_nonfinite_steps < 1 or config.max_rollbacks < 0:
        errors.append("--max_nonfinite_steps must be at least 1 and --max_rollbacks at least 0")
    if not 0.0 < config.rollback_lr_factor <= 1.0:
        errors.append("--rollback_lr_factor must lie in (0, 1]")
    if config.freeze:
        unknown = set(config.freeze.split(",")) - {"encoder", "quantizer", "decoder"}
        if unknown:
            errors.append(f"--freeze got {sorted(unknown)}; choose among encoder, quantizer, decoder")
    if not 0.0 <= config.quantizer_dropout <= 1.0:
        errors.append("--quantizer_dropout must lie in [0, 1]")
    if config.dead_code_steps is not None and config.dead_code_steps < 0:
        errors.append("--dead_code_steps must be 0 (off) or a number of optimizer steps")
    if config.ema_decay is not None and not 0.0 < config.ema_decay < 1.0:
        errors.append("--ema_decay must lie in (0, 1)")
    compiled = [part.strip() for part in config.torch_compile_models.split(",") if part.strip()]
    if not compiled or set(compiled) - {"generator", "discriminator"}:
        errors.append(f"--torch_compile_models {config.torch_compile_models}: give generator, discriminator or "
                      "generator,discriminator")
    if config.torch_compile and config.torch_compile_backend not in _compile_backends():
        errors.append(f"--torch_compile_backend {config.torch_compile_backend} is not one of "
                      f"{', '.join(_compile_backends())}")
    if config.report_to not in ("tensorboard", "wandb", "trackio", "all", "none"):
        errors.append(f"--report_to {config.report_to} is not one of tensorboard, wandb, trackio, all, none")
    if config.push_to_hub and not config.hub_model_id:
        errors.append("--push_to_hub needs --hub_model_id USER/NAME")
    if config.resume_from_checkpoint and config.resume_from_checkpoint != "latest":
        folder = Path(config.resume_from_checkpoint)
        if not folder.is_dir() or not any(folder.glob("model*.safetensors")):
            errors.append(f"--resume_from_checkpoint {folder} is not a checkpoint folder (no model*.safetensors); "
                          "give OUTPUT_DIR/checkpoints/checkpoint_N or 'latest'")
    tracker_modules = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
    for tracker in ([] if config.report_to in ("none", "all") else [config.report_to]):
        if tracker in tracker_modules and importlib.util.find_spec(tracker_modules[tracker]) is None:
            errors.append(f"--report_to {tracker} needs the '{tracker}' package: pip install {tracker} "
                          "(or --report_to none)")
    if errors:
        raise ConfigError("; ".join(errors))


def _compile_backends() -> list[str]:
    import torch._dynamo

    return torch._dynamo.list_backends(exclude_tags=())
