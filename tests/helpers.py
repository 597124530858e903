"""Test helpers: snapshots of a trainer's whole training state and exact comparisons of them.

A snapshot holds everything an optimizer update may change (both models, both optimizers' moments,
both schedulers, EMA, dead-code restarter, counters), so a test can say "nothing moved" or "this
equals what the checkpoint holds" about all of it at once.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def training_state(trainer: Any) -> dict[str, Any]:
    """A deep copy of a `SnacTrainer`'s state, keyed by part."""
    acc = trainer.accelerator
    snapshot = {
        "generator": clone(trainer.unwrapped_generator.state_dict()),
        "discriminator": clone(acc.unwrap_model(trainer.discriminator).state_dict()),
        "opt_g": copy.deepcopy(trainer.opt_g.state_dict()),
        "opt_d": copy.deepcopy(trainer.opt_d.state_dict()),
        "sched_g": copy.deepcopy(trainer.sched_g.state_dict()),
        "sched_d": copy.deepcopy(trainer.sched_d.state_dict()),
        "step": trainer.state.step,
    }
    if trainer.ema is not None:
        snapshot["ema"] = clone(trainer.ema.state_dict())
    if trainer.restarter is not None:
        snapshot["restarter"] = copy.deepcopy(trainer.restarter.state_dict())
    return snapshot


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two nested structures of tensors and plain values differ (NaN equals NaN); empty if identical."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{path}: tensor vs {type(b if isinstance(a, torch.Tensor) else a).__name__}"]
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
        return [] if bool(same.all()) else [f"{path}: values differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(map(str, a.keys() ^ b.keys()))[:4]} on one side only"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def assert_identical(a: Any, b: Any, what: str = "") -> None:
    found = differences(a, b)
    assert not found, f"{what} differs: " + "; ".join(found[:8])


def all_finite(state: Any) -> bool:
    """Every floating tensor in a nested structure is finite."""
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return True


def record_steps(trainer: Any) -> list[dict[str, Any]]:
    """Wrap ``trainer.train_step`` so that a snapshot is taken before each micro-batch.

    Entry 0 is what training started from (after any resume); for the state after the last call,
    take ``training_state(trainer)`` once the loop is done.
    """
    snapshots: list[dict[str, Any]] = []
    real_step = trainer.train_step

    def step(real: torch.Tensor) -> dict[str, torch.Tensor]:
        snapshots.append(training_state(trainer))
        return real_step(real)

    trainer.train_step = step
    return snapshots


def custom_states(checkpoint: Path) -> dict[str, Any]:
    """The custom objects of a checkpoint (`custom_checkpoint_N.pkl`), recognised by their keys:
    ``ema``, ``restarter``, ``train_state`` and ``schedulers`` (a list, in file order)."""
    found: dict[str, Any] = {"schedulers": []}
    for path in sorted(checkpoint.glob("custom_checkpoint_*.pkl"), key=lambda p: int(p.stem.rsplit("_", 1)[1])):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if "n_averaged" in state:
            found["ema"] = state
        elif "unused_steps" in state:
            found["restarter"] = state
        elif "best_step" in state:
            found["train_state"] = state
        elif "last_epoch" in state:
            found["schedulers"].append(state)
    return found


def optimizer_states(checkpoint: Path) -> list[dict[str, Any]]:
    return [torch.load(checkpoint / name, map_location="cpu", weights_only=False)
            for name in ("optimizer.bin", "optimizer_1.bin")]
