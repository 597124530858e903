"""PCM WAV files decoded by the standard library: no FFmpeg, and faster than torchcodec for WAV.

Opening a file with torchcodec costs about 6 ms of FFmpeg set-up, more than decoding a short FLAC
clip; a PCM WAV file is a header and raw samples, so reading it with `wave` and NumPy skips that
and needs no FFmpeg (the GPU check's machine has none). `PcmWavDecoder` offers the part of
torchcodec's ``AudioDecoder`` that `clips.decode_excerpt` uses. Only files already at the model's
rate go this way (resampling stays with FFmpeg, whose filter the rest of the data sees); float
WAV, more than two channels, other containers and other rates return None from `open_pcm_wav`
and take the usual path. The samples equal torchcodec's, bit for bit: integers divided by
2**(bits - 1), 8-bit offset by 128, stereo mixed down with FFmpeg's matrix.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

# FFmpeg's stereo-to-mono matrix (each channel times 1/sqrt(2), not normalised), so the samples equal torchcodec's.
STEREO_GAIN = np.float32(0.70710677)


@dataclass
class _Metadata:
    duration_seconds: float


@dataclass
class _Samples:
    data: torch.Tensor


class PcmWavDecoder:
    """Whole-file or ranged reads of a PCM WAV file (mono or stereo) as float32 [1, T], mono."""

    def __init__(self, source: Any, reader: wave.Wave_read) -> None:
        self._source = source
        self.sample_rate = reader.getframerate()
        self._frames = reader.getnframes()
        self._channels = reader.getnchannels()
        self._width = reader.getsampwidth()
        reader.close()
        self.metadata = _Metadata(self._frames / self.sample_rate)

    def _read(self, start: int, count: int) -> torch.Tensor:
        source = io.BytesIO(self._source) if isinstance(self._source, (bytes, bytearray)) else self._source
        with wave.open(source, "rb") as reader:
            reader.setpos(min(max(start, 0), self._frames))
            raw = reader.readframes(max(count, 0))
        return torch.from_numpy(_to_float(raw, self._width, self._channels))

    def get_all_samples(self) -> _Samples:
        return _Samples(self._read(0, self._frames))

    def get_samples_played_in_range(self, start_seconds: float, stop_seconds: float) -> _Samples:
        start = int(round(start_seconds * self.sample_rate))
        stop = min(self._frames, int(round(stop_seconds * self.sample_rate)))
        return _Samples(self._read(start, stop - start))


def _to_float(raw: bytes, width: int, channels: int) -> np.ndarray:
    """Interleaved PCM bytes -> float32 [1, T], stereo mixed down as FFmpeg does."""
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:
        bytes3 = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        wide = np.zeros((bytes3.shape[0], 4), np.uint8)
        wide[:, 1:] = bytes3  # little-endian 24-bit in the high bytes of an int32
        samples = wide.view("<i4").reshape(-1).astype(np.float32) / 2.0 ** 31
    else:
        samples = np.frombuffer(raw, f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    samples = samples.reshape(-1, channels)
    if channels == 1:
        return np.ascontiguousarray(samples[:, 0])[None]
    return (samples[:, 0] * STEREO_GAIN + samples[:, 1] * STEREO_GAIN)[None]


def open_pcm_wav(raw: Any, sample_rate: int) -> Optional[PcmWavDecoder]:
    """A decoder for an undecoded row (``{"path", "bytes"}``) holding PCM WAV at ``sample_rate``, else None."""
    if not isinstance(raw, dict):
        return None
    data, path = raw.get("bytes"), raw.get("path")
    if data:
        if bytes(data[:4]) != b"RIFF":
            return None
        source: Any = bytes(data)
    elif path and str(path).lower().endswith(".wav"):
        source = str(path)
    else:
        return None
    try:
        reader = wave.open(io.BytesIO(source) if isinstance(source, bytes) else source, "rb")
    except (wave.Error, EOFError, OSError):
        return None  # float or compressed WAV, or broken: torchcodec decides and names the problem
    if (reader.getframerate() != sample_rate or reader.getsampwidth() not in (1, 2, 3, 4)
            or reader.getnchannels() > 2):
        reader.close()
        return None
    return PcmWavDecoder(source, reader)
