"""Token layouts of SNAC codes: per level, or one flat list interleaved frame by frame.

SNAC level ``k`` has one code per ``stride_k`` fine frames, so a coarse frame (``stride_0`` fine
frames) holds ``stride_0 / stride_k`` codes of level ``k``. The ``frames`` layout writes each
coarse frame depth first, coarse to fine: a code, then (recursively) the codes of the next level
that it covers. For strides 4, 2, 1 that is 7 tokens per coarse frame, level 0, 1, 2, 2, 1, 2, 2,
the order Orpheus-style TTS models read; for 8, 4, 2, 1 it is 15 tokens, 0, 1, 2, 3, 3, 2, 3, 3,
1, 2, 3, 3, 2, 3, 3. Offsets shift the tokens of each position (or each level) into a language
model's vocabulary; `deinterleave` undoes both.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np
import torch

LAYOUTS = ("levels", "frames")


class LayoutError(ValueError):
    """The codes or options do not fit the layout (strides, lengths, offsets)."""


def frame_positions(strides: Sequence[int]) -> list[tuple[int, int]]:
    """(level, code within the coarse frame) of each token of one coarse frame, in frame order."""
    for coarse, fine in zip(strides, strides[1:]):
        if coarse % fine:
            raise LayoutError(f"strides {list(strides)}: each must be a multiple of the next")
    positions: list[tuple[int, int]] = []

    def visit(level: int, code: int) -> None:
        positions.append((level, code))
        if level + 1 < len(strides):
            ratio = strides[level] // strides[level + 1]
            for child in range(ratio):
                visit(level + 1, code * ratio + child)

    visit(0, 0)
    return positions


def parse_offsets(text: Optional[str], strides: Sequence[int], layout: str) -> Optional[list[int]]:
    """``--level_offsets`` as one offset per token position of the layout, or None.

    Accepted: one integer per level (every token of level k gets the k-th), one per position of a
    coarse frame (``frames`` only), or ``BASE+STEPk`` (position k gets BASE + k * STEP, e.g.
    ``128266+4096k`` for Orpheus-style models).
    """
    if not text:
        return None
    levels = len(strides)
    positions = frame_positions(strides) if layout == "frames" else [(k, 0) for k in range(levels)]
    match = re.fullmatch(r"\s*(-?\d+)\s*\+\s*(\d+)\s*k\s*", text)
    if match:
        base, step = int(match.group(1)), int(match.group(2))
        return [base + k * step for k in range(len(positions))]
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise LayoutError(f"--level_offsets {text!r}: give comma-separated integers or BASE+STEPk") from None
    if len(values) == levels:
        return [values[level] for level, _ in positions]
    if len(values) == len(positions):
        return values
    raise LayoutError(f"--level_offsets {text!r}: {len(values)} values, but the {layout} layout needs {levels} "
                      f"(one per level)" + (f" or {len(positions)} (one per position of a coarse frame)"
                                            if layout == "frames" else ""))


def code_dtype(codebook_size: int, offsets: Optional[Sequence[int]]) -> np.dtype:
    """int16 when every token fits, else int32."""
    low = min(0, *(offsets or [0]))
    high = codebook_size - 1 + max(0, *(offsets or [0]))
    if low >= np.iinfo(np.int16).min and high <= np.iinfo(np.int16).max:
        return np.dtype(np.int16)
    if low >= np.iinfo(np.int32).min and high <= np.iinfo(np.int32).max:
        return np.dtype(np.int32)
    raise LayoutError(f"offsets {offsets} push tokens beyond int32")


def _coarse_frames(codes: Sequence[torch.Tensor], strides: Sequence[int]) -> int:
    frames = codes[0].shape[-1]
    for level, (level_codes, stride) in enumerate(zip(codes, strides)):
        if level_codes.shape[-1] != frames * (strides[0] // stride):
            raise LayoutError(f"level {level} has {level_codes.shape[-1]} codes; {frames} coarse frames need "
                              f"{frames * (strides[0] // stride)}")
    return frames


def interleave(codes: Sequence[torch.Tensor], strides: Sequence[int],
               offsets: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Per-level codes (each [T_k], aligned to whole coarse frames) -> one flat [frames * positions] list."""
    positions = frame_positions(strides)
    frames = _coarse_frames(codes, strides)
    columns = []
    for level, code in positions:
        per_frame = strides[0] // strides[level]
        columns.append(codes[level].reshape(frames, per_frame)[:, code].long())
    flat = torch.stack(columns, dim=1)
    if offsets is not None:
        flat = flat + torch.tensor(offsets, dtype=torch.long)
    return flat.reshape(-1)


def deinterleave(flat: torch.Tensor, strides: Sequence[int], offsets: Optional[Sequence[int]] = None
                 ) -> list[torch.Tensor]:
    """The inverse of `interleave`: a flat token list -> per-level codes [T_k] (offsets removed)."""
    positions = frame_positions(strides)
    flat = torch.as_tensor(flat).long()
    if flat.numel() % len(positions):
        raise LayoutError(f"{flat.numel()} tokens is not a whole number of {len(positions)}-token frames")
    table = flat.reshape(-1, len(positions))
    if offsets is not None:
        table = table - torch.tensor(offsets, dtype=torch.long)
    frames = table.shape[0]
    codes = [torch.empty(frames, strides[0] // stride, dtype=torch.long) for stride in strides]
    for column, (level, code) in enumerate(positions):
        codes[level][:, code] = table[:, column]
    return [level_codes.reshape(-1) for level_codes in codes]


def shift_levels(codes: Sequence[torch.Tensor], offsets: Optional[Sequence[int]], sign: int = 1
                 ) -> list[torch.Tensor]:
    """``levels`` layout: level k shifted by its offset (``sign=-1`` removes the offsets)."""
    if offsets is None:
        return [c.long() for c in codes]
    return [c.long() + sign * offset for c, offset in zip(codes, offsets)]
