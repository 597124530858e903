"""The output-folder lock: one training run writes into an ``--output_dir`` at a time.

Two runs on one folder would write the same ``checkpoints/.partial_checkpoint_N`` and rotate each
other's checkpoints. The lock is a file created with ``O_EXCL`` (atomic, also on NFS, which a
multi-node run's shared folder often is) that names its holder: host, pid and, under SLURM, the job.
A lock left by a killed run is taken over with a warning when its holder is provably gone: a dead
pid in this process namespace of this running kernel (a host name alone does not prove it:
containers on one machine may share a host name but not their pids), or an earlier incarnation of
this SLURM job (a requeued job has a higher
``SLURM_RESTART_COUNT``). Any other holder is named in the refusal, with the file to delete if that
run is gone.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list

from .config import ConfigError

logger = get_logger(__name__)

LOCK_NAME = "run.lock"


class OutputDirLocked(ConfigError):
    """Another run holds the output folder."""


def pid_space() -> Optional[str]:
    """This kernel's boot and this process's pid namespace (Linux); pids mean something only within it."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _this_holder() -> dict[str, Any]:
    holder: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "pid_space": pid_space(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    if os.environ.get("SLURM_JOB_ID"):
        holder["slurm_job"] = os.environ["SLURM_JOB_ID"]
        holder["slurm_restart"] = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    return holder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class OutputDirLock:
    """``OUTPUT_DIR/run.lock``; `acquire` raises `OutputDirLocked` naming the holder."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.folder = Path(output_dir)
        self.path = self.folder / LOCK_NAME
        self.held = False
        self._created_folder = False

    def describe(self, holder: dict[str, Any]) -> str:
        if not holder:
            return "holder unknown: the lock file is empty or unreadable"
        job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('started')}"

    def read(self) -> Optional[dict[str, Any]]:
        """The holder written in the lock file; {} for an unreadable one, None when there is none."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale_reason(self, holder: dict[str, Any], me: dict[str, Any]) -> Optional[str]:
        """Why the holder is certainly gone, or None when it may still be running."""
        same_pids = holder.get("host") == me["host"] and me["pid_space"] and holder.get("pid_space") == me["pid_space"]
        if same_pids and isinstance(holder.get("pid"), int):
            if holder["pid"] == me["pid"]:
                return "held by this process"
            if not _pid_alive(holder["pid"]):
                return f"pid {holder['pid']} is no longer running"
        if (me.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]
                and int(holder.get("slurm_restart", 0)) < me["slurm_restart"]):
            return f"SLURM requeued job {me['slurm_job']}; its earlier run is over"
        return None

    def acquire(self) -> None:
        if not self.folder.exists():
            self._created_folder = True
        self.folder.mkdir(parents=True, exist_ok=True)
        me = _this_holder()
        text = json.dumps(me)
        # Serialise the takeover of a stale lock between processes of this host (flock on the folder;
        # best effort: NFS may refuse a lock on a folder, and O_EXCL alone still keeps two runs apart).
        guard = os.open(self.folder, os.O_RDONLY)
        try:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX)
            except OSError:
                pass
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.read() or {}
                reason = self._stale_reason(holder, me)
                if reason is None:
                    raise OutputDirLocked(
                        f"{self.folder} is in use by another training run ({self.describe(holder)}); wait for it, "
                        f"choose another --output_dir, or delete {self.path} if that run is gone") from None
                if reason != "held by this process":
                    logger.warning(f"taking over the lock of {self.folder} from {self.describe(holder)}: {reason}",
                                   main_process_only=False)
                partial = self.path.with_name(f".{LOCK_NAME}.{me['pid']}")
                partial.write_text(text)
                os.replace(partial, self.path)
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
        finally:
            os.close(guard)
        self.held = True

    def release(self) -> None:
        """Remove the lock if it is still ours, and the folder if this run created it and left it empty."""
        if not self.held:
            return
        self.held = False
        holder = self.read()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        if self._created_folder:
            try:
                self.folder.rmdir()
            except OSError:
                pass


def lock_output_dir(accelerator: Accelerator, output_dir: str | os.PathLike) -> OutputDirLock:
    """Own the output folder before anything is written; the main process holds the lock and
    tells the others, so that every process of a refused run stops with the same line."""
    lock = OutputDirLock(output_dir)
    refused = None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except OutputDirLocked as err:
            refused = str(err)
    if accelerator.num_processes > 1:
        refused = broadcast_object_list([refused])[0]
    if refused:
        raise OutputDirLocked(refused)
    return lock
