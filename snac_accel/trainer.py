"""`SnacTrainer`: a whole training run of a SNAC codec on HuggingFace Accelerate.

It builds everything from a `TrainConfig` (Accelerator, data, models, optimizers, what checkpoints
hold), then runs the loop as a flat sequence of named steps: next batch, the GAN step
(`snac_accel.step`), log, validate (`snac_accel.validation`), checkpoint (`snac_accel.checkpoints`),
stop; at the end it exports ``OUTPUT_DIR/final`` (`snac_accel.export`) and pushes it when asked.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradScalerKwargs, ProjectConfiguration, set_seed
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import checkpoints
from . import data as data_lib
from .card import describe_device, describe_training_data
from .checkpoints import MODELS, TrainState, list_checkpoints
from .codebook import DeadCodeRestarter, collapse_advice, default_dead_code_steps, seed_run_codebooks
from .compile import compile_models, eager, refuse_accelerate_dynamo
from .config import ConfigError, TrainConfig
from .control import RunControl
from .discriminators import Discriminator
from .export import export_folder
from .hub import HubTokenError, push_to_hub
from .lock import lock_output_dir
from .losses import DiscriminatorLoss, FeatureMatchingLoss, GeneratorAdversarialLoss, MultiScaleMelLoss
from .model import SnacGenerator, build_generator, freeze, generator_from_pretrained
from .perceptual import visqol_mode
from .progress import DataAdvice, Progress, count_flops, start_summary
from .resume import apply_optimizer_options, log_changes, resume_plan, run_record, scale_learning_rate
from .step import GanStep, NonFiniteError, build_optimizers, build_scheduler, use_fused_adam
from .validation import Validator

logger = get_logger(__name__)


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
            # fp16: accelerate's shared GradScaler stays off; each optimizer gets its own (`snac_accel.step`).
            kwargs_handlers=[GradScalerKwargs(enabled=False)],
        )
        self._check_launch()
        self.lock = lock_output_dir(self.accelerator, config.output_dir)
        weakref.finalize(self, self.lock.release)  # a trainer that is never fit() frees the folder too
        try:
            self._build()
        except BaseException:
            self.lock.release()
            raise

    def _build(self) -> None:
        config, acc = self.config, self.accelerator
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if acc.device.type == "cuda":  # training batches have one shape: cuDNN's autotuned choice serves them all
            torch.backends.cudnn.benchmark = True
        set_seed(config.seed)
        self.control = RunControl(acc, config.max_train_minutes)
        self.state = TrainState()
        self._check_resume()
        error = None
        try:  # a source that fails its pre-flight check on one process fails it for all
            self._build_data()
        except data_lib.DataError as err:
            error = str(err)
        self.control.agree(error, stops=False)
        self._build_models()
        self.opt_g, self.opt_d = build_optimizers(config, self.generator, self.discriminator,
                                                  fused=use_fused_adam(config, acc.device))
        self.sched_g = build_scheduler(config, self.opt_g, self.max_steps)
        self.sched_d = build_scheduler(config, self.opt_d, self.max_steps)
        self.generator, self.discriminator, self.opt_g, self.opt_d = acc.prepare(
            self.generator, self.discriminator, self.opt_g, self.opt_d)
        self.ema = None
        if config.ema_decay is not None:
            self.ema = AveragedModel(self.unwrapped_generator, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay),
                                     use_buffers=True)
            acc.register_for_checkpointing(self.ema)
        acc.register_for_checkpointing(self.sched_g, self.sched_d, self.state)
        frames = config.coarse_frames * config.train_batch_size * config.gradient_accumulation_steps * acc.num_processes
        self.dead_code_steps = (default_dead_code_steps(self.codebook_size, frames) if config.dead_code_steps is None
                                else config.dead_code_steps)
        self.restarter = DeadCodeRestarter(len(self.unwrapped_generator.vq_strides), self.codebook_size,
                                           self.dead_code_steps, seed=config.seed) if self.dead_code_steps else None
        if self.restarter is not None:  # registered last: the other objects keep their checkpoint indices
            acc.register_for_checkpointing(self.restarter)
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        if acc.mixed_precision == "fp16":  # registered after the others, as the restarter
            self.scalers = {name: torch.amp.GradScaler(acc.device.type) for name in MODELS}
            acc.register_for_checkpointing(*self.scalers.values())
        self.mel_loss = MultiScaleMelLoss(config.sampling_rate,
                                          hand_written_backward=config.mel_backward == "hand_written").to(acc.device)
        self.disc_loss, self.adv_loss = DiscriminatorLoss(), GeneratorAdversarialLoss()
        self.fm_loss = FeatureMatchingLoss()
        if config.torch_compile:  # after prepare (`snac_accel.compile`); each model with the losses of its outputs
            parts = {"generator": [self.unwrapped_generator, self.mel_loss],
                     "discriminator": [acc.unwrap_model(self.discriminator), self.disc_loss, self.adv_loss,
                                       self.fm_loss]}
            compile_models([m for p in config.torch_compile_models.split(",") if p.strip() for m in parts[p.strip()]],
                           config.torch_compile_mode, config.torch_compile_backend)
        self.gan = GanStep(config, acc, self.state, self.generator, self.discriminator, self.opt_g, self.opt_d,
                           self.sched_g, self.sched_d, self.scalers, self.ema, self.restarter, self.mel_loss,
                           self.disc_loss, self.adv_loss, self.fm_loss, self.codebook_size, self.control.group)
        self.validator = None if self.val_batch is None else Validator(
            self.val_batch, acc, self.mel_loss, config.sampling_rate, self.codebook_size, config.seed,
            advice=collapse_advice(config, self.dead_code_steps), visqol_mode=config.visqol_mode)
        self.bad_tracker = data_lib.BadFileTracker(max_fraction=config.max_bad_fraction)
        self._last_saved: Optional[tuple[int, int]] = None  # (step, best step) of the last checkpoint written
        self._update_flops = 0.0  # FLOPs of the micro-batches of the first update so far (`_counts_flops`)

    # ------------------------------------------------------------------ building

    def _check_launch(self) -> None:
        """Refuse `--multi_gpu` without CUDA or ACCELERATE_USE_CPU (it starts unsynchronised copies), and
        accelerate's dynamo_backend."""
        refuse_accelerate_dynamo(self.accelerator)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != self.accelerator.num_processes:
            raise ConfigError(
                f"launched as {world} processes but accelerate formed a group of {self.accelerator.num_processes}: "
                "on a machine without GPUs set ACCELERATE_USE_CPU=1 (or use launch.sh --accelerate-config cpu)")

    def _check_resume(self) -> None:
        """The checkpoint to resume from and the options changed since its run (`resume_plan`)."""
        self.resume_path, self.resume_changes = resume_plan(self.config, self.accelerator.is_main_process,
                                                            self.control.shared)

    def _build_data(self) -> None:
        acc = self.accelerator
        self.sources = data_lib.run_sources(self.config, acc.num_processes)
        self.data = data_lib.training_data(self.config, acc.process_index, acc.num_processes,
                                           pin_memory=acc.device.type == "cuda", sources=self.sources.train)
        self.train_loader, self.sampler, self.train_clips = self.data.loader, self.data.sampler, self.data.clips
        self.max_steps = self.data.max_steps
        if self.config.streaming:  # its position (rows read per loader worker) goes into checkpoints
            acc.register_for_checkpointing(self.train_loader)
        self.val_batch = data_lib.validation_batch(self.config, self.sources.validation)

    def _build_models(self) -> None:
        config = self.config
        if config.init_from:
            try:
                self.generator = generator_from_pretrained(config.init_from, config.quantizer_dropout,
                                                           config.model_noise)
            except FileNotFoundError as err:
                raise ConfigError(f"--init_from {err}") from None
        else:
            self.generator = build_generator(config.model_config, config.quantizer_dropout)
        if self.generator.sampling_rate != config.sampling_rate:
            raise ConfigError(f"--init_from model runs at {self.generator.sampling_rate} Hz but --preset "
                              f"{config.preset} at {config.sampling_rate} Hz; pick the matching preset")
        freeze(self.generator, config.freeze)
        self.codebook_size = self.generator.codebook_size
        self.discriminator = Discriminator(**config.discriminator_config)

    @property
    def unwrapped_generator(self) -> SnacGenerator:
        return self.accelerator.unwrap_model(self.generator)

    @property
    def export_model(self) -> SnacGenerator:
        if self.ema is not None and self.config.export_use_ema:
            return self.ema.module
        return self.unwrapped_generator

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.output_dir) / "checkpoints"

    def _seed_codebooks(self) -> None:
        """A fresh run's codebooks start at the encoder's vectors (`seed_run_codebooks`); recorded in the
        checkpointed `TrainState`, so a resumed run never seeds again."""
        if self.state.step > 0 or "codebook_init" in self.state.extra:
            return
        record = seed_run_codebooks(self.accelerator, self.unwrapped_generator, self.data, self.config)
        if record is not None:
            self.state.extra["codebook_init"] = record

    # ------------------------------------------------------------------ the loop's steps

    def train_step(self, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """One micro-batch of the GAN step (`GanStep.train_step`); returns detached loss tensors."""
        return self.gan.train_step(real)

    def _batches(self) -> Iterator[torch.Tensor]:
        """Batches until ``max_steps``, epoch after epoch, from the position the `TrainState` records."""
        state = self.state
        while state.step < self.max_steps:
            self.sampler.set_epoch(state.epoch, state.batch_in_epoch)
            batches = iter(self.train_loader)
            while state.step < self.max_steps:
                real = self._next_batch(batches)
                if real is None:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                    break
                yield real

    def _next_batch(self, batches: Iterator[dict[str, Any]]) -> Optional[torch.Tensor]:
        """The next batch's audio on the device, None at the epoch's end; unusable files are counted."""
        wait_start = time.monotonic()
        batch = next(batches, None)
        self.progress.waited(time.monotonic() - wait_start)
        if batch is None:
            return None
        self.state.batch_in_epoch += 1
        error = None
        try:
            self.bad_tracker.update(batch["bad"], batch["good"])
            if batch["audio"] is None:
                raise data_lib.DataError("a whole batch had no usable clip: " + "; ".join(batch["bad"][:3]))
        except data_lib.DataError as err:
            error = str(err)
        self.state.bad_files = self.bad_tracker.total
        self.control.agree(error)  # every process raises any process's data error, and learns of any stop
        return batch["audio"].to(self.accelerator.device, non_blocking=True)

    def _log(self, logs: dict[str, torch.Tensor]) -> None:
        """Every ``logging_steps`` updates and at the last: losses, rates, throughput, codebook use."""
        config, state = self.config, self.state
        if state.step % config.logging_steps and state.step != self.max_steps:
            return
        logs = {**logs, **self.gan.window_logs()}
        values = torch.stack([v.detach().float().reshape(()) for v in logs.values()])
        logs = dict(zip(logs, values.tolist()))  # one transfer for every value
        logs.update({"lr/generator": self.sched_g.get_last_lr()[0], "lr/discriminator": self.sched_d.get_last_lr()[0],
                     "data/bad_files": state.bad_files})
        logs.update({f"train/skipped_updates_{n}": v for n, v in state.skipped_updates.items()})
        for name, scaler in self.scalers.items():
            logs[f"train/scaler_backoffs_{name}"] = state.scaler_backoffs[name]
            logs[f"train/loss_scale_{name}"] = scaler.get_scale()
        self.progress.log(logs, state.step)

    def quality_due(self, final: bool = False) -> bool:
        """Whether this validation computes ViSQOL/PESQ/STOI: every ``--quality_metrics_steps``-th periodic one
        (counted from the step, so a resumed run keeps the cadence) and the run's last one, unless -1."""
        every, cadence = self.config.quality_metrics_steps, self.config.validation_steps
        if every < 0:
            return False
        if final or self.state.step >= self.max_steps:
            return True
        return every > 0 and cadence > 0 and (self.state.step // cadence) % every == 0

    def validate(self, final: bool = False) -> dict[str, float]:
        """Metrics on the fixed validation clips, with the EMA weights when EMA is on (`Validator`)."""
        if self.validator is None:
            return {}
        with eager():  # eval mode and the validation clips' length would compile graphs of their own
            return self.validator(self.export_model, self.state.step, quality=self.quality_due(final))

    def _validate_and_keep_best(self, final: bool = False) -> None:
        """Validate on the main process; its metrics decide, for every process, whether this is the new best."""
        metrics = self.control.shared(self.validate(final) if self.accelerator.is_main_process else {})
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

    def save_checkpoint(self) -> Path:
        """`checkpoints.save_checkpoint` (atomic, rotated); saving twice at one step (best model,
        checkpointing step, end of run) writes once, unless a new best was found in between."""
        final = self.checkpoint_dir / f"checkpoint_{self.state.step}"
        if self._last_saved == (self.state.step, self.state.best_step):
            return final
        self._last_saved = (self.state.step, self.state.best_step)
        checkpoints.save_checkpoint(self.accelerator, self.checkpoint_dir, self.state.step,
                                    self.config.checkpoints_total_limit, self.state.best_step,
                                    quiet=self.config.log_level != "debug")
        logger.info(f"saved {final}")
        return final

    def load_checkpoint(self, path: Path) -> None:
        checkpoints.load_checkpoint(self.accelerator, path, quiet=self.config.log_level != "debug")
        logger.info(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, "
                    f"batch {self.state.batch_in_epoch})", main_process_only=True)

    def _roll_back(self, err: NonFiniteError) -> None:
        """``--on_divergence rollback``: every process goes back to the last checkpoint, lowers the diverged
        model's learning rate and goes on past the batches that diverged; `err` again when it cannot."""
        config, state = self.config, self.state
        if config.on_divergence != "rollback":
            raise err
        rollbacks = list(state.extra.get("rollbacks", []))
        found = list_checkpoints(self.checkpoint_dir) if self.accelerator.is_main_process else []
        last = self.control.shared(found[-1][1] if found else None)
        if last is None or len(rollbacks) >= config.max_rollbacks:
            why = "no checkpoint to roll back to" if last is None else f"{len(rollbacks)} rollbacks already"
            raise NonFiniteError(f"{err} ({why})", err.models) from None
        position, diverged_at = (state.epoch, state.batch_in_epoch), state.step
        self.load_checkpoint(last)
        state.epoch, state.batch_in_epoch = position
        models = {"generator": (self.opt_g, self.sched_g), "discriminator": (self.opt_d, self.sched_d)}
        for name in err.models:
            scale_learning_rate(*models[name], config.rollback_lr_factor)
        rollbacks.append({"diverged_at": diverged_at, "back_to": state.step, "models": list(err.models),
                          "lr_factor": config.rollback_lr_factor})
        state.extra["rollbacks"] = rollbacks
        self.gan.restart_window()
        self._last_saved = (state.step, state.best_step)
        self.progress.bar.n = state.step
        self.progress.bar.refresh()
        logger.warning(f"rollback {len(rollbacks)} of at most {config.max_rollbacks}: the {' and the '.join(err.models)} "
                       f"diverged at step {diverged_at}; back to {last.name}, its learning rate x"
                       f"{config.rollback_lr_factor}, going on from batch {position[1]} of epoch {position[0]}",
                       main_process_only=True)

    def export(self, folder: Path, metrics: Optional[dict[str, float]] = None) -> Path:
        """The Hub folder of the current (or EMA) generator; main process only."""
        if self.accelerator.is_main_process:
            config = self.config
            datasets, words = describe_training_data(config)
            held = self.sources.held_out
            progress = getattr(self, "progress", None)
            clips = self.val_batch.shape[0] if self.val_batch is not None else 0
            info = dict(steps=self.state.step, metrics=metrics, datasets=datasets, training_data=words,
                        validation_data=held.description if held is not None and held.count else None,
                        throughput=progress.last if progress is not None else None,
                        device=describe_device(self.accelerator),
                        visqol_mode=visqol_mode(config.visqol_mode, config.sampling_rate),
                        paper_data=f"{clips} validation clips of {config.validation_seconds:g} s",
                        rollbacks=self.state.extra.get("rollbacks"),
                        base_model=config.init_from, repo_id=config.hub_model_id, name=Path(config.output_dir).name)
            example = self.val_batch[:1].float().cpu() if self.val_batch is not None else None
            with eager():
                export_folder(self.export_model, folder, info, example_audio=example)
        self.accelerator.wait_for_everyone()
        return folder

    # ------------------------------------------------------------------ the loop

    def fit(self) -> Path:
        """Train to ``max_train_steps`` (or a stop signal), checkpoint, export ``output_dir/final``.

        The output folder stays locked from the trainer's construction until this returns or raises.
        """
        if self.lock is None:  # a second fit() of the same trainer
            self.lock = lock_output_dir(self.accelerator, self.config.output_dir)
        try:
            self._start()
            self._train()
            return self._finish()
        finally:
            self.lock.release()
            self.lock = None

    def _start(self) -> None:
        """Write the effective config, resume, seed the codebooks of a fresh run, start the trackers."""
        config, acc = self.config, self.accelerator
        if acc.is_main_process:
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            config.save(Path(config.output_dir) / "config.yaml")
        if self.resume_path is not None:
            self.load_checkpoint(self.resume_path)
            apply_optimizer_options(config, self.resume_changes, {"generator": (self.opt_g, self.sched_g),
                                                                  "discriminator": (self.opt_d, self.sched_d)})
            log_changes(self.resume_changes)
            self._last_saved = (self.state.step, self.state.best_step)
        self.state.extra["run_config"] = run_record(config)  # what a later resume compares its options with
        self._seed_codebooks()
        logger.info(self._summary(), main_process_only=True)
        acc.init_trackers(config.tracker_project_name, config={k: v for k, v in config.to_dict().items()
                                                              if isinstance(v, (int, float, str, bool))})

    def _summary(self) -> str:
        held = self.sources.held_out
        if held is not None and held.count == 0:
            logger.warning(held.description, main_process_only=True)
        words = held.description if held is not None and held.count else ""
        return start_summary(self.config, None if self.train_clips is None else len(self.train_clips),
                             0 if self.val_batch is None else len(self.val_batch), words, self.max_steps,
                             self.accelerator.num_processes, sum(p.numel() for p in self.generator.parameters()),
                             self._data_advice().words())

    def _data_advice(self) -> DataAdvice:
        return DataAdvice(self.data.workers, self.data.decode_seconds, self.config.train_batch_size)

    def _train(self) -> None:
        """The loop. A batch is one micro-batch; after each optimizer update: log, validate, checkpoint, stop?

        Stops (SIGTERM, SIGUSR1, SIGINT, the time budget) and data errors are agreed by every process
        at each batch (`RunControl`): all processes finish the same update and stop after it.
        """
        config, acc = self.config, self.accelerator
        seconds_per_batch = config.train_batch_size * config.segment_samples / config.sampling_rate * acc.num_processes
        self.progress = Progress(acc, self.max_steps, self.state.step, seconds_per_batch,
                                 self.state.extra.get("flops_per_update"), self._data_advice())
        self.control.start_clock()
        try:
            with self.control.signals():
                for real in self._batches():
                    if not self._train_batch(real):  # the accumulation window is still open
                        continue
                    self.progress.bar.update(1)
                    self.progress.updated()
                    self._log(self.logs)
                    if config.validation_steps and self.state.step % config.validation_steps == 0:
                        self._validate_and_keep_best()
                    if (config.checkpointing_steps and self.state.step % config.checkpointing_steps == 0
                            and not any(self.state.nonfinite_in_row.values())):
                        self.save_checkpoint()
                    if self.control.stopping:
                        logger.info(f"stopped at step {self.state.step}", main_process_only=True)
                        break
        finally:
            self.progress.close()

    def _train_batch(self, real: torch.Tensor) -> bool:
        """One micro-batch; whether it closed an optimizer update. A divergence rolls back when asked."""
        step_before = self.state.step
        counting = self._counts_flops()
        try:
            with count_flops() if counting else contextlib.nullcontext([0.0]) as flops:
                self.logs = self.train_step(real)
        except NonFiniteError as err:
            self._roll_back(err)
            return False
        self.progress.trained_batch()
        if counting:
            self._update_flops += flops[0]
            if self.state.step != step_before:
                self.state.extra["flops_per_update"] = self.progress.flops_per_update = self._update_flops
        return self.state.step != step_before

    def _counts_flops(self) -> bool:
        """The FLOPs of an update are counted once, on a fresh run's first update (kept in the
        checkpoints for resumed runs)."""
        return self.state.step == 0 and "flops_per_update" not in self.state.extra

    def _finish(self) -> Path:
        """Stopped by a signal: the checkpoint only. Otherwise a last validation, then the checkpoint
        (so it records that validation's best), the export and the push."""
        config, acc, state = self.config, self.accelerator, self.state
        if self.control.signalled:
            path = self.save_checkpoint()
            acc.end_training()
            return path
        if not config.validation_steps or state.step % config.validation_steps:
            self._validate_and_keep_best(final=True)
        self.save_checkpoint()
        final = self.export(Path(config.output_dir) / "final", state.extra.get("last_metrics"))
        if config.push_to_hub and acc.is_main_process:
            try:
                push_to_hub(final, config.hub_model_id, token=config.hub_token, private=config.hub_private)
            except HubTokenError as err:  # the run's work is done and exported: say so, do not crash
                logger.error(str(err))
        acc.end_training()
        return final


def train(config: TrainConfig) -> Path:
    """Run a whole training as the CLI does; returns the exported folder."""
    config.apply_dataset_preset()
    config.validate()
    return SnacTrainer(config).fit()


def train_main(config: Optional[TrainConfig] = None, **options: Any) -> Path:
    """`train` under the earlier SNAC training scripts' name: a `TrainConfig`, or keyword options as
    `create_training_config` takes them; returns the exported folder."""
    from .arguments import create_training_config

    return train(config if config is not None else create_training_config(**options))
