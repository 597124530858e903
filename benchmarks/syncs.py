"""Host syncs per optimizer update of the real training loop, counted (not timed).

    python benchmarks/syncs.py [--preset tiny] [--updates 8] [--logging_steps 4] [--mixed_precision bf16]
    python benchmarks/syncs.py --cuda_debug   # on a GPU: also torch.cuda.set_sync_debug_mode's own count

A host sync is a call that makes the CPU wait for the device's queue: a value read back (``item``,
``tolist``, ``cpu``, ``numpy``, ``bool``/``float``/``int`` of a tensor), an op whose output size
depends on the data (``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``,
``bincount``) and a blocking copy between devices (``to``/``copy_`` naming a device without
``non_blocking``). `SyncCounter` counts them where the loop's own code (snac_accel, accelerate,
snac) calls them; calls from inside torch are left out (an optimizer reading its CPU step counter,
for example, waits for nothing). It runs on the CPU, where no call really waits, so the count says
what a GPU run would wait for. On CUDA, ``--cuda_debug`` adds the driver-side count of
`torch.cuda.set_sync_debug_mode` ("warn": one warning per synchronising call).

The clips are synthetic speech (`benchmarks.gpu_check.write_speech`, PCM WAV: no FFmpeg needed). The
loop is the trainer's own (`SnacTrainer._batches`, `_train_batch`, `_log`) without validation
and checkpoints; the first updates (codebook seeding, warm-up) are not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_check import write_speech  # noqa: E402
from snac_accel.config import TrainConfig  # noqa: E402
from snac_accel.progress import Progress  # noqa: E402
from snac_accel.trainer import SnacTrainer  # noqa: E402

TORCH_DIR = str(Path(torch.__file__).parent)
READ_BACK = {torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.cpu: "cpu",
             torch.Tensor.numpy: "numpy", torch.Tensor.__bool__: "bool", torch.Tensor.__float__: "float",
             torch.Tensor.__int__: "int", torch.Tensor.__index__: "index"}
DATA_SIZED = {torch.nonzero: "nonzero", torch.Tensor.nonzero: "nonzero", torch.unique: "unique",
              torch.Tensor.unique: "unique", torch.masked_select: "masked_select",
              torch.Tensor.masked_select: "masked_select", torch.bincount: "bincount",
              torch.Tensor.bincount: "bincount",
              torch.argwhere: "nonzero"}
INDEXING = {torch.Tensor.__getitem__: "mask index", torch.Tensor.__setitem__: "mask index"}
COPIES = {torch.Tensor.to: "blocking copy", torch.Tensor.copy_: "blocking copy", torch.Tensor.cuda: "blocking copy"}


def _has_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _names_device(args: tuple, kwargs: dict) -> bool:
    """Whether a ``to``/``copy_`` call names a device (or a tensor on one) and does not ask for non_blocking."""
    if kwargs.get("non_blocking") or any(a is True for a in args[2:]):
        return False
    values = list(args[1:]) + [kwargs.get("device")]
    return any(isinstance(v, (torch.device, str)) and str(v) not in ("", "None")
               for v in values) or (len(args) > 1 and isinstance(args[1], torch.Tensor) and args[0] is not args[1]
                                    and args[1].device != args[0].device)


class SyncCounter(TorchFunctionMode):
    """Counts host-sync calls made by code outside torch; ``counts`` by kind, ``sites`` by file:line."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.sites: Counter = Counter()
        self.active = True
        self.paused = False

    def _kind(self, func: Any, args: tuple, kwargs: dict) -> Optional[str]:
        if func in READ_BACK:
            return READ_BACK[func]
        if func in DATA_SIZED:
            return DATA_SIZED[func]
        if func in INDEXING and len(args) > 1 and _has_mask(args[1]):
            return INDEXING[func]
        if func in COPIES and _names_device(args, kwargs):
            return COPIES[func]
        return None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if self.active and not self.paused:
            kind = self._kind(func, args, kwargs)
            if kind is not None:
                caller = sys._getframe(1)
                if not caller.f_code.co_filename.startswith(TORCH_DIR) and caller.f_code.co_filename != __file__:
                    self.counts[kind] += 1
                    self.sites[f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {kind}"] += 1
        self.active = False  # calls made while running this one (inside torch) are not the caller's
        try:
            return func(*args, **kwargs)
        finally:
            self.active = True

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def build(args: argparse.Namespace, output_dir: str) -> SnacTrainer:
    rate = TrainConfig(preset=args.preset).sampling_rate
    data = write_speech(Path(output_dir) / "data", 2 * args.batch, 1.0, rate, 0)
    config = TrainConfig(preset=args.preset, train_data_dir=str(data), output_dir=output_dir + "/run",
                         train_batch_size=args.batch, segment_seconds=args.seconds, report_to="none",
                         dataloader_num_workers=0, mixed_precision=args.mixed_precision,
                         max_train_steps=args.warmup + args.updates, logging_steps=args.logging_steps,
                         disc_start=0, dead_code_steps=args.dead_code_steps, seed=0, codebook_init="none",
                         gradient_accumulation_steps=args.accumulation, adam_fused=args.adam_fused)
    return SnacTrainer(config)


def count_updates(trainer: SnacTrainer, warmup: int, cuda_debug: bool = False) -> list[dict[str, Any]]:
    """Per optimizer update after ``warmup`` ones: syncs counted, whether it was a logging update."""
    acc, config = trainer.accelerator, trainer.config
    trainer.progress = Progress(acc, trainer.max_steps, 0, 1.0)
    trainer._seed_codebooks()
    rows: list[dict[str, Any]] = []
    counter = SyncCounter()
    debug: list[warnings.WarningMessage] = []
    batches = trainer._batches()
    while trainer.state.step < trainer.max_steps:
        counting = trainer.state.step >= warmup
        counter.counts.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda_debug and counting:
                torch.cuda.set_sync_debug_mode("warn")
            with counter if counting else contextlib.nullcontext():
                updated = False
                while not updated:
                    counter.paused = True  # the loader's host-side work (workers, in a real run) is not counted
                    real = next(batches)
                    counter.paused = False
                    updated = trainer._train_batch(real)
                logging = not (trainer.state.step % config.logging_steps and trainer.state.step != trainer.max_steps)
                trainer._log(trainer.logs)
            if cuda_debug:
                torch.cuda.set_sync_debug_mode(0)
            debug = [w for w in caught if "synchroniz" in str(w.message)]
        if counting:
            rows.append({"step": trainer.state.step, "logging": logging, "syncs": counter.total,
                         "kinds": dict(counter.counts), "cuda": len(debug) if cuda_debug else None})
    trainer.progress.close()
    if rows:
        rows[-1]["sites"] = dict(counter.sites)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--mixed_precision", default="no")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--updates", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--logging_steps", type=int, default=4)
    parser.add_argument("--dead_code_steps", type=int, default=1, help="1: restarts at every update (the worst case)")
    parser.add_argument("--adam_fused", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
    parser.add_argument("--cuda_debug", action="store_true", help="also count with torch.cuda.set_sync_debug_mode")
    parser.add_argument("--cpu", action="store_true", help="on the CPU even where CUDA is available")
    args = parser.parse_args()
    if args.cpu:
        os.environ["ACCELERATE_USE_CPU"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        rows = count_updates(build(args, tmp), args.warmup, args.cuda_debug and torch.cuda.is_available())
    plain = [r["syncs"] for r in rows if not r["logging"]]
    logging = [r["syncs"] for r in rows if r["logging"]]
    cuda = [r["cuda"] for r in rows if r["cuda"] is not None]
    print(f"syncs per update ({args.preset}, {args.mixed_precision}, dead_code_steps {args.dead_code_steps}, "
          f"accumulation {args.accumulation}): non-logging {plain}, logging {logging}")
    if cuda:
        print(f"torch.cuda.set_sync_debug_mode count per update: {cuda}")
    print(f"where, over the {len(rows)} counted updates:")
    for site, n in sorted(rows[-1].get("sites", {}).items()):
        print(f"  {site}: {n}")


if __name__ == "__main__":
    main()
