"""What a resumed run may change: its options against the run that wrote the checkpoint.

A checkpoint restores the optimizers' hyperparameters and the schedulers' state as they were, so
a new ``--learning_rate`` given on resume would be silently ignored while ``config.yaml`` records
it; another preset would end in a size-mismatch traceback. So before anything is built the options
are compared with the checkpoint's run config (kept in the checkpoint; ``OUTPUT_DIR/config.yaml``
for older ones):

- changes that the checkpoint cannot hold are refused in one line: the model's and the
  discriminators' architecture, frozen parts, and what decides which objects a checkpoint holds
  (EMA on/off, dead-code restarts on/off, fp16 loss scalers, streaming) or how its state goes on
  (seed, scheduler kind and warm-up);
- the optimizer's hyperparameters (learning rates, AdamW betas, weight decay, epsilon, decay per
  step) are applied to the restored optimizers and schedulers, the decay already done kept;
- every other change (batch size, accumulation, segment, loss weights, clipping, GAN start, ...)
  takes effect by itself. Each change is logged as applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml
from accelerate.logging import get_logger

from .checkpoints import read_train_state, resolve_resume_path
from .config import ConfigError, TrainConfig

logger = get_logger(__name__)

ARCHITECTURE = ("preset", "init_from", "model_noise", "discriminator_preset", "freeze")
CONTINUITY = ("seed", "lr_scheduler", "lr_warmup_steps", "streaming", "validation_split")
OPTIMIZER = ("learning_rate", "disc_learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
             "lr_gamma")
# Where the run writes and how it reports: never worth a line.
UNREPORTED = ("output_dir", "resume_from_checkpoint", "hub_token", "log_level", "report_to", "logging_dir",
              "tracker_project_name", "dataloader_num_workers", "max_train_steps", "num_train_epochs",
              "max_train_minutes", "logging_steps", "validation_steps", "quality_metrics_steps",
              "visqol_mode", "checkpointing_steps", "checkpoints_total_limit",
              "push_to_hub", "hub_model_id", "hub_private")


def run_record(config: TrainConfig) -> dict[str, Any]:
    """The options a checkpoint records for a later resume to compare with (not where or how it reports)."""
    return {k: v for k, v in config.to_dict().items() if k not in UNREPORTED}


def run_config_of(checkpoint: Path) -> Optional[dict[str, Any]]:
    """The options of the run that wrote ``checkpoint``: recorded in it, else its OUTPUT_DIR/config.yaml."""
    state, _ = read_train_state(checkpoint)
    recorded = ((state or {}).get("extra") or {}).get("run_config")
    if recorded:
        return dict(recorded)
    path = checkpoint.parent.parent / "config.yaml"
    if path.is_file():
        return yaml.safe_load(path.read_text()) or None
    return None


def _structural(name: str, old: Any, new: Any) -> bool:
    """Whether changing ``name`` from ``old`` to ``new`` changes which objects a checkpoint holds."""
    if name == "ema_decay":
        return (old is None) != (new is None)
    if name == "dead_code_steps":
        return (old == 0) != (new == 0)
    if name == "mixed_precision":
        return (old == "fp16") != (new == "fp16")
    return False


def check_resume(config: TrainConfig, checkpoint: Path) -> dict[str, tuple[Any, Any]]:
    """The options that differ from the checkpoint's run, ``{name: (old, new)}``; refused ones raise.

    Raises `ConfigError` (one line) for a change the checkpoint cannot hold (see the module's docstring).
    """
    old = run_config_of(checkpoint)
    if old is None:
        return {}
    new = config.to_dict()
    changes = {name: (old[name], new[name]) for name in new
               if name in old and old[name] != new[name] and name not in UNREPORTED}
    refused = [name for name, (a, b) in changes.items()
               if name in ARCHITECTURE or name in CONTINUITY or _structural(name, a, b)]
    if refused:
        listed = ", ".join(f"--{name} {changes[name][0]} (now {changes[name][1]})" for name in refused)
        raise ConfigError(f"--resume_from_checkpoint {checkpoint}: it was trained with {listed}, which the "
                          "checkpoint cannot continue with; resume with the run's values or start a new --output_dir")
    return changes


def resume_plan(config: TrainConfig, is_main: bool, share: Callable[[Any], Any]
                ) -> tuple[Optional[Path], dict[str, tuple[Any, Any]]]:
    """(checkpoint to resume from, changed options), decided on the main process and shared: on a
    shared folder with a cached listing, nodes resolving `latest` themselves could load different
    checkpoints. A refusal raises the same `ConfigError` on every process."""
    found: tuple[Optional[Path], dict[str, tuple[Any, Any]], Optional[str]] = (None, {}, None)
    if is_main:
        path = resolve_resume_path(config)
        try:
            found = (path, check_resume(config, path) if path is not None else {}, None)
        except ConfigError as err:
            found = (path, {}, str(err))
    path, changes, refused = share(found)
    if refused:
        raise ConfigError(refused)
    if config.resume_from_checkpoint and path is None:
        logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {Path(config.output_dir) / 'checkpoints'}, "
                       "starting from scratch", main_process_only=True)
    return path, changes


def log_changes(changes: dict[str, tuple[Any, Any]]) -> None:
    if changes:
        logger.warning("resuming with changed options, applied from here on: " + ", ".join(
            f"--{name} {old} -> {new}" for name, (old, new) in changes.items()), main_process_only=True)


def _schedulers(scheduler: Any) -> list[Any]:
    return list(getattr(scheduler, "_schedulers", None) or [scheduler])


def scale_learning_rate(optimizer: Any, scheduler: Any, factor: float) -> None:
    """Multiply a model's learning rate by ``factor`` where it is now in its schedule, and its schedule's base."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    for each in _schedulers(scheduler):
        each.base_lrs = [lr * factor for lr in each.base_lrs]
        if getattr(each, "_last_lr", None) is not None:
            each._last_lr = [lr * factor for lr in each._last_lr]


def apply_optimizer_options(config: TrainConfig, changes: dict[str, tuple[Any, Any]],
                            models: dict[str, tuple[Any, Any]]) -> None:
    """After the checkpoint is loaded: the changed optimizer options on ``models`` {name: (optimizer, scheduler)}."""
    if not any(name in changes for name in OPTIMIZER):
        return
    old = {name: changes[name][0] if name in changes else getattr(config, name) for name in OPTIMIZER}
    bases = {"generator": ("learning_rate", "learning_rate"), "discriminator": ("disc_learning_rate", "learning_rate")}
    for model, (optimizer, scheduler) in models.items():
        own, fallback = bases[model]
        before = old[own] or old[fallback]
        after = getattr(config, own) or getattr(config, fallback)
        if before and after and before != after:
            scale_learning_rate(optimizer, scheduler, after / before)
        for group in optimizer.param_groups:
            group["betas"] = (config.adam_beta1, config.adam_beta2)
            group["weight_decay"], group["eps"] = config.adam_weight_decay, config.adam_epsilon
        for each in _schedulers(scheduler):
            if isinstance(each, torch.optim.lr_scheduler.ExponentialLR) and config.lr_gamma is not None:
                each.gamma = config.lr_gamma
