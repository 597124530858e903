"""Options: config-file problems are one `error:` line with exit 2, and the earlier SNAC scripts' spellings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from snac_accel.arguments import parse_args
from snac_accel.config import ConfigError

DEMO = Path(__file__).resolve().parents[1] / "snac_accel" / "demo_data"

CONFIG_FILES = {
    "missing": (None, "no such file"),
    "folder": ("<folder>", "is a folder"),
    "latin1.yaml": (b"preset: tin\xff\n", "is not UTF-8 text"),
    "malformed.yaml": ("preset: tiny\n  seed: [1\n", "is not valid YAML: mapping values are not allowed here at line 2"),
    "malformed.json": ('{"preset": "tiny",}', "is not valid JSON: Expecting property name enclosed in double quotes "
                                               "at line 1, column 19"),
    "list.yaml": ("- preset\n- tiny\n", "must hold a mapping of option names to values"),
    "unknown.yaml": ("presett: tiny\n", "unknown option --presett; did you mean --preset?"),
    "type.yaml": ("train_batch_size: four\n", "invalid int value: 'four'"),
    "float_for_int.json": ('{"max_train_steps": 2.5}', "invalid int value: '2.5'"),
    "two_values.yaml": ("train_batch_size: [4, 8]\n", "train_batch_size takes one value, not a list"),
    "choice.yaml": ("preset: snac_99khz\n", "invalid choice: 'snac_99khz'"),
    "null.yaml": ("seed: null\n", "seed needs a value (null given)"),
}


@pytest.mark.parametrize("name", list(CONFIG_FILES))
def test_config_file_problem_is_one_error_line(tmp_path, name):
    content, message = CONFIG_FILES[name]
    path = tmp_path / name
    if content == "<folder>":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    # parse_args is what the CLI runs first; its ConfigError becomes the `error:` line (next test).
    with pytest.raises(ConfigError) as refused:
        parse_args(["--config", str(path), "--train_data_dir", str(DEMO / "train"), "--output_dir", str(out)])
    err = str(refused.value)
    assert "\n" not in err and err.startswith(f"--config {path}") and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("name", ["missing", "malformed.yaml", "type.yaml"])
def test_config_file_problem_exits_2_from_the_command_line(tmp_path, name):
    # In a subprocess: importing snac_accel.train here would shadow the package's train() function.
    content, message = CONFIG_FILES[name]
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    result = subprocess.run([sys.executable, "-m", "snac_accel.train", "--config", str(path), "--output_dir",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --config {path}") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_config_file_values_null_and_cli_override(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"train_data_dir": "%s", "train_batch_size": 3, "target_loudness": null, "streaming": false,'
                    ' "learning_rate": "1e-3", "batch_size": 5}' % (DEMO / "train"))
    config = parse_args(["--config", str(path), "--seed", "7"])
    assert (config.train_batch_size, config.target_loudness, config.learning_rate, config.seed) == (5, None, 1e-3, 7)
    assert parse_args(["--config", str(path), "--train_batch_size", "2"]).train_batch_size == 2


def test_batch_size_is_an_alias_of_train_batch_size():
    config = parse_args(["--train_data_dir", str(DEMO / "train"), "--batch_size", "3"])
    assert config.train_batch_size == 3


def test_dataset_path_routes_folders_of_audio_saved_datasets_and_hub_ids(tmp_path):
    audio = parse_args(["--dataset_path", str(DEMO / "train")])
    assert (audio.train_data_dir, audio.dataset_name) == (str(DEMO / "train"), None)

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"audio": [str(DEMO / "train" / "clip_000.flac")]}).save_to_disk(str(saved))
    parquet = tmp_path / "parquet"
    (parquet / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"x": [1]}).to_parquet(str(parquet / "data" / "train-00000-of-00001.parquet"))
    for folder in (saved, parquet):
        config = parse_args(["--dataset_path", str(folder)])
        assert (config.dataset_name, config.train_data_dir) == (str(folder), None)

    hub = parse_args(["--dataset_path", "keithito/lj_speech", "--train_data_dir", str(DEMO / "train")])
    assert (hub.dataset_name, hub.train_data_dir) == ("keithito/lj_speech", str(DEMO / "train"))
    with pytest.raises(ConfigError, match="--dataset_path ./no/such/folder is not a folder"):
        parse_args(["--dataset_path", "./no/such/folder"])


def test_help_shows_the_aliases():
    out = subprocess.run([sys.executable, "-m", "snac_accel.train", "--help"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert "--batch_size TRAIN_BATCH_SIZE" in out
    assert "--dataset_path DATASET_PATH" in out and "--log_level" in out


# The published recipes, written out by hand from the SNAC paper (arXiv 2410.14411, sec. 4) and DAC's
# conf/final: the reference the presets' defaults must equal, not a copy of config.RECIPES.
PUBLISHED = {
    "snac": dict(learning_rate=6e-4, lr_gamma=0.999994, max_grad_norm=0.0, train_batch_size=16, segment_seconds=0.8),
    "dac": dict(learning_rate=1e-4, lr_gamma=0.999996, max_grad_norm=1000.0, disc_max_grad_norm=10.0,
                train_batch_size=72, segment_seconds=0.38),
}


@pytest.mark.parametrize("argv,recipe", [(["--preset", "snac_24khz"], "snac"), (["--preset", "snac_44khz"], "snac"),
                                         (["--preset", "snac_24khz", "--recipe", "dac"], "dac")])
def test_snac_presets_train_with_the_published_recipe_and_dac_is_one_option(argv, recipe):
    config = parse_args(["--train_data_dir", str(DEMO / "train"), *argv])
    assert config.recipe == recipe
    assert {key: getattr(config, key) for key in PUBLISHED[recipe]} == PUBLISHED[recipe]


def test_an_option_given_beats_the_recipe():
    config = parse_args(["--train_data_dir", str(DEMO / "train"), "--preset", "snac_24khz", "--learning_rate", "2e-4",
                         "--max_grad_norm", "1.0", "--dead_code_steps", "0"])
    assert (config.learning_rate, config.max_grad_norm, config.lr_gamma) == (2e-4, 1.0, 0.999994)
    assert config.dead_code_steps == 0
