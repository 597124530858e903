"""A new user's first run, as they meet it: a plain install, the first command, and each mistake
answered in one line that says what to do (issue 20)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import snac
import torch

from snac_accel import train as snac_train
from snac_accel import train_main

from .conftest import DEMO, tiny_config

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600
            ) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> Path:
    """`pip install` of the built wheel (its dependencies are the suite's own venv) into a folder of its own."""
    work = tmp_path_factory.mktemp("wheel")
    built = run_cli([PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work),
                     str(ROOT)], cwd=work)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(work.glob("snac_accel-*.whl"))
    target = work / "site"
    installed = run_cli([PYTHON, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                        cwd=work)
    assert installed.returncode == 0, installed.stderr[-2000:]
    return target


def test_the_wheel_ships_the_default_tracker_the_accelerate_configs_and_the_console_scripts(wheel_install):
    wheel = next(wheel_install.parent.glob("snac_accel-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    # --report_to defaults to tensorboard: it installs with the package, not only with an extra.
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert any(line.split()[1].startswith("tensorboard") and "extra ==" not in line for line in requires), requires
    for name in ("cpu", "single_gpu", "multi_gpu", "multi_node"):
        assert f"snac_accel/accelerate_configs/{name}.yaml" in names
    for script in ("snac-accel-train", "snac-accel-config", "snac-accel-export", "snac-accel-evaluate",
                   "snac-accel-encode", "snac-accel-decode"):
        assert f"{script} = " in entry_points, script


def test_a_plain_install_finds_its_configs_by_name_and_trains_from_any_folder(wheel_install, tmp_path):
    """Outside the clone, with the installed package only: the README's pip quick start."""
    env = {"PYTHONPATH": str(wheel_install), "PATH": f"{wheel_install / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    found = run_cli([PYTHON, "-c", "import snac_accel, sys; sys.stdout.write(snac_accel.__file__)"], tmp_path, env)
    assert found.stdout.startswith(str(wheel_install)), found.stdout  # the wheel's copy, not the clone's
    config = run_cli(["snac-accel-config", "cpu"], tmp_path, env)
    assert config.returncode == 0 and Path(config.stdout.strip()).is_file()
    assert Path(config.stdout.strip()).is_relative_to(wheel_install)
    assert "MULTI_GPU" in Path(config.stdout.strip()).read_text()
    unknown = run_cli(["snac-accel-config", "gpu"], tmp_path, env)
    assert unknown.returncode == 2 and unknown.stderr.strip().count("\n") == 0 and "cpu" in unknown.stderr
    out = tmp_path / "first"
    # The default tracker (tensorboard), default recipe and options: only the run's length is shortened.
    first = run_cli(["snac-accel-train", "--dataset", "demo", "--output_dir", str(out), "--max_train_steps", "2",
                     "--segment_seconds", "0.5", "--checkpointing_steps", "0"], tmp_path, env)
    assert first.returncode == 0, first.stderr[-3000:]
    log = first.stderr
    assert "Traceback" not in log and "FutureWarning" not in log, log[-3000:]
    assert "training tiny (" in log and "36 clips" in log and "recipe cpu" in log and "2 updates" in log
    assert log.count("done: ") == 1
    assert any((out / "logs").rglob("events.out.tfevents.*"))
    assert snac.SNAC.from_pretrained(str(out / "final")).codebook_size == 256


def one_line_error(argv: list[str], capsys) -> str:
    from snac_accel.train import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_mistakes_are_one_line_that_says_what_to_do(tmp_path, capsys, monkeypatch):
    demo = ["--dataset", "demo", "--max_train_steps", "1", "--report_to", "none"]
    err = one_line_error(["--batchsize", "2", *demo], capsys)
    assert "unknown option --batchsize; did you mean --batch_size or --train_batch_size?" in err
    err = one_line_error(["--num_epochs", "2", *demo], capsys)
    assert "--num_epochs is not an option here; use --num_train_epochs" in err
    config = tmp_path / "old.yaml"
    config.write_text("segment_length: 24000\nbatch_size: 2\n")
    err = one_line_error(["--config", str(config), *demo], capsys)
    assert f"--config {config}: --segment_length is not an option here; use --segment_seconds" in err
    a_file = tmp_path / "taken"
    a_file.write_text("")
    err = one_line_error([*demo, "--output_dir", str(a_file)], capsys)
    assert f"--output_dir {a_file} is a file; give a folder" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = one_line_error([*demo, "--output_dir", str(tmp_path / "ft"), "--init_from", "hubertsiuzdak/snac_24khz"],
                         capsys)
    assert "--init_from hubertsiuzdak/snac_24khz is not a local folder and the Hub cannot be reached" in err
    assert "hf download hubertsiuzdak/snac_24khz --local-dir DIR" in err


def test_launch_sh_refuses_bad_options_in_one_line_before_accelerate_starts(tmp_path):
    """accelerate's launcher would turn the trainer's exit 2 into 1 (and, without --quiet, a traceback)."""
    result = run_cli(["./launch.sh", "train", "--accelerate-config", "cpu", "--dataset", "demo", "--batchsize", "2"],
                     ROOT, {"VENV": str(Path(PYTHON).parents[1])})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: unknown option --batchsize; did you mean --batch_size or --train_batch_size?"], result.stderr


def test_train_is_the_training_function_even_after_the_cli_module_is_imported():
    import snac_accel
    import snac_accel.train  # noqa: F401  the CLI module: importing it sets the package's attribute `train`
    from snac_accel import train

    assert callable(train) and callable(snac_accel.train)


def test_help_shows_each_default_once_and_the_no_option_says_what_it_does(capsys):
    from snac_accel.arguments import build_parser

    text = build_parser().format_help()
    assert "(default: None)" not in text and "(default: the recipe's). (default" not in text
    assert "Model preset. (default: tiny)" in " ".join(text.split())
    flat = " ".join(text.split())
    assert "--no_export_use_ema, --no-export-use-ema Export the generator's own weights, not the EMA's" in flat


def test_a_folder_whose_first_file_is_broken_trains(tmp_path):
    """Three files, the first sorted one broken: the pre-flight check once probed row 0 alone and refused."""
    folder = tmp_path / "three"
    folder.mkdir()
    (folder / "a_broken.flac").write_bytes(b"not audio at all")
    for clip in sorted((DEMO / "train").glob("*.flac"))[:2]:
        shutil.copy(clip, folder / clip.name)
    final = snac_train(tiny_config(tmp_path / "run", train_data_dir=str(folder), train_batch_size=2,
                                   max_train_steps=1, checkpointing_steps=0))
    assert snac.SNAC.from_pretrained(str(final)).codebook_size == 256


def test_clips_shorter_than_an_excerpt_are_named_before_training(caplog):
    from snac_accel.data import AudioClips, ExcerptSpec, check_source, files_dataset, list_audio_files

    spec = ExcerptSpec(sample_rate=24000, length=24000 * 30)  # 30 s excerpts of clips of a few seconds
    clips = AudioClips([files_dataset(list_audio_files(DEMO / "validation"))], spec, train=False, names=["val"])
    with caplog.at_level(logging.WARNING):
        check_source(clips, "training")
    assert "mostly zero padding" in caplog.text and "--segment_seconds" in caplog.text
    caplog.clear()
    short = AudioClips([files_dataset(list_audio_files(DEMO / "validation"))], ExcerptSpec(24000, 12000),
                       train=False, names=["val"])
    with caplog.at_level(logging.WARNING):
        check_source(short, "training")
    assert "zero padding" not in caplog.text


def test_the_seed_api_trains_without_validation_data_and_holds_clips_out(tmp_path):
    """The earlier scripts' Python names, a folder given as dataset_path and no validation data: a few
    training clips are held out, so the run still has metrics, figures and best/."""
    from snac_accel import TrainConfig, create_training_config
    from snac_accel.data import AudioDataset
    from snac_accel.discriminators import MultiPeriodDiscriminator
    from snac_accel.losses import MultiScaleMelLoss, mel_spectrogram_loss

    assert TrainConfig(batch_size=2, dataset_path=str(DEMO / "train")).train_batch_size == 2
    config = create_training_config(dataset_path=str(DEMO / "train"), batch_size=2, max_train_steps=2,
                                    segment_seconds=0.5, output_dir=str(tmp_path / "run"), report_to="none",
                                    checkpointing_steps=0, dataloader_num_workers=0, validation_split=0.1)
    assert config.train_data_dir == str(DEMO / "train") and config.validation_data_dir is None
    final = train_main(config)
    out = tmp_path / "run"
    assert snac.SNAC.from_pretrained(str(final)).codebook_size == 256
    assert (out / "best" / "config.json").is_file() and (final / "spectrogram.png").is_file()
    card = (final / "README.md").read_text()
    assert "- Validation: 4 of the 36 training clips, held out and never trained on" in card
    assert "val/mel_distance" in card or "mel distance" in card.lower()
    with pytest.raises(Exception, match="use --num_train_epochs"):
        create_training_config(dataset_path=str(DEMO / "train"), num_epochs=3)
    items = AudioDataset(str(DEMO / "train"), segment_seconds=0.5)
    assert len(items) == 36 and items[0].shape == (1, 12000)
    audio = items[0][None]
    features = MultiPeriodDiscriminator(channels=4, max_channels=16)(audio)
    assert len(features) == 5  # the five periods, no STFT discriminators
    noisy = audio + 0.05 * torch.randn_like(audio)
    torch.testing.assert_close(mel_spectrogram_loss(noisy, audio), MultiScaleMelLoss(24000)(noisy, audio))
    assert float(mel_spectrogram_loss(audio, audio)) == 0.0


def test_held_out_clips_are_never_trained_on_and_the_same_on_every_call(tmp_path):
    from snac_accel.data import run_sources

    config = tiny_config(tmp_path, validation_data_dir=None, validation_split=0.1)
    first, again = run_sources(config), run_sources(config)
    held = [row["audio"]["path"] for _, ds in first.validation for row in ds]
    trained = [row["audio"]["path"] for _, ds in first.train for row in ds]
    assert len(held) == 4 and len(trained) == 32 and not set(held) & set(trained)
    assert held == [row["audio"]["path"] for _, ds in again.validation for row in ds]
    off = run_sources(tiny_config(tmp_path, validation_data_dir=None, validation_split=0.0))
    assert off.validation == [] and sum(len(ds) for _, ds in off.train) == 36
    given = run_sources(tiny_config(tmp_path))  # validation data given: nothing held out
    assert given.held_out is None and sum(len(ds) for _, ds in given.train) == 36


def test_exported_weights_are_readable_by_all(tmp_path):
    from snac_accel.hub import save_pretrained
    from snac_accel.model import build_generator
    from snac_accel.presets import MODEL_PRESETS

    folder = save_pretrained(build_generator(MODEL_PRESETS["tiny"]), tmp_path / "codec")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "pytorch_model.bin", "config.json"):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
