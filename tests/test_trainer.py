"""SnacTrainer: the GAN step, accumulation, precision, EMA, faults, exact resume and signals."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from snac_accel.arguments import parse_args
from snac_accel.config import ConfigError
from snac_accel.checkpoints import list_checkpoints, resolve_resume_path
from snac_accel.step import NonFiniteError
from snac_accel.trainer import SnacTrainer

from .conftest import tiny_config
from .helpers import (all_finite, assert_identical, clone, custom_states, differences, optimizer_states, record_steps,
                      training_state)


def weights(checkpoint: Path, index: int = 0) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if index == 0 else f"model_{index}.safetensors"
    return load_file(checkpoint / name)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_accumulated_batches_of_two_equal_one_batch_of_four(tmp_path):
    # adam_epsilon 1 makes AdamW's first update ~ lr * gradient: float-level gradient differences stay
    # float-level in the weights instead of being blown up by g / |g| for near-zero gradients.
    common = dict(max_train_steps=1, segment_seconds=0.25, checkpointing_steps=1, learning_rate=1e-2,
                  adam_epsilon=1.0, validation_data_dir=None)
    # Adversarial terms off: with them on, the second micro-batch's generator pass would see a
    # discriminator updated after the first (inherent to accumulating a GAN), so only D is compared.
    SnacTrainer(tiny_config(tmp_path / "acc", train_batch_size=2, gradient_accumulation_steps=2,
                            disc_start=10, **common)).fit()
    SnacTrainer(tiny_config(tmp_path / "big", train_batch_size=4, disc_start=10, **common)).fit()
    a = weights(tmp_path / "acc/checkpoints/checkpoint_1")
    b = weights(tmp_path / "big/checkpoints/checkpoint_1")
    init = SnacTrainer(tiny_config(tmp_path / "init", **common)).unwrapped_generator.state_dict()
    moved = max_difference(a, {k: v for k, v in init.items() if k in a})
    assert moved > 1e-5  # the step did change the weights
    assert max_difference(a, b) < 1e-3 * moved

    SnacTrainer(tiny_config(tmp_path / "acc_d", train_batch_size=2, gradient_accumulation_steps=2, **common)).fit()
    SnacTrainer(tiny_config(tmp_path / "big_d", train_batch_size=4, **common)).fit()
    d_a = weights(tmp_path / "acc_d/checkpoints/checkpoint_1", 1)
    d_b = weights(tmp_path / "big_d/checkpoints/checkpoint_1", 1)
    assert max_difference(d_a, d_b) < 1e-7


def test_discriminator_gets_no_gradient_from_the_generator_pass(tmp_path):
    trainer = SnacTrainer(tiny_config(tmp_path, train_batch_size=2, gradient_accumulation_steps=2,
                                      segment_seconds=0.25))
    trainer.sampler.set_epoch(0)
    real = next(iter(trainer.train_loader))["audio"]
    trainer.train_step(real)  # first micro-batch: no optimizer step, gradients stay in .grad
    got = {n: p.grad.clone() for n, p in trainer.discriminator.named_parameters()}
    trainer.discriminator.zero_grad()
    with torch.no_grad():
        fake = trainer.generator(real).audio
    loss = trainer.disc_loss(trainer.discriminator(real), trainer.discriminator(fake)) / 2
    loss.backward()
    for name, param in trainer.discriminator.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    trainer = SnacTrainer(tiny_config(tmp_path, mixed_precision="bf16", max_train_steps=2, segment_seconds=0.25,
                                      train_batch_size=2, checkpointing_steps=0, validation_data_dir=None))
    convs = {"generator": next(m for m in trainer.unwrapped_generator.encoder.modules() if isinstance(m, nn.Conv1d)),
             "discriminator": next(m for m in trainer.discriminator.modules() if isinstance(m, nn.Conv2d))}
    seen: dict[str, set] = {name: set() for name in convs}
    in_step = []  # only the training steps: codebook seeding before them encodes in float32 on purpose

    def record(name: str, output: torch.Tensor) -> None:
        if in_step:
            seen[name].add(output.dtype)

    for name, conv in convs.items():  # the period discriminator's first conv: its STFT branch stays float32
        conv.register_forward_hook(lambda module, args, output, name=name: record(name, output))
    real_step = trainer.train_step

    def step(real: torch.Tensor) -> dict:
        in_step.append(True)
        try:
            return real_step(real)
        finally:
            in_step.clear()

    trainer.train_step = step
    start = clone(trainer.unwrapped_generator.state_dict())
    final = trainer.fit()
    assert seen == {"generator": {torch.bfloat16}, "discriminator": {torch.bfloat16}}
    exported = load_file(final / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in exported.values())
    assert all(v.dtype == torch.float32 for v in exported.values())
    assert max_difference(exported, start) > 1e-6  # the bf16 steps did train


def test_ema_is_exported_and_differs_from_raw_weights(tmp_path):
    decay = 0.5
    trainer = SnacTrainer(tiny_config(tmp_path, ema_decay=decay, max_train_steps=3, segment_seconds=0.25,
                                      train_batch_size=2, checkpointing_steps=0))
    before_step = record_steps(trainer)
    final = trainer.fit()
    # The raw weights after each update; the EMA copies the first (torch's AveragedModel), then
    # ema <- decay * ema + (1 - decay) * raw.
    raw = [s["generator"] for s in before_step[1:]] + [clone(trainer.unwrapped_generator.state_dict())]
    expected = raw[0]
    for update in raw[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * update[k] for k in expected}
    exported = load_file(final / "model.safetensors")
    assert exported.keys() == expected.keys()
    for name, value in exported.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert max_difference(exported, raw[-1]) > 1e-6 and max_difference(raw[0], raw[-1]) > 1e-6
    assert (tmp_path / "checkpoints/checkpoint_3").is_dir()


def without_step(snapshot: dict) -> dict:
    return {k: v for k, v in snapshot.items() if k != "step"}


def test_non_finite_updates_are_skipped_then_stop_with_checkpoint_intact(tmp_path):
    trainer = SnacTrainer(tiny_config(tmp_path, max_train_steps=3, segment_seconds=0.25, checkpointing_steps=3,
                                      train_batch_size=2, max_nonfinite_steps=3, validation_data_dir=None))
    before_step = record_steps(trainer)
    recorded_step = trainer.train_step
    batches = []

    def second_batch_nan(real: torch.Tensor) -> dict:
        batches.append(real)
        return recorded_step(torch.full_like(real, float("nan")) if len(batches) == 2 else real)

    trainer.train_step = second_batch_nan
    trainer.fit()
    # One NaN batch: its update is skipped (weights, Adam moments, schedules untouched), the next one trains.
    after = training_state(trainer)
    assert_identical(without_step(before_step[1]), without_step(before_step[2]), "state over the NaN batch")
    assert differences(without_step(before_step[0]), without_step(before_step[1]))  # the first update did move
    assert trainer.state.skipped_updates == {"generator": 1, "discriminator": 1}
    assert trainer.state.nonfinite_in_row == {"generator": 0, "discriminator": 0} and trainer.state.step == 3
    assert differences(without_step(before_step[2]), without_step(after))  # and training went on
    assert all_finite(after)

    before = weights(tmp_path / "checkpoints/checkpoint_3")
    with torch.no_grad():  # a diverged generator: every loss is NaN from here on
        for param in trainer.unwrapped_generator.decoder.parameters():
            param.fill_(float("nan"))
    diverged = training_state(trainer)
    trainer.max_steps = 20
    with pytest.raises(NonFiniteError, match="3 non-finite updates in a row"):
        trainer.fit()
    assert trainer.state.skipped_updates == {"generator": 4, "discriminator": 4}
    assert_identical(without_step(diverged), without_step(training_state(trainer)), "state over skipped updates")
    assert all_finite(diverged["discriminator"]) and all_finite(diverged["opt_d"])
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [3]
    assert max_difference(before, weights(tmp_path / "checkpoints/checkpoint_3")) == 0


def test_resume_mid_epoch_is_bit_identical(tmp_path):
    # 36 clips / batch 4 = 9 batches per epoch: the cut at 5 is mid-epoch, the run crosses an epoch.
    # EMA and dead-code restarts are on: their states must come back exactly as well.
    common = dict(segment_seconds=0.25, checkpointing_steps=5, model_noise=True, quantizer_dropout=0.5,
                  ema_decay=0.9, dead_code_steps=2)
    SnacTrainer(tiny_config(tmp_path / "straight", max_train_steps=10, **common)).fit()
    SnacTrainer(tiny_config(tmp_path / "cut", max_train_steps=5, **common)).fit()
    resumed = SnacTrainer(tiny_config(tmp_path / "cut", max_train_steps=10, resume_from_checkpoint="latest",
                                      **common))
    resumed.fit()
    assert resumed.state.epoch == 1
    straight, cut = tmp_path / "straight/checkpoints/checkpoint_10", tmp_path / "cut/checkpoints/checkpoint_10"
    for index in (0, 1):
        a, b = weights(straight, index), weights(cut, index)
        assert all(torch.equal(a[k], b[k]) for k in a), f"model_{index} differs after resume"
    assert_identical(optimizer_states(straight), optimizer_states(cut), "optimizer state")
    a, b = custom_states(straight), custom_states(cut)
    assert a["restarter"]["restarted"].sum() > 0  # codes were re-seeded, some after the cut
    assert a["restarter"]["restarted"].sum() > custom_states(tmp_path / "cut/checkpoints/checkpoint_5")[
        "restarter"]["restarted"].sum()
    assert a["ema"]["n_averaged"] == 10
    for part in ("restarter", "ema", "schedulers"):
        assert_identical(a[part], b[part], part)


def test_kill_during_save_leaves_latest_on_the_last_complete_checkpoint(tmp_path):
    trainer = SnacTrainer(tiny_config(tmp_path, max_train_steps=2, segment_seconds=0.25, checkpointing_steps=2))
    trainer.fit()

    def killed_midway(output_dir, **kwargs):  # the process dies after writing part of the files
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    trainer.accelerator.save_state = killed_midway
    trainer.state.step = 4
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    latest = resolve_resume_path(tiny_config(tmp_path, resume_from_checkpoint="latest"))
    assert latest == tmp_path / "checkpoints/checkpoint_2"
    resumed = SnacTrainer(tiny_config(tmp_path, max_train_steps=3, segment_seconds=0.25,
                                      resume_from_checkpoint="latest"))
    resumed.fit()
    assert resumed.state.step == 3


def test_checkpoints_total_limit_rotates(tmp_path):
    SnacTrainer(tiny_config(tmp_path, max_train_steps=4, segment_seconds=0.25, checkpointing_steps=1,
                            checkpoints_total_limit=2, validation_data_dir=None)).fit()
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [3, 4]


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    demo = Path(__file__).resolve().parents[1] / "snac_accel" / "demo_data"
    return [sys.executable, "-m", "snac_accel.train", "--preset", "tiny", "--train_data_dir", str(demo / "train"),
            "--output_dir", str(tmp_path), "--train_batch_size", "2", "--segment_seconds", "0.25",
            "--report_to", "none", "--dataloader_num_workers", "0", "--checkpointing_steps", "2", *extra]


def _training_past_its_first_checkpoint(tmp_path: Path) -> subprocess.Popen:
    """A long CLI run, returned once checkpoint_2 is written: a signal then lands mid-training."""
    proc = subprocess.Popen(_cli(tmp_path, "--max_train_steps", "100000"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "checkpoints" / "checkpoint_2").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_preemption_signal_checkpoints_exits_zero_and_resumes(tmp_path, signum):
    proc = _training_past_its_first_checkpoint(tmp_path)
    sent = time.monotonic()
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert time.monotonic() - sent < 60
    step = list_checkpoints(tmp_path / "checkpoints")[-1][0]
    assert step >= 2 and f"signal {signal.Signals(signum).name}" in output
    resumed = subprocess.run(_cli(tmp_path, "--max_train_steps", str(step + 1), "--resume_from_checkpoint", "latest"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {step} " in resumed.stderr
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert list_checkpoints(tmp_path / "checkpoints")[-1][0] == step + 1


def test_config_file_with_cli_overrides_and_effective_config(tmp_path, trained_run):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("preset: tiny\ntrain_batch_size: 3\nmax_train_steps: 5\ntrain_data_dir: "
                        f"{tiny_config(tmp_path).train_data_dir}\n")
    config = parse_args(["--config", str(run_yaml), "--max_train_steps", "7"])
    assert (config.train_batch_size, config.max_train_steps, config.preset) == (3, 7, "tiny")
    effective = trained_run / "config.yaml"
    again = parse_args(["--config", str(effective)])
    assert again.max_train_steps == 30 and again.segment_seconds == 0.5
    # JSON too (tab-indented here, which a YAML parser refuses): nulls, booleans and floats come through.
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({"preset": "tiny", "train_data_dir": tiny_config(tmp_path).train_data_dir,
                                    "train_batch_size": 3, "ema_decay": 0.99, "model_noise": False,
                                    "max_train_steps": None, "num_train_epochs": 2}, indent="\t"))
    config = parse_args(["--config", str(run_json), "--train_batch_size", "5"])
    assert (config.train_batch_size, config.ema_decay, config.model_noise) == (5, 0.99, False)
    assert (config.max_train_steps, config.num_train_epochs) == (None, 2)
    (tmp_path / "bad.yaml").write_text("presett: tiny\n")
    with pytest.raises(ConfigError, match="unknown option --presett; did you mean --preset"):
        parse_args(["--config", str(tmp_path / "bad.yaml")])


@pytest.mark.parametrize("args,message", [
    (["--preset", "snac_99khz"], "invalid choice"),
    (["--logging_steps", "0"], "--logging_steps must be at least 1"),
    (["--resume_from_checkpoint", "."], "not a checkpoint folder"),
    (["--dataset_name", "{demo}", "--eval_split", "nosuchsplit"], "no split 'nosuchsplit'"),
])
def test_bad_options_are_refused_before_training(tmp_path, args, message):
    demo = Path(__file__).resolve().parents[1] / "snac_accel" / "demo_data"
    args = [a.replace("{demo}", str(demo)) for a in args]
    base = [sys.executable, "-m", "snac_accel.train", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    if "--dataset_name" not in args:
        base += ["--train_data_dir", str(demo / "train")]
    result = subprocess.run(base + args, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_tensorboard_gets_losses_codebook_stats_validation_and_media(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = SnacTrainer(tiny_config(tmp_path, dead_code_steps=2, max_train_steps=4, segment_seconds=0.25,
                                    checkpointing_steps=2, validation_steps=2, report_to="tensorboard",
                                    logging_steps=1))
    first.fit()
    saved = copy.deepcopy(first.restarter.state_dict())
    assert saved["restarted"].sum() > 0  # dead codes were re-seeded during the run
    assert_identical(custom_states(tmp_path / "checkpoints/checkpoint_4")["restarter"], saved, "saved restarter")
    resumed = SnacTrainer(tiny_config(tmp_path, dead_code_steps=2, max_train_steps=5, segment_seconds=0.25,
                                      resume_from_checkpoint="latest", report_to="none"))
    start = record_steps(resumed)
    resumed.fit()
    assert resumed.state.step == 5 and start[0]["step"] == 4
    assert_identical(start[0]["restarter"], saved, "restarter after resume")
    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*"))), size_guidance={"audio": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for level in range(3):
        assert {f"codebook/usage_level{level}", f"codebook/perplexity_level{level}",
                f"codebook/restarted_level{level}", f"loss/commitment_level{level}"} <= scalars
    assert {"loss/mel", "loss/discriminator", "loss/adversarial", "loss/feature_matching", "grad_norm/generator",
            "grad_norm/discriminator", "lr/generator", "data/wait_share", "data/bad_files",
            "perf/audio_seconds_per_second", "perf/peak_memory_gb", "val/mel_distance", "val/stft_distance",
            "val/si_sdr"} <= scalars
    usage = events.Scalars("codebook/usage_level0")
    assert [e.step for e in usage] == [1, 2, 3, 4] and all(0 < e.value <= 1 for e in usage)
    for level in range(3):  # every restart is logged once, at the step it happened
        logged = sum(e.value for e in events.Scalars(f"codebook/restarted_level{level}"))
        assert logged == saved["restarted"][level].item(), level
    assert [e.step for e in events.Scalars("val/mel_distance")] == [2, 4]
    assert "val/0/fake" in events.Tags()["audio"]
    assert {"val/0/spectrogram", "val/1/spectrogram", "val/codebook_usage"} <= set(events.Tags()["images"])
    figures = events.Images("val/0/spectrogram")
    assert [e.step for e in figures] == [2, 4] and (figures[0].width, figures[0].height) == (1000, 640)
    assert (tmp_path / "best" / "model.safetensors").is_file()


def _first_update(tmp_path: Path, precision: str, last_micro_batch_hook=None) -> SnacTrainer:
    """One optimizer update of two accumulated micro-batches, driven step by step.

    The discriminator's learning rate is 0, so whether its update is taken or skipped, the
    generator's last micro-batch sees the same critic: the generator's update then depends on its
    own gradients and on how they were scaled, nothing else.
    """
    trainer = SnacTrainer(tiny_config(tmp_path, mixed_precision=precision, gradient_accumulation_steps=2,
                                      train_batch_size=2, segment_seconds=0.25, learning_rate=1e-2, adam_epsilon=1.0,
                                      ema_decay=0.5, validation_data_dir=None))
    for group in trainer.opt_d.param_groups:
        group["lr"] = 0.0
    trainer.sampler.set_epoch(0)
    batches = iter(trainer.train_loader)
    trainer.train_step(next(batches)["audio"])
    hooks = last_micro_batch_hook(trainer) if last_micro_batch_hook else []
    trainer.train_step(next(batches)["audio"])
    for hook in hooks:
        hook.remove()
    return trainer


def _overflow(model: torch.nn.Module) -> list:
    """What an fp16 overflow leaves in a model's gradient: an inf (the loss itself stays finite)."""
    param = next(p for p in model.parameters() if p.requires_grad)
    return [param.register_hook(lambda grad: torch.full_like(grad, float("inf")))]


def test_fp16_scales_each_optimizer_on_its_own_with_accumulation(tmp_path):
    """A discriminator overflow on the last micro-batch must not change the generator's update.

    With one GradScaler for both optimizers, the discriminator's step halves the scale before the
    generator's last backward, and the generator's update becomes 2 * g_first + g_last.
    """
    reference = _first_update(tmp_path / "fp32", "no")
    start = SnacTrainer(tiny_config(tmp_path / "init", segment_seconds=0.25)).unwrapped_generator.state_dict()
    fp16 = _first_update(tmp_path / "fp16", "fp16", lambda trainer: _overflow(trainer.discriminator))

    want = reference.unwrapped_generator.state_dict()
    got = fp16.unwrapped_generator.state_dict()
    moved = max_difference(want, start)
    assert moved > 1e-4
    assert max_difference(got, want) < 1e-5 * moved  # scaled by 2**16 and back: equal to float precision
    assert fp16.scalers["discriminator"].get_scale() == 2.0**15  # it backed off ...
    assert fp16.scalers["generator"].get_scale() == 2.0**16  # ... and the generator's scale did not move

    # Booked apart: the generator stepped (its scheduler and the EMA follow), the discriminator did not,
    # and an fp16 back-off at a scale above 1 is the scaler's normal search, not a step towards the stop.
    state = fp16.state
    assert state.step == 1
    assert state.skipped_updates == {"generator": 0, "discriminator": 1}
    assert state.scaler_backoffs == {"generator": 0, "discriminator": 1}
    assert state.nonfinite_in_row == {"generator": 0, "discriminator": 0}
    assert (fp16.sched_g.last_epoch, fp16.sched_d.last_epoch) == (1, 0)
    assert fp16.ema.n_averaged.item() == 1


@pytest.mark.parametrize("fused", [False, True], ids=["host_check", "fused_found_inf"])
def test_discriminator_nonfinite_steps_are_booked_apart_and_stop_the_run(tmp_path, fused):
    # fused: AdamW's found_inf skips the step on the device (the GPU default); the booking is the same.
    trainer = SnacTrainer(tiny_config(tmp_path, train_batch_size=2, segment_seconds=0.25, max_nonfinite_steps=2,
                                      ema_decay=0.5, validation_data_dir=None, adam_fused=fused))
    trainer.sampler.set_epoch(0)
    batches = iter(trainer.train_loader)
    param = next(trainer.discriminator.parameters())
    hook = param.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    before_d = param.detach().clone()
    trainer.train_step(next(batches)["audio"])
    state = trainer.state
    assert state.skipped_updates == {"generator": 0, "discriminator": 1}
    assert state.nonfinite_in_row == {"generator": 0, "discriminator": 1}
    assert (trainer.sched_g.last_epoch, trainer.sched_d.last_epoch, trainer.ema.n_averaged.item()) == (1, 0, 1)
    assert torch.equal(param.detach(), before_d)
    assert all(float(s.get("step", 0)) == 0 and not any(torch.is_tensor(v) and v.numel() > 1 and v.abs().sum() > 0
                                                        for v in s.values()) for s in trainer.opt_d.state.values())
    with pytest.raises(NonFiniteError, match="2 non-finite updates in a row of the discriminator at step 1"):
        trainer.train_step(next(batches)["audio"])
    hook.remove()


def test_fp16_backoffs_count_towards_the_stop_only_at_a_scale_of_one_or_less(tmp_path):
    trainer = SnacTrainer(tiny_config(tmp_path, mixed_precision="fp16", train_batch_size=2, segment_seconds=0.25,
                                      max_nonfinite_steps=2, validation_data_dir=None))
    scaler = trainer.scalers["generator"]
    state_dict = scaler.state_dict()
    scaler.load_state_dict({**state_dict, "scale": 4.0})
    trainer.sampler.set_epoch(0)
    batches = iter(trainer.train_loader)
    _overflow(trainer.generator)
    for scale in (4.0, 2.0, 1.0):  # back-offs at 4 and 2 are the scaler's search; at 1 the gradient itself is inf
        trainer.train_step(next(batches)["audio"])
        assert scaler.get_scale() == scale / 2
    state = trainer.state
    assert state.scaler_backoffs["generator"] == 2 and state.nonfinite_in_row["generator"] == 1
    with pytest.raises(NonFiniteError, match="2 non-finite updates in a row of the generator at step 3"):
        trainer.train_step(next(batches)["audio"])
    assert state.skipped_updates == {"generator": 4, "discriminator": 0}


def test_output_dir_is_owned_by_one_run_and_a_killed_run_resumes(tmp_path):
    first = subprocess.Popen(_cli(tmp_path, "--max_train_steps", "100000"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "checkpoints" / "checkpoint_2").is_dir():
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.poll() else "slow"
            time.sleep(0.2)
        second = subprocess.run(_cli(tmp_path, "--max_train_steps", "3"), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {tmp_path} is in use by another training run (pid {first.pid} on "), last
        assert first.poll() is None  # the first run trains on, untouched
    finally:
        first.kill()  # SIGKILL: no clean-up, the lock stays behind
        first.communicate()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == first.pid
    step = list_checkpoints(tmp_path / "checkpoints")[-1][0]
    resumed = subprocess.run(_cli(tmp_path, "--max_train_steps", str(step + 1), "--resume_from_checkpoint", "latest"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"taking over the lock of {tmp_path} from pid {first.pid}" in resumed.stderr
    assert f"resumed from {tmp_path / 'checkpoints' / f'checkpoint_{step}'} at step {step} " in resumed.stderr
    assert list_checkpoints(tmp_path / "checkpoints")[-1][0] == step + 1
    assert not (tmp_path / "run.lock").exists()


def test_one_log_line_per_checkpoint_saved_or_loaded(tmp_path, caplog):
    def lines(level: int = logging.INFO) -> tuple[list[str], list[str]]:
        ours = [r.getMessage() for r in caplog.records
                if r.name == "snac_accel.trainer" and "checkpoint_" in r.getMessage()]
        theirs = [r.getMessage() for r in caplog.records if r.name.startswith("accelerate") and r.levelno >= level]
        caplog.clear()
        return ours, theirs

    caplog.set_level(logging.INFO)
    # no validation at all: a final validation's new best would repeat the last save (to record it)
    common = dict(segment_seconds=0.25, checkpointing_steps=1, validation_data_dir=None, validation_split=0.0)
    SnacTrainer(tiny_config(tmp_path, max_train_steps=2, **common)).fit()
    ours, theirs = lines()
    assert [line.split("] ")[-1] for line in ours] == [f"saved {tmp_path / 'checkpoints' / f'checkpoint_{n}'}"
                                                       for n in (1, 2)]
    assert theirs == []
    SnacTrainer(tiny_config(tmp_path, max_train_steps=2, resume_from_checkpoint="latest", **common)).fit()
    ours, theirs = lines()
    assert len(ours) == 1 and "resumed from" in ours[0] and theirs == []
    SnacTrainer(tiny_config(tmp_path, max_train_steps=3, resume_from_checkpoint="latest", log_level="debug",
                            **common)).fit()
    ours, theirs = lines()
    assert len(ours) == 2 and len(theirs) >= 8  # accelerate's own lines come back with --log_level debug


def test_fp16_loss_scales_are_checkpointed(tmp_path):
    common = dict(mixed_precision="fp16", segment_seconds=0.25, train_batch_size=2, max_train_steps=1,
                  checkpointing_steps=1, validation_data_dir=None)
    trainer = SnacTrainer(tiny_config(tmp_path, **common))
    scales = {"generator": 8.0, "discriminator": 2.0**20}  # not the initial 2**16, and not alike
    for name, scale in scales.items():
        trainer.scalers[name].load_state_dict({**trainer.scalers[name].state_dict(), "scale": scale})
    trainer.fit()
    resumed = SnacTrainer(tiny_config(tmp_path, resume_from_checkpoint="latest", **common))
    resumed.fit()  # loads checkpoint_1; nothing is left to train
    assert resumed.state.step == 1
    assert {name: scaler.get_scale() for name, scaler in resumed.scalers.items()} == scales


def test_max_train_minutes_stops_cleanly_with_checkpoint_and_export(tmp_path, caplog):
    trainer = SnacTrainer(tiny_config(tmp_path, max_train_minutes=1e-4, max_train_steps=5, segment_seconds=0.25,
                                      train_batch_size=2, checkpointing_steps=0, validation_data_dir=None))
    caplog.set_level("INFO")
    # A step takes longer than 6 ms: the budget is spent during the first update, agreed at the next
    # batch (RunControl), and every process stops after the update under way.
    final = trainer.fit()
    step = trainer.state.step  # 1 when the budget ran out while the first batch loaded, else 2
    assert step in (1, 2)
    assert "stopping after this update (--max_train_minutes)" in caplog.text
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [step]
    assert final == tmp_path / "final" and (final / "model.safetensors").is_file()


def test_num_train_epochs_sets_the_length_of_a_run(tmp_path, monkeypatch):
    from snac_accel import data as data_lib

    folder = tmp_path / "data"
    folder.mkdir()
    for path in sorted(Path(tiny_config(tmp_path).train_data_dir).glob("*.flac"))[:2]:
        shutil.copy(path, folder)
    keys = []
    real_iter = data_lib.EpochBatchSampler.__iter__

    def recording_iter(sampler):
        for batch in real_iter(sampler):
            keys.append(batch)
            yield batch

    monkeypatch.setattr(data_lib.EpochBatchSampler, "__iter__", recording_iter)
    trainer = SnacTrainer(tiny_config(tmp_path / "out", train_data_dir=str(folder), max_train_steps=None,
                                      num_train_epochs=2, train_batch_size=1, segment_seconds=0.25,
                                      checkpointing_steps=0, validation_data_dir=None))
    trainer.fit()
    assert trainer.state.step == 4  # 2 clips / batch 1 = 2 updates an epoch, 2 epochs
    assert [epoch for (epoch, _), in keys] == [0, 0, 1, 1]
    assert sorted(index for (_, index), in keys[:2]) == sorted(index for (_, index), in keys[2:]) == [0, 1]


def test_validation_file_manifest_gives_the_validation_clips(tmp_path):
    from torchcodec.decoders import AudioDecoder

    from snac_accel.data import normalize_loudness

    files = sorted(Path(tiny_config(tmp_path).validation_data_dir).glob("*.flac"))[:3]
    manifest = tmp_path / "validation.csv"
    manifest.write_text("path\n" + "".join(f"{path}\n" for path in files))
    config = parse_args(["--train_data_dir", tiny_config(tmp_path).train_data_dir, "--validation_file", str(manifest),
                         "--validation_seconds", "1.0", "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    trainer = SnacTrainer(config)
    # Each file's first second (rounded to the model's padding multiple), at the training loudness.
    length = 12 * 2048
    expected = [normalize_loudness(AudioDecoder(str(path), sample_rate=24000, num_channels=1)
                                   .get_all_samples().data[:, :length], 24000, config.target_loudness)
                for path in files]
    assert trainer.val_batch.shape == (3, 1, length)
    torch.testing.assert_close(trainer.val_batch, torch.stack(expected), rtol=1e-5, atol=1e-6)
    assert set(trainer.validate()) == {"val/mel_distance", "val/stft_distance", "val/si_sdr"} | {
        f"val/codebook_{name}_level{level}" for name in ("usage", "efficiency") for level in range(3)}


def test_max_bad_fraction_decides_when_broken_files_stop_a_run(tmp_path):
    from snac_accel.data import DataError

    folder = tmp_path / "data"
    folder.mkdir()
    for path in sorted(Path(tiny_config(tmp_path).train_data_dir).glob("*.flac"))[:4]:
        shutil.copy(path, folder)
    for i in range(12):  # 3 of 4 files are not audio: about 3 of 4 samples drawn are unusable
        (folder / f"broken_{i:02d}.wav").write_bytes(b"RIFF" + bytes(range(256)) * 4)
    options = dict(train_data_dir=str(folder), max_train_steps=1, train_batch_size=8, segment_seconds=0.25,
                   checkpointing_steps=0, validation_data_dir=None)
    with pytest.raises(DataError, match=r"unusable \(more than 30%\).*raise --max_bad_fraction"):
        SnacTrainer(tiny_config(tmp_path / "strict", max_bad_fraction=0.3, **options)).fit()
    assert not (tmp_path / "strict" / "checkpoints").exists()  # refused at the first batch, before any update
    tolerant = SnacTrainer(tiny_config(tmp_path / "tolerant", max_bad_fraction=0.95, **options))
    tolerant.fit()
    recent = tolerant.bad_tracker.recent
    assert len(recent) >= 20 and sum(recent) / len(recent) > 0.5  # the default 0.5 would have stopped it
    assert tolerant.state.step == 1 and tolerant.state.bad_files == sum(recent)


def test_export_of_a_run_gives_the_weights_of_its_best_folder_when_the_last_validation_is_best(tmp_path):
    """The last validation's new best is recorded by the final checkpoint (it was saved before it)."""
    from snac_accel.export import export_checkpoint

    trainer = SnacTrainer(tiny_config(tmp_path, max_train_steps=3, validation_steps=2, learning_rate=1e-3,
                                      segment_seconds=0.25, checkpointing_steps=0, disc_start=100))
    trainer.fit()
    assert trainer.state.best_step == 3  # the premise: the end-of-run validation (step 3) beat step 2's
    exported = export_checkpoint(tmp_path, tmp_path / "exported", evaluate_clips=0)
    a, b = load_file(exported / "model.safetensors"), load_file(tmp_path / "best" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rollback_recovers_from_a_divergence_and_finishes_finite(tmp_path, caplog):
    trainer = SnacTrainer(tiny_config(tmp_path, max_train_steps=6, segment_seconds=0.25, train_batch_size=2,
                                      checkpointing_steps=2, max_nonfinite_steps=2, validation_data_dir=None,
                                      on_divergence="rollback"))
    recorded_step, batches = trainer.train_step, []

    def diverging(real: torch.Tensor) -> dict:  # the 4th and 5th batches blow up every loss
        batches.append(real)
        return recorded_step(torch.full_like(real, float("nan")) if len(batches) in (4, 5) else real)

    trainer.train_step = diverging
    caplog.set_level("WARNING")
    trainer.fit()
    assert trainer.state.step == 6 and all_finite(training_state(trainer))
    # updates 3 and 4 were skipped (non-finite), the second in a row at step 4 is the divergence
    assert trainer.state.extra["rollbacks"] == [{"diverged_at": 4, "back_to": 2, "models": ["discriminator", "generator"],
                                                 "lr_factor": 0.5}]
    assert "rollback 1 of at most 3" in caplog.text
    assert "Rolled back: the discriminator and the generator diverged at step 4" in (tmp_path / "final/README.md").read_text()
    gamma = trainer.config.lr_gamma  # both learning rates halved, from where their decay had got to
    for sched in (trainer.sched_g, trainer.sched_d):
        assert sched.get_last_lr()[0] == pytest.approx(0.5 * 3e-4 * gamma ** sched.last_epoch, rel=1e-9)
    # 3 good + 2 diverged batches, then 4 more from step 2 on: the data went on past the diverged
    # batches rather than back to the checkpoint's position (which would read batch 3 again)
    assert len(batches) == 9 and not torch.equal(batches[5], batches[2])
    assert trainer.state.batch_in_epoch == 9  # and the recorded position, what a later resume starts from, agrees


def test_resume_applies_a_new_learning_rate_and_refuses_another_preset(tmp_path, caplog):
    common = dict(segment_seconds=0.25, train_batch_size=2, checkpointing_steps=2, validation_data_dir=None)
    SnacTrainer(tiny_config(tmp_path, max_train_steps=2, **common)).fit()
    caplog.set_level("WARNING")
    resumed = SnacTrainer(tiny_config(tmp_path, max_train_steps=3, learning_rate=6e-4,
                                      resume_from_checkpoint="latest", **common))
    resumed.fit()
    assert "--learning_rate 0.0003 -> 0.0006" in caplog.text
    gamma = resumed.config.lr_gamma
    assert resumed.sched_g.get_last_lr()[0] == pytest.approx(6e-4 * gamma ** resumed.sched_g.last_epoch, rel=1e-9)
    assert resumed.opt_g.param_groups[0]["lr"] == pytest.approx(6e-4 * gamma ** 3, rel=1e-9)
    with pytest.raises(ConfigError, match=r"trained with --preset tiny \(now snac_24khz\)"):
        SnacTrainer(tiny_config(tmp_path, preset="snac_24khz", resume_from_checkpoint="latest", **common))


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    proc = _training_past_its_first_checkpoint(tmp_path)
    # Python runs a signal's handler between bytecodes, so two SIGINTs that arrive during one long torch op
    # count as one: keep pressing Ctrl-C until the run is gone, as a user does.
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=60)
    # 130 from the trainer; -SIGINT when a later press lands while the interpreter is already shutting down
    assert proc.returncode in (130, -signal.SIGINT) and "interrupted: the last checkpoint is intact" in output, output
