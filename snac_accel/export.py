"""Checkpoint -> Hub folder (-> the Hub): ``python -m snac_accel.export SOURCE [options]``.

SOURCE is a checkpoint folder (``OUTPUT_DIR/checkpoints/checkpoint_N``) or a training output folder,
whose best checkpoint (lowest validation mel distance; the latest without validation) is exported
unless ``--checkpoint latest``. The token for ``--push_to_hub`` comes from HF_TOKEN or the login cache
(``hf auth login``), never from the command line, where it would land in the shell's history.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from .hub import ExportError, HubTokenError, ensure_accelerate_state, export_checkpoint, push_to_hub


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m snac_accel.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint folder, or a training output folder")
    parser.add_argument("--export_dir", default=None,
                        help="where the Hub folder goes (default: OUTPUT_DIR/export/checkpoint_N[_ema])")
    parser.add_argument("--checkpoint", choices=["best", "latest"], default="best",
                        help="which checkpoint of a training output folder")
    parser.add_argument("--use_ema", action="store_true", help="export the EMA weights (runs with --ema_decay)")
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
    except (ExportError, OSError, ValueError) as err:
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
