"""The tokenized dataset on disk: what `snac_accel.encode` writes and `snac_accel.decode` reads.

A folder that ``datasets.load_dataset(DIR)`` loads (the card's ``configs`` point it at the shards):

- ``data/train-NNNNN.parquet``: shard N holds the usable rows among source rows
  [N * shard_size, (N + 1) * shard_size), whichever process encoded it;
- ``snac_codes.json``: the codec (source, config, sha256 of its weights), the data source, the
  layout, the settings that decide the codes (a rerun with other settings is refused), the totals
  and one entry per invocation (command, processes, speed);
- ``README.md``: the dataset card;
- ``.progress/shard-NNNNN.json``: written after its shard, so a shard counts as finished only once
  both exist; it lists the rows skipped as unusable. Hidden: not uploaded, not loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from accelerate.logging import get_logger

from ..checkpoints import resolve_checkpoint
from ..hub import HubTokenError, ensure_accelerate_state
from ..model import resolve_pretrained_folder
from .tokens import deinterleave, shift_levels

logger = get_logger(__name__)

INFO_FILE = "snac_codes.json"
PROGRESS_DIR = ".progress"
DATA_DIR = "data"
FORMAT_VERSION = 1


def shard_path(folder: Path, shard: int) -> Path:
    return folder / DATA_DIR / f"train-{shard:05d}.parquet"


def progress_path(folder: Path, shard: int) -> Path:
    return folder / PROGRESS_DIR / f"shard-{shard:05d}.json"


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary name and ``os.replace``: a kill leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_info(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {INFO_FILE}: is it a folder written by snac_accel.encode?")
    return json.loads(path.read_text())


def write_shard(folder: Path, shard: int, records: list[dict[str, Any]], layout: dict[str, Any], keep: list[str],
                source_features: Optional[Any]) -> Path:
    """One shard's rows as Parquet, through a temporary name. Column types: ours, and the source's for
    the kept columns (inferred when a stream does not say); the schema carries them for `datasets`."""
    import datasets
    import pyarrow.parquet as pq

    codes = datasets.List(datasets.Value(layout["dtype"]))
    features = datasets.Features({"index": datasets.Value("int64"), "id": datasets.Value("string"),
                                  "duration": datasets.Value("float64"), "num_samples": datasets.Value("int64"),
                                  **{c: codes for c in layout["columns"]}})
    known = source_features or {}
    if all(c in known for c in keep):
        table = datasets.Dataset.from_list(records, features=datasets.Features({**features,
                                                                               **{c: known[c] for c in keep}}))
    else:  # a stream that does not say: the kept columns' types are inferred
        table = datasets.Dataset.from_list(records)
        table = table.cast(datasets.Features({**table.features, **features}))
    path = shard_path(folder, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table.data.table, tmp)
    os.replace(tmp, path)
    return path


def finished_shards(folder: Path) -> dict[int, dict[str, Any]]:
    """Shard number -> its progress record, for every shard whose Parquet file and record both exist."""
    done = {}
    for record in sorted((folder / PROGRESS_DIR).glob("shard-*.json")):
        info = json.loads(record.read_text())
        if info["rows"] == 0 or shard_path(folder, info["shard"]).is_file():
            done[info["shard"]] = info
    return done


def weights_sha256(folder: Path) -> tuple[str, str]:
    """(file name, sha256) of the weight file a codec folder is loaded from (safetensors first)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            digest = hashlib.sha256()
            with open(folder / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            return name, digest.hexdigest()
    raise FileNotFoundError(f"{folder} holds no model.safetensors or pytorch_model.bin")


def codec_folder(codec: str) -> Path:
    """The local folder whose weights `snac_accel.hub.load_codec` reads for ``codec``."""
    path = Path(codec)
    if path.is_dir() and not (path / "config.json").is_file():
        return resolve_checkpoint(path)
    return resolve_pretrained_folder(codec)


def summarize(folder: Path, total_rows: Optional[int], shard_size: int) -> dict[str, Any]:
    """Totals over the finished shards, and whether they cover every source row."""
    done = finished_shards(folder)
    expected = None if total_rows is None else -(-total_rows // shard_size)
    skipped = [entry for info in done.values() for entry in info["skipped"]]
    return {
        "rows": sum(info["rows"] for info in done.values()),
        "source_rows": total_rows,
        "audio_seconds": sum(info["audio_seconds"] for info in done.values()),
        "shards": len(done), "expected_shards": expected,
        "complete": expected is not None and all(k in done for k in range(expected)),
        "skipped": len(skipped), "skipped_files": sorted(skipped),
    }


# ----------------------------------------------------------------------------- card


def dataset_card(info: dict[str, Any]) -> str:
    """README.md of the tokenized dataset: where the codes come from and how to read them."""
    codec, data, layout, summary = info["codec"], info["data"], info["layout"], info["summary"]
    # No `configs:` block: datasets would then cache a local folder under its name and that block alone, so
    # two folders named alike would load each other's rows. data/train-*.parquet is found by datasets' own
    # file patterns (split "train"), on the Hub as locally.
    metadata = {"tags": ["audio-tokens", "snac", "snac-accel"]}
    hub_source = data["data"] if not os.path.exists(data["data"]) else None
    if hub_source:
        metadata["source_datasets"] = [hub_source]
    rates = codec["tokens_per_second"]
    hours = summary["audio_seconds"] / 3600
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "",
             f"# SNAC codes of {Path(data['data']).name if not hub_source else hub_source}", "",
             f"Audio tokenized with a [SNAC](https://github.com/hubertsiuzdak/snac) codec by `snac_accel.encode`: "
             f"{summary['rows']:,} rows, {hours:.3f} hours of audio.", "",
             "## Codec", "", "| property | value |", "| --- | --- |",
             f"| codec | `{codec['source']}` |",
             f"| weights | `{codec['weights_file']}`, sha256 `{codec['sha256']}` |",
             f"| sample rate | {codec['sample_rate']} Hz, mono (sources resampled and mixed down) |",
             f"| levels | {len(rates)} (strides {', '.join(map(str, codec['config']['vq_strides']))}) |",
             f"| token rates | {', '.join(f'{r:.2f}' for r in rates)} Hz ({sum(rates):.2f} tokens/s in all) |",
             f"| codebook | {codec['config']['codebook_size']} entries |",
             f"| bitrate | {codec['bitrate_bps'] / 1000:.3f} kbps |", "",
             "<details><summary>codec config.json</summary>", "", "```json",
             json.dumps(codec["config"], indent=2), "```", "</details>", "",
             "## Data", "",
             f"- Source: `{data['data']}`" + "".join(f", {k} `{data[k]}`" for k in (
                 "dataset_config_name", "split", "revision") if data.get(k) and hub_source),
             f"- Rows: {summary['rows']:,} of {summary['source_rows'] if summary['source_rows'] is not None else '?'} "
             f"source rows; {summary['skipped']} unusable files skipped",
             f"- Audio: {summary['audio_seconds']:.1f} s ({hours:.3f} hours)",
             f"- Columns: `index` (source row), `id` ({data['id_description']}), `duration` (s), "
             f"`num_samples` (at {codec['sample_rate']} Hz), {', '.join(f'`{c}`' for c in layout['columns'])} "
             f"({layout['dtype']})" + "".join(f", `{c}`" for c in data["keep_columns"]),
             "", "## Layout", "", layout_words(info), ""]
    if summary["skipped_files"]:
        lines += ["## Skipped files", "", f"{summary['skipped']} rows could not be used:", ""]
        lines += [f"- row {index}: `{name}`: {problem}" for index, name, problem in summary["skipped_files"][:200]]
        if summary["skipped"] > 200:
            lines.append(f"- ... and {summary['skipped'] - 200} more (see `{INFO_FILE}`)")
        lines.append("")
    lines += ["## Commands", ""]
    for run in info["runs"]:
        lines += ["```bash", run["command"], "```",
                  f"{run['processes']} process(es), {run['audio_seconds']:.1f} s of audio encoded in "
                  f"{run['seconds']:.1f} s ({run['audio_seconds'] / max(run['seconds'], 1e-9):.1f} s of audio per "
                  f"second, {run.get('cpu_seconds', 0):.1f} CPU s), on {run['device']}.", ""]
    lines += ["## Usage", "", "```python", "from datasets import load_dataset", "",
              f"codes = load_dataset(\"{hub_source and 'REPO_ID' or 'PATH'}\", split=\"train\")", "```", "",
              "Decode rows back to audio: `python -m snac_accel.decode PATH --rows 4 --output_dir wavs` "
              "(`--check N` measures them against the sources).", ""]
    return "\n".join(lines)


def layout_words(info: dict[str, Any]) -> str:
    layout = info["layout"]
    offsets = layout["offsets"]
    if layout["layout"] == "levels":
        text = ("One list per level, coarse first: `codes_k[i]` is the code of frame i of level k, as "
                "`snac.SNAC.encode` returns them (the last frames cover SNAC's zero padding).")
        return text + (f" Offsets added per level: {offsets}." if offsets else "")
    order = ", ".join(str(level) for level, _ in layout["positions"])
    text = (f"`codes` is one flat list, {len(layout['positions'])} tokens per coarse frame, interleaved depth "
            f"first, coarse to fine: levels {order}.")
    return text + (f" Offsets added per position: {offsets}." if offsets else "")


# ----------------------------------------------------------------------------- reading back


def row_codes(row: dict[str, Any], info: dict[str, Any]) -> list[torch.Tensor]:
    """Per-level codes of one row ([T_k] each, offsets removed), whatever the layout."""
    layout = info["layout"]
    strides = info["codec"]["config"]["vq_strides"]
    if layout["layout"] == "frames":
        return deinterleave(torch.as_tensor(row["codes"]), strides, layout["offsets"])
    levels = [torch.as_tensor(row[f"codes_{k}"]) for k in range(len(strides))]
    offsets = layout["offsets"]
    return shift_levels(levels, None if offsets is None else offsets[:len(strides)], sign=-1)


def load_codes(folder: str | os.PathLike) -> Any:
    """The tokenized rows as a `datasets.Dataset`, in source order."""
    import datasets

    files = sorted(str(p) for p in (Path(folder) / DATA_DIR).glob("train-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no {DATA_DIR}/train-*.parquet shards")
    return datasets.load_dataset("parquet", data_files=files, split="train")


# ----------------------------------------------------------------------------- push


def push_dataset(folder: str | os.PathLike, repo_id: str, private: bool = False,
                 commit_message: str = "Upload SNAC codes") -> str:
    """Upload the dataset folder (not ``.progress``) to a dataset repo; returns the commit URL.

    The token comes from HF_TOKEN or the login cache, as for models, and goes only to `HfApi`.
    """
    from huggingface_hub import HfApi, get_token

    ensure_accelerate_state()
    token = get_token()
    if not token:
        raise HubTokenError(f"no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again "
                            f"(python -m snac_accel.encode ... reruns only the push); the codes stay in {folder}")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    repo_id = getattr(repo, "repo_id", None) or repo_id
    commit = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder),
                               commit_message=commit_message, ignore_patterns=[".*", "**/.*"])
    url = str(getattr(commit, "commit_url", None) or commit)
    logger.info(f"pushed {folder} to the dataset repo {repo_id}: {url}")
    return url


def command_line(argv: Sequence[str], processes: int) -> str:
    """The command as typed, as well as it can be told: the launcher's own line when there is one."""
    if processes > 1:
        try:
            parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
            words = [w.decode() for w in parent if w]
            for i, word in enumerate(words):
                if Path(word).name in ("accelerate", "torchrun"):
                    return shlex.join([Path(word).name, *words[i + 1:]])
        except OSError:
            pass
        return shlex.join(["accelerate", "launch", "--num_processes", str(processes), "-m", "snac_accel.encode",
                           *argv])
    return shlex.join(["python", "-m", "snac_accel.encode", *argv])
