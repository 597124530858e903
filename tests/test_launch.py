"""launch.sh setup: idempotent, and refusing on a machine whose FFmpeg libraries do not load.

A private mount namespace (``unshare -m``) hides FFmpeg from this test only: /dev/null is bind-mounted
over every libavutil the loader knows, so torchcodec imports but cannot decode, as on a fresh machine
without FFmpeg. The venv is this interpreter behind a wrapper with setup's stamp, so setup installs
no Python package; apt-get is either absent from PATH or a stand-in, so nothing is installed for real.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MASK_FFMPEG = "for f in $(ldconfig -p | awk '/libavutil\\.so/{print $NF}'); do mount --bind /dev/null \"$f\"; done"
UNMASK_FFMPEG = "for f in $(ldconfig -p | awk '/libavutil\\.so/{print $NF}'); do umount \"$f\"; done"


def _unshare() -> list[str]:
    for command in (["unshare", "-m"], ["unshare", "-r", "-m"]):
        if shutil.which("unshare") and subprocess.run([*command, "mount", "--bind", "/dev/null", "/dev/null"],
                                                      capture_output=True).returncode == 0:
            return command
    pytest.skip("no private mount namespace here (unshare -m is not permitted)")


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture()
def venv(tmp_path: Path) -> Path:
    """This interpreter as a venv that setup finds up to date (its stamp matches the requirements)."""
    folder = tmp_path / "venv"
    (folder / "bin").mkdir(parents=True)
    _executable(folder / "bin" / "python", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    stamp = hashlib.sha256(b"".join((REPO / name).read_bytes()
                                    for name in ("setup.cfg", "pyproject.toml", "constraints.txt"))).hexdigest()
    (folder / ".snac-accel-stamp").write_text(stamp + "\n")
    return folder


def _path_without(tmp_path: Path, *names: str) -> str:
    """A PATH with every command of this one except ``names`` (a machine without apt-get)."""
    folder = tmp_path / "bin_without_apt"
    folder.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            target = folder / entry.name
            if entry.name not in names and not target.exists() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    return str(folder)


def _setup(venv: Path, script: str = "", path: str | None = None) -> subprocess.CompletedProcess:
    """`launch.sh setup` inside a namespace where FFmpeg does not load, after ``script``."""
    env = {**os.environ, "VENV": str(venv), "PATH": path or os.environ["PATH"]}
    command = f"{MASK_FFMPEG}; {script} exec ./launch.sh setup"
    return subprocess.run([*_unshare(), "bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_setup_passes_where_ffmpeg_decodes(venv):
    result = subprocess.run(["./launch.sh", "setup"], cwd=REPO, env={**os.environ, "VENV": str(venv)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [f"ready: {venv} (packages installed, FFmpeg decodes audio)"]


def test_setup_refuses_in_one_line_where_ffmpeg_does_not_load(venv, tmp_path):
    # torchcodec 0.17 loads FFmpeg lazily: importing it succeeds here, decoding does not.
    probe = f'"{venv}/bin/python" -c "import torchcodec.decoders" && echo "import works" >&2;'
    result = _setup(venv, probe, path=_path_without(tmp_path, "apt-get", "apt"))
    assert "import works" in result.stderr
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ready" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("torchcodec cannot decode audio: FFmpeg's shared libraries are missing"), result.stderr
    assert "Install with your package manager what Debian calls: ffmpeg" in last


@pytest.fixture()
def fake_apt(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in apt-get that records its arguments; ``install`` runs what the test asks for."""
    folder, calls = tmp_path / "fake_apt", tmp_path / "apt_calls"
    folder.mkdir()
    return folder, calls


def _apt_get(folder: Path, calls: Path, on_install: str) -> None:
    _executable(folder / "apt-get", f'#!/bin/bash\necho "$*" >> "{calls}"\n'
                                    f'if [[ " $* " == *" install "* ]]; then {on_install}; fi\n')


@pytest.mark.skipif(os.geteuid() != 0, reason="setup installs FFmpeg only as root")
def test_setup_installs_debian_ffmpeg_as_root(venv, fake_apt):
    folder, calls = fake_apt
    _apt_get(folder, calls, UNMASK_FFMPEG)  # "installing" makes the libraries load again
    result = _setup(venv, path=f"{folder}{os.pathsep}{os.environ['PATH']}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls.read_text().splitlines() == ["update -qq", "install -y -qq ffmpeg"]
    assert result.stdout.splitlines() == ["installing Debian's ffmpeg (apt-get)",
                                          f"ready: {venv} (packages installed, FFmpeg decodes audio)"]


@pytest.mark.skipif(os.geteuid() != 0, reason="setup installs FFmpeg only as root")
def test_setup_names_the_command_when_the_install_fails(venv, fake_apt):
    folder, calls = fake_apt
    _apt_get(folder, calls, "echo 'E: Unable to locate package ffmpeg' >&2; exit 100")
    result = _setup(venv, path=f"{folder}{os.pathsep}{os.environ['PATH']}")
    assert result.returncode == 1
    assert "E: Unable to locate package ffmpeg" in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("Run: apt-get install ffmpeg")


# Stands in for the venv's python: logs every call; pip calls end there (nothing is installed),
# anything else (the FFmpeg check) runs on the real interpreter.
PYTHON_STAND_IN = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls.log"
[[ "$1 $2" == "-m pip" ]] && exit 0
exec {python} "$@"
"""


def plain_setup(venv: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launch.sh"), "setup"], cwd=REPO, env={**os.environ, "VENV": str(venv)},
                          capture_output=True, text=True, timeout=300)


def test_setup_installs_once_then_reinstalls_nothing(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(PYTHON_STAND_IN.format(python=sys.executable))
    python.chmod(0o755)
    calls = venv / "calls.log"
    stamp = venv / ".snac-accel-stamp"
    expected = hashlib.sha256(b"".join((REPO / name).read_bytes()
                                       for name in ("setup.cfg", "pyproject.toml", "constraints.txt"))).hexdigest()

    first = plain_setup(venv)  # no stamp yet: installs, then records what it installed
    assert first.returncode == 0, first.stderr
    assert "setting up" in first.stdout
    assert sum(line.startswith("-m pip install") for line in calls.read_text().splitlines()) == 2
    assert stamp.read_text().strip() == expected

    calls.unlink()
    stamped = stamp.stat().st_mtime_ns
    second = plain_setup(venv)  # nothing changed: no pip, one line, the stamp untouched
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [f"ready: {venv} (packages installed, FFmpeg decodes audio)"]
    assert not any(line.startswith("-m pip") for line in calls.read_text().splitlines())
    assert stamp.stat().st_mtime_ns == stamped and stamp.read_text().strip() == expected

    stamp.write_text("stale\n")  # the requirements changed since: set up again
    third = plain_setup(venv)
    assert "setting up" in third.stdout and stamp.read_text().strip() == expected
