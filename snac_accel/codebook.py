"""Codebook health and care: usage statistics, data-driven seeding and dead-code restarts.

A residual VQ codec only carries information when its codes are used: a level that maps every
frame to one code transmits nothing however low the training loss goes. This module measures that
(usage, perplexity, bitrate efficiency = entropy of the code histogram / log2 codebook size, the
figure DAC reports), starts codebooks where the encoder's vectors are (`seed_codebooks`), and
re-seeds codes that fall out of use (`DeadCodeRestarter`). Every decision is identical on all
processes: histograms are summed and candidate vectors gathered across processes, and random
choices come from generators seeded by (seed, step, level).

The quantizer is reached through SNAC's attribute names (``model.quantizer.quantizers``, each with
``in_proj``, ``out_proj``, ``codebook``, ``stride`` and ``decode_latents``), so the functions work
on `snac.SNAC` and `snac_accel.model.SnacGenerator` alike.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import broadcast, broadcast_object_list

from .data import seeding_excerpts

logger = get_logger(__name__)

TensorFn = Callable[[torch.Tensor], torch.Tensor]
# Excerpts per encoder pass while seeding the codebooks (`seed_from_clips`).
SEEDING_BATCH = 8
COLLAPSE_USAGE = 0.10  # below this share of its codebook on validation clips a level is called collapsed
SEED_METHODS = ("kmeans", "sample", "none")


# ----------------------------------------------------------------------------- statistics


def code_counts(codes: Sequence[torch.Tensor], codebook_size: int, reduce: Optional[TensorFn] = None) -> torch.Tensor:
    """How often each code occurs, [levels, codebook_size] float32.

    A scatter into a fixed-size histogram, not `torch.bincount`, whose output size depends on the
    data and so waits for the GPU. ``reduce`` sums across processes (the trainer passes
    ``lambda t: accelerator.reduce(t, "sum")``); one collective covers all levels.
    """
    counts = torch.zeros(len(codes), codebook_size, device=codes[0].device)
    for level, c in enumerate(codes):
        flat = c.flatten()
        counts[level].index_add_(0, flat, torch.ones_like(flat, dtype=counts.dtype))
    return reduce(counts) if reduce is not None else counts


def histogram_statistics(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per level of a [levels, codebook_size] histogram: usage, entropy (bits), perplexity, efficiency.

    usage = share of codes seen at least once; perplexity = 2**entropy (codebook_size when all codes
    are equally used, 1 when one code takes everything); efficiency = entropy / log2(codebook_size),
    DAC's bitrate efficiency. Values stay tensors: no device sync until logged.
    """
    probs = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    entropy = -torch.special.xlogy(probs, probs).sum(-1) / math.log(2)
    return {"usage": (counts > 0).float().mean(-1), "entropy_bits": entropy, "perplexity": torch.exp2(entropy),
            "efficiency": entropy / math.log2(counts.shape[-1])}


def codebook_statistics(codes: Sequence[torch.Tensor], codebook_size: int, reduce: Optional[TensorFn] = None,
                        counts: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Per level, as tracker keys: ``codebook/{usage,perplexity,efficiency}_levelN``.

    Pass ``counts`` from `code_counts` to reuse an already reduced histogram.
    """
    if counts is None:
        counts = code_counts(codes, codebook_size, reduce)
    stats = histogram_statistics(counts)
    return {f"codebook/{name}_level{level}": stats[name][level]
            for level in range(counts.shape[0]) for name in ("usage", "perplexity", "efficiency")}


def attainable_usage(tokens: int, codebook_size: int) -> float:
    """Share of a codebook that ``tokens`` codes drawn uniformly would reach: 1 - (1 - 1/K)^tokens.

    Few validation frames cannot show many codes (48 coarse frames reach at most 17% of 256 codes),
    so a level is judged against this, not against the whole codebook.
    """
    return 1.0 - (1.0 - 1.0 / codebook_size) ** tokens


def collapse_advice(config: Optional[Any] = None, dead_code_steps: Optional[int] = None) -> str:
    """What to try for a collapsed level, fitting the run's options (generic without them)."""
    if config is None:
        return ("retrain with dead-code restarts (--dead_code_steps), a lower --learning_rate or for longer; "
                "or check that these files are like the training data")
    tries = []
    method = config.codebook_init or ("none" if config.init_from else "kmeans")
    if method != "kmeans":
        tries.append(f"--codebook_init kmeans (now {method})")
    tries.append("dead-code restarts (--dead_code_steps N; now off)" if not dead_code_steps
                 else f"a smaller --dead_code_steps (now {dead_code_steps})")
    tries.append(f"a lower --learning_rate (now {config.learning_rate:g})")
    return "try " + ", ".join(tries) + " or a longer run"


def collapse_warnings(usage: Sequence[float], codebook_size: int, where: str, tokens: Sequence[int],
                      advice: str = "") -> list[str]:
    """One line per level whose usage is below `COLLAPSE_USAGE` of what its ``tokens`` could reach."""
    advice = advice or collapse_advice()
    lines = []
    for level, (share, count) in enumerate(zip(usage, tokens)):
        reachable = attainable_usage(int(count), codebook_size)
        if share < COLLAPSE_USAGE * reachable:
            lines.append(f"level {level} collapsed: it uses {share:.1%} of its {codebook_size} codes on {where}, "
                         f"where {int(count)} tokens drawn evenly would reach {reachable:.0%}; its tokens carry "
                         f"little information: {advice}")
    return lines


# ----------------------------------------------------------------------------- seeding


def kmeans(vectors: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` centroids [k, D] of ``vectors`` [N, D] under SNAC's cosine code search (k-means++ start).

    Assignment is by cosine similarity, as the quantizer looks codes up; a centroid is the plain
    mean of its vectors, so a code starts at the scale of the latents it stands for (the commitment
    loss compares unnormalised vectors). An empty cluster takes a random vector. With fewer vectors
    than codes, the missing rows are random vectors plus a little noise, so no two codes tie. Runs
    on the vectors' device; random choices come from the CPU ``generator``.
    """
    vectors = vectors.float()
    n = vectors.shape[0]
    unit = F.normalize(vectors, dim=-1)
    if n >= k:
        centroids = vectors[_spread_picks(unit, k, generator)] if iterations else \
            vectors[torch.randperm(n, generator=generator)[:k]]
    else:
        extra = vectors[torch.randint(n, (k - n,), generator=generator)]
        noise = 0.01 * extra.std() * torch.randn(extra.shape, generator=generator).to(vectors.device)
        centroids = torch.cat([vectors, extra + noise])
    for _ in range(iterations):
        assign = (unit @ F.normalize(centroids, dim=-1).T).argmax(-1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, vectors)
        sizes = torch.bincount(assign, minlength=k)
        empty = sizes == 0
        centroids = torch.where(empty[:, None], centroids, sums / sizes.clamp(min=1)[:, None])
        if empty.any() and n >= k:
            centroids[empty] = vectors[torch.randint(n, (int(empty.sum()),), generator=generator)]
    return centroids


def _spread_picks(unit: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding under cosine distance: each next pick favours vectors far from those picked."""
    picks = [int(torch.randint(unit.shape[0], (), generator=generator))]
    distance = (1 - unit @ unit[picks[0]]).clamp(min=0).square()
    for _ in range(k - 1):
        cumulative = distance.cumsum(0)
        target = float(torch.rand((), generator=generator)) * cumulative[-1]
        pick = min(int(torch.searchsorted(cumulative, target, right=True)), unit.shape[0] - 1)
        picks.append(pick)
        distance = torch.minimum(distance, (1 - unit @ unit[pick]).clamp(min=0).square())
    return torch.tensor(picks)


def sample_rows(vectors: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct vectors at random (repeats with a little noise when there are fewer)."""
    return kmeans(vectors, k, iterations=0, generator=generator)


def _pool(x: torch.Tensor, stride: int) -> torch.Tensor:
    return F.avg_pool1d(x, stride, stride) if stride > 1 else x


@torch.no_grad()
def seed_codebooks(model: Any, audio: Iterable[torch.Tensor], method: str = "kmeans", iterations: int = 20,
                   seed: int = 0) -> dict[str, Any]:
    """Point every code at the encoder's own vectors, coarse level first.

    Level ``l`` sees the residual left by the already seeded levels above it, exactly as in
    training, so each level is seeded where its inputs actually lie. The code search is by cosine,
    so the data sets each row's direction; its length stays that of the fresh codebook (DAC's
    N(0, 1) rows, about sqrt(codebook_dim)), which keeps the decoder's input at the size a fresh
    model starts with. (Rows at the latents' own scale, about 100x shorter, or latents rescaled to
    unit size, measured no better or worse: see `benchmarks/quality.py` in the README.)

    ``audio`` are batches [B, 1, T]; in a multi-process run one process seeds and the trainer
    broadcasts its rows. Returns what was done (method, vectors per level) for the run's records.
    """
    if method not in SEED_METHODS:
        raise ValueError(f"codebook seeding method {method!r}; choose among {', '.join(SEED_METHODS)}")
    quantizers = model.quantizer.quantizers
    residuals = [model.encoder(model.preprocess(batch)) for batch in audio]
    record: dict[str, Any] = {"method": method, "vectors": []}
    for level, vq in enumerate(quantizers):
        latents = [vq.in_proj(_pool(residual, vq.stride)) for residual in residuals]
        vectors = torch.cat([z_e.transpose(1, 2).reshape(-1, z_e.shape[1]) for z_e in latents]).float()
        vectors = vectors[torch.isfinite(vectors).all(-1)]
        weight = vq.codebook.weight
        if method != "none" and vectors.shape[0] > 0:
            generator = torch.Generator().manual_seed((seed * 1_000_003 + 17) * 1009 + level)
            rows = (kmeans(vectors, weight.shape[0], iterations, generator) if method == "kmeans"
                    else sample_rows(vectors, weight.shape[0], generator))
            rows = F.normalize(rows, dim=-1) * weight.norm(dim=-1).mean()
            weight.copy_(rows.to(weight.device, weight.dtype))
        record["vectors"].append(int(vectors.shape[0]))
        if level + 1 < len(quantizers):  # the next level quantizes what this one leaves
            for i, z_e in enumerate(latents):
                z_q = vq.out_proj(vq.decode_latents(z_e)[0])
                residuals[i] = residuals[i] - z_q.repeat_interleave(vq.stride, dim=-1)
    logger.info(f"codebooks seeded ({method}) from {record['vectors']} encoder vectors per level",
                main_process_only=True)
    return record


def seed_from_clips(model: Any, clips: Sequence[torch.Tensor], method: str, seed: int,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    """`seed_codebooks` on training excerpts [1, T], encoded ``SEEDING_BATCH`` at a time.

    The batch is fixed, not the training batch, so the rows do not depend on it (float sums can
    differ between batch sizes). Without any excerpt the codebooks stay as they are, with a warning.
    """
    if not clips:
        logger.warning("no usable training excerpt to seed the codebooks from: they start as initialised")
        return {"method": "none", "vectors": [], "clips": 0}
    batches = [torch.stack(list(clips[i:i + SEEDING_BATCH])).to(device) for i in range(0, len(clips), SEEDING_BATCH)]
    return {**seed_codebooks(model, batches, method, seed=seed), "clips": len(clips)}


def seed_run_codebooks(accelerator: Any, generator: Any, data: Any, config: Any) -> Optional[dict[str, Any]]:
    """Before a run's first step, `seed_from_clips` on training excerpts; the record, None when off.

    The excerpts are drawn apart from the training stream (their own keys, or a stream iterator of
    their own), so training sees the same batches with or without seeding. The main process seeds
    from the same excerpts whatever the number of processes and broadcasts the rows.
    """
    method = config.codebook_init or ("none" if config.init_from else "kmeans")
    if method == "none":
        return None
    total = config.codebook_init_clips or min(1024, math.ceil(2 * generator.codebook_size / config.coarse_frames))
    record: list[Optional[dict[str, Any]]] = [None]
    if accelerator.is_main_process:  # one process seeds, so the rows do not depend on how many there are
        clips = seeding_excerpts(data, total, config.seed)
        record = [seed_from_clips(generator, clips, method, config.seed, accelerator.device)]
    if accelerator.num_processes > 1:
        for vq in generator.quantizer.quantizers:
            vq.codebook.weight.data.copy_(broadcast(vq.codebook.weight.data.clone(), from_process=0))
        broadcast_object_list(record, from_process=0)
    return record[0]


# ----------------------------------------------------------------------------- dead-code restarts


def default_dead_code_steps(codebook_size: int, frames_per_update: int) -> int:
    """Updates in which each code of the coarsest level would be drawn twice if all were used equally.

    A fixed count misjudges codebooks: 10 updates fit `tiny` on the demo batch (256 codes, 44 coarse
    frames per update; 50 lost codes, see `benchmarks/quality.py`), but a 4096-code level seeing 144
    frames per update would have healthy codes restarted that merely were not drawn yet.
    """
    return max(1, math.ceil(2 * codebook_size / max(1, frames_per_update)))


class DeadCodeRestarter:
    """Re-seeds codes left unused for ``dead_steps`` optimizer steps from current encoder vectors.

    Dead codes waste bits and never recover on their own (no encoder vector is near them, so the
    codebook loss never moves them). Usage comes from cross-process-summed counts and the choice
    from a generator seeded by (seed, step, level) over vectors gathered from every process, so
    all replicas write the same rows and stay identical without a broadcast. Codebooks frozen with
    ``requires_grad=False`` are left alone. Holds ``state_dict``/``load_state_dict`` for
    ``accelerator.register_for_checkpointing``.
    """

    def __init__(self, n_levels: int, codebook_size: int, dead_steps: int, seed: int = 0) -> None:
        if dead_steps < 1:
            raise ValueError("dead_steps must be at least 1")
        self.dead_steps = dead_steps
        self.seed = seed
        self.unused_steps = torch.zeros(n_levels, codebook_size, dtype=torch.long)
        self.used = torch.zeros(n_levels, codebook_size, dtype=torch.bool)
        self.restarted = torch.zeros(n_levels, dtype=torch.long)

    def observe(self, counts: torch.Tensor) -> None:
        """Record the codes used by one micro-batch; ``counts`` must already be summed across processes.
        The record stays on the counts' device: reading it back would wait for the GPU."""
        self._to(counts.device)
        self.used |= counts.detach() > 0

    def _to(self, device: torch.device) -> None:
        """The record moves to the device once (a fresh or loaded restarter holds it on the CPU)."""
        if self.used.device != device:
            self.used, self.unused_steps, self.restarted = (t.to(device) for t in (self.used, self.unused_steps,
                                                                                     self.restarted))

    def forget_window(self) -> None:
        """Drop the codes observed since the last update: that update was skipped (non-finite)."""
        self.used.zero_()

    def generator(self, step: int, level: int) -> torch.Generator:
        """The same CPU generator on every process for this (seed, step, level)."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1009 + level)

    @torch.no_grad()
    def step(self, model: Any, latents: Sequence[torch.Tensor], step: int,
             gather: Optional[TensorFn] = None, optimizer: Optional[torch.optim.Optimizer] = None,
             stepped: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Close one optimizer step: age unused codes and re-seed the dead ones; returns counts per level.

        Call once per optimizer update on every process, after ``optimizer.step()``. ``latents`` are
        `GeneratorOutput.latents` of the current batch ([B, D, T_level] per level); ``gather``
        concatenates a tensor from all processes along dim 0 (``accelerator.gather``). Given the
        optimizer, the Adam moments of re-seeded rows are zeroed so stale momentum does not drag
        the new vectors away. ``stepped`` (a 0-d bool tensor) is whether the update was taken, when
        that is known on the device only: a skipped one neither ages codes nor re-seeds any.

        Everything stays on the device (no host sync): the i-th dead code of a level takes the
        i-th vector of a permutation of the batch's vectors drawn from (seed, step, level), all
        codes are written through a mask, and the counts come back as 0-d device tensors. Non-finite
        vectors are never used (they go to the permutation's end); with fewer usable vectors than
        dead codes, the permutation repeats.
        """
        quantizers = model.quantizer.quantizers
        if len(quantizers) != self.unused_steps.shape[0]:
            raise ValueError(f"the model has {len(quantizers)} quantizer levels, the restarter tracks "
                             f"{self.unused_steps.shape[0]}")
        device = quantizers[0].codebook.weight.device
        self._to(device)
        used, unused, restarted = self.used, self.unused_steps, self.restarted
        aged = torch.where(used, 0, unused + 1)
        unused = aged if stepped is None else torch.where(stepped, aged, unused)
        self.used = torch.zeros_like(used)
        logs = {}
        for level, vq in enumerate(quantizers):
            weight = vq.codebook.weight
            logs[f"codebook/restarted_level{level}"] = torch.zeros((), dtype=torch.long, device=device)
            if not weight.requires_grad:
                continue
            dead = unused[level] >= self.dead_steps
            if stepped is not None:
                dead = dead & stepped
            z_e = latents[level].detach().contiguous()
            if gather is not None:
                z_e = gather(z_e)
            candidates = z_e.transpose(1, 2).reshape(-1, z_e.shape[1])
            n = candidates.shape[0]
            if n == 0:
                continue
            order = torch.randperm(n, generator=self.generator(step, level)).to(device, non_blocking=True)
            finite = torch.isfinite(candidates[order]).all(-1)
            order = order[torch.sort((~finite).int(), stable=True).indices]  # finite ones first, in order
            usable = finite.sum()
            pick = order[(dead.long().cumsum(0) - 1).clamp(min=0) % usable.clamp(min=1)]
            chosen = candidates[pick]
            replace = dead & (usable > 0)
            weight.copy_(torch.where(replace[:, None], chosen.to(weight.dtype), weight))
            if optimizer is not None:
                state = getattr(optimizer, "optimizer", optimizer).state.get(weight, {})
                for value in state.values():
                    if torch.is_tensor(value) and value.shape == weight.shape:
                        value.copy_(torch.where(replace[:, None], torch.zeros_like(value), value))
            unused[level] = torch.where(replace, 0, unused[level])
            count = replace.sum()
            restarted[level] += count
            logs[f"codebook/restarted_level{level}"] = count
        self.unused_steps, self.restarted = unused, restarted
        return logs

    def state_dict(self) -> dict[str, Any]:
        return {"unused_steps": self.unused_steps.cpu().clone(), "used": self.used.cpu().clone(),
                "restarted": self.restarted.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unused_steps = state["unused_steps"].clone()
        self.used = state["used"].clone()
        self.restarted = state["restarted"].clone()
