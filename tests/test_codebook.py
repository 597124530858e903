"""Codebooks that carry information: DAC's fresh init, k-means seeding, health figures, collapse warnings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import PartialState

from snac_accel.codebook import (attainable_usage, collapse_advice, collapse_warnings, histogram_statistics, kmeans,
                                 seed_codebooks)
from snac_accel.config import MODEL_PRESETS
from snac_accel.data import AudioClips, ExcerptSpec, files_dataset, list_audio_files
from snac_accel.model import SnacGenerator, build_generator

from .conftest import tiny_config

TINY = {**MODEL_PRESETS["tiny"], "noise": False}


@pytest.fixture(scope="module", autouse=True)
def accelerate_state():
    PartialState()  # accelerate's logger needs a state, as inside a training


@pytest.fixture(scope="module")
def validation_audio(demo_dir) -> torch.Tensor:
    """The 9 demo validation clips (never trained on), 2 s from their start: [9, 1, 49152]."""
    spec = ExcerptSpec(sample_rate=24000, length=49152, salience_threshold=None)
    clips = AudioClips(files_dataset(list_audio_files(demo_dir / "validation")), spec, train=False)
    return torch.stack([clips[i]["audio"] for i in range(len(clips))])


@pytest.fixture(scope="module")
def training_audio(demo_dir) -> torch.Tensor:
    spec = ExcerptSpec(sample_rate=24000, length=24576, salience_threshold=None)
    clips = AudioClips(files_dataset(list_audio_files(demo_dir / "train")), spec, train=False)
    return torch.stack([clips[i]["audio"] for i in range(len(clips))])


@torch.no_grad()
def distinct_codes(model: torch.nn.Module, audio: torch.Tensor) -> list[int]:
    model.eval()
    return [int(torch.unique(codes).numel()) for codes in model(audio).codes]


def test_fresh_generator_spreads_frames_over_many_codes_where_pytorch_default_init_collapses(validation_audio):
    # 9 clips x 2 s: 216, 432 and 864 frames at levels 0, 1, 2.
    torch.manual_seed(0)
    fresh = build_generator(TINY)
    torch.manual_seed(0)
    default = SnacGenerator(**TINY)  # the same weights with PyTorch's random conv biases
    conv_biases = [m.bias for m in fresh.modules() if isinstance(m, torch.nn.Conv1d) and m.bias is not None]
    assert len(conv_biases) > 40 and all(b.abs().sum() == 0 for b in conv_biases)  # DAC: every Conv1d bias
    fresh_codes, default_codes = distinct_codes(fresh, validation_audio), distinct_codes(default, validation_audio)
    assert min(fresh_codes) >= 40, fresh_codes  # measured 137, 81, 67
    assert max(default_codes) < 20, default_codes  # measured 6, 7, 9: every frame on a handful of codes


def test_noise_blocks_start_silent_so_two_decodes_of_one_clip_agree(validation_audio):
    torch.manual_seed(0)
    model = build_generator(MODEL_PRESETS["tiny"]).eval()  # noise blocks on
    with torch.no_grad():
        first, second = model(validation_audio[:2]).audio, model(validation_audio[:2]).audio
    assert torch.equal(first, second)
    torch.manual_seed(0)
    noisy = SnacGenerator(**MODEL_PRESETS["tiny"]).eval()
    with torch.no_grad():
        assert not torch.equal(noisy(validation_audio[:2]).audio, noisy(validation_audio[:2]).audio)


def test_kmeans_finds_known_clusters_under_cosine_assignment():
    generator = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    labels = torch.arange(4).repeat_interleave(50)
    scales = 0.5 + torch.rand(200, 1, generator=generator)  # cosine search: the length does not pick the code
    vectors = directions[labels] * scales + 0.02 * torch.randn(200, 8, generator=generator)
    centroids = kmeans(vectors, 4, iterations=20, generator=torch.Generator().manual_seed(1))
    expected = torch.stack([vectors[labels == c].mean(0) for c in range(4)])  # hand-computed cluster means
    match = (F.normalize(centroids, dim=-1) @ F.normalize(expected, dim=-1).T).argmax(-1)
    assert sorted(match.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(centroids, expected[match], rtol=1e-4, atol=1e-5)

    few = kmeans(vectors[:3], 8, iterations=5, generator=torch.Generator().manual_seed(1))
    assert few.shape == (8, 8) and torch.unique(few, dim=0).shape[0] == 8  # no two codes tie


def nearest_code_cosine(model: torch.nn.Module, audio: torch.Tensor) -> list[float]:
    """Per level, the median cosine between a latent and its nearest code (what the code search maximises)."""
    with torch.no_grad():
        latents = model.eval()(audio).latents
    medians = []
    for vq, z_e in zip(model.quantizer.quantizers, latents):
        vectors = F.normalize(z_e.transpose(1, 2).reshape(-1, z_e.shape[1]), dim=-1)
        medians.append((vectors @ F.normalize(vq.codebook.weight, dim=-1).T).amax(-1).median().item())
    return medians


def test_seeded_codebooks_sit_on_the_encoders_vectors_and_use_more_codes(training_audio, validation_audio):
    torch.manual_seed(0)
    model = build_generator(TINY)
    codes_before, fit_before = distinct_codes(model, validation_audio), nearest_code_cosine(model, training_audio)
    with torch.no_grad():
        audio_before = model(validation_audio[:2]).audio
    fresh_norm = torch.stack([vq.codebook.weight.norm(dim=-1).mean() for vq in model.quantizer.quantizers])
    record = seed_codebooks(model, training_audio.split(6), "kmeans", seed=0)
    codes_after, fit_after = distinct_codes(model, validation_audio), nearest_code_cosine(model, training_audio)
    assert record["method"] == "kmeans" and record["vectors"] == [36 * 12, 36 * 24, 36 * 48]
    assert all(a > b for a, b in zip(codes_after, codes_before)), (codes_before, codes_after)
    assert all(a > b + 0.05 for a, b in zip(fit_after, fit_before)), (fit_before, fit_after)
    for vq, norm in zip(model.quantizer.quantizers, fresh_norm):
        # The data sets the directions; the rows keep the fresh codebook's length (about sqrt(8)).
        torch.testing.assert_close(vq.codebook.weight.norm(dim=-1), norm.expand(vq.codebook.weight.shape[0]))
    with torch.no_grad():
        audio_after = model(validation_audio[:2]).audio
    ratio = audio_after.pow(2).mean().sqrt() / audio_before.pow(2).mean().sqrt()
    assert 0.5 < ratio < 2, ratio  # the decoder's input keeps its size: new codes, not a new scale


def test_health_figures_and_collapse_warning_from_a_known_histogram():
    counts = torch.zeros(2, 256)
    counts[0, :128] = 1.0  # half the codes, equally: 7 bits of 8
    counts[1, 3] = 50.0  # everything on one code
    stats = histogram_statistics(counts)
    torch.testing.assert_close(stats["usage"], torch.tensor([0.5, 1 / 256]))
    torch.testing.assert_close(stats["entropy_bits"], torch.tensor([7.0, 0.0]))
    torch.testing.assert_close(stats["efficiency"], torch.tensor([7 / 8, 0.0]))
    torch.testing.assert_close(stats["perplexity"], torch.tensor([128.0, 1.0]))
    lines = collapse_warnings(stats["usage"].tolist(), 256, "the validation clips", counts.sum(-1).tolist())
    assert len(lines) == 1 and lines[0].startswith("level 1 collapsed") and "--dead_code_steps" in lines[0]


def test_collapse_is_judged_against_what_the_validation_frames_allow():
    # 2 clips of 2 s at the tiny preset: 48 coarse frames, which reach at most 17% of 256 codes evenly used.
    assert abs(attainable_usage(48, 256) - (1 - (255 / 256) ** 48)) < 1e-12
    few = torch.zeros(1, 256)
    few[0, :12] = 4.0  # 12 codes of 256 (4.7%): under the old 10% rule "collapsed", yet 28% of what 48 tokens reach
    assert collapse_warnings([float((few > 0).float().mean())], 256, "v", [48]) == []
    one = torch.zeros(1, 256)
    one[0, 0] = 48.0  # one code for all 48 frames: collapsed
    assert len(collapse_warnings([1 / 256], 256, "v", [48])) == 1
    # The advice fits the options: kmeans is the default, so it is not advised again; restarts off are named.
    config = tiny_config("unused", dead_code_steps=0)
    advice = collapse_advice(config, 0)
    assert "--codebook_init" not in advice and "now off" in advice and f"{config.learning_rate:g}" in advice
    assert "--codebook_init kmeans (now none)" in collapse_advice(tiny_config("unused", codebook_init="none"), 10)


def test_init_from_weights_are_untouched_by_fresh_init_and_seeding(tmp_path):
    from safetensors.torch import load_file

    from snac_accel.hub import save_pretrained
    from snac_accel.trainer import SnacTrainer

    from .conftest import tiny_config

    torch.manual_seed(7)
    start = SnacGenerator(**TINY)  # random conv biases, N(0, 1) codebooks: nothing a fresh init would leave
    save_pretrained(start, tmp_path / "start")
    # A zero learning rate: whatever differs after one step was changed by something other than the update.
    trainer = SnacTrainer(tiny_config(tmp_path / "run", init_from=str(tmp_path / "start"), max_train_steps=1,
                                      learning_rate=0.0, disc_learning_rate=0.0, checkpointing_steps=1,
                                      train_batch_size=2, segment_seconds=0.25, validation_data_dir=None))
    trainer.fit()
    after = load_file(tmp_path / "run" / "checkpoints" / "checkpoint_1" / "model.safetensors")
    expected = start.state_dict()
    assert after.keys() == expected.keys()
    assert all(torch.equal(after[k], expected[k]) for k in expected)
    assert "codebook_init" not in trainer.state.extra
