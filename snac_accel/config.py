"""Training configuration: one dataclass parsed by ``transformers.HfArgumentParser``.

The fields follow the diffusers/accelerate example scripts so that their users find the options
they expect. This module holds plain data (presets, option checks) and imports no torch code of the
project, so ``--help`` and option errors come back before any model is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

# Constructor arguments of `snac.SNAC`, exactly as the released checkpoints' config.json.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "snac_24khz": dict(
        sampling_rate=24000, encoder_dim=48, encoder_rates=[2, 4, 8, 8], latent_dim=None,
        decoder_dim=1024, decoder_rates=[8, 8, 4, 2], attn_window_size=None,
        codebook_size=4096, codebook_dim=8, vq_strides=[4, 2, 1], noise=True, depthwise=True,
    ),
    "snac_32khz": dict(
        sampling_rate=32000, encoder_dim=64, encoder_rates=[2, 3, 8, 8], latent_dim=None,
        decoder_dim=1536, decoder_rates=[8, 8, 3, 2], attn_window_size=32,
        codebook_size=4096, codebook_dim=8, vq_strides=[8, 4, 2, 1], noise=True, depthwise=True,
    ),
    "snac_44khz": dict(
        sampling_rate=44100, encoder_dim=64, encoder_rates=[2, 3, 8, 8], latent_dim=None,
        decoder_dim=1536, decoder_rates=[8, 8, 3, 2], attn_window_size=32,
        codebook_size=4096, codebook_dim=8, vq_strides=[8, 4, 2, 1], noise=True, depthwise=True,
    ),
    # A 24 kHz codec small enough to train for real on two CPU cores (tests, demo).
    "tiny": dict(
        sampling_rate=24000, encoder_dim=16, encoder_rates=[2, 4, 8, 8], latent_dim=None,
        decoder_dim=128, decoder_rates=[8, 8, 4, 2], attn_window_size=None,
        codebook_size=256, codebook_dim=8, vq_strides=[4, 2, 1], noise=True, depthwise=True,
    ),
}

# Discriminator sizes per model preset: DAC's for the released sizes, narrow ones for `tiny`.
DISCRIMINATOR_PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(periods=[2, 3, 5, 7, 11], mpd_channels=32, mpd_max_channels=1024,
                 stft_windows=[2048, 1024, 512], stft_channels=32),
    "tiny": dict(periods=[2, 3, 5, 7, 11], mpd_channels=4, mpd_max_channels=32,
                 stft_windows=[2048, 1024, 512], stft_channels=4),
}

# Data presets: where a practitioner's usual corpora live on the Hub and what their columns are.
# LJ Speech and VCTK are loading-script repositories, which datasets >= 4 no longer runs: they are
# read from the Hub's automatic Parquet conversion (revision refs/convert/parquet). Common Voice is
# gated (accept its terms, then `hf auth login`); Mozilla has been moving it to its own Data
# Collective, so this id may need replacing by a mirror.
PARQUET_REVISION = "refs/convert/parquet"
DATASET_PRESETS: dict[str, dict[str, Any]] = {
    "ljspeech": dict(dataset_name="keithito/lj_speech", dataset_config_name="main", dataset_revision=PARQUET_REVISION,
                     train_split="train", eval_split=None, audio_column="audio"),
    "librispeech": dict(dataset_name="openslr/librispeech_asr", dataset_config_name="clean",
                        train_split="train.100", eval_split="validation", audio_column="audio"),
    "common_voice": dict(dataset_name="mozilla-foundation/common_voice_17_0", dataset_config_name="en",
                         dataset_revision=PARQUET_REVISION, train_split="train", eval_split="validation",
                         audio_column="audio"),
    "vctk": dict(dataset_name="CSTR-Edinburgh/vctk", dataset_revision=PARQUET_REVISION, train_split="train",
                 eval_split=None, audio_column="audio"),
    "demo": dict(train_data_dir=str(Path(__file__).parent / "demo_data" / "train"),
                 validation_data_dir=str(Path(__file__).parent / "demo_data" / "validation")),
}


# Optimisation recipes: the options each fills when left unset. Batch sizes are per process.
RECIPES: dict[str, dict[str, Any]] = {
    # SNAC (arXiv 2410.14411, section 4): "largely follows" DAC; AdamW, lr 6e-4, exponential decay
    # 0.999994 per iteration, no gradient clipping, batches of 16 clips of about 0.8 s, 800k iterations.
    "snac": dict(source="SNAC paper, arXiv 2410.14411", values=dict(
        learning_rate=6e-4, lr_gamma=0.999994, max_grad_norm=0.0, disc_max_grad_norm=0.0, train_batch_size=16,
        segment_seconds=0.8, disc_start=0)),
    # DAC's final configs (descript-audio-codec conf/final): AdamW lr 1e-4, decay 0.999996, gradient
    # clipping 1000 (generator) / 10 (discriminator), batch 72 x 0.38 s, 400k iterations.
    "dac": dict(source="DAC, descript-audio-codec conf/final", values=dict(
        learning_rate=1e-4, lr_gamma=0.999996, max_grad_norm=1000.0, disc_max_grad_norm=10.0, train_batch_size=72,
        segment_seconds=0.38, disc_start=0)),
    # The tiny preset on two CPU cores: what trained best in a few hundred steps (benchmarks/quality.py):
    # after 300 steps, validation mel distance 3.28 with lr 1e-3 (2e-3: 3.38 and 39% of the codes at level 0
    # in use), 3.45 with the GAN from step 150 (hence from step 1000 here), and dead codes re-seeded after 10
    # unused updates (after 50: usage 46/61/82% against 57/79/96%).
    "cpu": dict(source="measured with benchmarks/quality.py", values=dict(
        learning_rate=1e-3, lr_gamma=0.999994, max_grad_norm=1000.0, disc_max_grad_norm=10.0, train_batch_size=4,
        segment_seconds=1.0, disc_start=1000, dead_code_steps=10)),
}


def _choice(help_text: str, default: Any, choices: Optional[list] = None, aliases: Optional[list[str]] = None,
            **kwargs: Any) -> Any:
    metadata: dict[str, Any] = {"help": help_text}
    if choices is not None:
        metadata["choices"] = choices
    if aliases:
        metadata["aliases"] = aliases
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default.copy(), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class TrainConfig:
    """Every option of a training run. Parsed from the CLI, a YAML/JSON file, or built in Python."""

    # Model
    preset: str = _choice("Model preset.", "tiny", list(MODEL_PRESETS))
    init_from: Optional[str] = _choice("Start from an existing SNAC folder or Hub id (config.json + weights).", None)
    freeze: Optional[str] = _choice("Comma-separated parts to freeze: encoder, quantizer, decoder.", None)
    model_noise: Optional[bool] = _choice("Override the decoder's noise blocks (off makes runs deterministic).", None)
    quantizer_dropout: float = _choice(
        "Share of each batch trained with a random number of levels (DAC uses 0.5 for variable bitrates; off "
        "here: it cost reconstruction on the demo, see the README).", 0.0)
    dead_code_steps: Optional[int] = _choice(
        "Re-seed a code unused for this many optimizer steps (0 disables; default: the updates in which each code "
        "of the coarsest level would be drawn twice if all were used equally).", None)
    codebook_init: Optional[str] = _choice(
        "Seed the codebooks from the encoder's vectors of training clips before the first step; default: "
        "kmeans for a fresh model, none with --init_from.", None, ["kmeans", "sample", "none"])
    codebook_init_clips: Optional[int] = _choice(
        "Training excerpts encoded for --codebook_init (default: enough for 2 vectors per code at the "
        "coarsest level, at most 1024).", None)
    discriminator_preset: Optional[str] = _choice(
        "Discriminator sizes; default follows the model preset.", None, list(DISCRIMINATOR_PRESETS))

    # Data
    dataset: Optional[str] = _choice("Dataset preset.", None, list(DATASET_PRESETS))
    dataset_name: Optional[str] = _choice(
        "Hub dataset id or a local dataset folder (audiofolder, parquet, save_to_disk); several comma-separated.", None)
    dataset_config_name: Optional[str] = _choice("Hub dataset configuration.", None)
    dataset_revision: Optional[str] = _choice("Hub dataset revision (branch, tag or commit).", None)
    train_split: str = _choice("Split used for training.", "train")
    eval_split: Optional[str] = _choice("Split used for validation.", None)
    audio_column: str = _choice("Column holding the audio.", "audio")
    train_data_dir: Optional[str] = _choice(
        "Folder of audio files in any format FFmpeg reads, searched recursively; several comma-separated.", None)
    validation_data_dir: Optional[str] = _choice("Folder(s) of audio files for validation.", None)
    train_file: Optional[str] = _choice("CSV or JSONL manifest(s) with a path column, for training.", None)
    validation_file: Optional[str] = _choice("CSV or JSONL manifest(s) for validation.", None)
    path_column: str = _choice("Manifest column that holds the file paths.", "path")
    source_weights: Optional[str] = _choice(
        "Comma-separated sampling weights of the training sources, in the order: Hub datasets, folders, "
        "manifests (default: in proportion to their sizes).", None)
    streaming: bool = _choice("Stream the dataset instead of downloading it whole (needs --max_train_steps).", False)
    shuffle_buffer_size: int = _choice("Shuffle buffer for streaming.", 1000)
    segment_seconds: Optional[float] = _choice("Length of a training excerpt in seconds (default: the recipe's).",
                                               None)
    validation_seconds: float = _choice("Length of a validation excerpt in seconds.", 2.0)
    max_validation_clips: int = _choice("Validation clips used at most.", 16)
    short_clips: str = _choice("What to do with clips shorter than a segment.", "pad", ["pad", "skip"])
    salience_threshold: float = _choice("Retry an excerpt quieter than this (LUFS).", -40.0)
    salience_retries: int = _choice("Attempts at finding a salient excerpt.", 4)
    target_loudness: Optional[float] = _choice("Normalise each excerpt to this loudness (LUFS); None keeps it.", -16.0)
    max_bad_fraction: float = _choice("Stop when more than this share of recent samples is unusable.", 0.5)
    dataloader_num_workers: Optional[int] = _choice("Loader worker processes; default fits the machine.", None)

    # Optimisation
    output_dir: str = _choice("Where checkpoints, logs and the exported codec go.", "outputs/run")
    logging_dir: str = _choice("Tracker folder, relative to output_dir.", "logs")
    seed: int = _choice("Seed of models, data order and excerpts.", 0)
    train_batch_size: Optional[int] = _choice("Batch size per device (default: the recipe's).", None,
                                              aliases=["--batch_size"])
    num_train_epochs: int = _choice("Epochs, used when max_train_steps is not set.", 1)
    max_train_steps: Optional[int] = _choice("Total optimizer steps; overrides num_train_epochs.", None)
    max_train_minutes: Optional[float] = _choice("Stop cleanly (checkpoint + export) after this wall time.", None)
    gradient_accumulation_steps: int = _choice("Batches per optimizer update.", 1)
    recipe: Optional[str] = _choice(
        "Optimisation recipe filling the options you leave unset: snac (the SNAC paper's; default of the snac_* "
        "presets), dac (DAC's final configs) or cpu (default of tiny).", None, ["snac", "dac", "cpu"])
    learning_rate: Optional[float] = _choice("Generator learning rate (default: the recipe's).", None)
    disc_learning_rate: Optional[float] = _choice("Discriminator learning rate (default: learning_rate).", None)
    adam_beta1: float = _choice("AdamW beta1.", 0.8)
    adam_beta2: float = _choice("AdamW beta2.", 0.99)
    adam_weight_decay: float = _choice("AdamW weight decay.", 0.0)
    adam_epsilon: float = _choice("AdamW epsilon.", 1e-8)
    lr_scheduler: str = _choice("'exponential' or a transformers.get_scheduler name.", "exponential")
    lr_gamma: Optional[float] = _choice("Decay per update of the exponential scheduler (default: the recipe's).",
                                        None)
    lr_warmup_steps: int = _choice("Updates of linear learning-rate warm-up (any scheduler).", 0)
    max_grad_norm: Optional[float] = _choice(
        "Generator gradient clipping norm; 0 disables clipping (the norm is still logged). Default: the recipe's.",
        None)
    disc_max_grad_norm: Optional[float] = _choice(
        "Discriminator gradient clipping norm; 0 disables clipping. Default: the recipe's.", None)
    disc_start: Optional[int] = _choice(
        "Optimizer step at which the adversarial losses start (default: the recipe's).", None)
    mel_weight: float = _choice("Weight of the multi-scale mel loss.", 15.0)
    adversarial_weight: float = _choice("Weight of the adversarial loss.", 1.0)
    feature_matching_weight: float = _choice("Weight of the feature-matching loss.", 2.0)
    commitment_weight: float = _choice("Weight of the commitment loss.", 0.25)
    codebook_weight: float = _choice("Weight of the codebook loss.", 1.0)
    ema_decay: Optional[float] = _choice("Keep an EMA of the generator with this decay (e.g. 0.999).", None)
    max_nonfinite_steps: int = _choice(
        "This many non-finite updates in a row of a model count as a divergence (see --on_divergence).", 10)
    on_divergence: str = _choice(
        "On a divergence: stop (the last checkpoint intact), or rollback: every process goes back to the last "
        "checkpoint, lowers the diverged model's learning rate by --rollback_lr_factor and goes on past the "
        "batches that diverged.", "stop", ["stop", "rollback"])
    max_rollbacks: int = _choice("With --on_divergence rollback: stop at the divergence after this many rollbacks.",
                                 3)
    rollback_lr_factor: float = _choice("With --on_divergence rollback: the diverged model's learning rate factor.",
                                        0.5)
    mixed_precision: Optional[str] = _choice("Mixed precision (default: accelerate's config).", None,
                                             ["no", "fp16", "bf16"])
    allow_tf32: bool = _choice("Allow TF32 matmuls on Ampere or newer GPUs.", False)
    mel_backward: str = _choice(
        "Gradient of the mel loss: hand_written (measured faster on CPU) or torch autograd.", "hand_written",
        ["hand_written", "autograd"])
    torch_compile: bool = _choice(
        "Compile the generator and the discriminators with torch.compile (first steps slower, later ones faster; "
        "checkpoints and exports unchanged).", False)
    torch_compile_mode: str = _choice("torch.compile mode with --torch_compile (inductor's modes).", "default",
                                      ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    torch_compile_models: str = _choice(
        "What --torch_compile compiles: generator, discriminator, or both comma-separated (on a CPU the "
        "full-size discriminator measured slower compiled).", "generator,discriminator")
    torch_compile_backend: str = _choice(
        "torch.compile backend with --torch_compile: inductor, or e.g. aot_eager (traces, generates no code).",
        "inductor")

    # Observability, checkpoints, validation
    log_level: str = _choice("Log level; debug also shows accelerate's line per checkpoint file.", "info",
                             ["debug", "info", "warning", "error"])
    report_to: str = _choice("Trackers: tensorboard, wandb, trackio, all or none.", "tensorboard")
    tracker_project_name: str = _choice("Tracker project name.", "snac-accel")
    logging_steps: int = _choice("Log every N optimizer steps.", 10)
    validation_steps: int = _choice("Validate every N optimizer steps (0: only at the end).", 0)
    quality_metrics_steps: int = _choice(
        "Also compute ViSQOL, PESQ-WB and STOI of the validation clips at every Nth validation; 0: only at the "
        "run's last validation (the final model card's paper row); -1: never. On the CPU they cost several times "
        "a validation without them (README).", 0)
    visqol_mode: str = _choice("ViSQOL mode: speech (16 kHz) or audio (48 kHz); auto: speech for codecs at 24 kHz "
                               "or below, audio above.", "auto", ["auto", "speech", "audio"])
    checkpointing_steps: int = _choice("Save training state every N optimizer steps (0: only at the end).", 500)
    checkpoints_total_limit: Optional[int] = _choice("Keep at most this many checkpoints.", None)
    resume_from_checkpoint: Optional[str] = _choice("'latest' or a checkpoint folder.", None)
    export_use_ema: bool = _choice("Export the EMA weights when EMA is on.", True)
    push_to_hub: bool = _choice("Push the exported codec to the Hub at the end.", False)
    hub_model_id: Optional[str] = _choice("Hub repository for the push.", None)
    hub_token: Optional[str] = _choice("Hub token (default: HF_TOKEN or the login cache).", None, repr=False)
    hub_private: bool = _choice("Create the Hub repository private.", False)

    def __post_init__(self) -> None:
        self.apply_recipe()

    def apply_recipe(self) -> None:
        """Fill the recipe's options that were left unset (None); an unknown recipe is left to `validate`."""
        if self.recipe is None:
            self.recipe = "cpu" if self.preset == "tiny" else "snac"
        for key, value in RECIPES.get(self.recipe, {}).get("values", {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    @property
    def model_config(self) -> dict[str, Any]:
        config = dict(MODEL_PRESETS[self.preset])
        if self.model_noise is not None:
            config["noise"] = self.model_noise
        return config

    @property
    def sampling_rate(self) -> int:
        return int(self.model_config["sampling_rate"])

    @property
    def pad_multiple(self) -> int:
        """Samples the model pads its input to (hop length times the largest stride/window lcm)."""
        config = self.model_config
        hop = math.prod(config["encoder_rates"])
        return hop * math.lcm(config["vq_strides"][0], config["attn_window_size"] or 1)

    @property
    def segment_samples(self) -> int:
        """The training excerpt in samples, rounded to the model's padding multiple."""
        multiple = self.pad_multiple
        return max(1, round(self.segment_seconds * self.sampling_rate / multiple)) * multiple

    @property
    def coarse_frames(self) -> int:
        """Codes of the coarsest level in one training excerpt."""
        model = self.model_config
        return max(1, self.segment_samples // math.prod(model["encoder_rates"]) // model["vq_strides"][0])

    @property
    def discriminator_config(self) -> dict[str, Any]:
        name = self.discriminator_preset or ("tiny" if self.preset == "tiny" else "full")
        return dict(DISCRIMINATOR_PRESETS[name])

    def apply_dataset_preset(self) -> None:
        """Fill data fields from ``--dataset`` where the user left them at their defaults."""
        if self.dataset is None:
            return
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, value in DATASET_PRESETS[self.dataset].items():
            if getattr(self, key) == defaults[key]:
                setattr(self, key, value)

    def validate(self) -> None:
        """Refuse a bad combination of options before anything is built (one clear line each)."""
        errors = []
        sources = [s for s in ("dataset_name", "train_data_dir", "train_file") if getattr(self, s)]
        if not sources:
            errors.append("no training data: give --dataset PRESET, --dataset_name, --train_data_dir or --train_file")
        listed = {name: [p.strip() for p in (getattr(self, name) or "").split(",") if p.strip()]
                  for name in ("dataset_name", "train_data_dir", "validation_data_dir", "train_file", "validation_file")}
        for name in ("train_data_dir", "validation_data_dir"):
            errors += [f"--{name} {path} is not a folder" for path in listed[name] if not Path(path).is_dir()]
        for name in ("train_file", "validation_file"):
            errors += [f"--{name} {path} does not exist" for path in listed[name] if not Path(path).is_file()]
        if self.source_weights:
            count = len(listed["dataset_name"]) + len(listed["train_data_dir"]) + len(listed["train_file"])
            try:
                weights = [float(w) for w in self.source_weights.split(",") if w.strip()]
            except ValueError:
                weights = []
            if not weights or len(weights) != count or min(weights) < 0 or sum(weights) <= 0:
                errors.append(f"--source_weights {self.source_weights} needs {count} non-negative numbers, one per "
                              "training source (Hub datasets, then folders, then manifests)")
        if self.streaming and self.max_train_steps is None:
            errors.append("--streaming needs --max_train_steps (a stream has no known epoch length)")
        if self.shuffle_buffer_size < 1:
            errors.append("--shuffle_buffer_size must be at least 1")
        if not 0.0 < self.max_bad_fraction <= 1.0:
            errors.append("--max_bad_fraction must lie in (0, 1]")
        min_seconds = self.pad_multiple / self.sampling_rate
        if self.segment_samples < self.pad_multiple or self.segment_seconds < min_seconds:
            errors.append(f"--segment_seconds {self.segment_seconds} is shorter than the model's padding "
                          f"multiple ({self.pad_multiple} samples = {min_seconds:.3f} s); use at least that")
        if self.recipe not in RECIPES:
            errors.append(f"--recipe {self.recipe} is not one of {', '.join(RECIPES)}")
        if min(self.max_grad_norm or 0.0, self.disc_max_grad_norm or 0.0) < 0:
            errors.append("--max_grad_norm and --disc_max_grad_norm must be positive, or 0 for no clipping")
        if self.codebook_init_clips is not None and self.codebook_init_clips < 1:
            errors.append("--codebook_init_clips must be at least 1")
        if self.train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            errors.append("--train_batch_size and --gradient_accumulation_steps must be at least 1")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            errors.append("--max_train_steps must be at least 1")
        if self.quality_metrics_steps < -1:
            errors.append("--quality_metrics_steps must be -1 (never), 0 (the last validation only) or a count N")
        if self.logging_steps < 1:
            errors.append("--logging_steps must be at least 1 (the last update is always logged too)")
        if self.max_nonfinite_steps < 1 or self.max_rollbacks < 0:
            errors.append("--max_nonfinite_steps must be at least 1 and --max_rollbacks at least 0")
        if not 0.0 < self.rollback_lr_factor <= 1.0:
            errors.append("--rollback_lr_factor must lie in (0, 1]")
        if self.freeze:
            unknown = set(self.freeze.split(",")) - {"encoder", "quantizer", "decoder"}
            if unknown:
                errors.append(f"--freeze got {sorted(unknown)}; choose among encoder, quantizer, decoder")
        if not 0.0 <= self.quantizer_dropout <= 1.0:
            errors.append("--quantizer_dropout must lie in [0, 1]")
        if self.dead_code_steps is not None and self.dead_code_steps < 0:
            errors.append("--dead_code_steps must be 0 (off) or a number of optimizer steps")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            errors.append("--ema_decay must lie in (0, 1)")
        compiled = [part.strip() for part in self.torch_compile_models.split(",") if part.strip()]
        if not compiled or set(compiled) - {"generator", "discriminator"}:
            errors.append(f"--torch_compile_models {self.torch_compile_models}: give generator, discriminator or "
                          "generator,discriminator")
        if self.torch_compile and self.torch_compile_backend not in _compile_backends():
            errors.append(f"--torch_compile_backend {self.torch_compile_backend} is not one of "
                          f"{', '.join(_compile_backends())}")
        if self.report_to not in ("tensorboard", "wandb", "trackio", "all", "none"):
            errors.append(f"--report_to {self.report_to} is not one of tensorboard, wandb, trackio, all, none")
        if self.push_to_hub and not self.hub_model_id:
            errors.append("--push_to_hub needs --hub_model_id USER/NAME")
        if self.resume_from_checkpoint and self.resume_from_checkpoint != "latest":
            folder = Path(self.resume_from_checkpoint)
            if not folder.is_dir() or not any(folder.glob("model*.safetensors")):
                errors.append(f"--resume_from_checkpoint {folder} is not a checkpoint folder (no model*.safetensors); "
                              "give OUTPUT_DIR/checkpoints/checkpoint_N or 'latest'")
        tracker_modules = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
        for tracker in ([] if self.report_to in ("none", "all") else [self.report_to]):
            if tracker in tracker_modules and importlib.util.find_spec(tracker_modules[tracker]) is None:
                errors.append(f"--report_to {tracker} needs the '{tracker}' package: pip install {tracker} "
                              "(or --report_to none)")
        if errors:
            raise ConfigError("; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("hub_token", None)
        return data

    def save(self, path: str | os.PathLike) -> None:
        """Write the effective config (never the token) so a run can be repeated with --config."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _compile_backends() -> list[str]:
    import torch._dynamo

    return torch._dynamo.list_backends(exclude_tags=())


class ConfigError(ValueError):
    """A bad option or option combination, raised before any training starts."""


# Spellings of the earlier SNAC training scripts. `--batch_size` is an argparse alias of
# `--train_batch_size`; `--dataset_path` names either kind of source and is routed by `route_dataset_path`.
LEGACY_OPTIONS = ("batch_size", "dataset_path")
# Files that make a local folder a `datasets` dataset rather than a folder of audio files.
DATASET_FOLDER_FILES = ("state.json", "dataset_dict.json", "dataset_info.json")
DATASET_FOLDER_SUFFIXES = (".parquet", ".arrow")


def load_config_file(path: str) -> dict[str, Any]:
    """The mapping a ``--config`` file holds; every problem is one `ConfigError` line naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path} is a folder; give a YAML or JSON file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path} is not UTF-8 text; give a YAML or JSON file") from None
    except OSError as err:
        raise ConfigError(f"--config {path} cannot be read: {err.strerror or err}") from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--config {path} is not valid JSON: {err.msg} at line {err.lineno}, "
                          f"column {err.colno}") from None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path} is not valid YAML: {problem}{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(LEGACY_OPTIONS)
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise ConfigError(f"--config {path} has unknown options {unknown}; see --help for the names")
    return data


def config_file_arguments(path: str, data: dict[str, Any]) -> tuple[list[str], dict[str, None]]:
    """A config file's values as CLI words, so that argparse checks their types and choices as it
    checks the command line's; plus the options the file sets to null (argparse has no word for it)."""
    optional = {name for name, hint in typing.get_type_hints(TrainConfig).items()
                if type(None) in typing.get_args(hint)} | {"dataset_path"}
    words, nulls = [], {}
    for key, value in data.items():
        if value is None:
            if key not in optional:
                raise ConfigError(f"--config {path}: {key} needs a value (null given)")
            nulls[key] = None
        elif isinstance(value, (dict, list)):
            raise ConfigError(f"--config {path}: {key} takes one value, not a {type(value).__name__}")
        else:
            words.append(f"--{key}={str(value).lower() if isinstance(value, bool) else value}")
    return words, nulls


def route_dataset_path(value: str) -> tuple[str, str]:
    """`--dataset_path` -> ('dataset_name' | 'train_data_dir', value).

    A Hub id or a `datasets` folder (save_to_disk, parquet, arrow) goes to ``--dataset_name``; any
    other local folder is taken as a folder of audio files (``--train_data_dir``).
    """
    folder = Path(value).expanduser()
    if folder.is_dir():
        tops = [folder, *(p for p in folder.iterdir() if p.is_dir())]
        if any((top / name).is_file() for top in tops for name in DATASET_FOLDER_FILES) or any(
                p.suffix in DATASET_FOLDER_SUFFIXES for p in folder.rglob("*")):
            return "dataset_name", value
        return "train_data_dir", value
    looks_local = value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.sep != "/" and os.sep in value
    if folder.exists() or looks_local:
        raise ConfigError(f"--dataset_path {value} is not a folder; give a folder of audio files, a saved "
                          "dataset folder or a Hub dataset id")
    return "dataset_name", value


def build_parser() -> argparse.ArgumentParser:
    """The CLI: every `TrainConfig` field, ``--config`` and the earlier scripts' ``--dataset_path``."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str) -> None:  # argparse prints usage too; one line is clearer
            raise ConfigError(f"{message} (see --help)")

    parser = Parser(TrainConfig, description="Train a SNAC codec with accelerate.")
    parser.add_argument("--config", default=None, help="YAML or JSON file of options; CLI options override it.")
    parser.add_argument("--dataset_path", default=None,
                        help="Alias of the earlier SNAC training scripts: a folder of audio files (as "
                             "--train_data_dir), a saved or parquet dataset folder or a Hub id (as --dataset_name).")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    """CLI -> TrainConfig. ``--config FILE`` (YAML or JSON) sets values that CLI options override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    finder.add_argument("--config", default=None)
    config_path = finder.parse_known_args(argv)[0].config
    words: list[str] = []
    if config_path:
        data = load_config_file(config_path)
        words, nulls = config_file_arguments(config_path, data)
        try:
            parser.parse_args(words)
        except ConfigError as err:
            raise ConfigError(f"--config {config_path}: {err}") from None
        parser.set_defaults(**nulls)
    namespace = vars(parser.parse_args(words + argv))
    namespace.pop("config")
    dataset_path = namespace.pop("dataset_path")
    for entry in [p.strip() for p in (dataset_path or "").split(",") if p.strip()]:
        option, value = route_dataset_path(entry)
        namespace[option] = ",".join(filter(None, [namespace[option], value]))
    config = TrainConfig(**namespace)
    config.apply_dataset_preset()
    config.validate()
    return config
