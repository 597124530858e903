"""Discriminators: DAC's layout and output shapes for every preset, float32 STFT path, input preprocessing."""

from __future__ import annotations

import math

import pytest
import torch

from snac_accel.config import DISCRIMINATOR_PRESETS, MODEL_PRESETS
from snac_accel.discriminators import DEFAULT_BANDS, BandedSTFTDiscriminator, Discriminator, PeriodDiscriminator

SAMPLE_RATES = sorted({preset["sampling_rate"] for preset in MODEL_PRESETS.values()})


def halve(width: int, times: int) -> int:
    """Width after `times` convolutions of kernel 9, padding 4, stride 2."""
    for _ in range(times):
        width = (width + 2 * 4 - 9) // 2 + 1
    return width


def expected_period_shapes(batch: int, length: int, period: int, channels: int, max_channels: int) -> list[tuple]:
    rows = math.ceil(length / period)
    widths = [min(channels * 4**i, max_channels) for i in range(4)]
    shapes = []
    for width in widths:  # kernel 5, stride 3, padding 2 along time
        rows = (rows + 2 * 2 - 5) // 3 + 1
        shapes.append((batch, width, rows, period))
    shapes.append((batch, widths[-1], rows, period))
    shapes.append((batch, 1, rows, period))
    return shapes


def expected_stft_shapes(batch: int, length: int, window: int, channels: int) -> list[tuple]:
    frames = math.ceil(length / (window // 4))
    bins = window // 2 + 1
    shapes, total = [], 0
    for lo, hi in DEFAULT_BANDS:
        width = int(hi * bins) - int(lo * bins)
        shapes += [(batch, channels, frames, width)] + [(batch, channels, frames, halve(width, k)) for k in (1, 2, 3)]
        shapes.append((batch, channels, frames, halve(width, 3)))
        total += halve(width, 3)
    shapes.append((batch, 1, frames, total))
    return shapes


@pytest.mark.parametrize("sample_rate", SAMPLE_RATES)
@pytest.mark.parametrize("preset", sorted(DISCRIMINATOR_PRESETS))
@torch.no_grad()
def test_output_shapes_for_every_preset_and_sample_rate(preset, sample_rate):
    sizes = DISCRIMINATOR_PRESETS[preset]
    torch.manual_seed(0)
    discriminator = Discriminator(**sizes).eval()
    length = sample_rate // 4
    outputs = discriminator(0.1 * torch.randn(2, 1, length))
    assert len(outputs) == len(sizes["periods"]) + len(sizes["stft_windows"]) == 5 + 3
    for period, maps in zip(sizes["periods"], outputs):
        expected = expected_period_shapes(2, length, period, sizes["mpd_channels"], sizes["mpd_max_channels"])
        assert [tuple(m.shape) for m in maps] == expected, (preset, sample_rate, period)
    for window, maps in zip(sizes["stft_windows"], outputs[len(sizes["periods"]):]):
        assert len(maps) == 5 * len(DEFAULT_BANDS) + 1
        assert [tuple(m.shape) for m in maps] == expected_stft_shapes(2, length, window, sizes["stft_channels"])
    assert all(torch.isfinite(m).all() for maps in outputs for m in maps)


def test_full_preset_has_dacs_sizes():
    sizes = DISCRIMINATOR_PRESETS["full"]
    assert sizes["periods"] == [2, 3, 5, 7, 11] and sizes["stft_windows"] == [2048, 1024, 512]
    period = PeriodDiscriminator(2, sizes["mpd_channels"], sizes["mpd_max_channels"])
    assert [c.out_channels for c in period.convs] == [32, 128, 512, 1024, 1024]
    stft = BandedSTFTDiscriminator(2048, sizes["stft_channels"])
    assert stft.bands == [(0, 102), (102, 256), (256, 512), (512, 768), (768, 1025)]
    assert stft.hop_length == 512


def test_stft_path_is_float32_under_bf16_autocast():
    discriminator = Discriminator(**DISCRIMINATOR_PRESETS["tiny"])
    audio = 0.1 * torch.randn(1, 1, 6000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = discriminator(audio.bfloat16())
    for maps in outputs[5:]:
        assert all(m.dtype == torch.float32 for m in maps)
    with torch.no_grad():
        plain = discriminator(audio)
    torch.testing.assert_close(outputs[5][-1].detach(), plain[5][-1], rtol=0.05, atol=0.05)


def test_input_is_dc_free_and_peak_normalised_to_0_8():
    t = torch.arange(4800) / 24000
    audio = torch.stack([3.0 + 0.5 * torch.sin(2 * torch.pi * 100 * t), -0.01 * torch.sin(2 * torch.pi * 50 * t)])[:, None]
    x = Discriminator.preprocess(audio)
    torch.testing.assert_close(x.mean(-1), torch.zeros(2, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(x.abs().amax(-1), torch.full((2, 1), 0.8), atol=1e-6, rtol=0)
    # The discriminator sees only the shape of the waveform: gain and offset change nothing.
    discriminator = Discriminator(**DISCRIMINATOR_PRESETS["tiny"]).eval()
    with torch.no_grad():
        a, b = discriminator(audio), discriminator(5.0 * audio - 1.0)
    for maps_a, maps_b in zip(a, b):
        torch.testing.assert_close(maps_a[-1], maps_b[-1], rtol=1e-4, atol=1e-4)
