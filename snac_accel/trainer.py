"""`SnacTrainer`: the GAN training loop of a SNAC codec on HuggingFace Accelerate.

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

import itertools
import logging
import math
import os
import re
import shutil
import signal
import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradScalerKwargs, ProjectConfiguration, broadcast, broadcast_object_list, set_seed
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from . import data as data_lib
from .checkpoints import OutputDirLock, OutputDirLocked
from .config import ConfigError, TrainConfig
from .discriminators import Discriminator
from .hub import HubTokenError, describe_training_data, export_folder, push_to_hub
from .losses import (DiscriminatorLoss, FeatureMatchingLoss, GeneratorAdversarialLoss, MultiScaleMelLoss,
                     MultiScaleSTFTLoss, si_sdr)
from .codebook import (DeadCodeRestarter, code_counts, codebook_statistics, collapse_warnings, histogram_statistics,
                       seed_codebooks)
from .model import SnacGenerator, build_generator, freeze, generator_from_pretrained

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)$")
MODELS = ("generator", "discriminator")
# What became of one optimizer's update at the end of an accumulation window.
STEPPED, NONFINITE, BACKOFF = "stepped", "non-finite", "scaler back-off"


class NonFiniteError(RuntimeError):
    """Too many non-finite updates in a row: the run stops, the last good checkpoint stays."""


@dataclass
class TrainState:
    """Counters saved with every checkpoint (registered with ``accelerator.register_for_checkpointing``)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    # Per model (generator, discriminator): updates skipped, non-finite ones in a row (what stops a
    # run), and fp16 loss-scale back-offs (overflows at a scale above 1: the scaler's normal search).
    skipped_updates: dict = field(default_factory=lambda: dict.fromkeys(MODELS, 0))
    nonfinite_in_row: dict = field(default_factory=lambda: dict.fromkeys(MODELS, 0))
    scaler_backoffs: dict = field(default_factory=lambda: dict.fromkeys(MODELS, 0))
    bad_files: int = 0
    best_val_mel: float = math.inf
    best_step: int = -1
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        for key in ("skipped_updates", "nonfinite_in_row"):  # earlier checkpoints: one count for both models
            if isinstance(state.get(key), int):
                state[key] = {"generator": state[key], "discriminator": 0}
        self.__dict__.update(state)


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Partial saves live under another name and never match."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return sorted(found)


def resolve_resume_path(config: TrainConfig) -> Optional[Path]:
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint != "latest":
        return Path(config.resume_from_checkpoint)
    found = list_checkpoints(Path(config.output_dir) / "checkpoints")
    return found[-1][1] if found else None


class _QuietCheckpointLogs(logging.Filter):
    """Drops accelerate's INFO lines; a failed random-state load (only INFO there) becomes a warning,
    since a resume without them is not exact."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and "Could not load random states" in record.getMessage():
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return record.levelno >= logging.WARNING


class SnacTrainer:
    """Builds everything from a `TrainConfig` and runs the loop; `fit()` returns the export folder."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        output_dir = Path(config.output_dir)
        log_with = None if config.report_to == "none" else config.report_to
        # Accelerate keeps precision and accumulation in process-wide singletons; a second trainer in
        # the same process (notebook, tests) must be able to choose its own. The process group stays.
        AcceleratorState._reset_state()
        GradientState._reset_state()
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                logging_dir=str(output_dir / config.logging_dir)),
            # fp16: accelerate's shared GradScaler stays off; each optimizer gets its own (module docstring).
            kwargs_handlers=[GradScalerKwargs(enabled=False)],
        )
        self._check_launch()
        self.lock = self._lock_output_dir()
        weakref.finalize(self, self.lock.release)  # a trainer that is never fit() frees the folder too
        try:
            self._build()
        except BaseException:
            self.lock.release()
            raise

    def _build(self) -> None:
        config, output_dir = self.config, Path(self.config.output_dir)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        set_seed(config.seed)
        self.state = TrainState()
        self.resume_path = resolve_resume_path(config)
        if config.resume_from_checkpoint and self.resume_path is None:
            logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {output_dir / 'checkpoints'}, "
                           "starting from scratch", main_process_only=True)

        self._build_data()
        self._build_models()
        self._build_optimizers()
        self.generator, self.discriminator, self.opt_g, self.opt_d = self.accelerator.prepare(
            self.generator, self.discriminator, self.opt_g, self.opt_d)
        self.ema = None
        if config.ema_decay is not None:
            self.ema = AveragedModel(self.unwrapped_generator, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay),
                                     use_buffers=True)
            self.accelerator.register_for_checkpointing(self.ema)
        self.accelerator.register_for_checkpointing(self.sched_g, self.sched_d, self.state)
        self.restarter = None
        if config.dead_code_steps > 0:  # registered last: the other objects keep their checkpoint indices
            g = self.unwrapped_generator
            self.restarter = DeadCodeRestarter(len(g.vq_strides), g.codebook_size, config.dead_code_steps,
                                               seed=config.seed)
            self.accelerator.register_for_checkpointing(self.restarter)
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        if self.accelerator.mixed_precision == "fp16":  # registered after the others, as the restarter
            self.scalers = {name: torch.amp.GradScaler(self.accelerator.device.type) for name in MODELS}
            self.accelerator.register_for_checkpointing(*self.scalers.values())
        self.mel_loss = MultiScaleMelLoss(config.sampling_rate).to(self.accelerator.device)
        self.stft_loss = MultiScaleSTFTLoss().to(self.accelerator.device)
        self.disc_loss = DiscriminatorLoss()
        self.adv_loss = GeneratorAdversarialLoss()
        self.fm_loss = FeatureMatchingLoss()
        self.bad_tracker = data_lib.BadFileTracker(max_fraction=config.max_bad_fraction)
        self._stop_signal: Optional[int] = None
        self._last_saved_step = -1
        self.window_counts: Optional[torch.Tensor] = None  # code histogram since the last logging step

    # ------------------------------------------------------------------ building

    def _lock_output_dir(self) -> OutputDirLock:
        """Own the output folder before anything is written; the main process holds the lock and
        tells the others, so that every process of a refused run stops with the same line."""
        lock = OutputDirLock(self.config.output_dir)
        refused = None
        if self.accelerator.is_main_process:
            try:
                lock.acquire()
            except OutputDirLocked as err:
                refused = str(err)
        if self.accelerator.num_processes > 1:
            refused = broadcast_object_list([refused])[0]
        if refused:
            raise OutputDirLocked(refused)
        return lock

    def _check_launch(self) -> None:
        """Refuse `--multi_gpu` without CUDA or ACCELERATE_USE_CPU: it starts unsynchronised copies."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != self.accelerator.num_processes:
            raise ConfigError(
                f"launched as {world} processes but accelerate formed a group of {self.accelerator.num_processes}: "
                "on a machine without GPUs set ACCELERATE_USE_CPU=1 (or use launch.sh --accelerate-config cpu)")

    def _build_data(self) -> None:
        config, acc = self.config, self.accelerator
        sources = data_lib.load_sources(config, "train")
        if not sources:
            raise ConfigError("no training data source: give --dataset, --dataset_name, --train_data_dir or --train_file")
        names, train_sets = (list(x) for x in zip(*sources))
        weights = data_lib.source_weights(config, len(sources))
        spec = data_lib.train_spec(config)
        pin = acc.device.type == "cuda"
        workers = config.dataloader_num_workers
        if workers is None:
            workers = data_lib.default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if config.streaming:
            for name, stream in sources:
                data_lib.check_stream(stream, name, spec)
            clips = data_lib.StreamingClips(data_lib.mix_streams(train_sets, weights, config.seed), spec,
                                            seed=config.seed, rank=acc.process_index, world_size=acc.num_processes,
                                            shuffle_buffer_size=config.shuffle_buffer_size)
            # Endless per process; its position (rows read per loader worker) goes into checkpoints.
            self.train_loader = self.sampler = data_lib.StreamingLoader(
                clips, config.train_batch_size, workers, pin, world_size=acc.num_processes)
            acc.register_for_checkpointing(self.train_loader)
            self.max_steps = config.max_train_steps
        else:
            self.train_clips = data_lib.AudioClips(train_sets, spec, seed=config.seed, train=True, weights=weights,
                                                   names=names)
            data_lib.check_source(self.train_clips, "training")
            self.sampler = data_lib.EpochBatchSampler(len(self.train_clips), config.train_batch_size, seed=config.seed,
                                                      num_replicas=acc.num_processes, rank=acc.process_index)
            if len(self.sampler) == 0:
                raise ConfigError(f"the training data has {len(self.train_clips)} clips, fewer than one batch of "
                                  f"{config.train_batch_size} per process; lower --train_batch_size")
            self.train_loader = data_lib.make_loader(self.train_clips, self.sampler, workers, pin)
            updates_per_epoch = max(1, len(self.sampler) // config.gradient_accumulation_steps)
            self.max_steps = config.max_train_steps or config.num_train_epochs * updates_per_epoch
        self.val_batch = data_lib.validation_batch(config)

    def _build_models(self) -> None:
        config = self.config
        if config.init_from:
            self.generator = generator_from_pretrained(config.init_from, config.quantizer_dropout, config.model_noise)
        else:
            self.generator = build_generator(config.model_config, config.quantizer_dropout)
        if self.generator.sampling_rate != config.sampling_rate:
            raise ConfigError(f"--init_from model runs at {self.generator.sampling_rate} Hz but --preset "
                              f"{config.preset} at {config.sampling_rate} Hz; pick the matching preset")
        freeze(self.generator, config.freeze)
        self.codebook_size = self.generator.codebook_size
        self.discriminator = Discriminator(**config.discriminator_config)

    def _build_optimizers(self) -> None:
        config = self.config
        betas = (config.adam_beta1, config.adam_beta2)
        g_params = [p for p in self.generator.parameters() if p.requires_grad]
        self.opt_g = torch.optim.AdamW(g_params, lr=config.learning_rate, betas=betas,
                                       weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
        self.opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=config.disc_learning_rate or config.learning_rate,
                                       betas=betas, weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
        self.sched_g = self._scheduler(self.opt_g)
        self.sched_d = self._scheduler(self.opt_d)

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """Not prepared by accelerate: we step it ourselves, once per optimizer update, on every process."""
        if self.config.lr_scheduler == "exponential":
            decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.config.lr_gamma)
            if not self.config.lr_warmup_steps:
                return decay
            warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / self.config.lr_warmup_steps,
                                                       total_iters=self.config.lr_warmup_steps)
            return torch.optim.lr_scheduler.ChainedScheduler([warmup, decay])
        from transformers import get_scheduler

        return get_scheduler(self.config.lr_scheduler, optimizer, num_warmup_steps=self.config.lr_warmup_steps,
                             num_training_steps=self.max_steps)

    # ------------------------------------------------------------------ helpers

    @property
    def unwrapped_generator(self) -> SnacGenerator:
        return self.accelerator.unwrap_model(self.generator)

    @property
    def export_model(self) -> SnacGenerator:
        if self.ema is not None and self.config.export_use_ema:
            return self.ema.module
        return self.unwrapped_generator

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

    def _all_finite(self, *values: torch.Tensor) -> list[bool]:
        """Whether each value is finite on every process: one all-reduce for all of them."""
        bad = torch.stack([(~torch.isfinite(v)).any().float() for v in values]).to(self.accelerator.device)
        return [flag == 0 for flag in self.accelerator.reduce(bad, reduction="sum").tolist()]

    def _update(self, name: str, model: torch.nn.Module, optimizer: Any, loss: torch.Tensor, max_norm: float,
                logs: dict[str, torch.Tensor]) -> str:
        """The end of one optimizer's accumulation window: unscale with its own scale, clip, check, step.

        Returns STEPPED, NONFINITE, or BACKOFF (fp16: a gradient overflowed at a loss scale above 1,
        so the scaler lowers the scale; a finite loss makes it a scaling matter, not a diverged model).
        """
        scaler = self.scalers.get(name)
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

    # ------------------------------------------------------------------ codebook seeding

    def _seed_codebooks(self) -> None:
        """Before a fresh run's first step, start the codebooks at the encoder's vectors (`seed_codebooks`).

        The excerpts are drawn apart from the training stream (their own keys, or a stream iterator
        of their own), so training sees the same batches with or without seeding. The record goes
        into the checkpointed `TrainState`: a resumed run never seeds again.
        """
        config, acc = self.config, self.accelerator
        method = config.codebook_init or ("none" if config.init_from else "kmeans")
        if method == "none" or self.state.step > 0 or "codebook_init" in self.state.extra:
            return
        generator = self.unwrapped_generator
        frames = max(1, config.segment_samples // int(generator.hop_length) // generator.vq_strides[0])
        total = config.codebook_init_clips or min(1024, math.ceil(2 * self.codebook_size / frames))
        per_process = math.ceil(total / acc.num_processes)
        clips = self._excerpts_for_seeding(per_process)
        batches = [torch.stack(clips[i:i + config.train_batch_size]).to(acc.device)
                   for i in range(0, len(clips), config.train_batch_size)]
        distributed = acc.num_processes > 1
        record = seed_codebooks(generator, batches, method, seed=config.seed,
                                gather=acc.gather if distributed else None,
                                broadcast=(lambda t: broadcast(t, from_process=0)) if distributed else None)
        self.state.extra["codebook_init"] = {**record, "clips": per_process * acc.num_processes}

    def _excerpts_for_seeding(self, count: int) -> list[torch.Tensor]:
        """``count`` usable training excerpts of this process, off the training stream."""
        if self.config.streaming:
            stream = iter(self.train_loader.clips)
            return [item["audio"] for item in itertools.islice(
                (item for item in stream if item["audio"] is not None), count)]
        acc, clips, found = self.accelerator, self.train_clips, []
        for rounds in itertools.count():
            order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(self.config.seed + rounds))
            for index in order[acc.process_index::acc.num_processes].tolist():
                item = clips[(-1 - rounds, index)]  # negative epochs: keys training never uses
                if item["audio"] is not None:
                    found.append(item["audio"])
                if len(found) == count:
                    return found
        return found

    # ------------------------------------------------------------------ the step

    def train_step(self, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """One micro-batch; the optimizers step when the accumulation window closes.

        Returns detached loss tensors: converting them to floats is left to logging steps, so a GPU
        is synchronised once per update (the non-finite check) rather than once per value.
        """
        config, acc = self.config, self.accelerator
        adversarial = self.state.step >= config.disc_start
        logs: dict[str, torch.Tensor] = {}
        outcomes: dict[str, str] = {}
        with acc.accumulate(self.generator, self.discriminator):
            out = self.generator(real)
            fake = out.audio
            sync = acc.sync_gradients
            # Summed over processes (one all-reduce), so every rank agrees on usage and dead codes.
            counts = code_counts(out.codes, self.codebook_size, reduce=lambda t: acc.reduce(t, "sum"))
            self.window_counts = counts if self.window_counts is None else self.window_counts + counts
            if self.restarter is not None:
                self.restarter.observe(counts)

            if adversarial:
                d_fake, d_real = self.discriminator(fake.detach()), self.discriminator(real)
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
            if sync and self.restarter is not None and outcomes["generator"] == STEPPED:
                logs.update(self.restarter.step(self.unwrapped_generator, out.latents, self.state.step,
                                                gather=acc.gather, optimizer=self.opt_g))

        logs.update({"loss/generator": loss_g.detach(), "loss/mel": mel.detach(),
                     "loss/commitment": out.commitment_loss.detach(), "loss/codebook": out.codebook_loss.detach()})
        for level, (commitment, codebook) in enumerate(zip(out.commitment_per_level, out.codebook_per_level)):
            logs[f"loss/commitment_level{level}"] = commitment.detach()
            logs[f"loss/codebook_level{level}"] = codebook.detach()
        if sync:
            self._after_update(outcomes, out)
        return logs

    def _codebook_window_logs(self) -> dict[str, float]:
        """Usage, perplexity and efficiency per level over the batches since the last logging step.

        One batch holds too few frames to show a level's usage (4 clips of 1 s give the tiny
        preset's coarsest level 48 frames for 256 codes); the window's histogram does.
        """
        if self.window_counts is None:
            return {}
        stats = codebook_statistics([], self.codebook_size, counts=self.window_counts)
        self.window_counts = None
        return {key: value.item() for key, value in stats.items()}

    def _after_update(self, outcomes: dict[str, str], out: Any) -> None:
        """Book each model's update on its own: its scheduler steps only when it stepped, the EMA
        follows the generator, and max_nonfinite_steps non-finite updates in a row of either model
        stop the run (a discriminator that never updates any more would train the generator
        against a frozen critic)."""
        state = self.state
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
                f"at step {state.step}: stopping. The last checkpoint is intact; lower --learning_rate or use "
                "--mixed_precision bf16/no")
        state.step += 1

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

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.output_dir) / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write into a temporary folder, then rename: a kill mid-save never leaves a 'latest' to pick.

        Saving twice at one step (best model, checkpointing step, end of run) writes once.
        """
        acc = self.accelerator
        final = self.checkpoint_dir / f"checkpoint_{self.state.step}"
        if self._last_saved_step == self.state.step:
            return final
        self._last_saved_step = self.state.step
        partial = self.checkpoint_dir / f".partial_checkpoint_{self.state.step}"
        if acc.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        acc.wait_for_everyone()
        with self._quiet_accelerate_checkpoint_logs():
            acc.save_state(str(partial))
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            self._rotate_checkpoints()
            logger.info(f"saved {final}")
        acc.wait_for_everyone()
        return final

    @contextmanager
    def _quiet_accelerate_checkpoint_logs(self) -> Iterator[None]:
        """accelerate logs each file of a save or load at INFO (eight lines); ours says it in one.
        ``--log_level debug`` shows them."""
        if self.config.log_level == "debug":
            yield
            return
        loggers = [logging.getLogger(name) for name in ("accelerate.checkpointing", "accelerate.accelerator")]
        quiet = _QuietCheckpointLogs()
        for each in loggers:
            each.addFilter(quiet)
        try:
            yield
        finally:
            for each in loggers:
                each.removeFilter(quiet)

    def _rotate_checkpoints(self) -> None:
        limit = self.config.checkpoints_total_limit
        if not limit:
            return
        found = [(step, path) for step, path in list_checkpoints(self.checkpoint_dir) if step != self.state.best_step]
        keep = limit - (1 if self.state.best_step >= 0 and (self.checkpoint_dir / f"checkpoint_{self.state.best_step}").is_dir() else 0)
        for _, path in found[:max(0, len(found) - max(keep, 1))]:
            shutil.rmtree(path, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        if not path.is_dir() or not any(path.glob("model*.safetensors")) and not any(path.glob("*.bin")):
            raise ConfigError(f"{path} is not a checkpoint folder written by snac-accel (no model files)")
        with self._quiet_accelerate_checkpoint_logs():
            self.accelerator.load_state(str(path))
        logger.info(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, "
                    f"batch {self.state.batch_in_epoch})", main_process_only=True)

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Metrics on the fixed validation clips, with the EMA weights when EMA is on.

        Runs on a forked RNG with a fixed seed: the decoder's noise gives the same metrics every
        time, and training's random stream is untouched (resume stays bit-exact).
        """
        if self.val_batch is None:
            return {}
        model = self.export_model
        was_training = model.training
        model.eval()
        real = self.val_batch.to(self.accelerator.device)
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed)
            outputs = [model(chunk) for chunk in real.split(4)]
        fake = torch.cat([out.audio for out in outputs])
        codes = [torch.cat(level) for level in zip(*(out.codes for out in outputs))]
        model.train(was_training)
        metrics = {
            "val/mel_distance": self.mel_loss(fake, real).item(),
            "val/stft_distance": self.stft_loss(fake, real).item(),
            "val/si_sdr": si_sdr(fake, real).mean().item(),
        }
        health = histogram_statistics(code_counts(codes, self.codebook_size))
        for level, (usage, efficiency) in enumerate(zip(health["usage"].tolist(), health["efficiency"].tolist())):
            metrics[f"val/codebook_usage_level{level}"] = usage
            metrics[f"val/codebook_efficiency_level{level}"] = efficiency
        for line in collapse_warnings(health["usage"].tolist(), self.codebook_size, "the validation clips"):
            logger.warning(f"step {self.state.step}: {line}", main_process_only=True)
        self._log_media(real, fake)
        return metrics

    def _log_media(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        if not self.accelerator.is_main_process:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name != "tensorboard":
                continue
            writer = tracker.writer
            sr = self.config.sampling_rate
            for i in range(min(2, real.shape[0])):
                writer.add_audio(f"val/{i}/real", real[i, 0].float().cpu(), self.state.step, sample_rate=sr)
                writer.add_audio(f"val/{i}/fake", fake[i, 0].float().cpu(), self.state.step, sample_rate=sr)
                image = torch.cat([self.mel_loss.log_mels(x[i:i + 1], 5)[0].T.flip(0) for x in (real, fake)], dim=0)
                image = (image - image.min()) / (image.max() - image.min() + 1e-9)
                writer.add_image(f"val/{i}/mel_real_over_fake", image.cpu()[None], self.state.step)

    def _validate_and_keep_best(self) -> None:
        metrics = self.validate()
        if not metrics:
            return
        self.accelerator.log(metrics, step=self.state.step)
        logger.info(f"step {self.state.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
                    main_process_only=True)
        self.state.extra["last_metrics"] = metrics
        if metrics["val/mel_distance"] < self.state.best_val_mel:
            self.state.best_val_mel = metrics["val/mel_distance"]
            self.state.best_step = self.state.step
            self.state.extra["best_metrics"] = metrics
            self.export(Path(self.config.output_dir) / "best", metrics)
            self.save_checkpoint()

    # ------------------------------------------------------------------ export

    def export(self, folder: Path, metrics: Optional[dict[str, float]] = None) -> Path:
        """The Hub folder of the current (or EMA) generator; main process only."""
        if self.accelerator.is_main_process:
            config = self.config
            datasets, words = describe_training_data(config)
            info = dict(steps=self.state.step, metrics=metrics, datasets=datasets, training_data=words,
                        base_model=config.init_from, repo_id=config.hub_model_id, name=Path(config.output_dir).name)
            example = self.val_batch[:1].float().cpu() if self.val_batch is not None else None
            export_folder(self.export_model, folder, info, example_audio=example)
        self.accelerator.wait_for_everyone()
        return folder

    # ------------------------------------------------------------------ the loop

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _stop_requested(self, started: float) -> bool:
        """Every process agrees to stop at the same step (signal or wall-time budget)."""
        limit = self.config.max_train_minutes
        if self._stop_signal is not None or (limit is not None and time.monotonic() - started > limit * 60):
            self.accelerator.set_trigger()
        return self.accelerator.check_trigger()

    def fit(self) -> Path:
        """Train to ``max_train_steps`` (or a stop signal), checkpoint, export ``output_dir/final``.

        The output folder stays locked from the trainer's construction until this returns or raises.
        """
        if self.lock is None:  # a second fit() of the same trainer
            self.lock = self._lock_output_dir()
        try:
            return self._train_and_export()
        finally:
            self.lock.release()
            self.lock = None

    def _train_and_export(self) -> Path:
        config, acc, state = self.config, self.accelerator, self.state
        if acc.is_main_process:
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            config.save(Path(config.output_dir) / "config.yaml")
        if self.resume_path is not None:
            self.load_checkpoint(self.resume_path)
            self._last_saved_step = self.state.step
        self._seed_codebooks()
        acc.init_trackers(config.tracker_project_name, config={k: v for k, v in config.to_dict().items()
                                                              if isinstance(v, (int, float, str, bool))})
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        progress = tqdm(total=self.max_steps, initial=state.step, disable=not acc.is_local_main_process,
                        desc="training", dynamic_ncols=True)
        started = time.monotonic()
        seconds_per_batch = config.train_batch_size * config.segment_samples / config.sampling_rate * acc.num_processes
        data_wait, window_start, audio_seconds = 0.0, time.monotonic(), 0.0
        stopped_early = False
        try:
            while state.step < self.max_steps and not stopped_early:
                self.sampler.set_epoch(state.epoch, state.batch_in_epoch)
                batches = iter(self.train_loader)
                while state.step < self.max_steps:
                    wait_start = time.monotonic()
                    batch = next(batches, None)
                    data_wait += time.monotonic() - wait_start
                    if batch is None:
                        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                        break
                    state.batch_in_epoch += 1
                    self.bad_tracker.update(batch["bad"], batch["good"])
                    state.bad_files = self.bad_tracker.total
                    if batch["audio"] is None:
                        raise data_lib.DataError("a whole batch had no usable clip: " + "; ".join(batch["bad"][:3]))
                    step_before = state.step
                    logs = self.train_step(batch["audio"].to(acc.device, non_blocking=True))
                    audio_seconds += seconds_per_batch
                    if state.step == step_before:
                        continue
                    progress.update(1)
                    if state.step % config.logging_steps == 0 or state.step == self.max_steps:
                        elapsed = time.monotonic() - window_start
                        logs = {k: v.item() for k, v in logs.items()}
                        logs.update({
                            "lr/generator": self.sched_g.get_last_lr()[0],
                            "lr/discriminator": self.sched_d.get_last_lr()[0],
                            "data/bad_files": state.bad_files, "data/wait_share": data_wait / max(elapsed, 1e-9),
                            "perf/audio_seconds_per_second": audio_seconds / max(elapsed, 1e-9),
                        })
                        logs.update({f"train/skipped_updates_{n}": v for n, v in state.skipped_updates.items()})
                        for name, scaler in self.scalers.items():
                            logs[f"train/scaler_backoffs_{name}"] = state.scaler_backoffs[name]
                            logs[f"train/loss_scale_{name}"] = scaler.get_scale()
                        logs["perf/peak_memory_gb"] = peak_memory_gb(acc.device)
                        codebook_logs = self._codebook_window_logs()
                        logs.update(codebook_logs)
                        acc.log(logs, step=state.step)
                        usage = "/".join(f"{100 * v:.0f}" for k, v in codebook_logs.items() if "/usage_" in k)
                        progress.set_postfix(mel=f"{logs['loss/mel']:.3f}", codes_used=f"{usage}%",
                                             audio_s_per_s=f"{logs['perf/audio_seconds_per_second']:.1f}")
                        data_wait, window_start, audio_seconds = 0.0, time.monotonic(), 0.0
                    if config.validation_steps and state.step % config.validation_steps == 0:
                        self._validate_and_keep_best()
                    if (config.checkpointing_steps and state.step % config.checkpointing_steps == 0
                            and not any(state.nonfinite_in_row.values())):
                        self.save_checkpoint()
                    if self._stop_requested(started):
                        reason = f"signal {self._stop_signal}" if self._stop_signal else "--max_train_minutes"
                        logger.info(f"stopping at step {state.step} ({reason})", main_process_only=True)
                        stopped_early = True
                        break
        finally:
            progress.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        self.save_checkpoint()
        if self._stop_signal is not None:
            acc.end_training()
            return self.checkpoint_dir / f"checkpoint_{state.step}"
        if not config.validation_steps or state.step % config.validation_steps:
            self._validate_and_keep_best()
        final = self.export(Path(config.output_dir) / "final", self.state.extra.get("last_metrics"))
        if config.push_to_hub and acc.is_main_process:
            try:
                push_to_hub(final, config.hub_model_id, token=config.hub_token, private=config.hub_private)
            except HubTokenError as err:  # the run's work is done and exported: say so, do not crash
                logger.error(str(err))
        acc.end_training()
        return final


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train(config: TrainConfig) -> Path:
    """Run a whole training as the CLI does; returns the exported folder."""
    config.apply_dataset_preset()
    config.validate()
    return SnacTrainer(config).fit()
