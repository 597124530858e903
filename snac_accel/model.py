"""The trainable generator: `snac.SNAC` plus the VQ losses and codebook statistics it lacks.

`SnacGenerator` subclasses `snac.SNAC` without renaming a parameter, so its state dict loads into
`snac.SNAC` unchanged. Its quantizer pass follows DAC: per level, in that level's projected space,
commitment = MSE(z_e, sg(z_q)) and codebook = MSE(sg(z_e), z_q), with a straight-through estimator.
A fresh generator is initialised as DAC's (`init_fresh`); codebook statistics, seeding and
dead-code restarts live in `snac_accel.codebook`.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from snac import SNAC
from snac.layers import DecoderBlock, NoiseBlock, Snake1d


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


class Snake(Snake1d):
    """SNAC's Snake activation, x + sin(alpha x)^2 / alpha, computed eagerly in the activation's dtype.

    `snac.layers.snake` is a TorchScript function. TorchScript's profiling executor specialises its
    graph on the first calls it sees, and the specialised backward rounds differently from the
    generic one: a fresh run whose first calls came from codebook seeding (no gradient) and a
    resumed run whose first calls need a gradient trained apart by float rounding (219 of 269
    tensors after 3 steps). Eager ops have no such history. The same aten ops as snac's function,
    so float32 outputs equal `snac.SNAC`'s; alpha follows the activation's dtype, so bf16
    activations stay bf16 instead of being promoted by the float32 parameter.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.to(x.dtype)
        return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)


class SnacGenerator(SNAC):
    """`snac.SNAC` whose forward also returns the VQ losses; optional DAC quantizer dropout."""

    def __init__(self, quantizer_dropout: float = 0.0, **snac_kwargs: Any) -> None:
        super().__init__(**snac_kwargs)
        # snac computes it with np.prod: a numpy.int64, which torch.compile cannot fold into `preprocess`'s
        # padding (math.ceil on it breaks the graph); a Python int is a constant.
        self.hop_length = int(self.hop_length)
        for module in self.modules():  # same parameters and names, eager forward (see `Snake`)
            if type(module) is Snake1d:
                module.__class__ = Snake
        self.quantizer_dropout = quantizer_dropout
        defaults = {k: p.default for k, p in inspect.signature(SNAC.__init__).parameters.items() if k != "self"}
        self._snac_config = {**defaults, **snac_kwargs, "latent_dim": self.latent_dim}

    @property
    def config(self) -> dict[str, Any]:
        """Exactly `snac.SNAC`'s constructor arguments, as written to config.json."""
        return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in self._snac_config.items()}

    @property
    def pad_multiple(self) -> int:
        return self.hop_length * math.lcm(self.vq_strides[0], self.attn_window_size or 1)

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
        out.audio = self.decode_float32_output(z_q)[..., :length]
        return out

    def decode_float32_output(self, z_q: torch.Tensor) -> torch.Tensor:
        """`snac.layers.Decoder` with its last conv and tanh in float32 even under autocast.

        Under bf16 autocast they would round the waveform itself to bf16's 8 bits of mantissa, a
        floor the training cannot go below (a mel distance of 0.134 on the demo's validation clips
        from the rounding alone, fp16 0.023). Without autocast the same ops as ``self.decoder(z_q)``.
        """
        layers = self.decoder.model
        x = z_q
        for layer in layers[:-2]:
            x = layer(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return layers[-1](layers[-2](x.float()))


@contextmanager
def seeded_noise(seed: int) -> Iterator[None]:
    """The decoder's noise blocks draw from the global RNG: seed it for one decode, then put back the
    state of the CPU and of every CUDA device (``torch.manual_seed`` reseeds them all), so that a decode
    for a figure in the middle of training leaves the training's random streams as they were."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def init_fresh(model: SNAC) -> SNAC:
    """DAC's initialisation for a model trained from scratch, plus silent noise blocks.

    Every Conv1d bias starts at zero, as DAC's ``init_weights`` does (its truncated-normal weight
    init is overwritten by weight normalisation on the next forward, so DAC's weights are PyTorch's
    default: these are too). With PyTorch's random biases the encoder output is mostly a constant
    offset, and the cosine code search sends every frame to the same code. Noise blocks start with
    a zero gain: random gains make two decodes of the same codes differ more than the codes do.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Conv1d) and module.bias is not None:
            module.bias.zero_()
        if isinstance(module, NoiseBlock):
            module.linear.parametrizations.weight.original0.zero_()
    return model


def build_generator(config: dict[str, Any], quantizer_dropout: float = 0.0) -> SnacGenerator:
    """A fresh generator, initialised by `init_fresh`, from `snac.SNAC` constructor arguments."""
    return init_fresh(SnacGenerator(quantizer_dropout=quantizer_dropout, **config))


def resolve_pretrained_folder(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local SNAC folder as is, or a Hub id downloaded (config + weights only) to the cache."""
    if os.path.isdir(path_or_repo):
        return Path(path_or_repo)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    looks_local = path_or_repo.startswith(("/", ".", "~")) or path_or_repo.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"{path_or_repo} is not a folder (nor a Hub id); give a SNAC model folder")
    try:
        return Path(snapshot_download(path_or_repo, revision=revision,
                                      allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin"]))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{path_or_repo} is not a local folder and the Hub cannot be reached (offline, and not in the cache): "
            f"download it where the Hub is reachable (hf download {path_or_repo} --local-dir DIR) and give DIR"
        ) from None
    except (HfHubHTTPError, HFValidationError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"{path_or_repo} is not a local folder and the Hub refused it: {first}") from None


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
