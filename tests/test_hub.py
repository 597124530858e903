"""Export from accelerate checkpoints, the Hub folder, `load_codec`, and the push at the HfApi boundary."""

from __future__ import annotations

import inspect
import json
import math
import shutil

import pytest
import snac
import torch
import yaml
from safetensors.torch import load_file

from snac_accel import card as card_lib
from snac_accel import evaluate as ev
from snac_accel import export as export_cli
from snac_accel import hub
from snac_accel.config import MODEL_PRESETS
from snac_accel.data import audio_dataset_from_files, list_audio_files
from snac_accel.model import build_generator

from .conftest import tiny_config

SENTINEL = "hf_SECRETsentinel0123456789abcdefXYZ"
EXPORT_FILES = {"config.json", "model.safetensors", "pytorch_model.bin", "README.md", "spectrogram.png",
                "codebook_usage.png"}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """The trained run's best checkpoint exported by the CLI (two validation files measured)."""
    folder = tmp_path_factory.mktemp("export") / "codec"
    assert export_cli.main([str(trained_run), "--export_dir", str(folder), "--eval_clips", "2"]) == 0
    return folder


def test_export_is_a_hub_folder_that_snac_loads_and_decodes(exported, trained_run, demo_dir):
    assert {p.name for p in exported.iterdir()} == EXPORT_FILES
    config = json.loads((exported / "config.json").read_text())
    assert set(config) == set(inspect.signature(snac.SNAC.__init__).parameters) - {"self"}
    assert config == {**MODEL_PRESETS["tiny"], "noise": False, "latent_dim": 16 * 2 ** 4}  # latent_dim resolved

    # The best checkpoint of a run validated only at the end is its last one: the trainer's own
    # final export and ours hold the same weights, in both weight files.
    checkpoint = load_file(trained_run / "checkpoints" / "checkpoint_30" / "model.safetensors")
    assert _same_weights(load_file(exported / "model.safetensors"), checkpoint)
    assert _same_weights(torch.load(exported / "pytorch_model.bin", weights_only=True), checkpoint)
    assert _same_weights(load_file(trained_run / "final" / "model.safetensors"), checkpoint)

    model = snac.SNAC.from_pretrained(str(exported))
    decoder = audio_dataset_from_files(list_audio_files(demo_dir / "validation"), 24000)[1]["audio"]
    audio = decoder.get_all_samples().data[None]
    with torch.inference_mode():
        codes = model.encode(audio)
        out = model.decode(codes)
    assert torch.isfinite(out).all() and out.shape[-1] >= audio.shape[-1]
    assert all(int(c.max()) < 256 for c in codes)


def test_model_card_states_what_a_user_needs(exported, trained_run):
    card = (exported / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "snac" and "audio-codec" in meta["tags"]
    assert "datasets" not in meta  # local demo files are not Hub datasets
    n_params = sum(p.numel() for p in snac.SNAC.from_pretrained(str(exported)).parameters())
    for text in ("24000 Hz", "11.72, 23.44, 46.88 Hz", "0.656 kbps", f"{n_params:,}", "Steps: 30",
                 "demo clips", "2 validation clips", "](spectrogram.png)", "](codebook_usage.png)",
                 "SNAC.from_pretrained"):
        assert text in card, text
    # The card's numbers are what `evaluate` measures on the exported folder, on the run's validation
    # clips and settings (the export was asked for 2 clips).
    config = tiny_config(trained_run)
    measured = ev.evaluate(hub.load_codec(str(exported)), ev.open_source(config.validation_data_dir), max_clips=2,
                           max_seconds=config.validation_seconds, target_loudness=config.target_loudness,
                           timing=False)
    assert measured["clips"] == 2
    for key in ("mel_distance", "stft_distance", "si_sdr"):
        assert f"| {key} | {measured['metrics'][key]:.4f} |" in card, key


class ReferenceCodec(torch.nn.Module):
    """A codec whose reconstruction is known: the input itself (perfect) or silence (blank)."""

    sampling_rate = 24000

    def __init__(self, blank: bool) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(0.0 if blank else 1.0))

    def encode(self, audio: torch.Tensor) -> list[torch.Tensor]:
        return [audio]

    def decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        return self.gain * codes[0]


def pixels(path) -> torch.Tensor:
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"))).float()


def halves_mismatch(image: torch.Tensor) -> float:
    """How unlike the top half (original) the bottom half (reconstruction) looks: mean pixel difference at
    the best vertical alignment, whatever draws the figure (margins, titles and gaps shift the panels)."""
    height, half = image.shape[0], image.shape[0] // 2
    best = math.inf
    for shift in range(-(height // 8), height // 8 + 1):
        rows = min(half, height - half - shift)
        best = min(best, (image[:rows] - image[half + shift:half + shift + rows]).abs().mean().item())
    return best


def first_validation_clip(demo_dir) -> torch.Tensor:
    """The clip an export draws: the first usable validation file, its first 4 s at the data's level."""
    (_, raw), *_ = ev.rows(ev.open_source(str(demo_dir / "validation")))
    audio, _ = ev.load_clip(raw, 24000, 4 * 24000, None)
    return audio


def test_spectrogram_is_a_png_of_original_over_reconstruction(exported, demo_dir, tmp_path):
    data = (exported / "spectrogram.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = pixels(exported / "spectrogram.png")
    assert image.shape[0] > 100 and image.shape[1] > 100

    # The figure draws the reconstruction: a perfect codec's bottom half repeats the top, a blank one's does not.
    audio = first_validation_clip(demo_dir)
    figures = {name: pixels(card_lib.spectrogram_figure(ReferenceCodec(blank=name == "blank"), audio,
                                                   tmp_path / f"{name}.png")) for name in ("perfect", "blank")}
    assert halves_mismatch(figures["perfect"]) < 0.1 * halves_mismatch(figures["blank"])

    # The export's figure is the exported codec's reconstruction of that clip, which is not silence.
    ours = pixels(card_lib.spectrogram_figure(hub.load_codec(str(exported)), audio, tmp_path / "ours.png"))
    assert torch.equal(ours, image)
    half = image.shape[0] // 2
    assert torch.equal(image[:half // 2], figures["blank"][:half // 2])  # the same original on top
    assert (image[half:] - figures["blank"][half:]).abs().mean() > 0.1 * halves_mismatch(figures["blank"])


def test_figures_are_labelled_and_draw_the_spectra_and_usage_they_are_given(demo_dir, tmp_path):
    import numpy as np
    import torchaudio

    audio = first_validation_clip(demo_dir)
    perfect = card_lib.spectra(audio, card_lib.reconstruct(ReferenceCodec(blank=False), audio), 24000)
    blank = card_lib.spectra(audio, card_lib.reconstruct(ReferenceCodec(blank=True), audio), 24000)
    assert np.array_equal(perfect.reconstruction, perfect.original) and np.array_equal(blank.original, perfect.original)
    assert perfect.original.max() == 0.0 and perfect.original.min() >= -card_lib.DB_RANGE  # dB below its peak
    assert (blank.reconstruction == -card_lib.DB_RANGE).all()  # silence: the bottom of the scale
    assert perfect.seconds == audio.shape[-1] / 24000
    # The frequency axis: each band's centre lies within one FFT bin of the peak of torchaudio's filter.
    filters = torchaudio.functional.melscale_fbanks(257, 0.0, 12000.0, 80, 24000, norm="slaney", mel_scale="slaney")
    peaks = filters.argmax(0).numpy() * 12000.0 / 256
    assert perfect.band_hz.shape == (80,) and np.abs(perfect.band_hz - peaks).max() <= 12000.0 / 256

    figure = card_lib.spectrogram_plot(blank)
    panels = [ax for ax in figure.axes if ax.get_title()]
    colour_bars = [ax for ax in figure.axes if not ax.get_title()]
    assert [ax.get_title().split(":")[0] for ax in panels] == ["original", "reconstruction"]
    assert panels[0].get_position().y0 > panels[1].get_position().y1  # original above reconstruction
    for ax in panels:
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("time (s)", "frequency (Hz)")
        assert ax.get_xlim() == pytest.approx((0.0, blank.seconds))
        assert {"250", "1k", "4k"} <= {label.get_text() for label in ax.get_yticklabels()}
    assert len(colour_bars) == 2 and all("dB" in ax.get_ylabel() for ax in colour_bars)
    assert np.array_equal(panels[1].get_images()[0].get_array(), blank.reconstruction)

    usage, efficiency = [0.5, 0.25, 0.05], [0.4, 0.2, 0.01]
    chart = card_lib.codebook_usage_plot(usage, efficiency, 256, "the validation clips")
    (ax,) = chart.axes
    heights = [bar.get_height() for container in ax.containers for bar in container]
    assert heights == pytest.approx([100 * v for v in usage + efficiency])
    assert "256 codes" in ax.get_title() and [t.get_text() for t in ax.get_xticklabels()] == [
        "level 0", "level 1", "level 2"]
    path = card_lib.save_figure(chart, tmp_path / "usage.png")
    assert pixels(path).shape[:2] == (420, 700)


def test_card_lists_hub_datasets_and_base_model():
    model = build_generator(MODEL_PRESETS["tiny"])
    card = card_lib.model_card(model, {"datasets": ["keithito/lj_speech", None],
                                      "base_model": "hubertsiuzdak/snac_24khz",
                                      "metrics": {"val/mel_distance": 1.5}, "repo_id": "me/codec"})
    meta = _front_matter(card)
    assert meta["datasets"] == ["keithito/lj_speech"] and meta["base_model"] == "hubertsiuzdak/snac_24khz"
    assert "| mel_distance | 1.5000 |" in card and 'SNAC.from_pretrained("me/codec")' in card


@pytest.fixture(scope="module")
def ema_checkpoint(tmp_path_factory):
    """A checkpoint written by the real `accelerator.save_state`, registered as the trainer does (EMA,
    two schedulers, a TrainState), with no config.yaml beside it: the architecture comes from the keys."""
    from accelerate import Accelerator
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from snac_accel.checkpoints import TrainState

    torch.manual_seed(1)
    generator = build_generator({**MODEL_PRESETS["tiny"], "noise": False})
    accelerator = Accelerator()
    optimizer = torch.optim.AdamW(generator.parameters())
    generator, optimizer = accelerator.prepare(generator, optimizer)
    ema = AveragedModel(generator, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    ema.update_parameters(generator)  # the first update copies; the second one averages
    with torch.no_grad():  # a small step: a codec still (a large one saturates the output at a constant)
        for p in generator.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ema.update_parameters(generator)
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9) for _ in range(2)]
    state = TrainState(step=7, best_step=7, extra={"best_metrics": {"val/mel_distance": 3.25}})
    accelerator.register_for_checkpointing(ema, *schedulers, state)
    folder = tmp_path_factory.mktemp("ema_run") / "checkpoints" / "checkpoint_7"
    accelerator.save_state(str(folder))
    raw = {k: v.clone() for k, v in generator.state_dict().items()}
    averaged = {k: v.clone() for k, v in ema.module.state_dict().items()}
    assert not _same_weights(raw, averaged)
    return folder, raw, averaged


def test_use_ema_exports_the_averaged_weights(ema_checkpoint, tmp_path):
    folder, raw, averaged = ema_checkpoint
    assert export_cli.main([str(folder), "--export_dir", str(tmp_path / "ema"), "--use_ema"]) == 0
    assert export_cli.main([str(folder.parent.parent), "--export_dir", str(tmp_path / "raw")]) == 0
    assert _same_weights(load_file(tmp_path / "ema" / "model.safetensors"), averaged)
    assert _same_weights(load_file(tmp_path / "raw" / "model.safetensors"), raw)
    card = (tmp_path / "raw" / "README.md").read_text()
    assert "Steps: 7" in card and "| mel_distance | 3.2500 |" in card  # no validation data: the saved metrics
    assert "spectrogram.png" not in {p.name for p in (tmp_path / "raw").iterdir()}  # no clip known
    assert isinstance(snac.SNAC.from_pretrained(str(tmp_path / "ema")), snac.SNAC)


def test_use_ema_without_ema_is_one_clear_error(trained_run, tmp_path, capsys):
    assert export_cli.main([str(trained_run), "--export_dir", str(tmp_path / "x"), "--use_ema"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no EMA weights" in err and "--ema_decay" in err


def test_evaluate_use_ema_measures_the_averaged_weights(ema_checkpoint, demo_dir, tmp_path):
    folder, raw, averaged = ema_checkpoint
    clip = str(sorted((demo_dir / "validation").glob("*.flac"))[0])
    for name, state, flags in (("ema", averaged, ["--use_ema"]), ("raw", raw, [])):
        output = tmp_path / f"{name}.json"
        assert ev.main([str(folder), clip, "--max_seconds", "0.5", "--output_json", str(output), *flags]) == 0
        model = build_generator({**MODEL_PRESETS["tiny"], "noise": False})
        model.load_state_dict(state)
        expected = ev.evaluate(model, ev.open_source(clip), max_seconds=0.5, timing=False)
        measured = json.loads(output.read_text())
        assert measured["metrics"] == pytest.approx(expected["metrics"], rel=1e-6), name
        assert measured["codebooks"] == expected["codebooks"], name
    assert json.loads((tmp_path / "ema.json").read_text())["metrics"] != json.loads(
        (tmp_path / "raw.json").read_text())["metrics"]


def test_export_takes_the_best_checkpoint_or_with_checkpoint_latest_the_last(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", run / "checkpoints")
    shutil.copy(trained_run / "config.yaml", run / "config.yaml")
    # As a run whose validation found step 15 best: the latest checkpoint's TrainState records it.
    for path in (run / "checkpoints" / "checkpoint_30").glob("custom_checkpoint_*.pkl"):
        state = torch.load(path, weights_only=False)
        if isinstance(state, dict) and "best_step" in state:
            torch.save({**state, "best_step": 15}, path)
    for which, step in (("best", 15), ("latest", 30)):
        flags = [] if which == "best" else ["--checkpoint", "latest"]
        assert export_cli.main([str(run), "--export_dir", str(tmp_path / which), "--eval_clips", "0", *flags]) == 0
        expected = load_file(run / "checkpoints" / f"checkpoint_{step}" / "model.safetensors")
        assert _same_weights(load_file(tmp_path / which / "model.safetensors"), expected), which
        assert f"Steps: {step}" in (tmp_path / which / "README.md").read_text()


def test_load_codec_reads_ours_released_folders_and_checkpoints(exported, trained_run, tmp_path):
    ours = hub.load_codec(str(exported))
    assert not ours.training
    expected = load_file(exported / "model.safetensors")
    assert _same_weights(ours.state_dict(), expected)

    # Safetensors first: a stale pytorch_model.bin beside it is not read.
    stale = tmp_path / "stale"
    shutil.copytree(exported, stale)
    torch.save({k: torch.zeros_like(v) for k, v in expected.items()}, stale / "pytorch_model.bin")
    assert _same_weights(hub.load_codec(str(stale)).state_dict(), expected)

    # A released SNAC folder: config.json and pytorch_model.bin only.
    released = tmp_path / "released"
    released.mkdir()
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(exported / name, released / name)
    assert _same_weights(hub.load_codec(str(released)).state_dict(), expected)

    # A training checkpoint and a training output folder (its best checkpoint).
    assert _same_weights(hub.load_codec(str(trained_run / "checkpoints" / "checkpoint_30")).state_dict(), expected)
    assert _same_weights(hub.load_codec(str(trained_run)).state_dict(), expected)
    earlier = hub.load_codec(str(trained_run / "checkpoints" / "checkpoint_15")).state_dict()
    assert not _same_weights(earlier, expected)


class HubRecorder:
    """Stands in for the network at the HfApi methods; records what would be sent."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi

        self.calls: list[tuple[str, dict]] = []
        recorder = self

        def create_repo(api, repo_id, **kwargs):
            recorder.calls.append(("create_repo", {"repo_id": repo_id, "token": api.token, **kwargs}))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def create_branch(api, repo_id, **kwargs):
            recorder.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def upload_folder(api, **kwargs):
            from huggingface_hub.utils import filter_repo_objects
            from pathlib import Path

            root = Path(kwargs["folder_path"])
            files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            kwargs["uploaded"] = list(filter_repo_objects(files, allow_patterns=kwargs.get("allow_patterns"),
                                                          ignore_patterns=kwargs.get("ignore_patterns")))
            recorder.calls.append(("upload_folder", kwargs))
            return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    def named(self, name: str) -> list[dict]:
        return [kwargs for call, kwargs in self.calls if call == name]


@pytest.fixture
def no_login(monkeypatch, tmp_path):
    """No token anywhere: not in the environment, not in the login cache."""
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    return tmp_path / "no_token"


def test_push_uploads_only_the_export_with_the_env_token_and_never_leaks_it(
        trained_run, tmp_path, monkeypatch, no_login, capsys, caplog):
    hub_calls = HubRecorder(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    folder = tmp_path / "push"
    caplog.set_level("DEBUG")
    rc = export_cli.main([str(trained_run), "--export_dir", str(folder), "--eval_clips", "1", "--push_to_hub",
                          "--hub_model_id", "someone/tiny-snac", "--private", "--revision", "v1",
                          "--commit_message", "first codec"])
    assert rc == 0
    (repo,), (branch,), (upload,) = hub_calls.named("create_repo"), hub_calls.named("create_branch"), \
        hub_calls.named("upload_folder")
    assert repo["repo_id"] == "someone/tiny-snac" and repo["private"] is True and repo["exist_ok"] is True
    assert repo["token"] == SENTINEL
    assert branch["branch"] == "v1" and branch["exist_ok"] is True
    assert upload["repo_id"] == "someone/tiny-snac" and upload["revision"] == "v1"
    assert upload["commit_message"] == "first codec" and upload["folder_path"] == str(folder)
    assert set(upload["uploaded"]) == EXPORT_FILES
    assert 'SNAC.from_pretrained("someone/tiny-snac")' in (folder / "README.md").read_text()

    out = capsys.readouterr()
    assert "someone/tiny-snac/commit/abc" in out.out
    written = [p for root in (folder, trained_run) for p in root.rglob("*") if p.is_file()]
    assert written
    for path in written:
        assert SENTINEL.encode() not in path.read_bytes(), path
    assert SENTINEL not in caplog.text + out.out + out.err


def test_training_pushes_its_export_at_the_end_and_without_a_token_keeps_it(tmp_path, monkeypatch, no_login,
                                                                            caplog):
    from snac_accel import train

    hub_calls = HubRecorder(monkeypatch)
    run = tmp_path / "run"
    options = dict(push_to_hub=True, hub_model_id="someone/tiny-snac", max_train_steps=1, train_batch_size=2,
                   segment_seconds=0.25, checkpointing_steps=0, validation_data_dir=None)
    caplog.set_level("ERROR")
    final = train(tiny_config(run, **options))  # no token: one error, no crash, the export stays
    assert hub_calls.calls == []
    assert "no Hugging Face token" in caplog.text and str(final) in caplog.text
    assert isinstance(snac.SNAC.from_pretrained(str(final)), snac.SNAC)
    assert (run / "checkpoints" / "checkpoint_1").is_dir()

    # With a token, the same run (resumed at its last step: nothing left to train) pushes its export.
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    assert train(tiny_config(run, resume_from_checkpoint="latest", **options)) == final
    (repo,), (upload,) = hub_calls.named("create_repo"), hub_calls.named("upload_folder")
    assert repo["repo_id"] == "someone/tiny-snac" and repo["token"] == SENTINEL
    # the run named no validation data: a held-out clip gives the card its figures, pushed with it
    assert upload["folder_path"] == str(final) and set(upload["uploaded"]) == {
        "config.json", "model.safetensors", "pytorch_model.bin", "README.md", "spectrogram.png", "codebook_usage.png"}


def test_push_reads_the_login_cache(exported, monkeypatch, no_login):
    hub_calls = HubRecorder(monkeypatch)
    no_login.write_text(SENTINEL)
    url = hub.push_to_hub(exported, "someone/codec")
    assert url.endswith("/commit/abc")
    (repo,) = hub_calls.named("create_repo")
    assert repo["token"] == SENTINEL and repo["private"] is False
    assert hub_calls.named("create_branch") == []  # no revision: the default branch


def test_push_without_a_token_fails_once_and_keeps_the_export(trained_run, tmp_path, monkeypatch, no_login, capsys):
    hub_calls = HubRecorder(monkeypatch)
    folder = tmp_path / "kept"
    rc = export_cli.main([str(trained_run), "--export_dir", str(folder), "--eval_clips", "0", "--push_to_hub",
                          "--hub_model_id", "someone/tiny-snac"])
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no Hugging Face token" in err and str(folder) in err
    assert hub_calls.calls == []
    assert {"config.json", "model.safetensors", "pytorch_model.bin", "README.md"} <= {p.name for p in folder.iterdir()}
    assert isinstance(snac.SNAC.from_pretrained(str(folder)), snac.SNAC)


def test_push_refuses_a_folder_that_is_not_an_export(tmp_path, monkeypatch):
    hub_calls = HubRecorder(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    with pytest.raises(hub.ExportError, match="not an export folder"):
        hub.push_to_hub(tmp_path, "someone/codec")
    assert hub_calls.calls == []


def test_training_data_is_described_from_the_run_config():
    from snac_accel.config import TrainConfig

    ids, words = card_lib.describe_training_data(TrainConfig(dataset_name="org/speech,org/music", train_split="train"))
    assert ids == ["org/speech", "org/music"] and "https://huggingface.co/datasets/org/music" in words
    demo = TrainConfig(dataset="demo")
    demo.apply_dataset_preset()
    assert card_lib.describe_training_data(demo) == ([], "the snac-accel demo clips (synthetic speech)")
    manifest = TrainConfig(train_file="/data/list.csv")
    assert card_lib.describe_training_data(manifest) == ([], "local manifest `list.csv`")
