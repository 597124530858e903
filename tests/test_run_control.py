"""The promises users meet with the options they get without flags: exact resume, a clean stop when one
process of a run is signalled, one decision for every process (errors, best, latest), rollback.

Runs are real CLI processes (a fresh process per run, as users run them: state left behind in one
process by an earlier run, such as TorchScript's profiling, must not hide a difference).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from snac_accel.checkpoints import list_checkpoints

from .helpers import assert_identical, custom_states, optimizer_states
from .test_distributed import ACCELERATE, ROOT, child_env, free_port, tail

TRAIN = ROOT / "snac_accel" / "demo_data" / "train"
TIMEOUT = 600


def defaults(output_dir: Path, steps: int, *extra: str) -> list[str]:
    """The options a user must give (data, output, length, a checkpoint interval) and nothing else."""
    return ["--preset", "tiny", "--train_data_dir", str(TRAIN), "--output_dir", str(output_dir),
            "--max_train_steps", str(steps), "--checkpointing_steps", str(max(1, steps // 2)), *extra]


def train(args: list[str], log: Path, processes: int = 1) -> str:
    if processes == 1:
        cmd = [sys.executable, "-m", "snac_accel.train", *args]
        env = child_env()
    else:
        cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
               "--main_process_port", str(free_port()), "-m", "snac_accel.train", *args]
        env = child_env(ACCELERATE_USE_CPU="1")
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=TIMEOUT)
    assert done.returncode == 0, tail(log)
    return log.read_text()


def assert_same_training_state(a: Path, b: Path) -> None:
    """Both models, both optimizers, schedulers, EMA, restarter: bit for bit."""
    for name in ("model.safetensors", "model_1.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        differ = [k for k in x if not torch.equal(x[k], y[k])]
        assert not differ, f"{name}: {len(differ)} of {len(x)} tensors differ, e.g. {differ[:3]}"
    assert_identical(optimizer_states(a), optimizer_states(b), "optimizer state")
    x, y = custom_states(a), custom_states(b)
    for part in ("schedulers", "restarter"):
        assert_identical(x[part], y[part], part)


@pytest.fixture(scope="module")
def straight_two_processes(tmp_path_factory) -> Path:
    """6 updates of 2 processes with the default options: 8 clips per update, so it crosses epoch 0 -> 1."""
    out = tmp_path_factory.mktemp("straight2") / "run"
    train(defaults(out, 6), out.with_suffix(".log"), processes=2)
    return out


@pytest.fixture(scope="module")
def straight_one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight1") / "run"
    train(defaults(out, 4), out.with_suffix(".log"))
    return out


@pytest.mark.parametrize("workers", [None, "0"], ids=["default_workers", "no_workers"])
def test_resume_with_the_default_options_is_bit_identical(tmp_path, workers, straight_one_process):
    """4 updates straight (default options) against 2 + resume + 2, each run in its own process; with
    no loader workers too, which must not change what is trained on. Failed before the generator's
    Snake ran eagerly: the fresh run's codebook seeding made TorchScript specialise snac's Snake
    function on gradient-free calls, the resumed run on training calls."""
    extra = ("--dataloader_num_workers", workers) if workers else ()
    train(defaults(tmp_path / "cut", 2, *extra), tmp_path / "cut.log")
    log = train(defaults(tmp_path / "cut", 4, "--resume_from_checkpoint", "latest", *extra), tmp_path / "resumed.log")
    assert "resumed from" in log and "at step 2 " in log
    assert_same_training_state(straight_one_process / "checkpoints/checkpoint_4", tmp_path / "cut/checkpoints/checkpoint_4")


def test_two_process_resume_with_the_default_options_is_bit_identical(tmp_path, straight_two_processes):
    train(defaults(tmp_path / "cut", 3), tmp_path / "cut.log", processes=2)
    train(defaults(tmp_path / "cut", 6, "--resume_from_checkpoint", "latest"), tmp_path / "resumed.log", processes=2)
    assert_same_training_state(straight_two_processes / "checkpoints/checkpoint_6",
                               tmp_path / "cut/checkpoints/checkpoint_6")


@pytest.mark.parametrize("variant", [
    ("--recipe", "dac", "--train_batch_size", "4"),
    ("--recipe", "snac", "--train_batch_size", "4"),
    ("--preset", "snac_24khz", "--train_batch_size", "1", "--segment_seconds", "0.2"),
    ("--preset", "tiny_44khz", "--train_batch_size", "2", "--segment_seconds", "0.3"),
], ids=["tiny_dac_recipe", "tiny_snac_recipe", "snac_24khz_snac_recipe", "tiny_44khz_cpu_recipe"])
def test_resume_is_bit_identical_with_the_other_recipes_and_a_released_preset(tmp_path, variant):
    """The defaults of the other recipes (DAC's clipping, the GAN from step 0), of the snac_24khz
    preset (4096 codes, full-size discriminators) and of the 44 kHz layout (4 levels, local attention,
    resampled input); only the batch is cut to fit the demo clips and the CPU. 2 updates straight
    against 1 + resume + 1."""
    train([*defaults(tmp_path / "straight", 2), *variant], tmp_path / "straight.log")
    train([*defaults(tmp_path / "cut", 1), *variant], tmp_path / "cut.log")
    log = train([*defaults(tmp_path / "cut", 2, "--resume_from_checkpoint", "latest"), *variant],
                tmp_path / "resumed.log")
    assert "at step 1 " in log
    assert_same_training_state(tmp_path / "straight/checkpoints/checkpoint_2", tmp_path / "cut/checkpoints/checkpoint_2")


def rank_pids(launcher: int, deadline: float) -> dict[int, int]:
    """{rank: pid} of the training processes below ``launcher`` (their RANK environment variable)."""
    while time.monotonic() < deadline:
        found = {}
        for child in _descendants(launcher):
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
            if ranks and Path(f"/proc/{child}/cmdline").read_bytes().find(b"snac_accel.train") >= 0:
                found[int(ranks[0])] = child
        if len(found) == 2:
            return found
        time.sleep(0.5)
    raise AssertionError("the two training processes never appeared")


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return children + [d for c in children for d in _descendants(c)]


# Each of the three signals to each of the two ranks (about 30 s of the suite's time each); one of them resumes.
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.parametrize("rank", [0, 1], ids=lambda rank: f"rank{rank}")
def test_a_signal_to_one_process_stops_both_at_one_step(tmp_path, signum, rank, straight_two_processes):
    """Preemption signals one node, Ctrl-C may reach one process: every process checkpoints at the same
    step and exits 0, no export; the checkpoint resumes bit-identically to an uninterrupted run."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
           "--main_process_port", str(free_port()), "-m", "snac_accel.train", *defaults(out, 6)]
    cmd[cmd.index("--checkpointing_steps") + 1] = "100"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(ACCELERATE_USE_CPU="1"), stdout=f,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        pids = rank_pids(proc.pid, deadline)
        while "1/6" not in log.read_text():  # the first update is done: the signal lands mid-training
            assert proc.poll() is None and time.monotonic() < deadline, tail(log)
            time.sleep(0.2)
        os.kill(pids[rank], signum)
        assert proc.wait(timeout=TIMEOUT) == 0, tail(log)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert f"signal {signal.Signals(signum).name}" in text, tail(log)
    found = list_checkpoints(out / "checkpoints")
    assert len(found) == 1 and found[0][0] < 6, found
    assert not (out / "final").exists()
    step = found[0][0]
    assert {p.name for p in found[0][1].glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}
    if (signum, rank) == (signal.SIGINT, 1):
        train(defaults(out, 6, "--resume_from_checkpoint", "latest"), tmp_path / "resumed.log", processes=2)
        assert f"at step {step} " in (tmp_path / "resumed.log").read_text()
        assert_same_training_state(straight_two_processes / "checkpoints/checkpoint_6", out / "checkpoints/checkpoint_6")


FAULTS = r'''
import sys
from pathlib import Path

import torch
from snac_accel.data import AudioClips, Clip
from snac_accel.trainer import SnacTrainer
from tests.conftest import tiny_config

out, fault = Path(sys.argv[1]), sys.argv[2]
config = tiny_config(out / "run", train_batch_size=2, segment_seconds=0.25, max_train_steps=6, checkpointing_steps=0,
                     validation_data_dir=None, dead_code_steps=1)
trainer = SnacTrainer(config)
rank = trainer.accelerator.process_index
if fault == "broken_data" and rank == 1:  # this node's copy of the data became unreadable mid-run
    AudioClips.load_row = lambda self, source, row, generator: Clip(None, "cannot open: Input/output error")
    trainer.fit()
elif fault == "uneven":  # rank 1's batches lost a clip (broken, its replacements too)
    trainer.sampler.set_epoch(0)
    batches = iter(trainer.train_loader)
    trainer._seed_codebooks()
    for _ in range(4):
        real = next(batches)["audio"]
        trainer.train_step(real[:1] if rank == 1 else real)
    torch.save({"generator": trainer.unwrapped_generator.state_dict(),
                "restarted": trainer.restarter.restarted.clone()}, out / f"rank{rank}.pt")
else:
    trainer.fit()
'''


def run_faults(tmp_path: Path, fault: str) -> tuple[int, str, float]:
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    log = tmp_path / "log.txt"
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
           "--main_process_port", str(free_port()), str(script), str(tmp_path), fault]
    started = time.monotonic()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=child_env(ACCELERATE_USE_CPU="1"), stdout=f,
                              stderr=subprocess.STDOUT, timeout=TIMEOUT)
    return done.returncode, log.read_text(), time.monotonic() - started


def test_a_data_error_on_one_process_ends_both_with_its_message(tmp_path):
    code, text, seconds = run_faults(tmp_path, "broken_data")
    assert code != 0 and seconds < 300
    # both processes raise the same error, naming the process that met it (before, rank 0 trained on
    # and waited in its next collective for a rank that had left)
    raised = {line.split("]: ", 1)[0]: line.split("]: ", 1)[1] for line in text.splitlines()
              if "DataError: a whole batch had no usable clip" in line and "]: " in line}
    assert set(raised) == {"[rank0", "[rank1"} and len(set(raised.values())) == 1, tail(tmp_path / "log.txt")
    raised = list(raised.values())
    assert "Input/output error" in raised[0] and "(process 1)" in raised[0]


def test_dead_code_restarts_with_batches_of_different_sizes_keep_ranks_identical(tmp_path):
    code, text, _ = run_faults(tmp_path, "uneven")
    assert code == 0, text[-4000:]
    a, b = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert a["restarted"].sum() > 0  # codes were re-seeded from the gathered vectors
    assert torch.equal(a["restarted"], b["restarted"])
    for name, tensor in a["generator"].items():
        assert torch.equal(tensor, b["generator"][name]), name
