"""Discriminators: DAC's layout and output shapes for every preset, float32 STFT path, input preprocessing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

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


def test_stft_is_float32_and_its_convs_follow_bf16_autocast_only():
    """The spectrum in float32 under any autocast; the conv stacks in bfloat16 under bfloat16 (same
    range as float32), float32 under float16 (quiet bins below its range)."""
    discriminator = Discriminator(**DISCRIMINATOR_PRESETS["tiny"])
    stft = discriminator.discriminators[5]
    audio = 0.1 * torch.randn(1, 1, 6000)
    with torch.no_grad():
        plain = discriminator(audio)
    for dtype in (torch.bfloat16, torch.float16):
        spectra = []
        hook = stft.band_convs[0][0].register_forward_hook(lambda module, args, out: spectra.append(args[0]))
        with torch.autocast("cpu", dtype=dtype):
            outputs = discriminator(audio.to(dtype))
        hook.remove()
        assert spectra[0].dtype == torch.float32
        expected = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        for maps in outputs[5:]:
            assert all(m.dtype == expected for m in maps), dtype
        torch.testing.assert_close(outputs[5][-1].detach().float(), plain[5][-1], rtol=0.05, atol=0.05)


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


@pytest.mark.parametrize("period", [2, 3, 5])
@pytest.mark.parametrize("length", [60, 61, 64])
@torch.no_grad()
def test_period_discriminator_folds_the_waveform_one_period_per_row(period, length):
    """On a ramp every sample's value is its index: row r, column c of the fold must hold r * period + c."""
    discriminator = PeriodDiscriminator(period, channels=4, max_channels=16)
    seen = []
    discriminator.convs[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    ramp = torch.arange(length, dtype=torch.float32)
    discriminator(torch.stack([ramp, -ramp])[:, None])
    pad = (-length) % period  # reflected by hand: x[T-2], x[T-3], ...
    padded = torch.cat([ramp, ramp[length - 2 - torch.arange(pad)]])
    x = torch.stack([padded, -padded])[:, None]
    assert torch.equal(seen[0], x.view(2, 1, -1, period))
    assert seen[0][0, 0, 1, 0] == period  # the second row starts one period in


@pytest.mark.parametrize("window", [512, 2048])
@torch.no_grad()
def test_stft_branch_is_torch_stft_of_the_reflect_padded_clip(window):
    """DAC's "match stride" framing, computed plainly: reflect-pad (window - hop) / 2 on each side (plus the
    rest of the last hop on the right), then an uncentred STFT gives ceil(T / hop) frames."""
    discriminator = BandedSTFTDiscriminator(window, channels=4)
    length, hop = 5000, window // 4
    x = 0.1 * torch.randn(2, 1, length, generator=torch.Generator().manual_seed(0))
    side = (window - hop) // 2
    padded = F.pad(x, (side, side + (-length) % hop), mode="reflect")[:, 0]
    reference = torch.stft(padded, window, hop, window=torch.hann_window(window), center=False, return_complex=True)
    assert reference.shape[-1] == math.ceil(length / hop)
    expected = torch.view_as_real(reference).permute(0, 3, 2, 1)  # [B, (re, im), frames, bins]
    torch.testing.assert_close(discriminator.spectrogram(x), expected, rtol=1e-5, atol=1e-5)
    # and each band's convolutions get that band of it
    seen = []
    for convs in discriminator.band_convs:
        convs[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    discriminator(x)
    assert len(seen) == len(discriminator.bands) == 5
    for (lo, hi), band in zip(discriminator.bands, seen):
        torch.testing.assert_close(band, expected[..., lo:hi], rtol=1e-5, atol=1e-5)
