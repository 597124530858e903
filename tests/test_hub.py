"""Export from accelerate checkpoints, the Hub folder, `load_codec`, and the push at the HfApi boundary."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import snac
import torch
import yaml
from safetensors.torch import load_file

from snac_accel import export as export_cli
from snac_accel import hub
from snac_accel.config import MODEL_PRESETS
from snac_accel.data import audio_dataset_from_files, list_audio_files
from snac_accel.model import build_generator

SENTINEL = "hf_SECRETsentinel0123456789abcdefXYZ"
EXPORT_FILES = {"config.json", "model.safetensors", "pytorch_model.bin", "README.md", "spectrogram.png"}


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


def test_model_card_states_what_a_user_needs(exported):
    card = (exported / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "snac" and "audio-codec" in meta["tags"]
    assert "datasets" not in meta  # local demo files are not Hub datasets
    n_params = sum(p.numel() for p in snac.SNAC.from_pretrained(str(exported)).parameters())
    for text in ("24000 Hz", "11.72, 23.44, 46.88 Hz", "0.656 kbps", f"{n_params:,}", "Steps: 30",
                 "demo clips", "2 validation clips", "mel_distance", "si_sdr", "](spectrogram.png)",
                 "SNAC.from_pretrained"):
        assert text in card, text


def test_spectrogram_is_a_png_of_original_over_reconstruction(exported):
    data = (exported / "spectrogram.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    Image = pytest.importorskip("PIL.Image")
    with Image.open(exported / "spectrogram.png") as image:
        image.load()
        width, height = image.size
    assert width > 100 and height > 100


def test_png_writer_round_trips_pixels(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    rgb = torch.randint(0, 256, (7, 5, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    hub.write_png(tmp_path / "x.png", rgb)
    with Image.open(tmp_path / "x.png") as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), rgb.numpy())


def test_card_lists_hub_datasets_and_base_model():
    model = build_generator(MODEL_PRESETS["tiny"])
    card = hub.model_card(model, {"datasets": ["keithito/lj_speech", None], "base_model": "hubertsiuzdak/snac_24khz",
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

    from snac_accel.trainer import TrainState

    torch.manual_seed(1)
    generator = build_generator({**MODEL_PRESETS["tiny"], "noise": False})
    accelerator = Accelerator()
    optimizer = torch.optim.AdamW(generator.parameters())
    generator, optimizer = accelerator.prepare(generator, optimizer)
    ema = AveragedModel(generator, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    ema.update_parameters(generator)  # the first update copies; the second one averages
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(0.1)
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

    ids, words = hub.describe_training_data(TrainConfig(dataset_name="org/speech,org/music", train_split="train"))
    assert ids == ["org/speech", "org/music"] and "https://huggingface.co/datasets/org/music" in words
    demo = TrainConfig(dataset="demo")
    demo.apply_dataset_preset()
    assert hub.describe_training_data(demo) == ([], "the snac-accel demo clips (synthetic speech)")
    assert hub.describe_training_data(TrainConfig(train_file="/data/list.csv")) == ([], "local manifest `list.csv`")
