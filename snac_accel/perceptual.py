"""Perceptual quality of a reconstruction, offline: ViSQOL, wide-band PESQ and STOI.

These are the figures codec papers print (SNAC: ViSQOL; recent codecs add PESQ-WB and STOI), so a
codec trained here can be set beside a published table. All three run on the CPU from packages
installed with snac-accel; nothing is downloaded.

- ViSQOL v3 (`visqol-python`, a Python port of Google's C++ reference with its models in the
  wheel): MOS-LQO from 1 to 5. Speech mode resamples both signals to 16 kHz and maps similarity
  with the deep-lattice model (the C++ default); audio mode resamples to 48 kHz and uses the
  SVR model (at most about 4.75). ``auto`` picks speech mode for codecs at 24 kHz or below (SNAC's
  24 kHz model is a speech codec) and audio mode above (the 32/44 kHz music and general models).
- PESQ wide-band (ITU-T P.862.2, `pesq`): both signals resampled to 16 kHz; MOS-LQO from about
  1.04 to 4.64.
- STOI (`pystoi`, the classic measure, not extended): on the 16 kHz signals, which pystoi takes
  to its own 10 kHz; 0 to 1 (correlation of short-time envelopes), about intelligibility.

Resampling is torchaudio's band-limited sinc. A clip a metric rejects (PESQ finds no utterance in
silence) gets no figure for it; the rejection is counted and logged once per metric.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torchaudio
from accelerate.logging import get_logger

logger = get_logger(__name__)

METRICS = ("visqol", "pesq_wb", "stoi")
VISQOL_MODES = ("auto", "speech", "audio")
VISQOL_RATES = {"speech": 16000, "audio": 48000}
SPEECH_RATE = 16000  # PESQ-WB is defined at 16 kHz; STOI gets the same signals
SPEECH_CODEC_MAX_RATE = 24000  # auto: speech mode for codecs up to this rate


def visqol_mode(requested: str, sample_rate: int) -> str:
    """The ViSQOL mode to use: ``requested`` unless it is ``auto``, then speech up to 24 kHz, audio above."""
    if requested not in VISQOL_MODES:
        raise ValueError(f"visqol mode {requested!r} is not one of {', '.join(VISQOL_MODES)}")
    if requested != "auto":
        return requested
    return "speech" if sample_rate <= SPEECH_CODEC_MAX_RATE else "audio"


def _resample(audio: torch.Tensor, source_rate: int, target_rate: int) -> np.ndarray:
    signal = audio.detach().float().reshape(-1).cpu()
    if source_rate != target_rate:
        signal = torchaudio.functional.resample(signal, source_rate, target_rate)
    return signal.double().numpy()


class PerceptualMetrics:
    """ViSQOL, PESQ-WB and STOI of reconstructions against their originals, at one codec sample rate.

    The ViSQOL model is built once (it loads its mapping model); ``failures`` counts the clips each
    metric rejected.
    """

    def __init__(self, sample_rate: int, mode: str = "auto", metrics: tuple[str, ...] = METRICS) -> None:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown perceptual metrics {unknown}; choose from {', '.join(METRICS)}")
        self.sample_rate, self.metrics = int(sample_rate), tuple(metrics)
        self.mode = visqol_mode(mode, self.sample_rate)
        self.failures: dict[str, int] = {}
        self._visqol = None

    def _visqol_api(self):
        if self._visqol is None:
            from visqol import VisqolApi

            api = VisqolApi()
            api.create(mode=self.mode, use_lattice_model=True if self.mode == "speech" else None)
            self._visqol = api
        return self._visqol

    def visqol(self, fake: torch.Tensor, real: torch.Tensor) -> float:
        """ViSQOL MOS-LQO of ``fake`` against ``real`` in this object's mode."""
        rate = VISQOL_RATES[self.mode]
        result = self._visqol_api().measure_from_arrays(_resample(real, self.sample_rate, rate),
                                                        _resample(fake, self.sample_rate, rate), rate)
        return float(result.moslqo)

    def pesq_wb(self, fake: torch.Tensor, real: torch.Tensor) -> float:
        """Wide-band PESQ of ``fake`` against ``real`` at 16 kHz."""
        from pesq import pesq

        return float(pesq(SPEECH_RATE, _resample(real, self.sample_rate, SPEECH_RATE),
                          _resample(fake, self.sample_rate, SPEECH_RATE), "wb"))

    def stoi(self, fake: torch.Tensor, real: torch.Tensor) -> float:
        """STOI of ``fake`` against ``real`` (16 kHz signals; pystoi resamples them to 10 kHz)."""
        from pystoi import stoi

        return float(stoi(_resample(real, self.sample_rate, SPEECH_RATE),
                          _resample(fake, self.sample_rate, SPEECH_RATE), SPEECH_RATE, extended=False))

    def __call__(self, fake: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
        """The metrics of one clip (``fake`` and ``real`` [.., T] of the same length); rejected ones left out."""
        scores: dict[str, float] = {}
        for name in self.metrics:
            try:
                value = getattr(self, name)(fake, real)
            except Exception as err:  # pesq raises for a file without an utterance, visqol for too short ones
                value, why = math.nan, f"{type(err).__name__}: {err}"
            else:
                why = "not finite"
            if math.isfinite(value):
                scores[name] = value
                continue
            if name not in self.failures:
                logger.warning(f"{name} rejected a clip ({why}); such clips get no {name}")
            self.failures[name] = self.failures.get(name, 0) + 1
        return scores

    def mean(self, fake: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
        """Each metric's mean over a batch [N, 1, T] of clips, over the clips it accepted."""
        per_clip = [self(f, r) for f, r in zip(fake, real)]
        names = [n for n in self.metrics if any(n in s for s in per_clip)]
        return {n: sum(s[n] for s in per_clip if n in s) / sum(n in s for s in per_clip) for n in names}


def available(metrics: tuple[str, ...] = METRICS) -> Optional[str]:
    """None when every package the metrics need imports, else one line naming the missing ones."""
    import importlib.util

    packages = {"visqol": "visqol-python", "pesq_wb": "pesq", "stoi": "pystoi"}
    modules = {"visqol": "visqol", "pesq_wb": "pesq", "stoi": "pystoi"}
    missing = [packages[m] for m in metrics if importlib.util.find_spec(modules[m]) is None]
    if not missing:
        return None
    return f"perceptual metrics need {', '.join(missing)}: pip install -e . (or pip install snac-accel) installs them"
