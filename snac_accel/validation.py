"""Validation during training: metrics of the fixed validation clips, codebook health, media for TensorBoard.

With ``quality=True`` a validation also computes ViSQOL, PESQ-WB and STOI of each clip
(`snac_accel.perceptual`; the trainer asks for them every ``--quality_metrics_steps`` validations
and at the last one), as ``val/visqol``, ``val/pesq_wb``, ``val/stoi``: means over the clips.

Runs on a forked RNG with a fixed seed: the decoder's noise gives the same metrics every time, and
training's random stream is untouched (resume stays bit-exact). TensorBoard gets the card's figures
(`snac_accel.card`) and the first clips' audio, original and reconstruction.
"""

from __future__ import annotations

from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from .card import codebook_usage_plot, spectra, spectrogram_plot
from .codebook import code_counts, collapse_warnings, histogram_statistics
from .losses import MultiScaleMelLoss, MultiScaleSTFTLoss, si_sdr
from .perceptual import PerceptualMetrics, available

logger = get_logger(__name__)

MEDIA_CLIPS = 2  # clips whose audio and spectrogram go to TensorBoard


class Validator:
    """Metrics of a generator on the fixed validation clips [N, 1, T], as ``val/*`` tracker keys."""

    def __init__(self, clips: torch.Tensor, accelerator: Accelerator, mel_loss: MultiScaleMelLoss, sample_rate: int,
                 codebook_size: int, seed: int, advice: str = "", visqol_mode: str = "auto") -> None:
        self.clips, self.accelerator, self.mel_loss = clips, accelerator, mel_loss
        self.stft_loss = MultiScaleSTFTLoss().to(accelerator.device)
        self.sample_rate, self.codebook_size, self.seed = sample_rate, codebook_size, seed
        self.advice = advice  # what to try when a level collapses (`codebook.collapse_advice`)
        self.visqol_mode = visqol_mode
        self._quality: Optional[PerceptualMetrics] = None

    def quality(self) -> Optional[PerceptualMetrics]:
        """The perceptual metrics, built at their first use; None (and one warning) without their packages."""
        if self._quality is None:
            missing = available()
            if missing:
                logger.warning(f"no ViSQOL/PESQ/STOI in validation: {missing}", main_process_only=True)
                return None
            self._quality = PerceptualMetrics(self.sample_rate, self.visqol_mode)
        return self._quality

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, step: int, quality: bool = False) -> dict[str, float]:
        was_training = model.training
        model.eval()
        real = self.clips.to(self.accelerator.device)
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            outputs = [model(chunk) for chunk in real.split(4)]
        fake = torch.cat([out.audio for out in outputs])
        codes = [torch.cat(level) for level in zip(*(out.codes for out in outputs))]
        model.train(was_training)
        metrics = {
            "val/mel_distance": self.mel_loss(fake, real).item(),
            "val/stft_distance": self.stft_loss(fake, real).item(),
            "val/si_sdr": si_sdr(fake, real).mean().item(),
        }
        perceptual = self.quality() if quality else None
        if perceptual is not None:
            metrics.update({f"val/{k}": v for k, v in perceptual.mean(fake.float().cpu(), real.float().cpu()).items()})
        counts = code_counts(codes, self.codebook_size)
        health = histogram_statistics(counts)
        usage, efficiency = health["usage"].tolist(), health["efficiency"].tolist()
        for level, (level_usage, level_efficiency) in enumerate(zip(usage, efficiency)):
            metrics[f"val/codebook_usage_level{level}"] = level_usage
            metrics[f"val/codebook_efficiency_level{level}"] = level_efficiency
        tokens = counts.sum(-1).tolist()
        for line in collapse_warnings(usage, self.codebook_size, "the validation clips", tokens, self.advice):
            logger.warning(f"step {step}: {line}", main_process_only=True)
        if self.accelerator.is_main_process:
            self._log_media(real, fake, usage, efficiency, step)
        return metrics

    def _log_media(self, real: torch.Tensor, fake: torch.Tensor, usage: list[float], efficiency: list[float],
                   step: int) -> None:
        for tracker in self.accelerator.trackers:
            if tracker.name != "tensorboard":
                continue
            writer, rate = tracker.writer, self.sample_rate
            for i in range(min(MEDIA_CLIPS, real.shape[0])):
                writer.add_audio(f"val/{i}/real", real[i, 0].float().cpu(), step, sample_rate=rate)
                writer.add_audio(f"val/{i}/fake", fake[i, 0].float().cpu(), step, sample_rate=rate)
                writer.add_figure(f"val/{i}/spectrogram", spectrogram_plot(spectra(real[i], fake[i], rate)), step)
            writer.add_figure("val/codebook_usage", codebook_usage_plot(usage, efficiency, self.codebook_size,
                                                                        "the validation clips"), step)
