"""launch.sh setup: idempotent, reinstalls nothing when the requirements did not change."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Stands in for the venv's python: logs every call; pip calls end there (nothing is installed),
# anything else (the FFmpeg check) runs on the real interpreter.
PYTHON_STAND_IN = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls.log"
[[ "$1 $2" == "-m pip" ]] && exit 0
exec {python} "$@"
"""


def setup(venv: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "launch.sh"), "setup"], cwd=ROOT, env={**os.environ, "VENV": str(venv)},
                          capture_output=True, text=True, timeout=300)


def test_setup_installs_once_then_reinstalls_nothing(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(PYTHON_STAND_IN.format(python=sys.executable))
    python.chmod(0o755)
    calls = venv / "calls.log"
    stamp = venv / ".snac-accel-stamp"
    expected = hashlib.sha256(b"".join((ROOT / name).read_bytes()
                                       for name in ("setup.cfg", "pyproject.toml", "constraints.txt"))).hexdigest()

    first = setup(venv)  # no stamp yet: installs, then records what it installed
    assert first.returncode == 0, first.stderr
    assert "setting up" in first.stdout
    assert sum(line.startswith("-m pip install") for line in calls.read_text().splitlines()) == 2
    assert stamp.read_text().strip() == expected

    calls.unlink()
    stamped = stamp.stat().st_mtime_ns
    second = setup(venv)  # nothing changed: no pip, no output, the stamp untouched
    assert second.returncode == 0, second.stderr
    assert second.stdout == ""
    assert not any(line.startswith("-m pip") for line in calls.read_text().splitlines())
    assert stamp.stat().st_mtime_ns == stamped and stamp.read_text().strip() == expected

    stamp.write_text("stale\n")  # the requirements changed since: set up again
    third = setup(venv)
    assert "setting up" in third.stdout and stamp.read_text().strip() == expected
