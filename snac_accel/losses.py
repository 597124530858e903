"""Codec losses after DAC: multi-scale mel, least-squares adversarial and feature matching.

Spectral losses run in float32 even under autocast: log-magnitudes of quiet bins underflow in half
precision. Each module keeps its hyperparameters in its constructor and holds no optimisation state.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

FeatureMaps = list[torch.Tensor]

MEL_BINS = (5, 10, 20, 40, 80, 160, 320)
MEL_WINDOWS = (32, 64, 128, 256, 512, 1024, 2048)
LN10 = math.log(10.0)


def _frames_spectrum(audio: torch.Tensor, window: torch.Tensor, hop: int) -> torch.Tensor:
    """Complex one-sided spectrum [N, frames, bins] of audio [N, T]: torch.stft(center=True, reflect)."""
    pad = window.shape[0] // 2
    padded = F.pad(audio[:, None], (pad, pad), mode="reflect")[:, 0]
    return torch.fft.rfft(padded.unfold(-1, window.shape[0], hop) * window)


def _magnitude(spec: torch.Tensor) -> torch.Tensor:
    """|spec| as sqrt(re^2 + im^2): about three times faster than complex abs (hypot) on CPU."""
    parts = torch.view_as_real(spec)
    real, imag = parts[..., 0], parts[..., 1]
    return torch.addcmul(real * real, imag, imag).sqrt_()


def _overlap_add(frames: torch.Tensor, window: torch.Tensor, hop: int, length: int) -> torch.Tensor:
    """Adjoint of windowed framing: frames [N, F, n] times window, placed every ``hop`` samples, summed.

    With n a multiple of hop (the mel loss's hop is n/4) this is n/hop shifted multiply-adds, several
    times faster than ``F.fold`` on the CPU.
    """
    batch, n_frames, n_fft = frames.shape
    if n_fft % hop:
        return F.fold((frames * window).transpose(1, 2), output_size=(1, length), kernel_size=(1, n_fft),
                      stride=(1, hop)).reshape(batch, length)
    shifts = n_fft // hop
    out = frames.new_zeros(batch, max(length, (n_frames + shifts - 1) * hop))
    blocks = out[:, :(n_frames + shifts - 1) * hop].view(batch, n_frames + shifts - 1, hop)
    parts = frames.view(batch, n_frames, shifts, hop)
    window_parts = window.view(shifts, hop)
    for shift in range(shifts):
        blocks[:, shift:shift + n_frames].addcmul_(parts[:, :, shift], window_parts[shift])
    return out[:, :length]


def _adjoint_filterbank(fbank: torch.Tensor, n_fft: int) -> torch.Tensor:
    """fbank.T [n_mels, bins] with the DC (and Nyquist) rows doubled, for `_LogMelL1.backward`.

    The adjoint of a one-sided rfft counts every bin twice (it and its mirror) except DC and
    Nyquist, which have no mirror; the backward halves everything, so those two weigh double.
    """
    weights = torch.ones(fbank.shape[0], 1)
    weights[0] = 2.0
    if n_fft % 2 == 0:
        weights[-1] = 2.0
    return (fbank * weights).T.contiguous()


class _LogMelL1(torch.autograd.Function):
    """L1 between log10 mel magnitudes of fake and real at one scale, with a hand-written backward.

    Autograd through a batched STFT would also differentiate the real half and walk the complex
    abs and onesided-FFT graphs op by op; this backward covers the fake half only, in a few passes.
    """

    @staticmethod
    def forward(ctx: Any, fake: torch.Tensor, real: torch.Tensor, window: torch.Tensor, fbank: torch.Tensor,
                fbank_adjoint: torch.Tensor, hop: int, eps: float) -> torch.Tensor:
        batch = fake.shape[0]
        spec = _frames_spectrum(torch.cat([fake, real]), window, hop)
        mag = _magnitude(spec)
        mel = mag @ fbank
        diff = mel.clamp(min=eps).log10()
        diff = diff[:batch] - diff[batch:]
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(spec[:batch], mag[:batch], mel[:batch], diff.sign(), window, fbank_adjoint)
            ctx.hop, ctx.eps, ctx.length = hop, eps, fake.shape[-1]
        return diff.abs().mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        spec, mag, mel, sign, window, fbank_adjoint = ctx.saved_tensors
        n_fft, pad, length = window.shape[0], window.shape[0] // 2, ctx.length
        # L1 mean -> log10 -> clamp (no gradient below eps, as torch.clamp).
        d_mel = sign * (grad / sign.numel())
        d_mel = torch.where(mel >= ctx.eps, d_mel / (mel.clamp(min=ctx.eps) * LN10), 0.0)
        d_mag = d_mel @ fbank_adjoint
        d_spec = spec * (d_mag / mag).nan_to_num_(0.0, 0.0, 0.0)  # |z|' = z / |z|, 0 at 0 as torch.abs
        # irfft without 1/n scaling doubles the mirrored bins: the 0.5 on the window undoes it.
        d_frames = torch.fft.irfft(d_spec, n=n_fft, norm="forward")
        d_padded = _overlap_add(d_frames, 0.5 * window, ctx.hop, length + 2 * pad)
        d_audio = d_padded[:, pad:pad + length].clone()
        d_audio[:, 1:pad + 1] += d_padded[:, :pad].flip(-1)
        d_audio[:, length - 1 - pad:length - 1] += d_padded[:, pad + length:].flip(-1)
        return d_audio, None, None, None, None, None, None


def _log_mel_l1_autograd(fake: torch.Tensor, real: torch.Tensor, window: torch.Tensor, fbank: torch.Tensor,
                         hop: int, eps: float) -> torch.Tensor:
    """`_LogMelL1`'s loss differentiated by torch autograd (complex abs: a zero gradient at 0); the
    target's spectrum is taken apart, without a graph."""
    def log_mel(audio: torch.Tensor) -> torch.Tensor:
        return (_frames_spectrum(audio, window, hop).abs() @ fbank).clamp(min=eps).log10()

    with torch.no_grad():
        target = log_mel(real)
    return (log_mel(fake) - target).abs().mean()


class MultiScaleMelLoss(nn.Module):
    """L1 between log10 mel magnitudes at several resolutions, summed over scales (DAC's mel loss).

    Per scale: hann window, hop window/4, centred reflect-padded STFT, magnitude (power 1), slaney
    mel filterbank from torchaudio, log10 of the mel clamped at ``clamp_eps``. Real and fake share
    one STFT per scale (concatenated on the batch axis) and only the fake half is differentiated;
    the real audio is a target and gets no gradient. Windows and filterbanks are built once, as
    buffers that follow the module's device. ``hand_written_backward=False`` lets torch autograd
    differentiate the same forward (measured against the hand-written backward by benchmarks/losses.py).
    """

    def __init__(self, sample_rate: int, n_mels: Sequence[int] = MEL_BINS, window_lengths: Sequence[int] = MEL_WINDOWS,
                 clamp_eps: float = 1e-5, f_min: float = 0.0, f_max: float | None = None,
                 hand_written_backward: bool = True) -> None:
        super().__init__()
        self.hand_written_backward = hand_written_backward
        if len(n_mels) != len(window_lengths):
            raise ValueError("n_mels and window_lengths must have the same length")
        self.window_lengths = list(window_lengths)
        self.clamp_eps = clamp_eps
        f_max = f_max if f_max is not None else sample_rate / 2
        for i, (mels, window) in enumerate(zip(n_mels, window_lengths)):
            fbank = torchaudio.functional.melscale_fbanks(
                window // 2 + 1, f_min, f_max, mels, sample_rate, norm="slaney", mel_scale="slaney")
            self.register_buffer(f"fbank_{i}", fbank, persistent=False)
            self.register_buffer(f"fbank_adjoint_{i}", _adjoint_filterbank(fbank, window), persistent=False)
            self.register_buffer(f"window_{i}", torch.hann_window(window), persistent=False)

    def log_mels(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        """log10 mel magnitude [B, frames, n_mels] of audio [B, 1, T] or [B, T] at one scale (no gradient path)."""
        window_length = self.window_lengths[scale]
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = _frames_spectrum(x.float().reshape(-1, x.shape[-1]), getattr(self, f"window_{scale}"),
                                    window_length // 4)
            return (_magnitude(spec) @ getattr(self, f"fbank_{scale}")).clamp(min=self.clamp_eps).log10()

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Loss of ``fake`` against ``real``, both [B, 1, T] (or [B, T]); float32 under autocast."""
        with torch.autocast(device_type=fake.device.type, enabled=False):
            fake = fake.float().reshape(-1, fake.shape[-1])
            real = real.detach().float().reshape(-1, real.shape[-1])
            loss = fake.new_zeros(())
            for scale, window_length in enumerate(self.window_lengths):
                window, fbank = getattr(self, f"window_{scale}"), getattr(self, f"fbank_{scale}")
                hop = window_length // 4
                if self.hand_written_backward:
                    loss = loss + _LogMelL1.apply(fake, real, window, fbank, getattr(self, f"fbank_adjoint_{scale}"),
                                                  hop, self.clamp_eps)
                else:
                    loss = loss + _log_mel_l1_autograd(fake, real, window, fbank, hop, self.clamp_eps)
        return loss


class MultiScaleSTFTLoss(nn.Module):
    """DAC's STFT distance: per resolution, L1 of log10(clamp(|X|, eps) ** pow) plus L1 of |X|.

    DAC's defaults: windows 2048 and 512 (hop window/4, hann, centred), eps 1e-5, pow 2 (log power
    spectra), both weights 1; figures computed so compare with DAC's and SNAC's published ones.
    """

    def __init__(self, window_lengths: Sequence[int] = (2048, 512), clamp_eps: float = 1e-5,
                 log_weight: float = 1.0, mag_weight: float = 1.0, pow: float = 2.0) -> None:
        super().__init__()
        self.window_lengths = list(window_lengths)
        self.clamp_eps, self.log_weight, self.mag_weight, self.pow = clamp_eps, log_weight, mag_weight, pow
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
                log_mag = mag.clamp(min=self.clamp_eps).pow(self.pow).log10()
                loss = loss + self.log_weight * F.l1_loss(log_mag[:batch], log_mag[batch:])
                loss = loss + self.mag_weight * F.l1_loss(mag[:batch], mag[batch:])
        return loss


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """SI-SDR in dB per clip [B] of [B, 1, T] audio, on zero-mean signals as DAC computes it.

    torchmetrics' default keeps the mean; DAC removes it, so a DC offset in the reconstruction does
    not count as distortion and figures compare with DAC's and SNAC's published ones.
    """
    from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

    return scale_invariant_signal_distortion_ratio(estimate.float(), reference.float(), zero_mean=True).reshape(-1)


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


def mel_spectrogram_loss(fake: torch.Tensor, real: torch.Tensor, sample_rate: int = 24000) -> torch.Tensor:
    """`MultiScaleMelLoss` as one call, under the earlier SNAC training scripts' name (its weight, 15 in
    DAC's recipe, is applied by the caller). Builds the filterbanks each call: use the module in a loop."""
    return MultiScaleMelLoss(sample_rate).to(fake.device)(fake, real)
