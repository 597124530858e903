"""Discriminators after DAC: multi-period (HiFi-GAN) and multi-band multi-resolution STFT.

Each sub-discriminator returns its list of feature maps, the last one being the logits, so losses
can do feature matching without knowing the architecture.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

FeatureMaps = list[torch.Tensor]

DEFAULT_BANDS = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


def _conv2d(*args, **kwargs) -> nn.Module:
    return weight_norm(nn.Conv2d(*args, **kwargs))


class PeriodDiscriminator(nn.Module):
    """Looks at the waveform folded by one period: catches periodic artefacts (HiFi-GAN, DAC's sizes).

    The input is reflect-padded to a multiple of the period (DAC pads a whole extra period when
    the length already is one; that row carries no new information and is left out here).
    """

    def __init__(self, period: int, channels: int = 32, max_channels: int = 1024) -> None:
        super().__init__()
        self.period = period
        widths = [1] + [min(channels * 4**i, max_channels) for i in range(4)]
        self.convs = nn.ModuleList(
            _conv2d(c_in, c_out, (5, 1), (3, 1), padding=(2, 0)) for c_in, c_out in zip(widths, widths[1:])
        )
        self.convs.append(_conv2d(widths[-1], widths[-1], (5, 1), 1, padding=(2, 0)))
        self.conv_post = _conv2d(widths[-1], 1, (3, 1), 1, padding=(1, 0))

    def forward(self, x: torch.Tensor) -> FeatureMaps:
        length = x.shape[-1]
        x = F.pad(x, (0, (-length) % self.period), mode="reflect")
        x = x.view(x.shape[0], 1, -1, self.period)
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            features.append(x)
        features.append(self.conv_post(x))
        return features


class BandedSTFTDiscriminator(nn.Module):
    """Complex STFT at one resolution, split into frequency bands with their own conv stacks (DAC).

    The STFT follows DAC's "match stride" framing: hop = window/4 and ceil(T / hop) frames, every
    frame centred on a hop boundary. The STFT runs in float32 even under autocast (a half-precision
    STFT loses the quiet bands). The conv stacks follow a bfloat16 autocast, whose range is
    float32's, and stay float32 under float16, where the quiet bins would fall below its range.
    """

    def __init__(self, window_length: int, channels: int = 32, bands: Sequence[tuple[float, float]] = DEFAULT_BANDS
                 ) -> None:
        super().__init__()
        if window_length % 4:
            raise ValueError(f"STFT window {window_length} must be a multiple of 4 (hop = window / 4)")
        self.window_length = window_length
        self.hop_length = window_length // 4
        n_bins = window_length // 2 + 1
        self.bands = [(int(lo * n_bins), int(hi * n_bins)) for lo, hi in bands]
        self.register_buffer("window", torch.hann_window(window_length), persistent=False)

        def stack() -> nn.ModuleList:
            return nn.ModuleList([
                _conv2d(2, channels, (3, 9), (1, 1), padding=(1, 4)),
                _conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4)),
                _conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4)),
                _conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4)),
                _conv2d(channels, channels, (3, 3), (1, 1), padding=(1, 1)),
            ])

        self.band_convs = nn.ModuleList(stack() for _ in self.bands)
        self.conv_post = _conv2d(channels, 1, (3, 3), (1, 1), padding=(1, 1))

    def spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 2 (re, im), frames, bins] float32 of audio [B, 1, T]; frames = ceil(T / hop)."""
        x = x.float().reshape(x.shape[0], -1)
        length, hop = x.shape[-1], self.hop_length
        pad = (self.window_length - hop) // 2
        x = F.pad(x[:, None], (pad, pad + (-length) % hop), mode="reflect")[:, 0]
        spec = torch.stft(x, self.window_length, hop, window=self.window, center=True, pad_mode="reflect",
                          return_complex=True)[..., 2:-2]
        return torch.view_as_real(spec).permute(0, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> FeatureMaps:
        device = x.device.type
        with torch.autocast(device_type=device, enabled=False):
            spec = self.spectrogram(x)
        half_convs = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
        with torch.autocast(device_type=device, enabled=half_convs):
            features, outputs = [], []
            for (lo, hi), convs in zip(self.bands, self.band_convs):
                band = spec[..., lo:hi]
                for conv in convs:
                    band = F.leaky_relu(conv(band), 0.1)
                    features.append(band)
                outputs.append(band)
            features.append(self.conv_post(torch.cat(outputs, dim=-1)))
        return features


class Discriminator(nn.Module):
    """All sub-discriminators on DC-free, peak-normalised input (as DAC), one feature list each.

    Order: one `PeriodDiscriminator` per period, then one `BandedSTFTDiscriminator` per window.
    """

    def __init__(self, periods: Sequence[int] = (2, 3, 5, 7, 11), mpd_channels: int = 32,
                 mpd_max_channels: int = 1024, stft_windows: Sequence[int] = (2048, 1024, 512),
                 stft_channels: int = 32, bands: Sequence[tuple[float, float]] = DEFAULT_BANDS) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(
            [PeriodDiscriminator(p, mpd_channels, mpd_max_channels) for p in periods]
            + [BandedSTFTDiscriminator(w, stft_channels, bands) for w in stft_windows]
        )

    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        """Remove DC and peak-normalise to 0.8 per clip: loudness alone must not tell real from fake."""
        x = x - x.mean(dim=-1, keepdim=True)
        return 0.8 * x / (x.abs().amax(dim=-1, keepdim=True) + 1e-9)

    def forward(self, x: torch.Tensor) -> list[FeatureMaps]:
        x = self.preprocess(x)
        return [d(x) for d in self.discriminators]


def split_features(features: list[FeatureMaps], first: int) -> tuple[list[FeatureMaps], list[FeatureMaps]]:
    """The feature maps of a batched pass split into those of its first ``first`` clips and of the rest:
    real and fake go through the discriminator together (it has no batch statistics, so each clip's
    maps are those of a pass of its own)."""
    return ([[t[:first] for t in maps] for maps in features], [[t[first:] for t in maps] for maps in features])


class MultiPeriodDiscriminator(Discriminator):
    """The period discriminators alone (HiFi-GAN's MPD), under the earlier SNAC training scripts' name.

    The trainer uses `Discriminator` (these plus the banded STFT discriminators, as DAC); this alias
    keeps code written for the earlier scripts working.
    """

    def __init__(self, periods: Sequence[int] = (2, 3, 5, 7, 11), channels: int = 32, max_channels: int = 1024) -> None:
        super().__init__(periods, channels, max_channels, stft_windows=())
