"""The whole path: CLI -> config -> data -> trainer -> export -> `snac.SNAC.from_pretrained`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import snac
import torch

from snac_accel.config import MODEL_PRESETS
from snac_accel.data import AudioClips, ExcerptSpec, audio_dataset_from_files, list_audio_files
from snac_accel.losses import MultiScaleMelLoss
from snac_accel.model import build_generator, generator_from_pretrained

from .conftest import tiny_config

# Thresholds of the 30-step run (tests/conftest.py `trained_run`) on the 9 held-out clips, measured with
# 1 and 2 threads: own 4.71 / 4.76 against another clip's reconstruction 5.02 (input-blind: equal), mel
# 0.82x / 0.83x the untrained model's, 44/74/106 and 32/64/107 distinct codes (the old init: 1/2/1;
# 9 x 1.5 s hold 162, 324 and 648 frames).
OWN_MARGIN = 0.1
TRAINED_OVER_UNTRAINED = 0.9
MIN_DISTINCT = (16, 32, 48)  # of 256 codes at levels 0, 1, 2


# The released checkpoints' config.json (hubertsiuzdak/snac_24khz, snac_32khz, snac_44khz on the Hub), written
# out by hand from the snac README and model cards: the reference the presets must equal, not a copy of them.
RELEASED = {
    "snac_24khz": {"sampling_rate": 24000, "encoder_dim": 48, "encoder_rates": [2, 4, 8, 8], "latent_dim": None,
                   "decoder_dim": 1024, "decoder_rates": [8, 8, 4, 2], "attn_window_size": None,
                   "codebook_size": 4096, "codebook_dim": 8, "vq_strides": [4, 2, 1], "noise": True,
                   "depthwise": True},
    "snac_32khz": {"sampling_rate": 32000, "encoder_dim": 64, "encoder_rates": [2, 3, 8, 8], "latent_dim": None,
                   "decoder_dim": 1536, "decoder_rates": [8, 8, 3, 2], "attn_window_size": 32,
                   "codebook_size": 4096, "codebook_dim": 8, "vq_strides": [8, 4, 2, 1], "noise": True,
                   "depthwise": True},
    "snac_44khz": {"sampling_rate": 44100, "encoder_dim": 64, "encoder_rates": [2, 3, 8, 8], "latent_dim": None,
                   "decoder_dim": 1536, "decoder_rates": [8, 8, 3, 2], "attn_window_size": 32,
                   "codebook_size": 4096, "codebook_dim": 8, "vq_strides": [8, 4, 2, 1], "noise": True,
                   "depthwise": True},
}


# Parameters and bitrates as the snac README lists them (19.8M / 0.98 kbps, 54.5M / 1.9 kbps, 54.5M / 2.6 kbps).
@pytest.mark.parametrize("preset,millions,kbps", [("snac_24khz", 19.8, 0.98), ("snac_32khz", 54.5, 1.9),
                                                  ("snac_44khz", 54.5, 2.6)])
def test_presets_match_released_parameter_counts(preset, millions, kbps):
    from snac_accel.card import codec_rates

    assert MODEL_PRESETS[preset] == RELEASED[preset]
    model = snac.SNAC(**MODEL_PRESETS[preset])
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions
    assert codec_rates(MODEL_PRESETS[preset])["bitrate_bps"] / 1000 == pytest.approx(kbps, abs=0.03)


def test_export_loads_with_snac_and_round_trips_a_demo_clip(trained_run, demo_dir):
    final = trained_run / "final"
    assert {"config.json", "model.safetensors", "pytorch_model.bin", "README.md"} <= {p.name for p in final.iterdir()}
    model = snac.SNAC.from_pretrained(str(final))  # config.json + pytorch_model.bin
    ours = generator_from_pretrained(str(final)).eval()  # our generator from model.safetensors
    decoder = audio_dataset_from_files(list_audio_files(demo_dir / "validation"), 24000)[0]["audio"]
    audio = decoder.get_all_samples().data[None]  # [1, 1, T]
    with torch.inference_mode():
        codes = model.encode(audio)
        out = model.decode(codes)
        direct = ours(audio)  # encoder -> quantizer -> decoder, without SNAC.encode/decode
    padded = model.preprocess(audio).shape[-1]
    assert padded >= audio.shape[-1] and padded % 2048 == 0
    assert out.shape == (1, 1, padded)
    assert [c.shape[-1] for c in codes] == [padded // 512 // s for s in model.vq_strides]
    assert all(torch.equal(a, b) for a, b in zip(codes, direct.codes))
    torch.testing.assert_close(out[..., :audio.shape[-1]], direct.audio, rtol=1e-4, atol=1e-5)
    assert out.std() > 0.01 * audio.std()  # a signal, not silence or a constant


@pytest.fixture(scope="module")
def held_out(demo_dir) -> torch.Tensor:
    """The 9 demo validation clips, never trained on: 1.5 s from their start, [9, 1, 36864]."""
    spec = ExcerptSpec(sample_rate=24000, length=36864, salience_threshold=None)
    clips = AudioClips(audio_dataset_from_files(list_audio_files(demo_dir / "validation"), 24000), spec, train=False)
    return torch.stack([clips[i]["audio"] for i in range(len(clips))])


def test_thirty_steps_give_a_codec_whose_output_depends_on_its_input(trained_run, held_out):
    """A codec, not an average spectrum: each held-out clip is reconstructed from its own codes.

    An input-blind model (the same output for every input) and a collapsed one (one code per level)
    both lower the mel loss of a random start; they fail here: the reconstruction of clip i must be
    closer to clip i than the reconstruction of another clip is, every level must use many codes,
    and two clips must get different codes.
    """
    config = tiny_config(trained_run)
    mel = MultiScaleMelLoss(24000)
    torch.manual_seed(config.seed)
    untrained = build_generator(config.model_config).eval()
    trained = snac.SNAC.from_pretrained(str(trained_run / "final"))
    with torch.inference_mode():
        fake, codes = trained(held_out)
        start = untrained(held_out).audio
    n = held_out.shape[0]
    own = torch.tensor([mel(fake[i:i + 1], held_out[i:i + 1]).item() for i in range(n)])
    other = torch.tensor([mel(fake[(i + 1) % n:(i + 1) % n + 1], held_out[i:i + 1]).item() for i in range(n)])
    before = torch.tensor([mel(start[i:i + 1], held_out[i:i + 1]).item() for i in range(n)])
    assert (own < other).all(), (own, other)
    assert own.mean() < other.mean() - OWN_MARGIN, (own.mean(), other.mean())
    assert own.mean() < TRAINED_OVER_UNTRAINED * before.mean(), (own.mean(), before.mean())
    for level, level_codes in enumerate(codes):
        distinct = torch.unique(level_codes).numel()
        assert distinct >= MIN_DISTINCT[level], (level, distinct)
        rows = {tuple(row.tolist()) for row in level_codes}
        assert len(rows) == n, f"level {level}: two clips got the same codes"


def test_cli_help_lists_the_options():
    out = subprocess.run([sys.executable, "-m", "snac_accel.train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for option in ("--preset", "--train_data_dir", "--validation_data_dir", "--output_dir", "--max_train_steps",
                   "--train_batch_size", "--segment_seconds", "--seed", "--checkpointing_steps",
                   "--resume_from_checkpoint", "--config"):
        assert option in out


def test_accelerate_launch_help():
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                          "-m", "snac_accel.train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--train_data_dir" in out


def test_bad_option_is_refused_in_one_line_before_training(tmp_path, demo_dir):
    result = subprocess.run(
        [sys.executable, "-m", "snac_accel.train", "--train_data_dir", str(demo_dir / "train"),
         "--segment_seconds", "0.01", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "segment_seconds" in result.stderr and "padding multiple" in result.stderr
    assert not (tmp_path / "out").exists()
