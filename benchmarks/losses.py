"""Time MultiScaleMelLoss against a plain per-scale torchaudio reference, forward and backward.

Run `python benchmarks/losses.py [--device cuda]`: a batch of 8 one-second clips at 24 kHz, the
losses timed over the same repetitions in one run, the ratios printed (the project's target is at
least 1.5). Three contenders: the torchaudio reference, MultiScaleMelLoss with its hand-written
backward, and the same forward differentiated by torch autograd (``--mel_backward autograd``).
"""

from __future__ import annotations

import argparse
import time

import torch
import torchaudio

from snac_accel.losses import MEL_BINS, MEL_WINDOWS, MultiScaleMelLoss


class ReferenceMelLoss(torch.nn.Module):
    """One torchaudio MelSpectrogram per scale, real and fake transformed separately."""

    def __init__(self, sample_rate: int) -> None:
        super().__init__()
        self.transforms = torch.nn.ModuleList(
            torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate, n_fft=window, win_length=window, hop_length=window // 4, n_mels=mels,
                power=1.0, center=True, pad_mode="reflect", norm="slaney", mel_scale="slaney")
            for mels, window in zip(MEL_BINS, MEL_WINDOWS))

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        loss = fake.new_zeros(())
        for transform in self.transforms:
            log_fake = transform(fake).clamp(min=1e-5).log10()
            log_real = transform(real).clamp(min=1e-5).log10()
            loss = loss + (log_fake - log_real).abs().mean()
        return loss


def time_forward_backward(losses: dict[str, torch.nn.Module], fake: torch.Tensor, real: torch.Tensor,
                          repeats: int) -> dict[str, list[float]]:
    """Seconds of each forward + backward per loss, the losses interleaved so load hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in losses}
    for _ in range(repeats):
        for name, loss_fn in losses.items():
            fake.grad = None
            if fake.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss_fn(fake, real).backward()
            if fake.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--sample_rate", type=int, default=24000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    length = int(args.seconds * args.sample_rate)
    real = 0.1 * torch.randn(args.batch, 1, length, device=args.device)
    fake = (real + 0.05 * torch.randn_like(real)).requires_grad_(True)
    ours = MultiScaleMelLoss(args.sample_rate).to(args.device)
    autograd = MultiScaleMelLoss(args.sample_rate, hand_written_backward=False).to(args.device)
    reference = ReferenceMelLoss(args.sample_rate).to(args.device)

    with torch.no_grad():
        a, b = ours(fake, real).item(), reference(fake, real).item()
    losses = {"reference": reference, "autograd": autograd, "ours": ours}
    time_forward_backward(losses, fake, real, 2)  # warm-up: allocator, FFT plans
    times = time_forward_backward(losses, fake, real, args.repeats)
    for name, values in times.items():
        values.sort()
    print(f"batch {args.batch} x {args.seconds} s at {args.sample_rate} Hz on {args.device}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats")
    print(f"loss: ours {a:.6f}  reference {b:.6f}  relative difference {abs(a - b) / abs(b):.2e}")
    for label, pick in (("min", 0), ("median", args.repeats // 2)):
        t_ref, t_auto, t_ours = (times[name][pick] for name in ("reference", "autograd", "ours"))
        print(f"{label:>6}: reference (torchaudio per scale) {t_ref * 1e3:8.2f} ms, MultiScaleMelLoss "
              f"{t_ours * 1e3:8.2f} ms forward+backward, speed-up {t_ref / t_ours:.2f}x; same forward with "
              f"torch autograd {t_auto * 1e3:8.2f} ms, hand-written backward {t_auto / t_ours:.2f}x faster")
    print("(on a machine shared with other jobs the minimum is the steadier estimate; --threads 1 avoids "
          "thread oversubscription)")


if __name__ == "__main__":
    main()
