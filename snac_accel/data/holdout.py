"""A validation set made from the training data when a run names none.

Without validation clips a run has no metrics, no figures and no ``best/``; so a few training
files are held out (never trained on), chosen by a seeded permutation over every source's rows so
that every process and every resume of a run holds out the same ones. ``--validation_split 0``
turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class HeldOut:
    """Rows held out per source, and the words the log and the model card use for them."""

    rows: list[list[int]]
    description: str

    @property
    def count(self) -> int:
        return sum(len(rows) for rows in self.rows)


# Fewer training clips than this are all trained on: holding one out would cost a tenth of the data or more.
MIN_CLIPS_TO_HOLD_OUT = 10


def choose_held_out(lengths: list[int], fraction: float, max_clips: int, min_training: int, seed: int) -> list[list[int]]:
    """Per source, the rows to hold out: ``round(fraction * total)`` clips (at least 1, at most
    ``max_clips``) drawn over all rows at once; none from fewer than `MIN_CLIPS_TO_HOLD_OUT` clips or when
    fewer than ``min_training`` would be left."""
    total = sum(lengths)
    count = min(max_clips, max(1, round(fraction * total))) if fraction > 0 else 0
    if count == 0 or total < MIN_CLIPS_TO_HOLD_OUT or total - count < min_training:
        return [[] for _ in lengths]
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()[:count]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return [sorted(i - start for i in order if start <= i < start + length) for start, length in zip(starts, lengths)]


def split_sources(sources: list[tuple[str, Any]], fraction: float, max_clips: int, min_training: int, seed: int
                  ) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]], HeldOut]:
    """(training sources without the held-out rows, the held-out rows as validation sources, what was done)."""
    lengths = [len(ds) for _, ds in sources]
    rows = choose_held_out(lengths, fraction, max_clips, min_training, seed)
    held = HeldOut(rows, "")
    if held.count == 0:
        held.description = (f"no validation data, and {sum(lengths)} training clips are too few to hold any out "
                            f"(--validation_split {fraction}): no validation metrics, figures or best/")
        return sources, [], held
    training, validation = [], []
    for (name, ds), chosen in zip(sources, rows):
        kept = sorted(set(range(len(ds))) - set(chosen))
        training.append((name, ds.select(kept)))
        if chosen:
            validation.append((f"{name} (held out)", ds.select(chosen)))
    held.description = (f"{held.count} of the {sum(lengths)} training clips, held out and never trained on "
                        f"(--validation_split {fraction}, seed {seed}; 0 turns it off)")
    return training, validation, held
