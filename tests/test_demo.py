"""The demo run (`./launch.sh`, options in snac_accel/demo_data/demo.yaml): it trains the whole GAN, and its
validation computes the perceptual metrics when `--quality_metrics_steps` says so."""

from __future__ import annotations

from pathlib import Path

from snac_accel.arguments import parse_args
from snac_accel.trainer import SnacTrainer

from .conftest import tiny_config
from .helpers import differences, record_steps, training_state

DEMO_YAML = Path(__file__).resolve().parents[1] / "snac_accel" / "demo_data" / "demo.yaml"


def test_the_demo_discriminators_update_during_its_step_schedule(tmp_path, demo_dir):
    # The demo's own options; only what does not touch the GAN schedule is made cheaper here.
    config = parse_args(["--config", str(DEMO_YAML), "--output_dir", str(tmp_path), "--report_to", "none",
                         "--validation_data_dir", str(demo_dir / "real_speech"), "--max_validation_clips", "2",
                         "--quality_metrics_steps", "-1", "--dataloader_num_workers", "0", "--codebook_init", "none",
                         "--train_batch_size", "2", "--segment_seconds", "0.5", "--checkpointing_steps", "0"])
    assert config.recipe == "cpu" and config.train_data_dir.endswith("train")
    assert 0 < config.disc_start <= config.max_train_steps * 2 // 3  # on for a third of the steps at least
    start = config.disc_start
    config.max_train_steps = start + 2  # the two updates around the discriminators' start, then two with them
    trainer = SnacTrainer(config)
    trainer.state.step = start - 2  # as a run resumed two updates before the GAN starts
    snapshots = record_steps(trainer)
    trainer.fit()
    snapshots.append(training_state(trainer))
    assert [s["step"] for s in snapshots] == [start - 2, start - 1, start, start + 1, start + 2]
    changed = [bool(differences(a["discriminator"], b["discriminator"])) for a, b in zip(snapshots, snapshots[1:])]
    assert changed == [False, False, True, True]
    assert all(differences(a["generator"], b["generator"]) for a, b in zip(snapshots, snapshots[1:]))


def test_quality_metrics_every_nth_validation_and_at_the_last(tmp_path, demo_dir):
    config = tiny_config(tmp_path, validation_data_dir=str(demo_dir / "real_speech"), max_train_steps=4,
                         validation_steps=1, quality_metrics_steps=2, max_validation_clips=2, validation_seconds=2.5,
                         train_batch_size=2, checkpointing_steps=0, codebook_init="none")
    trainer = SnacTrainer(config)
    seen = []
    validator = trainer.validator

    def spy(model, step, quality=False):
        metrics = validator(model, step, quality)
        seen.append((step, sorted(k for k in metrics if k in ("val/visqol", "val/pesq_wb", "val/stoi"))))
        return metrics

    trainer.validator = spy
    final = trainer.fit()
    perceptual = ["val/pesq_wb", "val/stoi", "val/visqol"]
    assert seen == [(1, []), (2, perceptual), (3, []), (4, perceptual)]
    card = (final / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith(f"| {tmp_path.name} |"))
    assert "(speech)" in row and " - |" not in row  # every figure of the paper row measured
