"""The paper row: its fields from a real export on real speech, the CLI's text/JSON/Markdown, and the model
card's row equal to `evaluate`'s on the same weights."""

from __future__ import annotations

import json

import pytest

from snac_accel import evaluate as ev
from snac_accel.checkpoints import resolve_checkpoint, training_config
from snac_accel.export import export_checkpoint
from snac_accel.hub import load_codec
from snac_accel.paper import FIELDS, markdown_table, published_row


def test_paper_row_of_a_real_export_on_real_speech(trained_run, demo_dir, tmp_path, capsys):
    output, table = tmp_path / "eval.json", tmp_path / "row.md"
    rc = ev.main([str(trained_run / "final"), str(demo_dir / "real_speech"), "--max_clips", "3", "--max_seconds",
                  "1.5", "--output_json", str(output), "--output_markdown", str(table)])
    assert rc == 0
    result = json.loads(output.read_text())
    row = result["paper_row"]
    assert set(FIELDS) <= set(row)
    assert all(row[name] is not None for name in FIELDS), row
    assert row["kbps"] == pytest.approx(0.65625) and row["tokens_per_second"] == pytest.approx(24000 / 512 * 1.75)
    assert row["visqol_mode"] == "speech" and 1.0 <= row["visqol"] <= 5.0 and 1.0 <= row["pesq_wb"] <= 4.65
    for name in ("visqol", "pesq_wb", "stoi", "si_sdr", "mel_distance", "stft_distance"):
        assert row[name] == pytest.approx(result["metrics"][name])
    assert row["codebook_usage"] == pytest.approx([lv["usage"] for lv in result["codebooks"]])
    assert row["efficiency"] == pytest.approx(result["bitrate"]["efficiency"])
    assert result["published_row"]["visqol"] == 4.14 and result["published_row"]["si_sdr"] == 0.82

    printed = capsys.readouterr().out
    assert "paper row:\nfinal on real_speech (3 files): 0.656 kbps, 82.0 tokens/s, ViSQOL " in printed
    assert "SNAC 24 kHz, published" in printed
    lines = table.read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| codec | data | kbps | tokens/s | ViSQOL | PESQ-WB | STOI")
    assert "| final | real_speech (3 files) | 0.656 | 82.0 |" in lines[2] and "4.14 (speech)" in lines[3]


def test_card_row_matches_evaluate_on_the_same_weights(trained_run, tmp_path):
    folder = export_checkpoint(trained_run, tmp_path / "export", evaluate_clips=3)
    card = (folder / "README.md").read_text()
    assert "## Paper row" in card and "as published: other data" in card
    card_rows = [line for line in card.splitlines() if line.startswith("| ") and "(speech)" in line]
    assert len(card_rows) == 2  # this codec's and the published one
    config = training_config(resolve_checkpoint(trained_run, "best"))
    source = ev.open_source(config.validation_data_dir)
    result = ev.evaluate(load_codec(str(folder)), source, max_clips=3, max_seconds=config.validation_seconds,
                         target_loudness=config.target_loudness, timing=False)
    expected = markdown_table([ev.evaluation_row(result, "x", "y"), published_row(24000)]).splitlines()[2:]
    cells = [row.split(" | ")[2:] for row in card_rows]  # past codec and data
    assert cells == [row.split(" | ")[2:] for row in expected]
