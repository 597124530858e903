"""Does the codec learn, and what does the GAN add? Fixed-step trainings with the demo's options
(`snac_accel/demo_data/demo.yaml`: `tiny`, the demo train clips), measured on the bundled real speech (recorded voices, never trained on) against the untrained model.

    python benchmarks/quality.py [--steps 420] [--gan_from 150,250] [--set key=value ...] [--json out.json]
        [--markdown rows.md]

Prints, for the untrained and each trained codec: ViSQOL, PESQ-WB, STOI (`snac_accel.perceptual`),
mel and STFT distance, SI-SDR (as DAC computes them, see `snac_accel.evaluate`), and per level the
codebook usage and bitrate efficiency; then the trained/untrained ratios, and the paper rows
(`snac_accel.paper`). ``--gan_from N1,N2`` compares, at the same step count, a run without the
GAN against runs with the discriminators from step N1, N2, ...; each run's minutes show what the
discriminators cost. ``--set`` overrides any `TrainConfig` option (``--set dead_code_steps=0``) to
compare choices with the same steps, data and seed. Step counts, not wall time, fix the result: it
is the same on every machine, only slower or faster.
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

from snac_accel import train
from snac_accel.arguments import parse_args
from snac_accel.evaluate import evaluate, evaluation_row, open_source
from snac_accel.paper import format_text, markdown_table, published_row
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


REAL_SPEECH = DEMO / "real_speech"
NO_GAN = 10 ** 9  # a disc_start no run reaches


def measure(model: torch.nn.Module, name: str, rows: list) -> dict:
    result = evaluate(model, open_source(str(REAL_SPEECH)), timing=False)
    rows.append(evaluation_row(result, name, f"bundled real speech ({result['clips']} files)"))
    figures = dict(result["metrics"])
    for level in result["codebooks"]:
        figures[f"usage_level{level['level']}"] = level["usage"]
        figures[f"efficiency_level{level['level']}"] = level["efficiency"]
    figures["bitrate_efficiency"] = result["bitrate"]["efficiency"]
    return figures


def variants(gan_from: str) -> list[tuple[str, dict]]:
    """(name, overrides) of each run: as configured, or no GAN and the GAN from each step of ``gan_from``."""
    starts = [int(n) for n in gan_from.split(",") if n.strip()]
    if not starts:
        return [("trained", {})]
    return [("no GAN", {"disc_start": NO_GAN})] + [(f"GAN from {n}", {"disc_start": n}) for n in starts]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=420, help="optimizer steps (the demo's count)")
    parser.add_argument("--gan_from", default="", help="comma-separated disc_start steps to compare with no GAN")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainConfig override")
    parser.add_argument("--output_dir", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--markdown", default=None, help="also write the paper rows as a Markdown table here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = parse_overrides(args.set)
    rows: list = []
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, variant in variants(args.gan_from):
            output_dir = str(Path(args.output_dir or scratch) / name.replace(" ", "_"))
            # the demo's options (demo.yaml), its length and GAN start from the command line
            config = parse_args(["--config", str(DEMO / "demo.yaml"), "--output_dir", output_dir, "--report_to",
                                 "none", "--validation_data_dir", str(REAL_SPEECH), "--max_train_steps",
                                 str(args.steps), "--checkpointing_steps", "0", "--quality_metrics_steps", "-1"])
            for key, value in {**overrides, **variant}.items():
                setattr(config, key, value)
            if not results:
                torch.manual_seed(config.seed)
                results["untrained"] = {"figures": measure(build_generator(config.model_config).eval(), "untrained",
                                                           rows)}
            started = time.monotonic()
            final = train(config)
            minutes = (time.monotonic() - started) / 60
            results[name] = {"minutes": minutes, "disc_start": config.disc_start,
                             "figures": measure(load_codec(str(final)), name, rows)}
    before = results["untrained"]["figures"]
    print(f"tiny preset, {args.steps} steps of {config.train_batch_size} x {config.segment_seconds} s, overrides "
          f"{overrides or 'none'}; bundled real speech (unseen); ratio = trained / untrained")
    names = [n for n in results if n != "untrained"]
    print(f"{'figure':<24}{'untrained':>12}" + "".join(f"{n:>16}{'ratio':>8}" for n in names))
    for key in before:
        cells = "".join(f"{results[n]['figures'][key]:>16.4f}"
                        f"{results[n]['figures'][key] / before[key] if before[key] else float('nan'):>8.3f}"
                        for n in names)
        print(f"{key:<24}{before[key]:>12.4f}{cells}")
    print("minutes" + " " * 29 + "".join(f"{results[n]['minutes']:>16.1f}{'':>8}" for n in names))
    published = published_row(config.sampling_rate)
    print("\n" + "\n".join(format_text(row) for row in rows + [published]))
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(rows + [published]) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "overrides": overrides, "runs": results,
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
