"""`snac_accel.evaluate`: metrics of a real codec on real files, broken files counted, the CLI's JSON."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import snac
import torch
from torchcodec.decoders import AudioDecoder

from snac_accel import evaluate as ev
from snac_accel.hub import load_codec, save_pretrained
from snac_accel.model import build_generator

from .conftest import tiny_config


@pytest.fixture(scope="module")
def validation(demo_dir):
    return ev.open_source(str(demo_dir / "validation"))


def test_trained_codec_beats_its_untrained_start_on_held_out_clips(trained_run, validation, tmp_path):
    config = tiny_config(trained_run)
    torch.manual_seed(config.seed)
    untrained_dir = save_pretrained(build_generator(config.model_config), tmp_path / "untrained")
    kwargs = dict(max_clips=4, max_seconds=1.5, timing=False)
    before = ev.evaluate(load_codec(str(untrained_dir)), validation, **kwargs)
    after = ev.evaluate(load_codec(str(trained_run / "final")), validation, **kwargs)
    assert before["clips"] == after["clips"] == 4
    assert after["metrics"]["mel_distance"] < before["metrics"]["mel_distance"], (before["metrics"], after["metrics"])
    assert after["metrics"]["si_sdr"] > before["metrics"]["si_sdr"], (before["metrics"], after["metrics"])


def _broken_set(demo_dir, folder):
    """Two good clips, and three files training would skip: not audio, empty, silent."""
    from torchcodec.encoders import AudioEncoder

    folder.mkdir()
    good = sorted((demo_dir / "validation").glob("*.flac"))[:2]
    for path in good:
        shutil.copy(path, folder / path.name)
    (folder / "garbage.wav").write_bytes(b"RIFF" + bytes(range(256)) * 8)
    (folder / "empty.flac").write_bytes(b"")
    AudioEncoder(torch.zeros(1, 24000), sample_rate=24000).to_file(str(folder / "silent.wav"))
    return good


def test_cli_skips_broken_files_and_reports_rates_usage_and_speed(trained_run, demo_dir, tmp_path, capsys):
    good = _broken_set(demo_dir, tmp_path / "data")
    output = tmp_path / "out" / "eval.json"
    rc = ev.main([str(trained_run / "final"), str(tmp_path / "data"), "--output_json", str(output),
                  "--max_seconds", "1.0"])
    assert rc == 0
    result = json.loads(output.read_text())
    assert result["clips"] == 2 and result["bad_files"] == 3
    assert {row["name"].rsplit("/", 1)[-1] for row in result["files"]} == {p.name for p in good}
    problems = " ".join(result["bad_examples"])
    for name in ("garbage.wav", "empty.flac", "silent.wav: silent"):
        assert name in problems

    rates = result["bitrate"]
    assert rates["tokens_per_second"] == pytest.approx([24000 / 512 / s for s in (4, 2, 1)])
    assert rates["bitrate_bps"] == pytest.approx(656.25)
    frames = [sum(math.ceil(row["samples"] / (512 * s)) for row in result["files"]) for s in (4, 2, 1)]
    assert [lv["tokens"] for lv in result["codebooks"]] == frames
    # The codebook statistics are those of the files' own tokens, as `snac.SNAC` itself encodes them.
    reference = snac.SNAC.from_pretrained(str(trained_run / "final"))
    counts = torch.zeros(3, 256)
    for path in good:
        audio = AudioDecoder(str(path), sample_rate=24000, num_channels=1).get_all_samples().data[:, :24000]
        with torch.inference_mode():
            codes = reference.encode(audio[None])
        for level, stride in enumerate((4, 2, 1)):
            counts[level] += torch.bincount(codes[level][0, :math.ceil(audio.shape[-1] / (512 * stride))],
                                            minlength=256)
    for level, lv in enumerate(result["codebooks"]):
        p = counts[level][counts[level] > 0] / counts[level].sum()
        assert lv["tokens"] == counts[level].sum()
        assert lv["used_codes"] == int((counts[level] > 0).sum()) and lv["usage"] == lv["used_codes"] / 256
        assert lv["entropy_bits"] == pytest.approx(float(-(p * p.log2()).sum()), abs=1e-6)
        assert lv["perplexity"] == pytest.approx(2 ** lv["entropy_bits"])
    assert 0 <= rates["entropy_bound_bps"] <= rates["bitrate_bps"]
    assert result["speed"]["encode_rtf"] > 0 and result["speed"]["decode_rtf"] > 0
    assert set(result["metrics"]) >= {"mel_distance", "stft_distance", "si_sdr"}

    table = capsys.readouterr().out
    assert "mel distance" in table and "SI-SDR" in table and "encode RTF" in table and str(output) in table


def test_evaluation_is_repeatable_despite_decoder_noise(demo_dir, tmp_path):
    from snac_accel.config import MODEL_PRESETS

    torch.manual_seed(0)
    folder = save_pretrained(build_generator({**MODEL_PRESETS["tiny"], "noise": True}), tmp_path / "noisy")
    source = ev.open_source(str(sorted((demo_dir / "validation").glob("*.flac"))[0]))
    model = load_codec(str(folder))
    runs = [ev.evaluate(model, source, max_seconds=0.5, timing=False) for _ in range(2)]
    assert runs[0]["metrics"] == runs[1]["metrics"] and runs[0]["clips"] == 1

    # The codebook statistics are those of the file's own tokens.
    (_, raw), = ev.rows(source)
    audio, _ = ev.load_clip(raw, 24000, 12000, None)
    with torch.inference_mode():
        codes = model.encode(audio)
    for level, stats in enumerate(runs[0]["codebooks"]):
        counts = torch.bincount(codes[level][0, :stats["tokens"]], minlength=256).double()
        p = counts[counts > 0] / counts.sum()
        assert stats["used_codes"] == int((counts > 0).sum())
        assert stats["entropy_bits"] == pytest.approx(float(-(p * p.log2()).sum()), abs=1e-9)


def test_visqol_pesq_and_stoi_by_default_and_off_on_request(demo_dir):
    from snac_accel.config import MODEL_PRESETS

    torch.manual_seed(0)
    model = build_generator({**MODEL_PRESETS["tiny"], "noise": False}).eval()
    source = ev.open_source(str(demo_dir / "real_speech" / "cs_m_01.flac"))
    result = ev.evaluate(model, source, max_seconds=2.0, timing=False)
    assert result["metric_failures"] == {} and result["settings"]["visqol_mode"] == "speech"
    metrics = result["metrics"]
    # an untrained codec: near the bottom of each scale
    assert 1.0 <= metrics["visqol"] < 2.5 and 1.0 <= metrics["pesq_wb"] < 1.5 and -1.0 <= metrics["stoi"] < 0.7
    reference = ev.evaluate(model, source, max_seconds=2.0, timing=False, speech_metrics=False)
    assert not {"visqol", "pesq_wb", "stoi"} & set(reference["metrics"])
    assert reference["metrics"]["mel_distance"] == metrics["mel_distance"]
