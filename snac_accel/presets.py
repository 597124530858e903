"""Presets and recipes: the released SNAC architectures, discriminator sizes, data sources and
optimisation recipes, as plain data (no torch), so that every other module reads the same values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    # snac_44khz's layout (4 levels, local attention over 32 frames) at tiny's widths: smoke tests of
    # the music configuration on a CPU.
    "tiny_44khz": dict(
        sampling_rate=44100, encoder_dim=16, encoder_rates=[2, 3, 8, 8], latent_dim=None,
        decoder_dim=128, decoder_rates=[8, 8, 3, 2], attn_window_size=32,
        codebook_size=256, codebook_dim=8, vq_strides=[8, 4, 2, 1], noise=True, depthwise=True,
    ),
}

# The small presets train with the CPU recipe and narrow discriminators unless told otherwise.
SMALL_PRESETS = ("tiny", "tiny_44khz")

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
