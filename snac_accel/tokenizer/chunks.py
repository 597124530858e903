"""Chunks and batches for a SNAC encoder: long files cut on SNAC's padding grid, equal padded lengths batched.

SNAC pads every input with zeros up to a multiple of hop x lcm(stride_0, attention window) (the
grid). A chunk starts on the grid and carries a context on each side at least as wide as the
encoder's receptive field, so its centre sees exactly what a one-pass encode sees there; only the
centre's codes are kept. Batches hold pieces of one padded length only: a shorter clip padded
further with zeros would get other codes in its last frames than alone. On a CPU, batching makes
the encoder memory-bound, and rows are encoded one at a time in the loader's workers instead
(`RowEncoder`).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch


def receptive_field(model: torch.nn.Module) -> int:
    """Input samples that can reach one code: the encoder's convolutions and attention windows, plus
    the coarsest level's pooling (a finer level's residual depends on the coarse code above it)."""
    total, jump = 0, 1
    for module in model.encoder.modules():
        if isinstance(module, torch.nn.Conv1d):
            total += (module.kernel_size[0] - 1) * module.dilation[0] * jump
            jump *= module.stride[0]
        elif hasattr(module, "window_size"):  # snac.attention.LocalMHA
            total += 2 * (module.window_size - 1) * jump
    return total + (max(model.vq_strides) - 1) * jump


@dataclass
class Piece:
    """A clip or a chunk of one: samples [start, end) of its row, of which [core_start, core_end) are kept."""

    index: int
    part: int
    start: int
    end: int
    core_start: int
    core_end: int


class ChunkPlan:
    """Cuts long files into chunks on SNAC's padding grid and keeps each chunk's centre codes."""

    def __init__(self, model: torch.nn.Module, chunk_seconds: float) -> None:
        self.hop = int(model.hop_length)
        self.strides = list(model.vq_strides)
        self.grid = self.hop * math.lcm(self.strides[0], model.attn_window_size or 1)
        self.context = math.ceil(receptive_field(model) / self.grid) * self.grid
        self.chunk = max(1, round(chunk_seconds * model.sampling_rate / self.grid)) * self.grid

    def padded(self, length: int) -> int:
        return max(1, math.ceil(length / self.grid)) * self.grid

    def pieces(self, index: int, length: int) -> list[Piece]:
        if self.padded(length) <= self.chunk + 2 * self.context:
            return [Piece(index, 0, 0, length, 0, length)]
        pieces, start = [], 0
        while start < length:
            end = min(start + self.chunk, length)
            pieces.append(Piece(index, len(pieces), max(0, start - self.context), min(length, end + self.context),
                                start, end))
            start = end
        return pieces

    def keep(self, piece: Piece, length: int, codes: list[torch.Tensor]) -> list[torch.Tensor]:
        """The codes of the piece's centre, from the codes of the whole piece."""
        end = piece.core_end if piece.core_end < length else self.padded(length)
        kept = []
        for level_codes, stride in zip(codes, self.strides):
            frame = self.hop * stride
            first = (piece.core_start - piece.start) // frame
            kept.append(level_codes[first:first + (end - piece.core_start) // frame])
        return kept


class Batcher:
    """Groups pieces by padded length; a group becomes a batch when full, or on `drain`."""

    def __init__(self, plan: ChunkPlan, batch_size: int, max_batch_samples: int) -> None:
        self.plan, self.batch_size, self.max_samples = plan, batch_size, max_batch_samples
        self.groups: dict[int, list[tuple[Piece, torch.Tensor]]] = {}

    def add(self, piece: Piece, audio: torch.Tensor) -> Iterator[list[tuple[Piece, torch.Tensor]]]:
        length = self.plan.padded(audio.shape[-1])
        group = self.groups.setdefault(length, [])
        group.append((piece, audio))
        if len(group) >= self.batch_size or len(group) * length >= self.max_samples:
            yield self.groups.pop(length)
        while self.groups and sum(k * len(g) for k, g in self.groups.items()) > 4 * self.max_samples:
            yield self.groups.pop(max(self.groups, key=lambda k: k * len(self.groups[k])))

    def drain(self) -> Iterator[list[tuple[Piece, torch.Tensor]]]:
        while self.groups:
            yield self.groups.pop(next(iter(self.groups)))


class RowEncoder:
    """One row's codes, its pieces encoded one at a time: the CPU path, run inside each loader worker
    (one thread each) so that a single process keeps every core busy."""

    def __init__(self, model: torch.nn.Module, plan: ChunkPlan, autocast: Any) -> None:
        self.model, self.plan, self.autocast = model, plan, autocast

    def __call__(self, audio: torch.Tensor) -> list[torch.Tensor]:
        parts = []
        for piece in self.plan.pieces(0, audio.shape[-1]):
            x = torch.zeros(1, 1, self.plan.padded(piece.end - piece.start))
            x[0, 0, :piece.end - piece.start] = audio[piece.start:piece.end]
            codes = encode_batch(self.model, x, self.autocast())
            parts.append(self.plan.keep(piece, audio.shape[-1], [c[0] for c in codes]))
        return [torch.cat([part[k] for part in parts]) for k in range(len(self.plan.strides))]


@torch.inference_mode()
def encode_batch(model: torch.nn.Module, audio: torch.Tensor, autocast: Any) -> list[torch.Tensor]:
    """Codes of [B, 1, T] audio already padded to the grid: the encoder under ``autocast``, the
    quantizer in float32 (what `snac.SNAC.encode` does, in one precision)."""
    with autocast:
        z = model.encoder(audio)
    with torch.autocast(device_type=audio.device.type, enabled=False):
        _, codes = model.quantizer(z.float())
    return [c.cpu() for c in codes]


def cpu_autocast(mixed_precision: str) -> Any:
    """The autocast of ``--mixed_precision`` in a CPU loader worker (the accelerator stays in the main process)."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
