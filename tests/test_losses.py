"""Losses against plain references: DAC's multi-scale mel loss, least-squares GAN and feature matching."""

from __future__ import annotations

import pytest
import torch
import torchaudio

from snac_accel.losses import (MEL_BINS, MEL_WINDOWS, DiscriminatorLoss, FeatureMatchingLoss,
                               GeneratorAdversarialLoss, MultiScaleMelLoss)


def reference_mel_loss(fake: torch.Tensor, real: torch.Tensor, sample_rate: int, bins=MEL_BINS,
                       windows=MEL_WINDOWS) -> torch.Tensor:
    """DAC's mel loss spelled out: one torchaudio MelSpectrogram per scale, log10 clamp 1e-5, L1, summed."""
    loss = torch.zeros(())
    for n_mels, window in zip(bins, windows):
        mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=window, win_length=window, hop_length=window // 4, n_mels=n_mels,
            power=1.0, center=True, pad_mode="reflect", norm="slaney", mel_scale="slaney")
        log_fake = mel(fake.float()).clamp(min=1e-5).log10()
        log_real = mel(real.float()).clamp(min=1e-5).log10()
        loss = loss + (log_fake - log_real).abs().mean()
    return loss


def clips(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / 24000
    real = 0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.05 * torch.randn(batch, length, generator=generator)
    fake = real + 0.02 * torch.randn(batch, length, generator=generator)
    real, fake = real[:, None], fake[:, None]
    real[0, :, :3000] = 0.0  # silence in both (exact zeros: the clamp and |z| at 0)
    fake[0, :, :2000] = 0.0
    return fake, real


@pytest.mark.parametrize("hand_written_backward", [True, False])
@pytest.mark.parametrize("length", [12000, 12345])
def test_mel_loss_and_its_gradient_match_per_scale_torchaudio(length, hand_written_backward):
    fake, real = clips(3, length)
    fake_ours = fake.clone().requires_grad_(True)
    fake_ref = fake.clone().requires_grad_(True)
    ours = MultiScaleMelLoss(24000, hand_written_backward=hand_written_backward)(fake_ours, real)
    reference = reference_mel_loss(fake_ref, real, 24000)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - reference.item()) / reference.item() < 1e-5
    ours.backward()
    reference.backward()
    assert torch.isfinite(fake_ours.grad).all()
    assert (fake_ours.grad - fake_ref.grad).norm() / fake_ref.grad.norm() < 1e-4


def test_mel_loss_with_odd_windows_and_windows_that_are_no_multiple_of_their_hop():
    fake, real = clips(2, 6000)
    fake.requires_grad_(True)
    reference_fake = fake.detach().clone().requires_grad_(True)
    ours = MultiScaleMelLoss(24000, n_mels=(8, 10, 24), window_lengths=(30, 33, 202))(fake, real)
    reference = reference_mel_loss(reference_fake, real, 24000, bins=(8, 10, 24), windows=(30, 33, 202))
    assert abs(ours.item() - reference.item()) / reference.item() < 1e-5
    ours.backward()
    reference.backward()
    assert (fake.grad - reference_fake.grad).norm() / reference_fake.grad.norm() < 1e-4


def test_mel_loss_is_zero_on_identical_audio_and_real_gets_no_gradient():
    fake, real = clips(2, 8000)
    real.requires_grad_(True)
    loss = MultiScaleMelLoss(24000)(real, real.detach())
    assert loss.item() == 0.0
    fake.requires_grad_(True)
    MultiScaleMelLoss(24000)(fake, real).backward()
    assert real.grad is None and fake.grad is not None


def test_mel_loss_runs_in_float32_under_bf16_autocast():
    fake, real = clips(2, 8000)
    loss_fn = MultiScaleMelLoss(24000)
    expected = loss_fn(fake, real)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(fake, real)
        from_bf16 = loss_fn(fake.bfloat16(), real.bfloat16())
    assert loss.dtype == torch.float32 and from_bf16.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert from_bf16.item() == pytest.approx(reference_mel_loss(fake.bfloat16(), real.bfloat16(), 24000).item(),
                                             rel=1e-5)


def test_log_mels_shape_matches_the_reference_frames():
    _, real = clips(2, 8000)
    log_mels = MultiScaleMelLoss(24000).log_mels(real, 5)
    reference = torchaudio.transforms.MelSpectrogram(
        24000, n_fft=1024, win_length=1024, hop_length=256, n_mels=160, power=1.0, norm="slaney",
        mel_scale="slaney")(real[:, 0]).clamp(min=1e-5).log10()
    assert log_mels.shape == (2, reference.shape[-1], 160)
    torch.testing.assert_close(log_mels, reference.transpose(1, 2), rtol=1e-4, atol=1e-5)


def feature_maps(seed: int, requires_grad: bool = False) -> list[list[torch.Tensor]]:
    """Two sub-discriminators with three feature maps each, the last being the logits."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [[(2, 4, 10), (2, 4, 5), (2, 1, 5)], [(2, 3, 7, 2), (2, 3, 3, 2), (2, 1, 3, 2)]]
    return [[torch.randn(s, generator=generator).requires_grad_(requires_grad) for s in sub] for sub in shapes]


def test_least_squares_adversarial_losses_match_plain_references():
    real, fake = feature_maps(0), feature_maps(1)
    expected_d = sum(((1 - r[-1]) ** 2).mean() + (f[-1] ** 2).mean() for r, f in zip(real, fake))
    expected_g = sum(((1 - f[-1]) ** 2).mean() for f in fake)
    torch.testing.assert_close(DiscriminatorLoss()(real, fake), expected_d)
    torch.testing.assert_close(GeneratorAdversarialLoss()(fake), expected_g)


def test_feature_matching_is_l1_over_hidden_maps_with_real_detached():
    real, fake = feature_maps(0, requires_grad=True), feature_maps(1, requires_grad=True)
    expected = sum((f - r).abs().mean() for rs, fs in zip(real, fake) for r, f in zip(rs[:-1], fs[:-1]))
    loss = FeatureMatchingLoss()(real, fake)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(m.grad is None for sub in real for m in sub)
    assert all(m.grad is not None for sub in fake for m in sub[:-1]) and fake[0][-1].grad is None


def test_gan_losses_are_float32_under_bf16_autocast():
    real = [[m.bfloat16() for m in sub] for sub in feature_maps(0)]
    fake = [[m.bfloat16() for m in sub] for sub in feature_maps(1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = [DiscriminatorLoss()(real, fake), GeneratorAdversarialLoss()(fake), FeatureMatchingLoss()(real, fake)]
    assert all(v.dtype == torch.float32 for v in values)
