"""Training options: one dataclass, parsed by ``transformers.HfArgumentParser`` (see `arguments`).

The fields follow the diffusers/accelerate example scripts so that their users find the options
they expect. This module holds plain data and imports no torch code of the project, so ``--help``
and option errors come back before any model is built.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .option_checks import ConfigError, check_options
from .presets import DATASET_PRESETS, DISCRIMINATOR_PRESETS, MODEL_PRESETS, RECIPES, SMALL_PRESETS

__all__ = ["TrainConfig", "ConfigError", "MODEL_PRESETS", "DISCRIMINATOR_PRESETS", "DATASET_PRESETS", "RECIPES"]

# Files that make a local folder a `datasets` dataset rather than a folder of audio files.
DATASET_FOLDER_FILES = ("state.json", "dataset_dict.json", "dataset_info.json")
DATASET_FOLDER_SUFFIXES = (".parquet", ".arrow")


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
    validation_split: float = _choice(
        "Without validation data: the share of the training clips held out for validation (at least 1 clip, at "
        "most --max_validation_clips; never trained on). 0 turns it off.", 0.02)
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
        "presets), dac (DAC's final configs) or cpu (default of tiny and tiny_44khz).", None, ["snac", "dac", "cpu"])
    learning_rate: Optional[float] = _choice("Generator learning rate (default: the recipe's).", None)
    disc_learning_rate: Optional[float] = _choice("Discriminator learning rate (default: learning_rate).", None)
    adam_beta1: float = _choice("AdamW beta1.", 0.8)
    adam_beta2: float = _choice("AdamW beta2.", 0.99)
    adam_weight_decay: float = _choice("AdamW weight decay.", 0.0)
    adam_epsilon: float = _choice("AdamW epsilon.", 1e-8)
    adam_fused: Optional[bool] = _choice(
        "Fused AdamW (one kernel per step; skips a non-finite update on the device, without a host sync). "
        "Default: on CUDA.", None)
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

    # The earlier SNAC training scripts' names, taken in Python as on the CLI (not stored: see route_dataset_path).
    dataset_path: dataclasses.InitVar[Optional[str]] = None
    batch_size: dataclasses.InitVar[Optional[int]] = None

    def __post_init__(self, dataset_path: Optional[str], batch_size: Optional[int]) -> None:
        if batch_size is not None:
            if self.train_batch_size not in (None, batch_size):
                raise ConfigError(f"batch_size {batch_size} and train_batch_size {self.train_batch_size} disagree; "
                                  "give one of them")
            self.train_batch_size = batch_size
        for entry in [p.strip() for p in (dataset_path or "").split(",") if p.strip()]:
            option, value = route_dataset_path(entry)
            setattr(self, option, ",".join(filter(None, [getattr(self, option), value])))
        self.apply_recipe()

    def apply_recipe(self) -> None:
        """Fill the recipe's options that were left unset (None); an unknown recipe is left to `validate`."""
        if self.recipe is None:
            self.recipe = "cpu" if self.preset in SMALL_PRESETS else "snac"
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
        name = self.discriminator_preset or ("tiny" if self.preset in SMALL_PRESETS else "full")
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
        """Refuse a bad combination of options before anything is built (`option_checks`)."""
        check_options(self)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("hub_token", None)
        return data

    def save(self, path: str | os.PathLike) -> None:
        """Write the effective config (never the token) so a run can be repeated with --config."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
