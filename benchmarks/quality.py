"""Does the codec learn? A fixed-step `tiny` training on the demo train clips, measured on the demo
validation clips (never trained on) against the untrained model.

    python benchmarks/quality.py [--steps 750] [--set key=value ...] [--json results.json]

Prints, for the untrained and the trained codec: mel and STFT distance, SI-SDR (as DAC computes
them, see `snac_accel.evaluate`), and per level the codebook usage and bitrate efficiency
(entropy / log2 codebook size); then the trained/untrained ratios. ``--set`` overrides any
`TrainConfig` option (``--set dead_code_steps=0 --set codebook_init=none``) to compare choices
with the same steps, data and seed. Step counts, not wall time, fix the result: it is the same on
every machine, only slower or faster.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from snac_accel import TrainConfig, train
from snac_accel.evaluate import evaluate, open_source
from snac_accel.hub import load_codec
from snac_accel.model import build_generator

DEMO = Path(__file__).resolve().parents[1] / "snac_accel" / "demo_data"


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        overrides[key] = parsed
    return overrides


def measure(model: torch.nn.Module) -> dict:
    result = evaluate(model, open_source(str(DEMO / "validation")), timing=False, speech_metrics=False)
    figures = dict(result["metrics"])
    for level in result["codebooks"]:
        figures[f"usage_level{level['level']}"] = level["usage"]
        figures[f"efficiency_level{level['level']}"] = level["efficiency"]
    figures["bitrate_efficiency"] = result["bitrate"]["efficiency"]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=750, help="optimizer steps (the demo's count)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainConfig override")
    parser.add_argument("--output_dir", default=None, help="keep the run here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = parse_overrides(args.set)
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or str(Path(scratch) / "run")
        config = TrainConfig(**{"dataset": "demo", "preset": "tiny", "output_dir": output_dir,
                                "max_train_steps": args.steps, "checkpointing_steps": 0, "report_to": "none",
                                "logging_steps": max(1, args.steps // 10), **overrides})
        torch.manual_seed(config.seed)
        untrained = build_generator(config.model_config).eval()
        started = time.monotonic()
        final = train(config)
        minutes = (time.monotonic() - started) / 60
        before, after = measure(untrained), measure(load_codec(str(final)))
    print(f"tiny preset, {args.steps} steps of {config.train_batch_size} x {config.segment_seconds} s "
          f"({minutes:.1f} min), overrides {overrides or 'none'}; demo validation clips (unseen)")
    print(f"{'figure':<24}{'untrained':>12}{'trained':>12}{'ratio':>10}")
    for key in before:
        ratio = after[key] / before[key] if before[key] else float("nan")
        print(f"{key:<24}{before[key]:>12.4f}{after[key]:>12.4f}{ratio:>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "overrides": overrides, "minutes": minutes,
                                               "untrained": before, "trained": after}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
