"""What decides GPU speed, checked on the CPU: host syncs per update of the real loop (counted by
benchmarks/syncs.py), and benchmarks/gpu_check.sh refusing a machine it cannot measure on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.syncs import SyncCounter, build, count_updates  # noqa: E402


def counted(tmp_path: Path, **options) -> list[dict]:
    from types import SimpleNamespace

    values = dict(preset="tiny", batch=2, seconds=0.25, mixed_precision="bf16", updates=2, warmup=1,
                  logging_steps=3, dead_code_steps=1, accumulation=1, adam_fused=True)
    values.update(options)
    args = SimpleNamespace(**values)
    return count_updates(build(args, str(tmp_path)), args.warmup)


def test_one_host_sync_per_update_with_restarts_and_one_more_to_log(tmp_path):
    # dead_code_steps 1: codes are re-seeded at every update, the most bookkeeping there is.
    rows = counted(tmp_path)
    assert [(r["step"], r["logging"]) for r in rows] == [(2, False), (3, True)]
    assert [r["syncs"] for r in rows] == [1, 2]  # the outcomes of both optimizers read back once, + 1 to log
    assert all(r["kinds"] == {"tolist": r["syncs"]} for r in rows)


def test_sync_counter_sees_each_kind_of_host_sync():
    import torch

    x = torch.arange(6.0)
    with SyncCounter() as counter:
        x.sum().item(), x.tolist(), bool(x[0] > 1), x[x > 2], x.nonzero(), x.to("cpu"), x.to("cpu", non_blocking=True)
        torch.nn.functional.relu(x)  # none
    assert dict(counter.counts) == {"item": 1, "tolist": 1, "bool": 1, "mask index": 1, "nonzero": 1,
                                    "blocking copy": 1}


def run_check(python: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), *args], env={**env, "PYTHON": python},
                          capture_output=True, text=True, timeout=120)


def test_gpu_check_exits_non_zero_without_torch_or_without_cuda(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    no_torch = subprocess.run([sys.executable, "-I", "-S", "-c", "import torch"], capture_output=True)
    if no_torch.returncode == 0:
        pytest.skip("this Python finds torch even without site-packages")
    script = tmp_path / "python-no-site"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")
    script.chmod(0o755)
    missing = run_check(str(script))
    assert missing.returncode == 1 and "has no torch" in missing.stderr
    import torch

    if not torch.cuda.is_available():
        no_gpu = run_check(sys.executable)
        assert no_gpu.returncode == 1 and "torch.cuda.is_available() is false" in no_gpu.stderr


def test_throughput_and_flops_per_update_reach_the_logs_and_the_model_card(tmp_path):
    from snac_accel.progress import count_flops
    from snac_accel.trainer import SnacTrainer

    from .conftest import tiny_config
    from .helpers import custom_states

    trainer = SnacTrainer(tiny_config(tmp_path, max_train_steps=1, segment_seconds=0.25, train_batch_size=2,
                                      validation_data_dir=None, codebook_init="none"))
    final = trainer.fit()
    flops = trainer.state.extra["flops_per_update"]  # counted on the first update, checkpointed
    trainer.sampler.set_epoch(0)
    with count_flops() as again:
        trainer.train_step(next(iter(trainer.train_loader))["audio"])
    assert flops == again[0] > 1e9
    assert custom_states(tmp_path / "checkpoints/checkpoint_1")["train_state"]["extra"]["flops_per_update"] == flops
    last = trainer.progress.last
    assert last["perf/updates_per_second"] > 0 and last["perf/audio_seconds_per_second"] > 0
    assert abs(last["perf/tflops_per_second"] - flops * last["perf/updates_per_second"] / 1e12) < 1e-9
    card = (final / "README.md").read_text()
    assert "- Throughput: " in card and "updates per second" in card and "on 1 x CPU" in card


def test_loader_workers_follow_the_cores_and_the_measured_decode_cost(monkeypatch, demo_dir):
    """A batch decoded per 15 ms update: cheap formats leave the cores to the step, slow ones may pass the old cap of 8."""
    from snac_accel.data import AudioClips, check_source, default_num_workers, files_dataset
    from snac_accel.data.clips import ExcerptSpec

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert default_num_workers() == 8  # unmeasured (streaming): every spare core, at most 8
    assert default_num_workers(1, 16 * 0.00006) == 2  # 24 kHz WAV, 0.06 ms a clip: two workers
    assert default_num_workers(1, 16 * 0.00775) == 9  # Opus, 129 clips per CPU-second: ceil(124 / 15)
    assert default_num_workers(1, 16 * 0.1) == 15 and default_num_workers(2, 16 * 0.1) == 7  # all spare cores
    clips = AudioClips([files_dataset([str(p) for p in sorted((demo_dir / "train").glob("*.flac"))])],
                       ExcerptSpec(sample_rate=24000, length=12000))
    assert 0 < check_source(clips, "training") < 1.0  # real decodes, seconds per clip


def test_a_loop_that_waits_on_its_loader_is_told_how_many_workers_keep_up(tmp_path, monkeypatch, caplog):
    import logging

    from snac_accel.progress import DataAdvice, Progress
    from snac_accel.trainer import SnacTrainer

    from .conftest import tiny_config

    # by hand: 16 clips of 10 ms are 160 ms of one worker per batch; at 20 ms a step, 8 workers keep up
    line = DataAdvice(workers=3, decode_seconds=0.01, clips_per_batch=16).message(0.5, 10, 0.02)
    assert "50% of the time of its last 10 updates (3 loader workers per process, 10.0 ms" in line
    assert "160 ms and a step 20 ms, so about 8 workers keep up" in line and "--dataloader_num_workers" in line
    monkeypatch.setattr(Progress, "SLOW_DATA_SHARE", 0.0)  # any wait counts as slow: the advice is due
    trainer = SnacTrainer(tiny_config(tmp_path, max_train_steps=3, logging_steps=1, segment_seconds=0.25,
                                      train_batch_size=2, validation_data_dir=None, codebook_init="none",
                                      dataloader_num_workers=0))
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    advice = [r.getMessage() for r in caplog.records if "waited for data" in r.getMessage()]
    assert len(advice) == 1 and "0 loader workers per process" in advice[0] and "workers keep up" in advice[0]
