"""Parsing of the training options: the command line, ``--config`` files (YAML or JSON) and the
spellings of the earlier SNAC training scripts, each problem refused in one ``error:`` line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import ConfigError, TrainConfig


# Spellings of the earlier SNAC training scripts. `--batch_size` is an argparse alias of
# `--train_batch_size`; `--dataset_path` names either kind of source and is routed by `route_dataset_path`.
LEGACY_OPTIONS = ("batch_size", "dataset_path")
# Files that make a local folder a `datasets` dataset rather than a folder of audio files.
DATASET_FOLDER_FILES = ("state.json", "dataset_dict.json", "dataset_info.json")
DATASET_FOLDER_SUFFIXES = (".parquet", ".arrow")


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
    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(LEGACY_OPTIONS)
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise ConfigError(f"--config {path} has unknown options {unknown}; see --help for the names")
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


def route_dataset_path(value: str) -> tuple[str, str]:
    """`--dataset_path` -> ('dataset_name' | 'train_data_dir', value).

    A Hub id or a `datasets` folder (save_to_disk, parquet, arrow) goes to ``--dataset_name``; any
    other local folder is taken as a folder of audio files (``--train_data_dir``).
    """
    folder = Path(value).expanduser()
    if folder.is_dir():
        tops = [folder, *(p for p in folder.iterdir() if p.is_dir())]
        if any((top / name).is_file() for top in tops for name in DATASET_FOLDER_FILES) or any(
                p.suffix in DATASET_FOLDER_SUFFIXES for p in folder.rglob("*")):
            return "dataset_name", value
        return "train_data_dir", value
    looks_local = value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.sep != "/" and os.sep in value
    if folder.exists() or looks_local:
        raise ConfigError(f"--dataset_path {value} is not a folder; give a folder of audio files, a saved "
                          "dataset folder or a Hub dataset id")
    return "dataset_name", value


def build_parser() -> argparse.ArgumentParser:
    """The CLI: every `TrainConfig` field, ``--config`` and the earlier scripts' ``--dataset_path``."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str) -> None:  # argparse prints usage too; one line is clearer
            raise ConfigError(f"{message} (see --help)")

    parser = Parser(TrainConfig, description="Train a SNAC codec with accelerate.")
    parser.add_argument("--config", default=None, help="YAML or JSON file of options; CLI options override it.")
    parser.add_argument("--dataset_path", default=None,
                        help="Alias of the earlier SNAC training scripts: a folder of audio files (as "
                             "--train_data_dir), a saved or parquet dataset folder or a Hub id (as --dataset_name).")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    """CLI -> TrainConfig. ``--config FILE`` (YAML or JSON) sets values that CLI options override."""
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
    dataset_path = namespace.pop("dataset_path")
    for entry in [p.strip() for p in (dataset_path or "").split(",") if p.strip()]:
        option, value = route_dataset_path(entry)
        namespace[option] = ",".join(filter(None, [namespace[option], value]))
    config = TrainConfig(**namespace)
    config.apply_dataset_preset()
    config.validate()
    return config
