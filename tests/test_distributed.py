"""Distributed training with real processes: 2 CPU ranks over gloo, launched the way users launch.

One 2-process run (accelerate launch with accelerate_configs/cpu.yaml) is shared by several tests;
a helper script runs the real `SnacTrainer` in it and records, per rank, the sampler's batches, every
file write, the first update and the final weights. Other tests go through launch.sh itself
(multi-node on loopback, signals), the example SLURM script (with srun/scancel/scontrol stand-ins),
or a bare `--multi_gpu` launch that the trainer must refuse.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
STEPS = 10  # one epoch of the 36 demo clips is 9 steps of 2 x 2: the run crosses an epoch boundary
TIMEOUT = 600

HELPER = r'''
import json, os, sys
from pathlib import Path

import torch
import accelerate.utils.other
import snac_accel.trainer as trainer_lib
from snac_accel import data as data_lib
from snac_accel.config import TrainConfig
from tests.conftest import tiny_config

out, steps, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
batches, writes = [], []

real_iter = data_lib.EpochBatchSampler.__iter__
def recording_iter(self):
    for keys in real_iter(self):
        batches.append([list(k) for k in keys])
        yield keys
data_lib.EpochBatchSampler.__iter__ = recording_iter

def recorded(kind, fn, path_arg):
    def wrapper(*args, **kwargs):
        writes.append([kind, str(args[path_arg])])
        return fn(*args, **kwargs)
    return wrapper

real_torch_save = torch.save
torch.save = recorded("torch.save", torch.save, 1)
accelerate.utils.other.safe_save_file = recorded("safetensors", accelerate.utils.other.safe_save_file, 1)
trainer_lib.export_folder = recorded("export", trainer_lib.export_folder, 1)
TrainConfig.save = recorded("config", TrainConfig.save, 1)

config = tiny_config(out / "run", train_batch_size=batch, segment_seconds=0.25, max_train_steps=steps,
                     checkpointing_steps=steps // 2, max_validation_clips=2, validation_seconds=0.5,
                     validation_steps=0)
config.apply_dataset_preset()
config.validate()
trainer = trainer_lib.SnacTrainer(config)
rank = trainer.accelerator.process_index

def weights():
    return {"generator": {k: v.clone() for k, v in trainer.unwrapped_generator.state_dict().items()},
            "discriminator": {k: v.clone() for k, v in
                              trainer.accelerator.unwrap_model(trainer.discriminator).state_dict().items()}}

# Each optimizer's first update: the gradient it applies (after DDP's all-reduce), the weights before and after.
first_update = {}
def recording_step(name, optimizer):
    real_step = optimizer.step
    params = [p for group in optimizer.param_groups for p in group["params"]]
    def step(*args, **kwargs):
        if name in first_update:
            return real_step(*args, **kwargs)
        record = {"grad": torch.cat([p.grad.flatten().clone() for p in params if p.grad is not None]),
                  "before": torch.cat([p.detach().flatten().clone() for p in params])}
        result = real_step(*args, **kwargs)
        record["after"] = torch.cat([p.detach().flatten().clone() for p in params])
        first_update[name] = record
        return result
    optimizer.step = step
recording_step("generator", trainer.opt_g)
recording_step("discriminator", trainer.opt_d)

trainer.fit()
real_torch_save({**weights(), "first_update": first_update}, out / f"rank{rank}.pt")
(out / f"rank{rank}.json").write_text(json.dumps(
    {"num_processes": trainer.accelerator.num_processes, "batches": batches, "writes": writes}))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "SLURM_")) and k not in {"NNODES", "NODE_RANK", "MASTER_ADDR",
                                                                       "MASTER_PORT", "WORLD_SIZE", "RANK"}}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=TIMEOUT)
    return done


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text()[-n:]


def training_options(output_dir: Path, steps: int, **extra) -> list[str]:
    options = dict(preset="tiny", train_data_dir=str(ROOT / "snac_accel" / "demo_data" / "train"),
                   output_dir=str(output_dir), train_batch_size=2, segment_seconds=0.25, max_train_steps=steps,
                   report_to="none", dataloader_num_workers=0, model_noise=False, seed=0, checkpointing_steps=0,
                   mixed_precision="no")
    options.update(extra)
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def helper(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("helper") / "helper.py"
    path.write_text(HELPER)
    return path


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, helper) -> Path:
    """2 processes x batch 2 through accelerate_configs/cpu.yaml."""
    out = tmp_path_factory.mktemp("two_ranks")
    log = out / "log.txt"
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
           "--main_process_port", str(free_port()), str(helper), str(out), str(STEPS), "2"]
    done = run(cmd, child_env(ACCELERATE_USE_CPU="1"), log)
    assert done.returncode == 0, tail(log)
    return out


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, helper) -> Path:
    """1 process x batch 4, the same helper without a launcher."""
    out = tmp_path_factory.mktemp("one_rank")
    log = out / "log.txt"
    done = run([sys.executable, str(helper), str(out), str(STEPS), "4"], child_env(), log)
    assert done.returncode == 0, tail(log)
    return out


def load(folder: Path, rank: int) -> tuple[dict, dict]:
    return (torch.load(folder / f"rank{rank}.pt", weights_only=True),
            json.loads((folder / f"rank{rank}.json").read_text()))


def test_ranks_hold_identical_weights(two_ranks):
    (w0, info0), (w1, info1) = load(two_ranks, 0), load(two_ranks, 1)
    assert info0["num_processes"] == info1["num_processes"] == 2
    for model in ("generator", "discriminator"):
        assert w0[model].keys() == w1[model].keys()
        for name, tensor in w0[model].items():
            assert torch.equal(tensor, w1[model][name]), f"{model}.{name} differs between ranks"
    # and training moved them since the mid-run checkpoint: not two copies of frozen weights
    from safetensors.torch import load_file

    middle = load_file(two_ranks / "run" / "checkpoints" / f"checkpoint_{STEPS // 2}" / "model.safetensors")
    assert any(not torch.equal(middle[name], w0["generator"][name]) for name in middle)


def test_no_sample_seen_by_two_ranks_within_an_epoch(two_ranks):
    batches = {rank: load(two_ranks, rank)[1]["batches"] for rank in (0, 1)}
    assert len(batches[0]) == len(batches[1]) == STEPS
    epochs = {key[0] for rank in (0, 1) for batch in batches[rank] for key in batch}
    assert epochs == {0, 1}
    for epoch in epochs:
        seen = [{key[1] for batch in batches[rank] for key in batch if key[0] == epoch} for rank in (0, 1)]
        assert seen[0] and seen[1]
        assert not seen[0] & seen[1], f"epoch {epoch}: clips {sorted(seen[0] & seen[1])} went to both ranks"
    first_epoch = [{k[1] for b in batches[r] for k in b if k[0] == 0} for r in (0, 1)]
    clips = len(list((ROOT / "snac_accel" / "demo_data" / "train").glob("*.flac")))
    assert len(first_epoch[0] | first_epoch[1]) == clips // 4 * 4  # a whole epoch, the ragged tail dropped


def test_two_ranks_of_batch_2_equal_one_rank_of_batch_4(two_ranks, one_rank):
    (w2, info0), (_, info1) = load(two_ranks, 0), load(two_ranks, 1)
    w4, single = load(one_rank, 0)
    assert single["num_processes"] == 1
    # the same clips per optimizer step: the two ranks' batches together are the single batch
    for step, batch in enumerate(single["batches"]):
        assert sorted(map(tuple, batch)) == sorted(map(tuple, info0["batches"][step] + info1["batches"][step]))
    lr = 3e-4  # tiny_config's learning rate
    for model in ("generator", "discriminator"):
        two, one = w2["first_update"][model], w4["first_update"][model]
        assert torch.equal(two["before"], one["before"])
        # DDP's averaged gradient is the batch-4 gradient up to float rounding (observed 3e-6)
        assert (two["grad"] - one["grad"]).norm() < 1e-4 * one["grad"].norm()
        # Adam's first step moves every weight by about lr * sign(gradient): where rounding flips the
        # sign of a near-zero gradient, the two runs end up to 2 lr apart; anywhere else they agree
        moved, apart = one["after"] - one["before"], two["after"] - one["after"]
        assert apart.abs().max() <= 2.5 * lr
        assert apart.norm() < 1e-3 * moved.norm(), f"{model}: {apart.norm():.3g} apart, moved {moved.norm():.3g}"
    # Later steps are not compared weight by weight: the GAN amplifies those flips step after step.


def test_only_main_process_writes(two_ranks):
    writes = {rank: load(two_ranks, rank)[1]["writes"] for rank in (0, 1)}
    # rank 1 writes its own RNG state (exact resume needs every rank's) and nothing else
    assert writes[1], "rank 1 recorded no write at all: the recording is broken"
    assert {Path(path).name for _, path in writes[1]} == {"random_states_1.pkl"}
    kinds = {kind for kind, _ in writes[0]}
    names = {Path(path).name for _, path in writes[0]}
    assert {"export", "config", "safetensors"} <= kinds
    assert {"model.safetensors", "model_1.safetensors", "random_states_0.pkl", "final"} <= names
    checkpoints = two_ranks / "run" / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} == {f"checkpoint_{STEPS // 2}", f"checkpoint_{STEPS}"}
    assert {p.name for p in (checkpoints / f"checkpoint_{STEPS}").glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}


def test_two_process_checkpoint_resumes_in_one_process(two_ranks, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from snac_accel.trainer import SnacTrainer

    from .conftest import tiny_config
    from .helpers import assert_identical, custom_states, optimizer_states, record_steps

    out = tmp_path / "resumed"
    shutil.copytree(two_ranks / "run" / "checkpoints", out / "checkpoints")
    checkpoint = out / "checkpoints" / f"checkpoint_{STEPS}"
    trainer = SnacTrainer(tiny_config(out, train_batch_size=2, segment_seconds=0.25, max_train_steps=STEPS + 2,
                                      checkpointing_steps=STEPS + 2, validation_data_dir=None,
                                      resume_from_checkpoint="latest"))
    before_step = record_steps(trainer)
    trainer.fit()
    assert len(before_step) == 2 and trainer.state.step == STEPS + 2
    # Training went on from what the two processes saved: weights, Adam moments, schedules and step.
    start = before_step[0]
    assert start["step"] == STEPS
    assert_identical(start["generator"], load_file(checkpoint / "model.safetensors"), "generator")
    assert_identical(start["discriminator"], load_file(checkpoint / "model_1.safetensors"), "discriminator")
    assert_identical([start["opt_g"], start["opt_d"]], optimizer_states(checkpoint), "optimizers")
    assert_identical([start["sched_g"], start["sched_d"]], custom_states(checkpoint)["schedulers"], "schedulers")
    resumed = load_file(out / "checkpoints" / f"checkpoint_{STEPS + 2}" / "model.safetensors")
    assert any(not torch.equal(resumed[k], start["generator"][k]) for k in resumed)
    assert (out / "final" / "config.json").is_file()


def test_multi_gpu_without_cuda_or_cpu_flag_is_refused(tmp_path):
    """`--multi_gpu` on a CPU machine without ACCELERATE_USE_CPU=1 would start 2 unsynchronised copies."""
    log = tmp_path / "log.txt"
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "snac_accel.train", *training_options(tmp_path / "out", 2)]
    done = run(cmd, child_env(), log)
    assert done.returncode != 0
    assert log.read_text().count("launched as 2 processes but accelerate formed a group of 1") == 2
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_locked_output_dir_stops_every_rank_in_one_line(tmp_path):
    """The main process holds the output folder's lock and tells the other ranks: all stop, none hangs."""
    holder = subprocess.Popen(["sleep", "300"])
    try:
        out = tmp_path / "out"
        out.mkdir()
        (out / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                  "started": "earlier"}))
        log = tmp_path / "log.txt"
        cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
               "--main_process_port", str(free_port()), "-m", "snac_accel.train", *training_options(out, 2)]
        done = run(cmd, child_env(ACCELERATE_USE_CPU="1"), log)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode != 0
    refusal = f"error: {out} is in use by another training run (pid {holder.pid} on {socket.gethostname()}"
    assert [line for line in log.read_text().splitlines() if line.startswith("error:")] == [
        line for line in log.read_text().splitlines() if line.startswith(refusal)], tail(log)
    assert log.read_text().count(refusal) == 2, tail(log)
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]


def test_two_machines_on_loopback_through_launch_sh(tmp_path):
    """launch.sh twice, as machine 0 and machine 1 of a 2-machine job with the multi_node config.

    Machine 0 reads the generic variables (NNODES, NODE_RANK, MASTER_ADDR); machine 1 reads SLURM's
    (SLURM_NNODES, SLURM_NODEID, the first host of SLURM_JOB_NODELIST through a stand-in scontrol).
    """
    out, port = tmp_path / "out", free_port()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/usr/bin/env bash\n'
                        '[[ "$*" == "show hostnames node[01-02]" ]] && printf "localhost\\nnode02\\n"\n')
    scontrol.chmod(0o755)
    machines = [
        dict(NNODES="2", NODE_RANK="0", MASTER_ADDR="127.0.0.1", GPUS_PER_NODE="1"),
        dict(SLURM_NNODES="2", SLURM_NODEID="1", SLURM_JOB_NODELIST="node[01-02]", SLURM_GPUS_ON_NODE="1",
             PATH=f"{bin_dir}:{os.environ['PATH']}"),
    ]
    procs, logs = [], []
    for node_rank, variables in enumerate(machines):
        env = child_env(MASTER_PORT=str(port), ACCELERATE_USE_CPU="1", **variables)
        logs.append(tmp_path / f"machine{node_rank}.txt")
        with open(logs[-1], "w") as f:
            procs.append(subprocess.Popen(
                ["bash", str(ROOT / "launch.sh"), "train", "--accelerate-config", "multi_node",
                 *training_options(out, 3, checkpointing_steps=3)],
                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], "\n----\n".join(tail(log) for log in logs)
    checkpoint = out / "checkpoints" / "checkpoint_3"
    # one random state per rank: the two machines formed one 2-process group
    assert {p.name for p in checkpoint.glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert (out / "final" / "config.json").is_file()


def test_multi_node_without_rendezvous_variables_is_refused(tmp_path):
    log = tmp_path / "log.txt"
    done = run(["bash", str(ROOT / "launch.sh"), "train", "--accelerate-config", "multi_node",
                *training_options(tmp_path / "out", 2)], child_env(), log)
    assert done.returncode == 2
    assert "multi-node needs NNODES" in log.read_text()


@pytest.mark.parametrize("config, signum", [("cpu", signal.SIGTERM), ("single_gpu", signal.SIGUSR1)])
def test_signal_to_launch_sh_checkpoints_and_exits_cleanly(tmp_path, config, signum):
    """The preemption path: a signal to launch.sh reaches the trainers, which save and exit 0.

    cpu: 2 ranks under torchrun, which does not forward USR1 itself; single_gpu (run on the CPU
    here): accelerate's one-process launcher, which dies on TERM and would orphan the trainer.
    """
    out, log = tmp_path / "out", tmp_path / "log.txt"
    env = child_env(MASTER_PORT=str(free_port()))
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", str(ROOT / "launch.sh"), "train", "--accelerate-config", config,
                                 *training_options(out, 10_000)],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for_step(proc, log)
        proc.send_signal(signum)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, tail(log)
    checkpoints = list((out / "checkpoints").glob("checkpoint_*"))
    assert len(checkpoints) == 1, tail(log)
    step = int(checkpoints[0].name.split("_")[1])
    assert 1 <= step < 10_000
    ranks = 2 if config == "cpu" else 1
    assert {p.name for p in checkpoints[0].glob("random_states_*")} == {f"random_states_{r}.pkl" for r in range(ranks)}
    assert f"(signal {signal.Signals(signum).name})" in log.read_text()
    assert not (out / "final").exists()


FAKE_SLURM = {
    # one task per node, all on this machine; their pids are kept for scancel
    "srun": """#!/usr/bin/env bash
set -euo pipefail
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node "$@" &
  pids+=($!)
  echo $! >> "$FAKE_SLURM_DIR/tasks"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
""",
    "scancel": """#!/usr/bin/env bash
[[ "$1" == --signal=TERM ]] && kill -TERM $(cat "$FAKE_SLURM_DIR/tasks")
""",
    "scontrol": """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") printf "localhost\\nnode02\\n" ;;
  "requeue "*) echo "$2" >> "$FAKE_SLURM_DIR/requeued" ;;
  *) exit 1 ;;
esac
""",
}


def test_slurm_script_checkpoints_requeues_and_resumes(tmp_path):
    """The example batch script, with srun/scancel/scontrol stand-ins: 2 nodes on loopback; USR1 (the
    time-limit warning) makes it checkpoint and requeue; the requeued run resumes and finishes."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = ROOT / "accelerate_configs" / "slurm_multi_node.sbatch"

    def submit(log: Path, steps: int) -> subprocess.Popen:
        (tmp_path / "tasks").unlink(missing_ok=True)
        env = child_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_DIR=str(tmp_path), SLURM_JOB_ID="4242",
                        SLURM_NNODES="2", SLURM_JOB_NODELIST="node[01-02]", SLURM_GPUS_ON_NODE="1",
                        SLURM_SUBMIT_DIR=str(ROOT), MASTER_PORT=str(free_port()), ACCELERATE_USE_CPU="1")
        with open(log, "w") as f:
            return subprocess.Popen(["bash", str(script), *training_options(out, steps)], cwd=tmp_path, env=env,
                                    stdout=f, stderr=subprocess.STDOUT)

    first_log = tmp_path / "first.txt"
    job = submit(first_log, 10_000)
    try:
        wait_for_step(job, first_log)
        job.send_signal(signal.SIGUSR1)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert (tmp_path / "requeued").read_text().split() == ["4242"], tail(first_log)
    checkpoints = list((out / "checkpoints").glob("checkpoint_*"))
    assert len(checkpoints) == 1, tail(first_log)
    step = int(checkpoints[0].name.split("_")[1])
    assert {p.name for p in checkpoints[0].glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert not (out / "final").exists()

    second_log = tmp_path / "second.txt"
    job = submit(second_log, step + 1)
    try:
        assert job.wait(timeout=TIMEOUT) == 0, tail(second_log)
    finally:
        if job.poll() is None:
            job.kill()
    assert f"at step {step}" in second_log.read_text()
    assert (out / "checkpoints" / f"checkpoint_{step + 1}").is_dir()
    assert (out / "final" / "config.json").is_file()


def wait_for_step(proc: subprocess.Popen, log: Path) -> None:
    """Until the first optimizer step is logged: the signal must land in the middle of training."""
    deadline = time.monotonic() + TIMEOUT
    while "1/10000" not in log.read_text():
        assert proc.poll() is None, tail(log)
        assert time.monotonic() < deadline, tail(log)
        time.sleep(0.5)


def test_two_rank_streaming_resume_matches_a_straight_run(tmp_path):
    """--streaming with 2 ranks: the gathered per-rank position resumes both ranks exactly."""
    from safetensors.torch import load_file

    def launch(out: Path, steps: int, **extra) -> str:
        log = out.with_suffix(".log")
        cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
               "--main_process_port", str(free_port()), "-m", "snac_accel.train",
               *training_options(out, steps, streaming=True, checkpointing_steps=2, shuffle_buffer_size=8, **extra)]
        done = run(cmd, child_env(ACCELERATE_USE_CPU="1"), log)
        assert done.returncode == 0, tail(log)
        return log.read_text()

    launch(tmp_path / "straight", 4)
    launch(tmp_path / "cut", 2)
    log = launch(tmp_path / "cut", 4, resume_from_checkpoint="latest")
    assert "at step 2 " in log
    # Equal up to float rounding: observed one Snake alpha 6e-8 apart (an ulp; single-process resumes
    # are bit-identical). One batch read out of turn moves weights by about lr = 1e-3.
    for name in ("model.safetensors", "model_1.safetensors"):
        a = load_file(tmp_path / "straight" / "checkpoints" / "checkpoint_4" / name)
        b = load_file(tmp_path / "cut" / "checkpoints" / "checkpoint_4" / name)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, name
