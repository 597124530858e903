"""`snac_accel.perceptual`: ViSQOL, PESQ-WB and STOI on a real recording, against itself and degraded copies."""

from __future__ import annotations

import pytest
import torch
import torchaudio

from snac_accel import evaluate as ev
from snac_accel.hub import ensure_accelerate_state
from snac_accel.perceptual import PerceptualMetrics, available, visqol_mode

REAL = "real_speech/nl_m_01.flac"  # 4.8 s of a recorded Dutch voice


@pytest.fixture(scope="module")
def clip(demo_dir):
    (_, raw), = ev.rows(ev.open_source(str(demo_dir / REAL)))
    audio, problem = ev.load_clip(raw, 24000, 24000 * 3, None)
    assert audio is not None, problem
    return audio[0]


def degraded(clip: torch.Tensor, snr_db: float, cutoff_hz: float) -> torch.Tensor:
    """Low-passed at ``cutoff_hz`` with white noise at ``snr_db``: what a worse codec does to a clip."""
    generator = torch.Generator().manual_seed(0)
    lowpassed = torchaudio.functional.lowpass_biquad(clip, 24000, cutoff_hz)
    noise = torch.randn(clip.shape, generator=generator)
    noise *= clip.pow(2).mean().sqrt() / noise.pow(2).mean().sqrt() / 10 ** (snr_db / 20)
    return lowpassed + noise


def test_metrics_rank_the_clip_above_a_mild_and_a_strong_degradation(clip):
    assert available() is None  # installed with the package
    speech = PerceptualMetrics(24000)  # auto: speech mode at 24 kHz
    assert speech.mode == "speech"
    same = speech(clip, clip)
    mild = speech(degraded(clip, 25, 6000), clip)
    strong = speech(degraded(clip, 5, 2000), clip)
    assert speech.failures == {}
    for name in ("visqol", "pesq_wb", "stoi"):
        assert same[name] > mild[name] > strong[name], (name, same, mild, strong)
    # the published ranges: a clip against itself scores near each metric's top
    assert 4.2 <= same["visqol"] <= 5.0 and 4.5 <= same["pesq_wb"] <= 4.65 and same["stoi"] >= 0.999
    assert 1.0 <= strong["visqol"] < 3.5 and 1.0 <= strong["pesq_wb"] < 2.5 and 0.0 <= strong["stoi"] < 0.95

    music = PerceptualMetrics(24000, mode="audio", metrics=("visqol",))  # 48 kHz, SVR mapping
    top, worse = music(clip, clip)["visqol"], music(degraded(clip, 5, 2000), clip)["visqol"]
    assert 4.5 <= top <= 4.8 and 1.0 <= worse < top - 1.0


def test_visqol_mode_follows_the_sample_rate_unless_chosen():
    assert [visqol_mode("auto", rate) for rate in (16000, 24000, 32000, 44100)] == ["speech", "speech", "audio",
                                                                                      "audio"]
    assert visqol_mode("speech", 44100) == "speech" and visqol_mode("audio", 24000) == "audio"
    with pytest.raises(ValueError, match="not one of auto, speech, audio"):
        visqol_mode("music", 24000)


def test_silence_is_rejected_by_pesq_counted_and_not_averaged(clip):
    ensure_accelerate_state()  # the rejection is logged
    metrics = PerceptualMetrics(24000, metrics=("pesq_wb", "stoi"))
    silent = torch.zeros_like(clip)
    scores = metrics(silent, silent)
    assert "pesq_wb" not in scores and metrics.failures["pesq_wb"] == 1
    batch = metrics.mean(torch.stack([clip, silent]), torch.stack([clip, silent]))
    assert batch["pesq_wb"] == pytest.approx(metrics(clip, clip)["pesq_wb"])
