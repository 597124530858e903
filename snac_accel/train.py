"""Entry point: ``accelerate launch -m snac_accel.train [--config run.yaml] [options]``."""

from __future__ import annotations

import logging
import sys
import types
from typing import Any, Optional

from .arguments import parse_command
from .config import ConfigError


def main(argv: Optional[list[str]] = None) -> int:
    try:
        config, check_only = parse_command(argv)
    except ConfigError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    if check_only:  # launch.sh checks the options before it starts accelerate's launcher
        return 0
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=getattr(logging, config.log_level.upper()))
    from .data import DataError
    from .step import NonFiniteError
    from .trainer import train

    try:
        final = train(config)
    except (ConfigError, DataError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except NonFiniteError as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: abort at once, the last checkpoint stays as it was
        sys.stderr.write("interrupted: the last checkpoint is intact\n")
        return 130
    from accelerate import PartialState

    if PartialState().is_main_process:
        logging.getLogger("snac_accel").info(f"done: {final}")
    return 0


class _TrainModule(types.ModuleType):
    """Importing this module sets ``snac_accel.train`` to it, hiding the package's ``train(config)``
    function; calling the module runs that function, so ``from snac_accel import train`` stays usable."""

    def __call__(self, config: Any) -> Any:
        from .trainer import train

        return train(config)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _TrainModule
