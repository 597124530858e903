"""Run control: the decisions that change what every process does next, made once and shared.

A fault reaches one process, not all: a preemption signal lands on one node, one rank meets a batch
of broken files, one rank's clock passes ``--max_train_minutes`` first. If each rank acted on its own
flag, one would stop (or raise) while the others wait in the next collective: a crash under gloo, a
hang until the collective timeout under NCCL. So each rank only records what it saw; once per
micro-batch, before the step, `RunControl.agree` combines every rank's record in one all-reduce on a
CPU (gloo) group, which never waits for the GPU, and every rank then acts on the same result:

- an error on any rank (a `DataError`) is raised on every rank with the same message;
- a stop request (SIGTERM, SIGUSR1, SIGINT or the time budget) on any rank makes every rank finish
  the optimizer update under way and stop after it, at the same step, the signal's stop taking
  precedence over the time budget's (a signal means "checkpoint and leave", the budget "finish").

A second SIGINT aborts at once (KeyboardInterrupt), as a user pressing Ctrl-C twice expects.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list

from .data import DataError

logger = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Stop codes, ordered: the largest requested on any process wins.
NO_STOP, TIME_BUDGET, SIGNALLED = 0, 1, 2
T = TypeVar("T")


class RunControl:
    """What the processes of one run agree on: errors and stops (see the module's docstring)."""

    def __init__(self, accelerator: Accelerator, max_train_minutes: Optional[float] = None) -> None:
        self.accelerator = accelerator
        self.max_seconds = None if max_train_minutes is None else max_train_minutes * 60
        self.started = time.monotonic()
        # Agreement goes over a CPU group: a gloo all-reduce of a host tensor never syncs a GPU stream.
        self.group = dist.new_group(backend="gloo") if accelerator.num_processes > 1 else None
        self.local_signal: Optional[int] = None
        self._interrupts = 0
        self.stop_code = NO_STOP  # agreed
        self.stop_signal: Optional[int] = None  # agreed: the signal that stopped the run, if one did

    # ------------------------------------------------------------------ what one process sees

    def on_signal(self, signum: int, _frame: Any = None) -> None:
        """Record a stop signal; a second SIGINT aborts at once."""
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt
        self.local_signal = self.local_signal or signum

    @contextmanager
    def signals(self) -> Iterator[None]:
        """SIGTERM, SIGUSR1 and SIGINT recorded by `on_signal` while the loop runs."""
        previous = {s: signal.signal(s, self.on_signal) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def start_clock(self) -> None:
        self.started = time.monotonic()

    def _local_stop(self) -> int:
        if self.local_signal is not None:
            return SIGNALLED
        if self.max_seconds is not None and time.monotonic() - self.started > self.max_seconds:
            return TIME_BUDGET
        return NO_STOP

    # ------------------------------------------------------------------ what all processes agree on

    def agree(self, error: Optional[str] = None, stops: bool = True) -> None:
        """Combine every process's error and (unless ``stops`` is False, as while building) stop request;
        raises the shared error on every process.

        Called by every process at the same points: once per micro-batch, and after building the data.
        """
        # The agreed stop code is kept in the local record, so a stop once agreed stays agreed.
        requested = max(self.stop_code, self._local_stop()) if stops else self.stop_code
        local = [int(error is not None), requested, (self.local_signal or 0) if stops else 0]
        if self.group is None:
            flags = local
        else:
            tensor = torch.tensor(local, dtype=torch.int64)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
            flags = tensor.tolist()
        if flags[0]:
            raise self._shared_error(error)
        if flags[1] > self.stop_code:
            self.stop_code = flags[1]
            self.stop_signal = flags[2] or None
            reason = f"signal {signal.Signals(flags[2]).name}" if self.stop_code == SIGNALLED else "--max_train_minutes"
            logger.info(f"stopping after this update ({reason})", main_process_only=True)

    def _shared_error(self, error: Optional[str]) -> Exception:
        if self.group is None:
            return DataError(error)
        messages: list[Optional[str]] = [None] * self.accelerator.num_processes
        dist.all_gather_object(messages, error, group=self.group)
        rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
        return DataError(f"{message} (process {rank})" if self.accelerator.num_processes > 1 else message)

    @property
    def stopping(self) -> bool:
        return self.stop_code != NO_STOP

    @property
    def signalled(self) -> bool:
        return self.stop_code == SIGNALLED

    def shared(self, value: T) -> T:
        """The main process's ``value`` on every process (for decisions such as `latest` or a new best)."""
        if self.accelerator.num_processes == 1:
            return value
        return broadcast_object_list([value], from_process=0)[0]
