"""Audio data, in four layers that import only downwards: sources -> clips -> loaders -> streaming.

- `sources`: Hub ids, dataset folders, audio folders and manifests as datasets of undecoded rows.
- `wav`: PCM WAV decoded without FFmpeg (the fast path of `clips`).
- `clips`: decoding (torchcodec through ``datasets.Audio``), salient excerpts, loudness, broken files.
- `loaders`: the epoch sampler, the DataLoader, a source's first check.
- `streaming`: ``--streaming`` sources split by process, and their checkpointed position.
- `holdout`: a validation set held out of the training data when a run names none.
- `training`: what a training run reads, built from its config.

Every public name is re-exported here: ``from snac_accel.data import X`` works for all of them.
"""

from .clips import (MAX_REPLACEMENTS, SILENCE_PEAK, AudioClips, BadFileTracker, Clip, ExcerptSpec, decode_excerpt,
                    decode_problem, excerpt_from_row, k_weighting, loudness, make_excerpt, mixing_map,
                    normalize_loudness, row_name, sample_seed)
from .loaders import EpochBatchSampler, check_source, collate_clips, default_num_workers, make_loader
from .sources import (AUDIO_EXTENSIONS, MAX_LOCAL_SHARDS, DataError, audio_column, audio_dataset_from_files,
                      files_dataset, list_audio_files, load_hub_dataset, load_sources, read_manifest, source_weights,
                      split_option)
from .streaming import StreamingClips, StreamingLoader, check_stream, mix_streams
from .holdout import HeldOut, choose_held_out, split_sources
from .loaders import probe_rows
from .training import (AudioDataset, RunSources, TrainingData, run_sources, seeding_excerpts, train_spec, training_data,
                       validation_batch, validation_spec)

__all__ = [
    "AUDIO_EXTENSIONS", "MAX_LOCAL_SHARDS", "DataError", "audio_column", "audio_dataset_from_files", "files_dataset",
    "list_audio_files", "load_hub_dataset", "load_sources", "read_manifest", "source_weights", "split_option",
    "MAX_REPLACEMENTS", "SILENCE_PEAK", "AudioClips", "BadFileTracker", "Clip", "ExcerptSpec", "decode_excerpt",
    "decode_problem", "excerpt_from_row", "k_weighting", "loudness", "make_excerpt", "mixing_map",
    "normalize_loudness", "row_name", "sample_seed",
    "EpochBatchSampler", "check_source", "collate_clips", "default_num_workers", "make_loader",
    "StreamingClips", "StreamingLoader", "check_stream", "mix_streams",
    "AudioDataset", "HeldOut", "choose_held_out", "split_sources", "probe_rows", "RunSources", "run_sources",
    "TrainingData", "seeding_excerpts", "train_spec", "training_data", "validation_batch", "validation_spec",
]
