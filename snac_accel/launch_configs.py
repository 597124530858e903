"""The accelerate configs shipped inside the package, found by name from any folder.

``accelerate launch --config_file "$(snac-accel-config cpu)" -m snac_accel.train ...`` works after a
plain ``pip install``, without a clone of the repository.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

CONFIG_FOLDER = Path(__file__).parent / "accelerate_configs"


def available() -> list[str]:
    """Names of the shipped configs (file names without .yaml)."""
    return sorted(path.stem for path in CONFIG_FOLDER.glob("*.yaml"))


def config_path(name: str) -> Path:
    """The shipped config NAME (``cpu``, ``single_gpu``, ``multi_gpu``, ``multi_node``), or a path as given."""
    given = Path(name)
    if given.suffix in (".yaml", ".yml") and given.is_file():
        return given
    path = CONFIG_FOLDER / f"{given.stem if given.suffix else name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no accelerate config named {name!r}; choose from: {', '.join(available())}")
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="snac-accel-config",
        description="Print the path of a shipped accelerate config, for accelerate launch --config_file. The cpu "
                    "config needs ACCELERATE_USE_CPU=1 in the environment (two gloo processes).")
    parser.add_argument("name", nargs="?", help=f"one of: {', '.join(available())}; without it, list them")
    args = parser.parse_args(argv)
    if args.name is None:
        sys.stdout.write("\n".join(f"{name}\t{config_path(name)}" for name in available()) + "\n")
        return 0
    try:
        sys.stdout.write(f"{config_path(args.name)}\n")
    except FileNotFoundError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
