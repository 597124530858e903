"""The output-folder lock: one run per --output_dir; a lock whose holder is gone is taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess

import pytest
from accelerate import PartialState

from snac_accel.lock import LOCK_NAME, OutputDirLock, OutputDirLocked, pid_space


@pytest.fixture(autouse=True)
def accelerate_state():
    PartialState()  # accelerate's logger, which the lock warns through, needs it


def _holder(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_space": pid_space(),
              "started": "2025-01-01 00:00:00 +0000", **fields}
    (folder / LOCK_NAME).write_text(json.dumps(holder))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_lock_names_its_holder_and_refuses_a_second_run(tmp_path):
    first = OutputDirLock(tmp_path / "run")
    first.acquire()
    holder = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _holder(tmp_path / "run", pid=sleeper.pid)  # another live process of this host holds it
        with pytest.raises(OutputDirLocked, match=f"in use by another training run \\(pid {sleeper.pid} on "
                                                  f"{socket.gethostname()}, since 2025-01-01"):
            OutputDirLock(tmp_path / "run").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = _dead_pid()
    _holder(tmp_path, pid=dead)
    lock = OutputDirLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert f"taking over the lock of {tmp_path} from pid {dead}" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists() and tmp_path.is_dir()


@pytest.mark.parametrize("pids", ["another pid namespace", None])
def test_dead_pid_of_another_pid_namespace_on_this_host_name_is_not_proof(tmp_path, pids):
    """Containers sharing a host name but not a PID namespace: the holder's pid means nothing here
    (None: a lock written without the namespace, as older versions did)."""
    _holder(tmp_path, pid=_dead_pid(), pid_space=pids)
    with pytest.raises(OutputDirLocked, match="in use by another training run"):
        OutputDirLock(tmp_path).acquire()


def test_lock_of_another_host_is_refused_unless_slurm_requeued_this_job(tmp_path, monkeypatch):
    _holder(tmp_path, host="node-7", pid=_dead_pid(), slurm_job="42", slurm_restart=0)
    with pytest.raises(OutputDirLocked, match="on node-7, SLURM job 42"):
        OutputDirLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    OutputDirLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["slurm_restart"] == 1


def test_release_leaves_another_holder_and_removes_the_folder_it_created(tmp_path):
    lock = OutputDirLock(tmp_path / "new")
    lock.acquire()
    lock.release()
    assert not (tmp_path / "new").exists()
    lock = OutputDirLock(tmp_path)
    lock.acquire()
    _holder(tmp_path, pid=1, host="elsewhere")  # someone deleted ours and started a run: not ours to remove
    lock.release()
    assert (tmp_path / LOCK_NAME).is_file()
