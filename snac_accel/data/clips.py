"""From an undecoded audio row to a training clip: decoding, salient excerpts, loudness, broken files.

Rows are decoded with the ``datasets.Audio`` feature (torchcodec, at the model's rate, mixed down
to mono); PCM WAV at the model's rate by the standard library (`snac_accel.data.wav`). Every
training sample is a pure function of (seed, epoch, index): an excerpt's randomness is seeded
from its key, so a resumed run (or a run with more workers) sees exactly the same clips. Several
sources are mixed by weight through a per-epoch index map that is itself a function of (seed,
epoch). A file that cannot be used (empty, truncated, not audio, NaN or inf, silent) is
replaced by another one, counted and named once in the log (`BadFileTracker`).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import datasets
import numpy as np
import torch
from accelerate.logging import get_logger

from .sources import DataError, audio_column
from .wav import open_pcm_wav

logger = get_logger(__name__)

SILENCE_PEAK = 1e-4  # -80 dBFS: nothing to learn from
MAX_REPLACEMENTS = 8


def sample_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part (unlike a sum, (1, 2) and (2, 1) differ)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class Clip:
    audio: Optional[torch.Tensor]  # [1, T] float32, or None when the file was unusable
    problem: str = ""
    content: int = 0  # samples of T that came from the file (the rest is padding)


def _biquad_response(b: Sequence[float], a: Sequence[float], bins: int, n_fft: int) -> torch.Tensor:
    """Complex response of a biquad at the rfft bins of an ``n_fft``-point transform."""
    z = torch.exp(-2j * math.pi * torch.arange(bins, dtype=torch.float64) / n_fft)
    return (b[0] + b[1] * z + b[2] * z * z) / (a[0] + a[1] * z + a[2] * z * z)


_K_RESPONSES: dict[tuple[int, int], np.ndarray] = {}


def k_weighting(audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """BS.1770 K-weighting (the shelf and high-pass torchaudio's loudness applies), in the frequency domain.

    torchaudio runs the two biquads sample by sample (about 30 ms per 0.5 s clip on a CPU core, most
    of an excerpt's cost); one FFT with the filters' exact response, zero-padded by 0.1 s so their
    decaying tails (under 1e-4 after 60 ms) do not wrap around, gives the same result in about a
    millisecond. NumPy's FFT: torch's MKL one is ten times slower on a busy machine with few cores.
    """
    length = audio.shape[-1]
    n_fft = 1 << math.ceil(math.log2(length + sample_rate // 10))
    key = (sample_rate, n_fft)
    if key not in _K_RESPONSES:
        w0 = 2 * math.pi * 1500.0 / sample_rate  # high shelf, +4 dB at 1.5 kHz, Q 1/sqrt(2)
        gain, alpha, cos = 10 ** (4.0 / 40), math.sin(w0) / 2 * math.sqrt(2), math.cos(w0)
        root = 2 * math.sqrt(gain) * alpha
        shelf_b = [gain * ((gain + 1) + (gain - 1) * cos + root), -2 * gain * ((gain - 1) + (gain + 1) * cos),
                   gain * ((gain + 1) + (gain - 1) * cos - root)]
        shelf_a = [(gain + 1) - (gain - 1) * cos + root, 2 * ((gain - 1) - (gain + 1) * cos),
                   (gain + 1) - (gain - 1) * cos - root]
        w0 = 2 * math.pi * 38.0 / sample_rate  # high-pass at 38 Hz, Q 0.5
        alpha, cos = math.sin(w0), math.cos(w0)
        high_b, high_a = [(1 + cos) / 2, -(1 + cos), (1 + cos) / 2], [1 + alpha, -2 * cos, 1 - alpha]
        bins = n_fft // 2 + 1
        _K_RESPONSES[key] = (_biquad_response(shelf_b, shelf_a, bins, n_fft)
                             * _biquad_response(high_b, high_a, bins, n_fft)).numpy()
    spectrum = np.fft.rfft(audio.detach().cpu().double().numpy(), n=n_fft) * _K_RESPONSES[key]
    return torch.from_numpy(np.fft.irfft(spectrum, n=n_fft)[..., :length])


def loudness(audio: torch.Tensor, sample_rate: int) -> float:
    """Integrated loudness of a mono clip [1, T] in LUFS (ITU-R BS.1770-4, gated as torchaudio's
    ``loudness`` does, which it matches to 0.05 LU while torchaudio's K-weighted signal stays within
    [-1, 1], where torchaudio clips it); RMS dBFS for clips under one 0.4 s block."""
    block = int(round(0.4 * sample_rate))
    if audio.shape[-1] >= block:
        energy = k_weighting(audio, sample_rate).square().unfold(-1, block, int(round(block * 0.25))).mean(-1).flatten()
        levels = -0.691 + 10 * torch.log10(energy)
        kept = levels > -70.0
        if kept.any():
            relative = -0.691 + 10 * math.log10(float(energy[kept].mean())) - 10.0
            kept &= levels > relative
            value = -0.691 + 10 * math.log10(float(energy[kept].mean()))
            if math.isfinite(value):
                return value
    rms = audio.pow(2).mean().sqrt().item()
    return 20 * math.log10(rms) - 0.691 if rms > 0 else -math.inf


def normalize_loudness(audio: torch.Tensor, sample_rate: int, target: Optional[float],
                       current: Optional[float] = None) -> torch.Tensor:
    """Gain to ``target`` LUFS, then scaled down if needed so the peak stays within [-1, 1].

    ``current`` is the clip's loudness when already measured (loudness shifts exactly with gain).
    """
    if target is not None:
        current = loudness(audio, sample_rate) if current is None else current
        if math.isfinite(current):
            audio = audio * 10 ** ((target - current) / 20)
    peak = audio.abs().max()
    return audio / peak if peak > 1 else audio


def decode_excerpt(decoder: Any, length: int, sample_rate: int, generator: Optional[torch.Generator]) -> Clip:
    """``length`` samples from a random start (or the start when ``generator`` is None).

    Long files are decoded only around the excerpt (a seek), short ones whole; a long file's NaN or
    inf is therefore caught only when an excerpt covers it.
    """
    duration = decoder.metadata.duration_seconds
    seconds = length / sample_rate
    if duration is not None and duration > seconds + 1.0:
        start = 0.0 if generator is None else float(torch.rand((), generator=generator)) * (duration - seconds)
        audio = decoder.get_samples_played_in_range(start, start + seconds + 0.05).data
    else:
        audio = decoder.get_all_samples().data
        if not torch.isfinite(audio).all():  # the whole file is at hand: check all of it, not just the excerpt
            return Clip(None, "contains NaN or inf")
        if audio.shape[-1] > length and generator is not None:
            start = int(torch.randint(0, audio.shape[-1] - length + 1, (), generator=generator))
            audio = audio[..., start:]
    audio = audio[..., :length].float()
    if audio.numel() == 0:
        return Clip(None, "empty")
    if not torch.isfinite(audio).all():
        return Clip(None, "contains NaN or inf")
    return Clip(audio)


@dataclass
class ExcerptSpec:
    """How training and validation excerpts are cut; see the data options of `TrainConfig`."""

    sample_rate: int
    length: int
    short_clips: str = "pad"
    salience_threshold: Optional[float] = -40.0
    salience_retries: int = 4
    target_loudness: Optional[float] = -16.0


def make_excerpt(decoder: Any, spec: ExcerptSpec, generator: Optional[torch.Generator]) -> Clip:
    """A salient excerpt: retried while quieter than the threshold, then loudness normalised."""
    best, best_loudness = None, -math.inf
    attempts = max(1, spec.salience_retries) if generator is not None else 1
    for _ in range(attempts):
        clip = decode_excerpt(decoder, spec.length, spec.sample_rate, generator)
        if clip.audio is None:
            return clip
        value = loudness(clip.audio, spec.sample_rate)
        if value > best_loudness or best is None:
            best, best_loudness = clip.audio, value
        if spec.salience_threshold is None or value >= spec.salience_threshold:
            break
    audio = best
    content = audio.shape[-1]
    if audio.abs().max() < SILENCE_PEAK:
        return Clip(None, "silent")
    if audio.shape[-1] < spec.length:
        if spec.short_clips == "skip":
            return Clip(None, f"shorter than a segment ({audio.shape[-1]} < {spec.length} samples)")
        audio = torch.nn.functional.pad(audio, (0, spec.length - audio.shape[-1]))
    return Clip(normalize_loudness(audio, spec.sample_rate, spec.target_loudness, best_loudness), content=content)


def decode_problem(err: Exception) -> str:
    """One short line for the log: FFmpeg/torchcodec messages carry a C++ source location first."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = re.sub(r"^[\w:]+, \S+\.(?:cpp|h):\d+, ", "", text)
    return f"cannot be decoded ({type(err).__name__}: {text[:120]})"


def row_name(raw: Any, fallback: str) -> str:
    """A file's name for the log, from an undecoded row."""
    if isinstance(raw, dict) and raw.get("path"):
        return str(raw["path"])
    return fallback


def excerpt_from_row(feature: datasets.Audio, raw: Any, spec: ExcerptSpec, generator: Optional[torch.Generator]) -> Clip:
    """Decode one undecoded row (PCM WAV at the model's rate without FFmpeg, anything else with ``feature``)
    and cut the excerpt; any decoding failure is a `Clip` problem."""
    try:
        if raw is None or isinstance(raw, dict) and not raw.get("bytes") and not raw.get("path"):
            return Clip(None, "no audio in the row")
        decoder = open_pcm_wav(raw, spec.sample_rate) or feature.decode_example(raw)
        return make_excerpt(decoder, spec, generator)
    except Exception as err:  # torchcodec/FFmpeg raise many types for truncated or non-audio input
        return Clip(None, decode_problem(err))


def mixing_map(lengths: Sequence[int], weights: Sequence[float], seed: int, epoch: int) -> torch.Tensor:
    """Global row indices for one epoch of weighted mixing, a pure function of (seed, epoch).

    The epoch keeps the total size; source ``s`` fills ``weights[s]`` of it, drawing its rows
    without replacement within each pass (a small source repeats, a large one is subsampled anew
    every epoch).
    """
    total = sum(lengths)
    quotas = [w * total for w in weights]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda s: (counts[s] - quotas[s], s))
    for s in by_remainder[:total - sum(counts)]:
        counts[s] += 1
    offsets = [0]
    for n in lengths[:-1]:
        offsets.append(offsets[-1] + n)
    parts = []
    for s, (n, count) in enumerate(zip(lengths, counts)):
        if count == 0 or n == 0:
            continue
        generator = torch.Generator().manual_seed(sample_seed(seed, epoch, s, "mix"))
        passes = [torch.randperm(n, generator=generator) for _ in range(math.ceil(count / n))]
        parts.append(torch.cat(passes)[:count] + offsets[s])
    return torch.cat(parts)


class AudioClips(torch.utils.data.Dataset):
    """Map-style clips keyed by ``(epoch, index)`` over one or several sources; broken rows are replaced.

    ``sources`` is a dataset with an audio column (decoded or not) or a list of them; with
    ``weights`` the sources are mixed by those shares through `mixing_map`, otherwise concatenated.
    """

    def __init__(self, sources: Any, spec: ExcerptSpec, seed: int = 0, train: bool = True,
                 weights: Optional[Sequence[float]] = None, names: Optional[Sequence[str]] = None) -> None:
        sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        self.sources = [audio_column(ds) for ds in sources]
        self.names = list(names) if names is not None else [f"source {i}" for i in range(len(sources))]
        self.spec = spec
        self.seed = seed
        self.train = train
        self.weights = list(weights) if weights is not None else None
        self.lengths = [len(ds) for ds in self.sources]
        self.offsets = [0]
        for n in self.lengths[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.feature = datasets.Audio(sampling_rate=spec.sample_rate, num_channels=1)
        self._map: tuple[int, Optional[torch.Tensor]] = (-1, None)

    def __len__(self) -> int:
        return sum(self.lengths)

    def locate(self, epoch: int, index: int) -> tuple[int, int]:
        """(source, row) of position ``index`` in ``epoch``."""
        if self.weights is not None and self.train:
            if self._map[0] != epoch:
                self._map = (epoch, mixing_map(self.lengths, self.weights, self.seed, epoch))
            index = int(self._map[1][index])
        source = bisect.bisect_right(self.offsets, index) - 1
        return source, index - self.offsets[source]

    def describe(self, source: int, row: int) -> str:
        try:
            return row_name(self.sources[source][row]["audio"], f"{self.names[source]} row {row}")
        except Exception:  # naming a broken row must never raise
            return f"{self.names[source]} row {row}"

    def load_row(self, source: int, row: int, generator: Optional[torch.Generator]) -> Clip:
        return excerpt_from_row(self.feature, self.sources[source][row]["audio"], self.spec, generator)

    def load(self, epoch: int, index: int) -> Clip:
        """One excerpt at position ``index``; a pure function of (seed, epoch, index) for training."""
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index)) if self.train else None
        return self.load_row(*self.locate(epoch, index), generator)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        bad: list[str] = []
        for attempt in range(MAX_REPLACEMENTS):
            candidate = index if attempt == 0 else sample_seed(self.seed, epoch, index, attempt) % len(self)
            clip = self.load(epoch, candidate)
            if clip.audio is not None:
                return {"audio": clip.audio, "bad": bad, "index": candidate}
            bad.append(f"{self.describe(*self.locate(epoch, candidate))}: {clip.problem}")
        return {"audio": None, "bad": bad, "index": index}



@dataclass
class BadFileTracker:
    """Counts unusable files, names each once, and stops the run when most recent samples are bad."""

    max_fraction: float = 0.5
    window: int = 200
    total: int = 0
    seen: set = field(default_factory=set)
    recent: list = field(default_factory=list)

    def update(self, bad: list[str], good: int) -> None:
        for problem in bad:
            if problem not in self.seen:
                self.seen.add(problem)
                logger.warning(f"skipped unusable audio: {problem}")
        self.total += len(bad)
        self.recent.extend([1] * len(bad) + [0] * good)
        self.recent = self.recent[-self.window:]
        if len(self.recent) >= min(self.window, 20) and sum(self.recent) / len(self.recent) > self.max_fraction:
            examples = "; ".join(bad[:3] or sorted(self.seen)[:3])
            raise DataError(f"{sum(self.recent)} of the last {len(self.recent)} samples were unusable "
                            f"(more than {self.max_fraction:.0%}), e.g. {examples}. Fix or remove those files, "
                            "or raise --max_bad_fraction")

