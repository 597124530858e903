"""The GAN training step of a SNAC codec: one micro-batch, its optimizer updates and their booking.

The step (see shared/ACCELERATE-NOTES.md):
1. one ``accelerator.accumulate(generator, discriminator)`` block per batch;
2. generator forward -> reconstruction, codes, VQ losses;
3. discriminator: backward on real and fake.detach(), unscale its optimizer only, clip, step;
4. generator: the discriminator is frozen (no gradient, no all-reduce), backward on mel +
   adversarial + feature matching + commitment + codebook, unscale, clip, step;
5. each optimizer's update is booked on its own: its scheduler steps only when it stepped, and a
   non-finite loss or gradient skips that update and is counted for that model.

fp16: accelerate's one GradScaler, updated inside every optimizer's ``step``, would change the scale
between the discriminator's step and the generator's last micro-batch, so with accumulation the
generator's update would mix two scales. Each optimizer has its own GradScaler instead, driven here:
its micro-batches are scaled, unscaled and checked with one scale, updated once per optimizer step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.optim.swa_utils import AveragedModel

from .checkpoints import TrainState
from .codebook import DeadCodeRestarter, code_counts, codebook_statistics
from .config import TrainConfig
from .discriminators import split_features
from .losses import DiscriminatorLoss, FeatureMatchingLoss, GeneratorAdversarialLoss, MultiScaleMelLoss
from .model import SnacGenerator

logger = get_logger(__name__)

# What became of one optimizer's update at the end of an accumulation window.
STEPPED, NONFINITE, BACKOFF = "stepped", "non-finite", "scaler back-off"
# An outcome known on the host, or (fused AdamW, no fp16) a 0-d bool device tensor: whether it stepped.
Outcome = Union[str, torch.Tensor]


class NonFiniteError(RuntimeError):
    """Too many non-finite updates in a row of ``models``: the run stops (or rolls back), the last good
    checkpoint stays."""

    def __init__(self, message: str, models: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.models = tuple(models)


def row_counts(accelerator: Accelerator, count: int, host_group: Any = None) -> list[int]:
    """Every process's ``count``: over ``host_group`` (gloo, host integers) when given, so that knowing
    them never waits on the device; else through the accelerator (a device tensor read back)."""
    if accelerator.num_processes == 1:
        return [count]
    if host_group is None:
        return accelerator.gather(torch.tensor([count], device=accelerator.device)).tolist()
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(accelerator.num_processes)]
    dist.all_gather(counts, torch.tensor([count], dtype=torch.int64), group=host_group)
    return [int(c) for c in counts]


def gather_uneven(accelerator: Accelerator, tensor: torch.Tensor, counts: Optional[list[int]] = None) -> torch.Tensor:
    """Every process's ``tensor`` concatenated along dim 0, also when the processes hold different counts.

    A batch made smaller by a broken file whose replacements failed too gives one process fewer rows;
    a plain ``gather`` of unequal first dimensions aborts (gloo) or returns garbage. Rows are padded to
    the largest count, gathered, and the padding dropped. ``counts`` (`row_counts`) saves asking.
    """
    if accelerator.num_processes == 1:
        return tensor
    counts = row_counts(accelerator, tensor.shape[0]) if counts is None else counts
    largest = max(counts)
    padding = tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))
    padded = accelerator.gather(torch.cat([tensor, padding]).contiguous())
    return torch.cat([padded[rank * largest:rank * largest + count] for rank, count in enumerate(counts)])


def use_fused_adam(config: TrainConfig, device: torch.device) -> bool:
    """``--adam_fused``, by default on CUDA: one kernel per step, and a skipped update decided on the device."""
    return config.adam_fused if config.adam_fused is not None else device.type == "cuda"


def build_optimizers(config: TrainConfig, generator: torch.nn.Module, discriminator: torch.nn.Module,
                     fused: bool = False) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """AdamW for the generator's trainable parameters and for the discriminator."""
    betas = (config.adam_beta1, config.adam_beta2)
    g_params = [p for p in generator.parameters() if p.requires_grad]
    opt_g = torch.optim.AdamW(g_params, lr=config.learning_rate, betas=betas, fused=fused or None,
                              weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    opt_d = torch.optim.AdamW(discriminator.parameters(), lr=config.disc_learning_rate or config.learning_rate,
                              betas=betas, weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
                              fused=fused or None)
    return opt_g, opt_d


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, max_steps: int) -> Any:
    """Not prepared by accelerate: the step steps it, once per optimizer update, on every process."""
    if config.lr_scheduler == "exponential":
        decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_gamma)
        if not config.lr_warmup_steps:
            return decay
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / config.lr_warmup_steps,
                                                   total_iters=config.lr_warmup_steps)
        return torch.optim.lr_scheduler.ChainedScheduler([warmup, decay])
    from transformers import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=max_steps)


@dataclass
class GanStep:
    """The step over the prepared models and optimizers that `SnacTrainer` builds and registers."""

    config: TrainConfig
    accelerator: Accelerator
    state: TrainState
    generator: torch.nn.Module
    discriminator: torch.nn.Module
    opt_g: Any
    opt_d: Any
    sched_g: Any
    sched_d: Any
    scalers: dict[str, torch.amp.GradScaler]  # fp16 only: one per optimizer
    ema: Optional[AveragedModel]
    restarter: Optional[DeadCodeRestarter]
    mel_loss: MultiScaleMelLoss
    disc_loss: DiscriminatorLoss
    adv_loss: GeneratorAdversarialLoss
    fm_loss: FeatureMatchingLoss
    codebook_size: int
    host_group: Any = None  # gloo group of every process (`RunControl`): batch sizes known without a device sync
    window_counts: Optional[torch.Tensor] = None  # code histogram since the last logging step
    update_counts: Optional[torch.Tensor] = None  # this process's histogram of the open accumulation window

    @property
    def unwrapped_generator(self) -> SnacGenerator:
        return self.accelerator.unwrap_model(self.generator)

    def train_step(self, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """One micro-batch; the optimizers step when the accumulation window closes.

        Returns detached loss tensors: converting them to floats is left to logging steps, so a GPU
        is synchronised once per update (the non-finite check) rather than once per value.
        """
        config, acc = self.config, self.accelerator
        adversarial = self.state.step >= config.disc_start
        logs: dict[str, torch.Tensor] = {}
        outcomes: dict[str, Outcome] = {}
        with acc.accumulate(self.generator, self.discriminator):
            out = self.generator(real)
            fake = out.audio
            sync = acc.sync_gradients
            counts = code_counts(out.codes, self.codebook_size)
            self.update_counts = counts if self.update_counts is None else self.update_counts + counts
            if sync:  # summed over processes once per update, so every rank agrees on usage and dead codes
                counts, self.update_counts = acc.reduce(self.update_counts, "sum"), None
                self.window_counts = counts if self.window_counts is None else self.window_counts + counts
                if self.restarter is not None:
                    self.restarter.observe(counts)

            if adversarial:  # one pass over fake and real: each weight normalised once, half the kernel launches
                d_fake, d_real = split_features(self.discriminator(torch.cat([fake.detach(), real])), real.shape[0])
                loss_d = self.disc_loss(d_real, d_fake)
                self._backward(loss_d, "discriminator")
                if sync:
                    outcomes["discriminator"] = self._update("discriminator", self.discriminator, self.opt_d, loss_d,
                                                             config.disc_max_grad_norm, logs)
                logs["loss/discriminator"] = loss_d.detach()

            # The generator pass goes around DDP with a frozen discriminator: no gradient lands in
            # the discriminator's .grad (which accumulation would carry into its next update) and
            # no all-reduce is spent on it.
            discriminator = acc.unwrap_model(self.discriminator)
            discriminator.requires_grad_(False)
            mel = self.mel_loss(fake, real)
            loss_g = (config.mel_weight * mel + config.commitment_weight * out.commitment_loss
                      + config.codebook_weight * out.codebook_loss)
            if adversarial:
                with self._weights_once(discriminator):
                    with torch.no_grad():
                        d_real = discriminator(real)
                    d_fake = discriminator(fake)
                adv, fm = self.adv_loss(d_fake), self.fm_loss(d_real, d_fake)
                loss_g = loss_g + config.adversarial_weight * adv + config.feature_matching_weight * fm
                logs["loss/adversarial"], logs["loss/feature_matching"] = adv.detach(), fm.detach()
            self._backward(loss_g, "generator")
            discriminator.requires_grad_(True)
            if sync:
                outcomes["generator"] = self._update("generator", self.generator, self.opt_g, loss_g,
                                                     config.max_grad_norm, logs)
            if sync and self.restarter is not None:
                outcome = outcomes["generator"]
                if isinstance(outcome, torch.Tensor) or outcome == STEPPED:  # a tensor: decided on the device
                    counts = row_counts(acc, real.shape[0], self.host_group)  # the same for every level
                    logs.update(self.restarter.step(self.unwrapped_generator, out.latents, self.state.step,
                                                    gather=lambda t: gather_uneven(acc, t, counts),
                                                    optimizer=self.opt_g,
                                                    stepped=outcome if isinstance(outcome, torch.Tensor) else None))
                else:  # a skipped update neither ages codes nor counts as their use
                    self.restarter.forget_window()

        logs.update({"loss/generator": loss_g.detach(), "loss/mel": mel.detach(),
                     "loss/commitment": out.commitment_loss.detach(), "loss/codebook": out.codebook_loss.detach()})
        for level, (commitment, codebook) in enumerate(zip(out.commitment_per_level, out.codebook_per_level)):
            logs[f"loss/commitment_level{level}"] = commitment.detach()
            logs[f"loss/codebook_level{level}"] = codebook.detach()
        if sync:
            self._after_update(outcomes, out)
        return logs

    def restart_window(self) -> None:
        """Forget the codes counted since the last update and logging step (after a rollback)."""
        self.window_counts = self.update_counts = None
        if self.restarter is not None:
            self.restarter.forget_window()

    def window_logs(self) -> dict[str, torch.Tensor]:
        """Usage, perplexity and efficiency per level over the batches since the last logging step.

        One batch holds too few frames to show a level's usage (4 clips of 1 s give the tiny
        preset's coarsest level 48 frames for 256 codes); the window's histogram does.
        """
        if self.window_counts is None:
            return {}
        stats = codebook_statistics([], self.codebook_size, counts=self.window_counts)
        self.window_counts = None
        return stats

    def _after_update(self, pending: dict[str, Outcome], out: Any) -> None:
        """Book each model's update on its own: its scheduler steps only when it stepped, the EMA
        follows the generator, and max_nonfinite_steps non-finite updates in a row of either model
        stop the run (a discriminator that never updates any more would train the generator
        against a frozen critic). Outcomes decided on the device are read back here, all in one
        transfer: the update's one host sync."""
        state = self.state
        outcomes = self._resolve(pending)
        for name, outcome in outcomes.items():
            self._book(name, outcome)
        if outcomes["generator"] == STEPPED:
            self.sched_g.step()
            if self.ema is not None:
                self.ema.update_parameters(self.unwrapped_generator)
        if outcomes.get("discriminator") == STEPPED:
            self.sched_d.step()
        stuck = [name for name in outcomes if state.nonfinite_in_row[name] >= self.config.max_nonfinite_steps]
        if stuck:
            raise NonFiniteError(
                f"{state.nonfinite_in_row[stuck[0]]} non-finite updates in a row of the {' and the '.join(stuck)} "
                f"at step {state.step}: stopping. The last checkpoint is intact; lower --learning_rate, use "
                "--mixed_precision bf16/no, or --on_divergence rollback", stuck)
        state.step += 1

    @staticmethod
    def _resolve(pending: dict[str, Outcome]) -> dict[str, str]:
        """Outcomes as STEPPED/NONFINITE/BACKOFF; those still on the device read back in one transfer."""
        names = [name for name, outcome in pending.items() if isinstance(outcome, torch.Tensor)]
        if not names:
            return dict(pending)  # type: ignore[arg-type]
        stepped = torch.stack([pending[name] for name in names]).tolist()
        return {**pending, **{name: STEPPED if ok else NONFINITE for name, ok in zip(names, stepped)}}

    def _book(self, name: str, outcome: str) -> None:
        state = self.state
        if outcome == STEPPED:
            state.nonfinite_in_row[name] = 0
            return
        state.skipped_updates[name] += 1
        if outcome == BACKOFF:
            state.scaler_backoffs[name] += 1
            logger.debug(f"fp16 overflow of the {name} at step {state.step}: update skipped, loss scale now "
                         f"{self.scalers[name].get_scale():g}")
            return
        state.nonfinite_in_row[name] += 1
        logger.warning(f"non-finite {name} loss or gradient at step {state.step}: its update skipped "
                       f"({state.nonfinite_in_row[name]} in a row)")

    @staticmethod
    def _weights_once(discriminator: torch.nn.Module) -> Any:
        """The frozen discriminator's weight norms computed once for both of the generator pass's calls
        (`parametrize.cached`); a compiled discriminator computes them inside its graph instead."""
        if getattr(discriminator, "_compiled_call_impl", None) is not None:
            return contextlib.nullcontext()
        return torch.nn.utils.parametrize.cached()

    def _backward(self, loss: torch.Tensor, name: str) -> None:
        scaler = self.scalers.get(name)
        self.accelerator.backward(scaler.scale(loss) if scaler is not None else loss)

    def _clip(self, model: torch.nn.Module, max_norm: Optional[float]) -> torch.Tensor:
        """Clip this model's (already unscaled) gradients; ``max_norm`` 0 (the SNAC recipe) only
        measures the norm for the logs."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.accelerator.device)
        if not max_norm:
            return torch.nn.utils.get_total_norm(grads)
        return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)

    def _nonfinite(self, *values: torch.Tensor) -> torch.Tensor:
        """Per value, whether it is not finite on some process (float 0/1 on the device): one all-reduce."""
        bad = torch.stack([(~torch.isfinite(v)).any().float() for v in values])
        return self.accelerator.reduce(bad, reduction="sum") > 0

    def _all_finite(self, *values: torch.Tensor) -> list[bool]:
        """Whether each value is finite on every process (a host sync)."""
        return [not flag for flag in self._nonfinite(*values).tolist()]

    def _update(self, name: str, model: torch.nn.Module, optimizer: Any, loss: torch.Tensor, max_norm: float,
                logs: dict[str, torch.Tensor]) -> Outcome:
        """The end of one optimizer's accumulation window: unscale with its own scale, clip, check, step.

        Returns STEPPED, NONFINITE, or BACKOFF (fp16: a gradient overflowed at a loss scale above 1,
        so the scaler lowers the scale; a finite loss makes it a scaling matter, not a diverged model).
        Fused AdamW without fp16 takes the check on the device instead (its ``found_inf``: the
        kernel leaves the weights, moments and step count alone) and returns whether it stepped as
        a device tensor, read back with the other at the update's end (`_after_update`).
        """
        scaler = self.scalers.get(name)
        inner = getattr(optimizer, "optimizer", optimizer)
        if scaler is None and inner.defaults.get("fused"):
            norm = self._clip(model, max_norm)
            logs[f"grad_norm/{name}"] = norm.detach()
            bad = self._nonfinite(loss.detach(), norm).any()
            inner.grad_scale, inner.found_inf = None, bad.float()
            try:
                optimizer.step()
            finally:
                del inner.grad_scale, inner.found_inf
            optimizer.zero_grad(set_to_none=True)
            return ~bad
        scale = scaler.get_scale() if scaler is not None else 1.0
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = self._clip(model, max_norm)
        logs[f"grad_norm/{name}"] = norm.detach()
        loss_ok, grad_ok = self._all_finite(loss.detach(), norm)
        if scaler is not None:
            if loss_ok:
                scaler.step(optimizer)  # the scaler skips the step itself when a gradient is not finite
            scaler.update()
            grad_ok = scaler.get_scale() >= scale  # the scale drops exactly when the scaler found an overflow
        elif loss_ok and grad_ok:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if loss_ok and grad_ok:
            return STEPPED
        return BACKOFF if scaler is not None and loss_ok and scale > 1 else NONFINITE
