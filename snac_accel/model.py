"""The trainable generator: `snac.SNAC` plus the VQ losses and codebook statistics it lacks.

`SnacGenerator` subclasses `snac.SNAC` without renaming a parameter, so its state dict loads into
`snac.SNAC` unchanged. Its quantizer pass follows DAC: per level, in that level's projected space,
commitment = MSE(z_e, sg(z_q)) and codebook = MSE(sg(z_e), z_q), with a straight-through estimator.
`code_counts`/`codebook_statistics` give per-level usage and perplexity across processes, and
`DeadCodeRestarter` re-seeds codes that stopped being used, identically on every process.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from snac import SNAC
from snac.layers import DecoderBlock, NoiseBlock

logger = get_logger(__name__)

TensorFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class GeneratorOutput:
    """Everything one training step needs from the generator, in one object (DDP passes it through)."""

    audio: torch.Tensor  # [B, 1, T], trimmed to the input length
    codes: list[torch.Tensor]  # per level, [B, T_level]
    commitment_loss: torch.Tensor  # summed over levels
    codebook_loss: torch.Tensor  # summed over levels
    commitment_per_level: list[torch.Tensor]
    codebook_per_level: list[torch.Tensor]
    latents: list[torch.Tensor]  # per level projected encoder vectors z_e, [B, D, T_level], detached


class SnacGenerator(SNAC):
    """`snac.SNAC` whose forward also returns the VQ losses; optional DAC quantizer dropout."""

    def __init__(self, quantizer_dropout: float = 0.0, **snac_kwargs: Any) -> None:
        super().__init__(**snac_kwargs)
        self.quantizer_dropout = quantizer_dropout
        defaults = {k: p.default for k, p in inspect.signature(SNAC.__init__).parameters.items() if k != "self"}
        self._snac_config = {**defaults, **snac_kwargs, "latent_dim": self.latent_dim}

    @property
    def config(self) -> dict[str, Any]:
        """Exactly `snac.SNAC`'s constructor arguments, as written to config.json."""
        return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in self._snac_config.items()}

    @property
    def pad_multiple(self) -> int:
        return int(self.hop_length) * math.lcm(self.vq_strides[0], self.attn_window_size or 1)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, GeneratorOutput]:
        """Residual quantization with DAC's losses; same codes and z_q as `ResidualVectorQuantize.forward`.

        Runs in float32 even under autocast: nearest-code search in half precision picks other codes
        than inference in float32 would. With quantizer dropout (training only, as DAC), the first
        ``int(B * quantizer_dropout)`` samples keep a random number of levels in [1, n_levels]; the
        dropped levels add nothing to z_q and to the losses, whose batch mean still divides by B.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._quantize(z.float())

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, GeneratorOutput]:
        batch = z.shape[0]
        n_levels = len(self.quantizer.quantizers)
        active = torch.full((batch,), n_levels, device=z.device)
        if self.training and self.quantizer_dropout > 0:
            n_dropout = int(batch * self.quantizer_dropout)
            active[:n_dropout] = torch.randint(1, n_levels + 1, (n_dropout,), device=z.device)
        z_q_total = torch.zeros_like(z)
        residual = z
        codes, commitment, codebook, latents = [], [], [], []
        for level, vq in enumerate(self.quantizer.quantizers):
            x = F.avg_pool1d(residual, vq.stride, vq.stride) if vq.stride > 1 else residual
            z_e = vq.in_proj(x)
            z_q, indices = vq.decode_latents(z_e)
            mask = (level < active).to(z.dtype)
            commitment.append((F.mse_loss(z_e, z_q.detach(), reduction="none").mean([1, 2]) * mask).mean())
            codebook.append((F.mse_loss(z_q, z_e.detach(), reduction="none").mean([1, 2]) * mask).mean())
            z_q = z_e + (z_q - z_e).detach()  # straight-through: the encoder gets the decoder's gradient
            z_q = vq.out_proj(z_q)
            if vq.stride > 1:
                z_q = z_q.repeat_interleave(vq.stride, dim=-1)
            z_q_total = z_q_total + z_q * mask[:, None, None]
            residual = residual - z_q
            codes.append(indices)
            latents.append(z_e.detach())
        stats = GeneratorOutput(
            audio=z_q_total, codes=codes,
            commitment_loss=torch.stack(commitment).sum(), codebook_loss=torch.stack(codebook).sum(),
            commitment_per_level=commitment, codebook_per_level=codebook, latents=latents,
        )
        return z_q_total, stats

    def forward(self, audio_data: torch.Tensor) -> GeneratorOutput:  # type: ignore[override]
        """Reconstruction of audio [B, 1, T] plus codes, VQ losses and latents (`snac.SNAC` returns a tuple)."""
        length = audio_data.shape[-1]
        z = self.encoder(self.preprocess(audio_data))
        z_q, out = self.quantize(z)
        out.audio = self.decoder(z_q)[..., :length]
        return out


def build_generator(config: dict[str, Any], quantizer_dropout: float = 0.0) -> SnacGenerator:
    """A fresh generator from `snac.SNAC` constructor arguments (a preset or a config.json)."""
    return SnacGenerator(quantizer_dropout=quantizer_dropout, **config)


def resolve_pretrained_folder(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local SNAC folder as is, or a Hub id downloaded (config + weights only) to the cache."""
    if os.path.isdir(path_or_repo):
        return Path(path_or_repo)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path_or_repo, revision=revision,
                                  allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin"]))


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Weights of a SNAC folder: safetensors first, else `pytorch_model.bin` (the released format)."""
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} holds neither model.safetensors nor pytorch_model.bin")


def generator_from_pretrained(path_or_repo: str, quantizer_dropout: float = 0.0,
                              noise: Optional[bool] = None) -> SnacGenerator:
    """Build a `SnacGenerator` from any SNAC folder or Hub id (ours or a released one).

    ``noise`` overrides the decoder's noise blocks. Adding or removing them shifts the indices of
    the layers after them in each decoder block, so the weights are carried over layer by layer;
    added noise blocks start with a zero gain (they add nothing until trained).
    """
    folder = resolve_pretrained_folder(path_or_repo)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; is it a SNAC model folder?")
    config = json.loads(config_path.read_text())
    model = build_generator(config, quantizer_dropout)
    model.load_state_dict(load_state_dict(folder), strict=True)
    if noise is not None and bool(noise) != bool(model.config["noise"]):
        target = build_generator({**config, "noise": noise}, quantizer_dropout)
        copy_across_noise(model, target)
        model = target
    return model


@torch.no_grad()
def copy_across_noise(source: SnacGenerator, target: SnacGenerator) -> None:
    """Copy every weight of ``source`` into ``target``, which differs only in its noise blocks."""
    target.encoder.load_state_dict(source.encoder.state_dict())
    target.quantizer.load_state_dict(source.quantizer.state_dict())
    for src_layer, dst_layer in zip(source.decoder.model, target.decoder.model, strict=True):
        if not isinstance(src_layer, DecoderBlock):
            dst_layer.load_state_dict(src_layer.state_dict())
            continue
        src_parts = [m for m in src_layer.block if not isinstance(m, NoiseBlock)]
        dst_parts = [m for m in dst_layer.block if not isinstance(m, NoiseBlock)]
        for a, b in zip(src_parts, dst_parts, strict=True):
            b.load_state_dict(a.state_dict())
        for block in dst_layer.block:
            if isinstance(block, NoiseBlock):
                block.linear.parametrizations.weight.original0.zero_()


FREEZABLE = ("encoder", "quantizer", "decoder")


def freeze(model: SnacGenerator, parts: Optional[str]) -> None:
    """Freeze named parts before `accelerator.prepare` (DDP must see requires_grad=False)."""
    if not parts:
        return
    for part in parts.split(","):
        part = part.strip()
        if part not in FREEZABLE:
            raise ValueError(f"cannot freeze {part!r}; choose among {', '.join(FREEZABLE)}")
        getattr(model, part).requires_grad_(False)


def code_counts(codes: Sequence[torch.Tensor], codebook_size: int, reduce: Optional[TensorFn] = None) -> torch.Tensor:
    """How often each code occurs in the batch, [levels, codebook_size] float32.

    ``reduce`` sums across processes (the trainer passes ``lambda t: accelerator.reduce(t, "sum")``);
    one collective covers all levels.
    """
    counts = torch.stack([torch.bincount(c.flatten(), minlength=codebook_size) for c in codes]).float()
    return reduce(counts) if reduce is not None else counts


def codebook_statistics(codes: Sequence[torch.Tensor], codebook_size: int, reduce: Optional[TensorFn] = None,
                        counts: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Per level: share of the codebook used in the batch and the perplexity of the code histogram.

    Perplexity is exp(entropy): the number of equally used codes that would give the same entropy
    (codebook_size at best, 1 when one code takes everything). Pass ``counts`` from `code_counts`
    to reuse an already reduced histogram. Values stay tensors: no device sync until logged.
    """
    if counts is None:
        counts = code_counts(codes, codebook_size, reduce)
    probs = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    usage = (counts > 0).float().mean(-1)
    perplexity = torch.exp(-torch.special.xlogy(probs, probs).sum(-1))
    stats = {}
    for level in range(counts.shape[0]):
        stats[f"codebook/usage_level{level}"] = usage[level]
        stats[f"codebook/perplexity_level{level}"] = perplexity[level]
    return stats


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
        """Record the codes used by one micro-batch; ``counts`` must already be summed across processes."""
        self.used |= counts.detach().cpu() > 0

    def generator(self, step: int, level: int) -> torch.Generator:
        """The same CPU generator on every process for this (seed, step, level)."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1009 + level)

    @torch.no_grad()
    def step(self, model: SnacGenerator, latents: Sequence[torch.Tensor], step: int,
             gather: Optional[TensorFn] = None, optimizer: Optional[torch.optim.Optimizer] = None
             ) -> dict[str, torch.Tensor]:
        """Close one optimizer step: age unused codes and re-seed the dead ones; returns counts per level.

        Call once per optimizer update on every process, after ``optimizer.step()``. ``latents`` are
        `GeneratorOutput.latents` of the current batch ([B, D, T_level] per level); ``gather``
        concatenates a tensor from all processes along dim 0 (``accelerator.gather``). Given the
        optimizer, the Adam moments of re-seeded rows are zeroed so stale momentum does not drag
        the new vectors away. Non-finite candidates are never used. Counts come back as 0-d
        tensors, like the trainer's other logs.
        """
        quantizers = model.quantizer.quantizers
        if len(quantizers) != self.unused_steps.shape[0]:
            raise ValueError(f"the model has {len(quantizers)} quantizer levels, the restarter tracks "
                             f"{self.unused_steps.shape[0]}")
        self.unused_steps = torch.where(self.used, 0, self.unused_steps + 1)
        self.used.zero_()
        logs = {}
        for level, vq in enumerate(quantizers):
            weight = vq.codebook.weight
            dead = (self.unused_steps[level] >= self.dead_steps).nonzero().flatten()
            logs[f"codebook/restarted_level{level}"] = torch.tensor(0)
            if dead.numel() == 0 or not weight.requires_grad:
                continue
            z_e = latents[level].detach().contiguous()
            if gather is not None:
                z_e = gather(z_e)
            candidates = z_e.transpose(1, 2).reshape(-1, z_e.shape[1])
            candidates = candidates[torch.isfinite(candidates).all(-1)]
            if candidates.shape[0] == 0:
                continue
            generator = self.generator(step, level)
            if candidates.shape[0] >= dead.numel():
                pick = torch.randperm(candidates.shape[0], generator=generator)[:dead.numel()]
            else:
                pick = torch.randint(candidates.shape[0], (dead.numel(),), generator=generator)
            rows = dead.to(weight.device)
            weight[rows] = candidates[pick.to(candidates.device)].to(weight.dtype)
            if optimizer is not None:
                state = getattr(optimizer, "optimizer", optimizer).state.get(weight, {})
                for value in state.values():
                    if torch.is_tensor(value) and value.shape == weight.shape:
                        value[rows] = 0
            self.unused_steps[level, dead] = 0
            self.restarted[level] += dead.numel()
            logs[f"codebook/restarted_level{level}"] = torch.tensor(dead.numel())
            logger.info(f"step {step}: re-seeded {dead.numel()} dead codes of level {level}", main_process_only=True)
        return logs

    def state_dict(self) -> dict[str, Any]:
        return {"unused_steps": self.unused_steps.clone(), "used": self.used.clone(),
                "restarted": self.restarted.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unused_steps = state["unused_steps"].clone()
        self.used = state["used"].clone()
        self.restarted = state["restarted"].clone()
