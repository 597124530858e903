"""The "paper row": one line per codec and data set with the figures codec papers print.

Bitrate (kbps), tokens per second, ViSQOL, PESQ-WB, STOI, SI-SDR, mel and STFT distance, codebook
usage per level and bitrate efficiency, as text (one line), JSON (a dict) and a Markdown table.
`evaluate` prints it, the model card carries it beside the SNAC paper's published row for the same
sample rate, labelled as published figures on other data: a codec trained here is then read against
a published table, knowing the data differ.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Optional

from .config import MODEL_PRESETS

# What the SNAC paper (arXiv 2410.14411) reports, as published. None: not reported there.
PUBLISHED = {
    24000: {"codec": "SNAC 24 kHz, published", "preset": "snac_24khz",
            "data": "speech (DAPS), other data than this row's", "visqol": 4.14, "visqol_mode": "speech",
            "si_sdr": 0.82, "mel_distance": 1.50, "stft_distance": 1.78},
    44100: {"codec": "SNAC 44 kHz ablation (batch 8, 250k it.), published", "preset": "snac_44khz",
            "data": "general audio, other data than this row's", "visqol": 4.00, "visqol_mode": "audio",
            "si_sdr": 3.95, "mel_distance": 1.38, "stft_distance": 1.62},
}
FIELDS = ("codec", "data", "kbps", "tokens_per_second", "visqol", "pesq_wb", "stoi", "si_sdr", "mel_distance",
          "stft_distance", "codebook_usage", "efficiency")
HEADERS = {"codec": "codec", "data": "data", "kbps": "kbps", "tokens_per_second": "tokens/s", "visqol": "ViSQOL",
           "pesq_wb": "PESQ-WB", "stoi": "STOI", "si_sdr": "SI-SDR dB", "mel_distance": "mel",
           "stft_distance": "STFT", "codebook_usage": "codebook usage", "efficiency": "efficiency"}
METRICS = ("visqol", "pesq_wb", "stoi", "si_sdr", "mel_distance", "stft_distance")


def codec_rates(config: dict[str, Any]) -> dict[str, Any]:
    """Token rate per level (coarse first), bits per token and the bitrate of a SNAC config."""
    hop = math.prod(config["encoder_rates"])
    rates = [config["sampling_rate"] / hop / stride for stride in config["vq_strides"]]
    bits = math.log2(config["codebook_size"])
    return {"tokens_per_second": rates, "bits_per_token": bits, "bitrate_bps": sum(rates) * bits}


def _key(metrics: dict[str, Any], name: str) -> Optional[float]:
    """``name`` or ``prefix/name`` (validation's ``val/`` keys) of a flat metrics dict."""
    for key, value in metrics.items():
        if key.split("/", 1)[-1] == name and isinstance(value, (int, float)):
            return float(value)
    return None


def paper_row(codec: str, data: str, config: dict[str, Any], metrics: dict[str, Any],
              visqol_mode: Optional[str] = None) -> dict[str, Any]:
    """The row of one codec (its config: rates) on one data set, from flat metrics: ``mel_distance``,
    ``visqol``, ..., and ``codebook_usage_levelN`` / ``codebook_efficiency_levelN`` (``val/`` prefixes
    allowed). Missing metrics are None. Efficiency is the token-rate weighted mean of the levels'
    (entropy / log2 codebook size), i.e. the entropy bound over the bitrate."""
    rates = codec_rates(config)
    usage, level_efficiency = [], []
    for level in itertools.count():
        found = _key(metrics, f"codebook_usage_level{level}"), _key(metrics, f"codebook_efficiency_level{level}")
        if None in found:
            break
        usage.append(found[0])
        level_efficiency.append(found[1])
    per_level = rates["tokens_per_second"]
    efficiency = (sum(r * e for r, e in zip(per_level, level_efficiency)) / sum(per_level)
                  if len(level_efficiency) == len(per_level) else None)
    row = {"codec": codec, "data": data, "kbps": rates["bitrate_bps"] / 1000,
           "tokens_per_second": sum(per_level), **{name: _key(metrics, name) for name in METRICS},
           "visqol_mode": visqol_mode, "codebook_usage": usage or None, "efficiency": efficiency}
    return row


def published_row(sample_rate: int) -> Optional[dict[str, Any]]:
    """The SNAC paper's row for a codec of this sample rate (rates from the released model), or None."""
    published = PUBLISHED.get(int(sample_rate))
    if published is None:
        return None
    rates = codec_rates(MODEL_PRESETS[published["preset"]])
    row = {name: None for name in FIELDS}
    row.update({k: v for k, v in published.items() if k != "preset"})
    row.update(kbps=rates["bitrate_bps"] / 1000, tokens_per_second=sum(rates["tokens_per_second"]))
    return row


def _cell(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None:
        return "-"
    if name == "codebook_usage":
        return "/".join(f"{100 * u:.0f}" for u in value) + "%"
    if name == "visqol" and row.get("visqol_mode"):
        return f"{value:.2f} ({row['visqol_mode']})"
    if name == "tokens_per_second":
        return f"{value:.1f}"
    if name == "si_sdr":
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.3f}" if name in ("kbps", "efficiency", "stoi") else f"{value:.2f}"
    return str(value)


def format_text(row: dict[str, Any]) -> str:
    """One line: ``codec on data: 0.656 kbps, 82.0 tokens/s, ViSQOL ..., efficiency ...``."""
    parts = [f"{_cell(row, 'kbps')} kbps", f"{_cell(row, 'tokens_per_second')} tokens/s"]
    parts += [f"{HEADERS[name]} {_cell(row, name)}" for name in FIELDS[4:]]
    return f"{row['codec']} on {row['data']}: " + ", ".join(parts)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as one Markdown table, one column per field."""
    lines = ["| " + " | ".join(HEADERS[name] for name in FIELDS) + " |", "|" + " --- |" * len(FIELDS)]
    lines += ["| " + " | ".join(_cell(row, name) for name in FIELDS) + " |" for row in rows]
    return "\n".join(lines)
