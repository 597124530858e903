"""Checkpoint or model -> Hub folder (-> the Hub): ``python -m snac_accel.export SOURCE [options]``.

SOURCE is a checkpoint folder (``OUTPUT_DIR/checkpoints/checkpoint_N``) or a training output folder,
whose best checkpoint (lowest validation mel distance; the latest without validation) is exported
unless ``--checkpoint latest``. The folder holds what `snac_accel.hub.save_pretrained` writes, the
model card (``README.md``) and, when a clip or codebook metrics are at hand, its figures
(`snac_accel.card`). The token for ``--push_to_hub`` comes from HF_TOKEN or the login cache
(``hf auth login``), never from the command line, where it would land in the shell's history.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate.logging import get_logger

from . import data as data_lib
from .card import FIGURE_NAME, USAGE_FIGURE_NAME, describe_training_data, draw_figures, model_card
from .checkpoints import CheckpointError, model_from_checkpoint, resolve_checkpoint, training_config
from .config import TrainConfig
from .evaluate import evaluate, load_clip, rows
from .hub import HubTokenError, ensure_accelerate_state, push_to_hub, save_pretrained
from .model import SnacGenerator

logger = get_logger(__name__)


def export_folder(model: SnacGenerator, folder: str | os.PathLike, info: Optional[dict[str, Any]] = None,
                  example_audio: Optional[torch.Tensor] = None) -> Path:
    """The whole Hub folder: weights, the figures (clip or codebook metrics given) and the card."""
    info = dict(info or {})
    folder = save_pretrained(model, folder)
    for name in (FIGURE_NAME, USAGE_FIGURE_NAME):  # a re-export must not keep an older run's figure
        (folder / name).unlink(missing_ok=True)
    info.update(draw_figures(model, folder, info.get("metrics") or {}, example_audio))
    (folder / "README.md").write_text(model_card(model, info))
    return folder


def _example_clip(train_config: Optional[TrainConfig], audio_file: Optional[str], sample_rate: int,
                  seconds: float = 4.0) -> Optional[torch.Tensor]:
    """The clip of the card's figure: ``audio_file``, else the first usable validation (or training)
    file, its first ``seconds`` unpadded, at the data's own level."""
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
                      which: str = "best", use_ema: Optional[bool] = None, audio_file: Optional[str] = None,
                      repo_id: Optional[str] = None, evaluate_clips: int = 16) -> Path:
    """Checkpoint (or a run's best/latest) -> Hub folder; returns the folder.

    The card's validation metrics are measured on the exported weights (up to ``evaluate_clips``
    validation files) when the run had validation data, else taken from the checkpoint when it is
    the one they were recorded at. ``use_ema`` None follows the run: the EMA weights when it exported
    them (``--ema_decay`` with ``--export_use_ema``), so a run's best checkpoint exports exactly what
    the run wrote to ``OUTPUT_DIR/best``.
    """
    ensure_accelerate_state()
    checkpoint = resolve_checkpoint(source, which)
    if use_ema is None:
        run = training_config(checkpoint)
        use_ema = bool(run is not None and run.ema_decay is not None and run.export_use_ema)
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
    """The card's metrics: measured on the exported weights when the run had validation data, else
    those recorded in training, when this checkpoint is the one they were recorded at."""
    source = None
    if train_config is not None and evaluate_clips > 0:
        try:
            source = data_lib.load_sources(train_config, "validation", streaming=False)
        except Exception as err:
            logger.warning(f"validation data unavailable for the card ({err})")
    if source:
        result = evaluate(model, source, max_clips=evaluate_clips, max_seconds=train_config.validation_seconds,
                          target_loudness=train_config.target_loudness, timing=False)
        keys = ("mel_distance", "stft_distance", "si_sdr", "visqol", "pesq_wb", "stoi")
        metrics = {k: result["metrics"][k] for k in keys if k in result["metrics"]}
        for level in result["codebooks"]:
            metrics[f"codebook_usage_level{level['level']}"] = level["usage"]
            metrics[f"codebook_efficiency_level{level['level']}"] = level["efficiency"]
        return {"metrics": metrics, "visqol_mode": result["settings"]["visqol_mode"],
                "paper_data": f"{result['clips']} validation clips",
                "metrics_source": f"Measured on the exported weights: {result['clips']} validation clips, "
                                  f"at most {train_config.validation_seconds:g} s each (`snac_accel.evaluate`)."}
    state = info.get("train_state") or {}
    best = (state.get("extra") or {}).get("best_metrics")
    if best and state.get("step") == state.get("best_step"):
        return {"metrics": best, "metrics_source": f"Recorded during training at step {state['step']}."}
    return {}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m snac_accel.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint folder, or a training output folder")
    parser.add_argument("--export_dir", default=None,
                        help="where the Hub folder goes (default: OUTPUT_DIR/export/checkpoint_N[_ema])")
    parser.add_argument("--checkpoint", choices=["best", "latest"], default="best",
                        help="which checkpoint of a training output folder")
    parser.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=None,
                        help="export the EMA weights (runs with --ema_decay); default: as the run exported them")
    parser.add_argument("--audio", default=None,
                        help="clip for the card's spectrogram figure (default: the first validation clip)")
    parser.add_argument("--eval_clips", type=int, default=16,
                        help="validation files measured for the card (0: use the metrics saved in training)")
    parser.add_argument("--push_to_hub", action="store_true", help="upload the folder to --hub_model_id")
    parser.add_argument("--hub_model_id", default=None, help="USER/NAME of the Hub repository")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="branch to push to (created when missing)")
    parser.add_argument("--commit_message", default="Upload SNAC codec")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id USER/NAME")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ensure_accelerate_state()
    try:
        folder = export_checkpoint(args.source, args.export_dir, which=args.checkpoint, use_ema=args.use_ema,
                                   audio_file=args.audio, repo_id=args.hub_model_id, evaluate_clips=args.eval_clips)
    except (CheckpointError, OSError, ValueError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    sys.stdout.write(f"exported {folder}\n")
    if args.push_to_hub:
        try:
            url = push_to_hub(folder, args.hub_model_id, private=args.private, revision=args.revision,
                              commit_message=args.commit_message)
        except HubTokenError as err:
            sys.stderr.write(f"error: {err}\n")
            return 1
        sys.stdout.write(f"pushed to {url}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
