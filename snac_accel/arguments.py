"""Parsing of the training options: the command line, ``--config`` files (YAML or JSON) and the
spellings of the earlier SNAC training scripts, each problem refused in one ``error:`` line."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import ConfigError, TrainConfig


# Spellings of the earlier SNAC training scripts that are still taken. `--batch_size` is an argparse
# alias of `--train_batch_size`; `--dataset_path` names either kind of source (`config.route_dataset_path`).
LEGACY_OPTIONS = ("batch_size", "dataset_path")
# Names of the earlier scripts (and of other trainers) that are refused, each with the option to use.
RENAMED_OPTIONS = {
    "num_epochs": "--num_train_epochs", "epochs": "--num_train_epochs",
    "segment_length": "--segment_seconds (in seconds, not samples)", "segment_len": "--segment_seconds",
    "sample_rate": "--preset (the sample rate comes with the architecture)", "sampling_rate": "--preset",
    "lr": "--learning_rate", "disc_lr": "--disc_learning_rate", "weight_decay": "--adam_weight_decay",
    "max_steps": "--max_train_steps", "num_steps": "--max_train_steps",
    "save_every": "--checkpointing_steps", "save_steps": "--checkpointing_steps",
    "checkpoint_every": "--checkpointing_steps", "eval_every": "--validation_steps",
    "val_every": "--validation_steps", "eval_steps": "--validation_steps", "log_every": "--logging_steps",
    "checkpoint_dir": "--output_dir", "save_dir": "--output_dir", "log_dir": "--logging_dir",
    "resume": "--resume_from_checkpoint latest (or a checkpoint folder)",
    "num_workers": "--dataloader_num_workers", "warmup_steps": "--lr_warmup_steps",
    "grad_accum_steps": "--gradient_accumulation_steps", "accumulation_steps": "--gradient_accumulation_steps",
    "val_dataset_path": "--validation_data_dir (a folder) or --validation_file", "use_ema": "--ema_decay 0.999",
    "fp16": "--mixed_precision fp16", "bf16": "--mixed_precision bf16", "use_amp": "--mixed_precision bf16",
    "device": "accelerate's launch options (the device follows the machine)",
    "model_name": "--init_from", "pretrained": "--init_from",
}

NO_OPTION_HELP = {"export_use_ema": "Export the generator's own weights, not the EMA's, even when EMA is on."}


def known_options() -> list[str]:
    """Every option name the CLI and --config files take (without dashes)."""
    return [f.name for f in dataclasses.fields(TrainConfig)] + list(LEGACY_OPTIONS) + ["config"]


def unknown_option_message(name: str, where: str = "") -> str:
    """One line for an unknown option: the earlier scripts' new name, or the closest known names."""
    key = name.lstrip("-").split("=", 1)[0].replace("-", "_")
    if key in RENAMED_OPTIONS:
        return f"{where}--{key} is not an option here; use {RENAMED_OPTIONS[key]}"
    close = difflib.get_close_matches(key, known_options(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else "; see --help for the names"
    return f"{where}unknown option --{key}{hint}"


def load_config_file(path: str) -> dict[str, Any]:
    """The mapping a ``--config`` file holds; every problem is one `ConfigError` line naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path} is a folder; give a YAML or JSON file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path} is not UTF-8 text; give a YAML or JSON file") from None
    except OSError as err:
        raise ConfigError(f"--config {path} cannot be read: {err.strerror or err}") from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--config {path} is not valid JSON: {err.msg} at line {err.lineno}, "
                          f"column {err.colno}") from None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path} is not valid YAML: {problem}{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of option names to values")
    known = set(known_options()) - {"config"}
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise ConfigError("; ".join(unknown_option_message(key, f"--config {path}: ") for key in unknown))
    return data


def config_file_arguments(path: str, data: dict[str, Any]) -> tuple[list[str], dict[str, None]]:
    """A config file's values as CLI words, so that argparse checks their types and choices as it
    checks the command line's; plus the options the file sets to null (argparse has no word for it)."""
    optional = {name for name, hint in typing.get_type_hints(TrainConfig).items()
                if type(None) in typing.get_args(hint)} | {"dataset_path"}
    words, nulls = [], {}
    for key, value in data.items():
        if value is None:
            if key not in optional:
                raise ConfigError(f"--config {path}: {key} needs a value (null given)")
            nulls[key] = None
        elif isinstance(value, (dict, list)):
            raise ConfigError(f"--config {path}: {key} takes one value, not a {type(value).__name__}")
        else:
            words.append(f"--{key}={str(value).lower() if isinstance(value, bool) else value}")
    return words, nulls


class HelpFormatter(argparse.HelpFormatter):
    """Shows a default once: not when the help text already says what it is, nor when it is None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if isinstance(action, argparse._StoreFalseAction):
            return text
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


def build_parser() -> argparse.ArgumentParser:
    """The CLI: every `TrainConfig` field, ``--config`` and the earlier scripts' ``--dataset_path``."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str) -> None:  # argparse prints usage too; one line is clearer
            raise ConfigError(f"{message} (see --help)")

        def parse_args(self, args: Optional[list[str]] = None, namespace: Any = None) -> argparse.Namespace:
            parsed, unknown = self.parse_known_args(args, namespace)
            options = [word for word in unknown if word.startswith("-")]
            if options:
                raise ConfigError("; ".join(unknown_option_message(word) for word in options))
            if unknown:
                self.error(f"unrecognized arguments: {' '.join(unknown)}")
            return parsed

    parser = Parser(TrainConfig, description="Train a SNAC codec with accelerate.", formatter_class=HelpFormatter)
    for action in parser._actions:  # HfArgumentParser gives a `--no_X` the help text of `--X`
        if isinstance(action, argparse._StoreFalseAction):
            action.help = NO_OPTION_HELP.get(action.dest, f"Turn --{action.dest} off.")
    parser.add_argument("--config", default=None, help="YAML or JSON file of options; CLI options override it.")
    parser.add_argument("--check_only", action="store_true",
                        help="Check the options and the files they name, then exit (0: the run would start).")
    parser.add_argument("--dataset_path", default=None,
                        help="Alias of the earlier SNAC training scripts: a folder of audio files (as "
                             "--train_data_dir), a saved or parquet dataset folder or a Hub id (as --dataset_name).")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    """CLI -> TrainConfig. ``--config FILE`` (YAML or JSON) sets values that CLI options override."""
    return parse_command(argv)[0]


def parse_command(argv: Optional[list[str]] = None) -> tuple[TrainConfig, bool]:
    """CLI -> (TrainConfig, whether ``--check_only`` asks to stop once the options are checked)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    finder.add_argument("--config", default=None)
    config_path = finder.parse_known_args(argv)[0].config
    words: list[str] = []
    if config_path:
        data = load_config_file(config_path)
        words, nulls = config_file_arguments(config_path, data)
        try:
            parser.parse_args(words)
        except ConfigError as err:
            raise ConfigError(f"--config {config_path}: {err}") from None
        parser.set_defaults(**nulls)
    namespace = vars(parser.parse_args(words + argv))
    namespace.pop("config")
    check_only = namespace.pop("check_only")
    dataset_path = namespace.pop("dataset_path")
    config = TrainConfig(**namespace, dataset_path=dataset_path)
    config.apply_dataset_preset()
    config.validate()
    return config, check_only


def create_training_config(**options: Any) -> TrainConfig:
    """A checked `TrainConfig` from keyword options, under the earlier SNAC training scripts' name.

    Takes every CLI option name plus the earlier ``dataset_path`` and ``batch_size``; another earlier
    name (``num_epochs``, ``segment_length``...) is refused in one line naming the option to use.
    """
    known = set(known_options()) - {"config"}
    unknown = [name for name in options if name not in known]
    if unknown:
        raise ConfigError("; ".join(unknown_option_message(name) for name in unknown))
    config = TrainConfig(**options)
    config.apply_dataset_preset()
    config.validate()
    return config
