"""Codec losses after DAC: multi-scale mel, least-squares adversarial and feature matching.

Spectral losses run in float32 even under autocast: log-magnitudes of quiet bins underflow in half
precision. Each module keeps its hyperparameters in its constructor and holds no optimisation state.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

FeatureMaps = list[torch.Tensor]

MEL_BINS = (5, 10, 20, 40, 80, 160, 320)
MEL_WINDOWS = (32, 64, 128, 256, 512, 1024, 2048)


class MultiScaleMelLoss(nn.Module):
    """L1 between log10 mel magnitudes at several resolutions, summed over scales.

    Real and fake share one STFT per scale (concatenated on the batch axis); the hann windows and
    slaney mel filterbanks are built once, as buffers, and follow the module's device.
    """

    def __init__(self, sample_rate: int, n_mels: Sequence[int] = MEL_BINS, window_lengths: Sequence[int] = MEL_WINDOWS,
                 clamp_eps: float = 1e-5, f_min: float = 0.0, f_max: float | None = None) -> None:
        super().__init__()
        if len(n_mels) != len(window_lengths):
            raise ValueError("n_mels and window_lengths must have the same length")
        self.window_lengths = list(window_lengths)
        self.clamp_eps = clamp_eps
        f_max = f_max if f_max is not None else sample_rate / 2
        for i, (mels, window) in enumerate(zip(n_mels, window_lengths)):
            fbank = torchaudio.functional.melscale_fbanks(
                window // 2 + 1, f_min, f_max, mels, sample_rate, norm="slaney", mel_scale="slaney")
            self.register_buffer(f"fbank_{i}", fbank, persistent=False)
            self.register_buffer(f"window_{i}", torch.hann_window(window), persistent=False)

    def log_mels(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        """log10 mel magnitude [B, frames, n_mels] of audio [B, 1, T] or [B, T] at one scale."""
        window_length = self.window_lengths[scale]
        spec = torch.stft(x.float().reshape(-1, x.shape[-1]), window_length, window_length // 4,
                          window=getattr(self, f"window_{scale}"), center=True, pad_mode="reflect",
                          return_complex=True)
        mel = spec.abs().transpose(1, 2) @ getattr(self, f"fbank_{scale}")
        return mel.clamp(min=self.clamp_eps).log10()

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        batch = fake.shape[0]
        loss = fake.new_zeros((), dtype=torch.float32)
        with torch.autocast(device_type=fake.device.type, enabled=False):
            both = torch.cat([fake, real.to(fake.dtype)], dim=0)
            for scale in range(len(self.window_lengths)):
                mels = self.log_mels(both, scale)
                loss = loss + F.l1_loss(mels[:batch], mels[batch:])
        return loss


class MultiScaleSTFTLoss(nn.Module):
    """L1 of log10 and linear STFT magnitudes at several resolutions (DAC's STFT distance)."""

    def __init__(self, window_lengths: Sequence[int] = (2048, 512), clamp_eps: float = 1e-5,
                 log_weight: float = 1.0, mag_weight: float = 1.0) -> None:
        super().__init__()
        self.window_lengths = list(window_lengths)
        self.clamp_eps, self.log_weight, self.mag_weight = clamp_eps, log_weight, mag_weight
        for i, window in enumerate(window_lengths):
            self.register_buffer(f"window_{i}", torch.hann_window(window), persistent=False)

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        batch = fake.shape[0]
        loss = fake.new_zeros((), dtype=torch.float32)
        with torch.autocast(device_type=fake.device.type, enabled=False):
            both = torch.cat([fake, real.to(fake.dtype)], dim=0).float()
            both = both.reshape(-1, both.shape[-1])
            for i, window_length in enumerate(self.window_lengths):
                mag = torch.stft(both, window_length, window_length // 4, window=getattr(self, f"window_{i}"),
                                 center=True, pad_mode="reflect", return_complex=True).abs()
                log_mag = mag.clamp(min=self.clamp_eps).log10()
                loss = loss + self.log_weight * F.l1_loss(log_mag[:batch], log_mag[batch:])
                loss = loss + self.mag_weight * F.l1_loss(mag[:batch], mag[batch:])
        return loss


class DiscriminatorLoss(nn.Module):
    """Least-squares GAN loss of the discriminator: real logits to 1, fake logits to 0."""

    def forward(self, real: list[FeatureMaps], fake: list[FeatureMaps]) -> torch.Tensor:
        loss = 0.0
        for r, f in zip(real, fake):
            loss = loss + torch.mean((1 - r[-1].float()) ** 2) + torch.mean(f[-1].float() ** 2)
        return loss


class GeneratorAdversarialLoss(nn.Module):
    """Least-squares GAN loss of the generator: fake logits to 1."""

    def forward(self, fake: list[FeatureMaps]) -> torch.Tensor:
        loss = 0.0
        for f in fake:
            loss = loss + torch.mean((1 - f[-1].float()) ** 2)
        return loss


class FeatureMatchingLoss(nn.Module):
    """L1 between the discriminator's hidden feature maps of fake and (detached) real audio."""

    def forward(self, real: list[FeatureMaps], fake: list[FeatureMaps]) -> torch.Tensor:
        loss = 0.0
        for r, f in zip(real, fake):
            for r_map, f_map in zip(r[:-1], f[:-1]):
                loss = loss + F.l1_loss(f_map.float(), r_map.detach().float())
        return loss
