"""SnacTrainer's step against a bare PyTorch loop doing the same GAN step; memory growth over steps.
With ``--compile``: the trainer's eager step against its ``--torch_compile`` step instead.

    python benchmarks/trainer.py [--preset tiny] [--batch 4] [--seconds 0.5] [--steps 10] [--long 200]
    python benchmarks/trainer.py --compile [--preset snac_24khz] [--compile_mode default] [--long 0]
    python benchmarks/trainer.py --ops [--preset tiny]   # aten ops and weight-norm recomputations per update

Both sides use the same generator, discriminator, losses, AdamW settings and batch; the bare loop
has no accelerate, no accumulation context, no non-finite guard and no schedulers. Rounds alternate
between the two so that a busy machine slows both alike. Target: ratio <= 1.05. Memory: peak
resident set (CPU) or peak allocated (GPU) after 20 and after ``--long`` trainer steps; target
growth < 5%.

``--compile`` compiles the trainer's own models in place (`snac_accel.compile`), as
``--torch_compile`` does; its eager rounds run the same modules under ``torch.compiler.set_stance
("force_eager")``. The first compiled step's time less an eager step's is printed as compile time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snac_accel.compile import compile_models, eager  # noqa: E402
from snac_accel.config import TrainConfig  # noqa: E402
from snac_accel.progress import peak_memory_gb  # noqa: E402
from snac_accel.trainer import SnacTrainer  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "snac_accel" / "demo_data"


def bare_step(generator, discriminator, opt_g, opt_d, losses, config, real):
    mel_loss, disc_loss, adv_loss, fm_loss = losses
    out = generator(real)
    fake = out.audio
    loss_d = disc_loss(discriminator(real), discriminator(fake.detach()))
    loss_d.backward()
    torch.nn.utils.clip_grad_norm_(discriminator.parameters(), config.disc_max_grad_norm)
    opt_d.step()
    opt_d.zero_grad(set_to_none=True)
    discriminator.requires_grad_(False)
    with torch.no_grad():
        d_real = discriminator(real)
    d_fake = discriminator(fake)
    loss_g = (config.mel_weight * mel_loss(fake, real) + config.commitment_weight * out.commitment_loss
              + config.codebook_weight * out.codebook_loss + config.adversarial_weight * adv_loss(d_fake)
              + config.feature_matching_weight * fm_loss(d_real, d_fake))
    loss_g.backward()
    discriminator.requires_grad_(True)
    torch.nn.utils.clip_grad_norm_(generator.parameters(), config.max_grad_norm)
    opt_g.step()
    opt_g.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def compare_compiled(trainer: SnacTrainer, run_trainer, args: argparse.Namespace, device: torch.device) -> int:
    """Eager rounds and compiled rounds of the trainer's step, alternating; returns the steps taken."""
    with eager():
        run_trainer()  # warm-up (allocator)
        reset_peak(device)
        t_eager_first = timed(run_trainer, 1, device)
        peak_eager = peak_memory_gb(device)
    parts = {"generator": trainer.unwrapped_generator,
             "discriminator": trainer.accelerator.unwrap_model(trainer.discriminator)}
    compile_models([parts[name] for name in args.compile_models.split(",")], args.compile_mode)
    t_first = timed(run_trainer, 1, device)
    reset_peak(device)
    t_second = timed(run_trainer, 1, device)  # a graph first needed at the second step would show here
    peak_compiled = peak_memory_gb(device)
    eager_times, compiled_times = [], []
    for _ in range(args.rounds):
        with eager():
            eager_times.append(timed(run_trainer, args.steps, device))
        compiled_times.append(timed(run_trainer, args.steps, device))
    t_eager, t_compiled = statistics.median(eager_times), statistics.median(compiled_times)
    seconds = args.batch * args.seconds
    print(f"compile ({args.compile_models}, mode {args.compile_mode}): first compiled step {t_first:.1f} s, "
          f"compile time "
          f"{t_first - t_eager_first:.1f} s; second compiled step {t_second * 1000:.1f} ms")
    print(f"eager step:    {t_eager * 1000:8.1f} ms  ({seconds / t_eager:.2f} audio s/s)")
    print(f"compiled step: {t_compiled * 1000:8.1f} ms  ({seconds / t_compiled:.2f} audio s/s)")
    print(f"speed-up eager/compiled: {t_eager / t_compiled:.3f}x")
    if device.type == "cuda":  # a process's peak resident set cannot be reset on the CPU
        print(f"peak memory of a step: eager {peak_eager:.2f} GiB, compiled {peak_compiled:.2f} GiB")
    return 4 + 2 * args.rounds * args.steps


def count_ops(trainer: SnacTrainer, real: torch.Tensor, steps: int) -> None:
    """Aten ops of one trainer update (weight-norm recomputations apart) and CPU seconds per update."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    trainer.train_step(real)  # warm-up
    with Ops() as ops:
        trainer.train_step(real)
    norms = sum(n for name, n in ops.counts.items() if name.startswith("_weight_norm") and "backward" not in name)
    backward = sum(n for name, n in ops.counts.items() if name.startswith("_weight_norm") and "backward" in name)
    start = time.process_time()
    for _ in range(steps):
        trainer.train_step(real)
    cpu = (time.process_time() - start) / steps
    print(f"ops per update: {sum(ops.counts.values())} aten ops, weight norm computed {norms} times in the "
          f"forwards and {backward} in the backward; {cpu * 1000:.0f} ms CPU per update ({steps} updates)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=5, help="steps per timing round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--long", type=int, default=200, help="trainer steps for the memory check")
    parser.add_argument("--mixed_precision", default="no")
    parser.add_argument("--compile", action="store_true", help="eager vs --torch_compile instead of bare vs trainer")
    parser.add_argument("--ops", action="store_true",
                        help="op counts (weight norm apart) and CPU time of the trainer's update, GAN on")
    parser.add_argument("--compile_mode", default="default")
    parser.add_argument("--compile_models", default="generator,discriminator",
                        help="what --compile compiles: generator, discriminator or both (comma-separated)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(preset=args.preset, train_data_dir=str(DEMO / "train"), output_dir=tmp,
                             train_batch_size=args.batch, segment_seconds=args.seconds, report_to="none",
                             dataloader_num_workers=0, mixed_precision=args.mixed_precision,
                             **({"disc_start": 0} if args.ops else {}))
        trainer = SnacTrainer(config)
        device = trainer.accelerator.device
        trainer.sampler.set_epoch(0)
        real = next(iter(trainer.train_loader))["audio"].to(device)

        generator = copy.deepcopy(trainer.unwrapped_generator)
        discriminator = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.discriminator))
        betas = (config.adam_beta1, config.adam_beta2)
        opt_g = torch.optim.AdamW(generator.parameters(), lr=config.learning_rate, betas=betas)
        opt_d = torch.optim.AdamW(discriminator.parameters(), lr=config.learning_rate, betas=betas)
        losses = (trainer.mel_loss, trainer.disc_loss, trainer.adv_loss, trainer.fm_loss)

        def run_bare():
            bare_step(generator, discriminator, opt_g, opt_d, losses, config, real)

        def run_trainer():
            trainer.train_step(real)

        print(f"device: {device}, preset {args.preset}, batch {args.batch} x {args.seconds} s, "
              f"{torch.get_num_threads()} threads, {args.rounds} rounds of {args.steps} steps (median)")
        if args.ops:
            return count_ops(trainer, real, args.steps)
        if args.compile:
            done = compare_compiled(trainer, run_trainer, args, device)
        else:
            run_bare(), run_trainer()  # warm-up (allocator, autotuning)
            bare, ours = [], []
            for _ in range(args.rounds):
                bare.append(timed(run_bare, args.steps, device))
                ours.append(timed(run_trainer, args.steps, device))
            t_bare, t_ours = statistics.median(bare), statistics.median(ours)
            print(f"bare PyTorch step: {t_bare * 1000:8.1f} ms")
            print(f"SnacTrainer step:  {t_ours * 1000:8.1f} ms")
            print(f"ratio trainer/bare: {t_ours / t_bare:.3f}  (target <= 1.05)")
            done = 1 + args.rounds * args.steps
        if args.long <= 0:
            return
        for _ in range(max(0, 20 - done)):
            run_trainer()
        at_20 = peak_memory_gb(device)
        for _ in range(args.long - max(done, 20)):
            run_trainer()
        at_long = peak_memory_gb(device)
        print(f"peak memory after 20 steps: {at_20:.3f} GiB, after {args.long}: {at_long:.3f} GiB, "
              f"growth {100 * (at_long / at_20 - 1):.2f}%  (target < 5%)")


if __name__ == "__main__":
    main()
