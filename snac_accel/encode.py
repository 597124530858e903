"""Tokenize an audio dataset: ``accelerate launch -m snac_accel.encode CODEC DATA --output_dir DIR``.

CODEC is anything `snac_accel.hub.load_codec` reads; DATA anything the trainer reads (Hub id with
``--dataset_config_name``/``--split``, a local dataset folder, an audio folder or file, a CSV/JSONL
manifest; ``--streaming``). The output is described in `snac_accel.tokenizer.codes`.

- Split: source row i belongs to shard i // shard_size, and shard N to process N % processes, so
  the shards (names and contents) do not depend on the number of processes: a 2-process run writes
  the rows of a 1-process run, and a run killed with N processes resumes with any number.
- Resume: a rerun skips finished shards (their rows are not even decoded) and redoes the others;
  a shard is written to a temporary name and renamed, so a kill never leaves half a shard.
- Long files are cut into chunks of ``--chunk_seconds`` plus a context on each side that covers
  the encoder's receptive field; chunk edges sit on SNAC's padding grid (hop x lcm(stride_0,
  attention window)), so attention windows and pooled frames line up with a one-pass encode and
  only each chunk's centre is kept. The codes equal one-pass codes up to float rounding.
- Batches hold clips (or chunks) of the same padded length only: SNAC pads every input with zeros
  to that grid, and zeros beyond it change the last codes (measured: the last 1 to 6 frames).
  On a CPU, where batches make the encoder memory-bound, the loader's workers encode their rows
  one at a time, one thread each, instead (`snac_accel.tokenizer.chunks.RowEncoder`).
- Mixed precision (``--mixed_precision bf16``) runs the encoder under autocast; the quantizer always
  runs in float32 (a nearest-code search in half precision picks other codes).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate.logging import get_logger

from . import data as data_lib
from .card import codec_rates
from .config import _choice
from .hub import load_codec
from .tokenizer import codes as codes_lib
from .tokenizer.chunks import Batcher, ChunkPlan, Piece, RowEncoder, available_cores, cpu_autocast, encode_batch
from .tokenizer.source_rows import MapRows, RowReader, SourceError, StreamRows, identity, local_path, open_rows
from .tokenizer.tokens import (LAYOUTS, LayoutError, code_dtype, frame_positions, interleave, parse_offsets,
                               shift_levels)

logger = get_logger(__name__)


class EncodeError(ValueError):
    """An option or the output folder does not allow the run; nothing was encoded."""


@dataclass
class EncodeConfig:
    """Options of ``snac_accel.encode``; CODEC and DATA are positional."""

    output_dir: str = _choice("Folder of the tokenized dataset (created; a rerun resumes it).", None)
    split: str = _choice("Split of a Hub dataset or dataset folder.", "train")
    dataset_config_name: Optional[str] = _choice("Config of a Hub dataset.", None)
    revision: Optional[str] = _choice("Revision of a Hub dataset.", None)
    audio_column: str = _choice("Audio column of a dataset.", "audio")
    path_column: str = _choice("Column of a CSV/JSONL manifest holding file paths.", "path")
    streaming: bool = _choice("Stream the dataset instead of downloading it (every process reads the whole "
                              "stream and decodes only its own rows).", False)
    id_column: str = _choice("Column copied to `id` when the source has it; otherwise the file path.", "id")
    keep_columns: Optional[str] = _choice("Comma-separated source columns carried along (transcripts, speakers).",
                                          None)
    layout: str = _choice("levels: one list per level (codes_0, codes_1, ...); frames: one flat list per row, "
                          "interleaved frame by frame, coarse to fine.", "levels", list(LAYOUTS))
    level_offsets: Optional[str] = _choice("Offsets added to the tokens: one per level, one per position of a "
                                           "coarse frame (frames layout), or BASE+STEPk.", None)
    shard_size: int = _choice("Source rows per output shard (the unit of work and of resume).", 500)
    batch_size: int = _choice("Most clips or chunks per batch.", 32)
    max_batch_seconds: Optional[float] = _choice(
        "Most audio per batch, in seconds. Default: 120 on a GPU; on a CPU 10, or one clip at a time when the "
        "process has one thread (batches then only add memory traffic: measured 2 to 3x slower at 32 clips).", None)
    chunk_seconds: float = _choice("Files longer than this are encoded in chunks of it (plus context).", 30.0)
    max_seconds: Optional[float] = _choice("Cut files longer than this (default: encode them whole).", None)
    mixed_precision: str = _choice("Autocast of the encoder; the quantizer stays float32.", "no",
                                   ["no", "bf16", "fp16"])
    use_ema: bool = _choice("With a training checkpoint: its EMA weights.", False)
    dataloader_num_workers: Optional[int] = _choice(
        "Loader workers per process. On a GPU they decode (default: the cores left); on a CPU each also encodes "
        "its rows, one thread each (default: this process's share of the cores; 0 encodes in batches in the "
        "process itself).", None)
    push_to_hub: Optional[str] = _choice("Upload the folder to this dataset repo at the end (token: HF_TOKEN "
                                         "or the login cache).", None)
    private: bool = _choice("Create the dataset repo private.", False)
    codec: str = field(init=False, default="")
    data: str = field(init=False, default="")


def parse_args(argv: Optional[list[str]] = None) -> EncodeConfig:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(EncodeConfig, prog="python -m snac_accel.encode",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("codec_source", metavar="CODEC", help="export folder, SNAC folder or Hub id, checkpoint")
    parser.add_argument("data_source", metavar="DATA", help="Hub dataset id or folder, audio folder/file, manifest")
    config, rest = parser.parse_args_into_dataclasses(argv)
    config.codec, config.data = rest.codec_source, rest.data_source
    return config


# ----------------------------------------------------------------------------- the run


@dataclass
class OpenShard:
    """The rows of one shard while its pieces are being encoded."""

    shard: int
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    skipped: list[list[Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


class DatasetEncoder:
    """One process's share of a tokenization run; the main process also writes the info and the card."""

    def __init__(self, config: EncodeConfig, argv: list[str]) -> None:
        from accelerate import Accelerator

        self.config, self.argv = config, argv
        self._check_options()
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision)
        self._check_launch()
        self.model = load_codec(config.codec, device=self.accelerator.device, use_ema=config.use_ema)
        self.strides = list(self.model.vq_strides)
        self.plan = ChunkPlan(self.model, config.chunk_seconds)
        self.offsets = parse_offsets(config.level_offsets, self.strides, config.layout)
        if config.layout == "frames":
            frame_positions(self.strides)  # refuses strides that do not nest
        self.dtype = code_dtype(int(self.model.codebook_size), self.offsets)
        self.sources = open_rows(config)
        self.streaming = any(not hasattr(ds, "__len__") for _, ds in self.sources)
        self.total_rows = None if self.streaming else sum(len(ds) for _, ds in self.sources)
        self.output = Path(config.output_dir)
        self.keep = data_lib.split_option(config.keep_columns)
        self.info = self._describe()
        self.batcher = Batcher(self.plan, config.batch_size, int(self._batch_seconds() * self.model.sampling_rate))
        self.tracker = data_lib.BadFileTracker(max_fraction=1.0)

    # ------------------------------------------------------------------ checks

    def _check_options(self) -> None:
        config = self.config
        if not config.output_dir:
            raise EncodeError("--output_dir is required")
        for name, value in [("CODEC", config.codec)] + [("DATA", part) for part in data_lib.split_option(config.data)]:
            if not Path(value).exists() and (value.startswith((".", "/", "~")) or value.count("/") > 1):
                raise EncodeError(f"{name} {value}: no such file or folder, and not a Hub id (owner/name)")
        for name in ("shard_size", "batch_size"):
            if getattr(config, name) < 1:
                raise EncodeError(f"--{name} must be at least 1")
        if config.chunk_seconds <= 0 or (config.max_batch_seconds is not None and config.max_batch_seconds < 0):
            raise EncodeError("--chunk_seconds must be positive and --max_batch_seconds not negative")
        if config.push_to_hub:
            from huggingface_hub import get_token

            if not get_token():
                raise codes_lib.HubTokenError("--push_to_hub: no Hugging Face token: set HF_TOKEN or run "
                                              "`hf auth login` first (nothing was encoded)")

    def _batch_seconds(self) -> float:
        """``--max_batch_seconds`` or its default for the device (0: every clip or chunk alone)."""
        if self.config.max_batch_seconds is not None:
            return self.config.max_batch_seconds
        if self.accelerator.device.type != "cpu":
            return 120.0
        return 10.0 if torch.get_num_threads() > 1 else 0.0

    def _check_launch(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != self.accelerator.num_processes:
            raise EncodeError(f"launched as {world} processes but accelerate formed a group of "
                              f"{self.accelerator.num_processes}: on a machine without GPUs set ACCELERATE_USE_CPU=1 "
                              "(or use launch.sh encode --accelerate-config cpu)")

    def _describe(self) -> dict[str, Any]:
        """What decides the codes (compared on resume) and what the card reports."""
        config, model = self.config, self.model
        weights_file, sha256 = codes_lib.weights_sha256(codes_lib.codec_folder(config.codec))
        rates = codec_rates(model.config)
        local_codec, local_data = local_path(config.codec), local_path(config.data)
        columns = ["codes"] if config.layout == "frames" else [f"codes_{k}" for k in range(len(self.strides))]
        return {
            "format_version": codes_lib.FORMAT_VERSION,
            "codec": {"source": str(local_codec or config.codec), "config": model.config, "ema": config.use_ema,
                      "weights_file": weights_file, "sha256": sha256, "sample_rate": int(model.sampling_rate),
                      "hop_length": self.plan.hop, "tokens_per_second": rates["tokens_per_second"],
                      "bitrate_bps": rates["bitrate_bps"]},
            "data": {"data": str(local_data or config.data), "split": config.split,
                     "dataset_config_name": config.dataset_config_name, "revision": config.revision,
                     "audio_column": config.audio_column, "path_column": config.path_column,
                     "id_column": config.id_column, "keep_columns": self.keep,
                     "id_description": f"the source's `{config.id_column}` column, else the file path"},
            "layout": {"layout": config.layout, "offsets": self.offsets, "columns": columns, "dtype": self.dtype.name,
                       "positions": frame_positions(self.strides) if config.layout == "frames" else None},
            "read": {"streaming": self.streaming},  # how the rows were read: not compared on resume
            "encoding": {"shard_size": config.shard_size, "grid": self.plan.grid, "chunk_samples": self.plan.chunk,
                         "context_samples": self.plan.context, "max_seconds": config.max_seconds,
                         "mixed_precision": config.mixed_precision},
        }

    def _prepare_output(self) -> list[dict[str, Any]]:
        """Refuse a folder holding codes of other settings; returns the earlier runs' records."""
        settings = json.loads(json.dumps(self.info))
        path = self.output / codes_lib.INFO_FILE
        runs: list[dict[str, Any]] = []
        if path.is_file():
            old = json.loads(path.read_text())
            changed = [k for k in settings if k not in ("format_version", "read") and old.get(k) != settings[k]]
            if changed:
                raise EncodeError(f"{self.output} holds codes made with other {' and '.join(changed)} settings: "
                                  "rerun with the same options to resume, or choose a new --output_dir")
            runs = old.get("runs", [])
        elif self.accelerator.is_main_process:
            codes_lib.write_atomic(path, json.dumps({**settings, "summary": None, "runs": []}, indent=2) + "\n")
        if self.accelerator.is_main_process:  # what a killed run was writing; nobody writes before the barrier
            for stale in self.output.rglob(".*.tmp*"):
                stale.unlink()
        self.accelerator.wait_for_everyone()
        return runs

    # ------------------------------------------------------------------ encoding

    def run(self) -> Optional[dict[str, Any]]:
        """Encode this process's unfinished shards; the main process then writes the card (and pushes).

        Returns the summary on the main process, None on the others. An error of the main
        process's last step is raised after the final barrier, so that no process waits forever.
        """
        from accelerate.utils import gather_object

        start, cpu_start = time.perf_counter(), cpu_seconds()
        runs = self._prepare_output()
        audio_seconds, total_rows = self._encode_my_shards()
        self.accelerator.wait_for_everyone()
        seconds = time.perf_counter() - start
        mine = (audio_seconds, total_rows, cpu_seconds() - cpu_start)
        gathered = gather_object([mine]) if self.accelerator.num_processes > 1 else [mine]
        summary, error = None, None
        if self.accelerator.is_main_process:
            total = self.total_rows if self.total_rows is not None else max(t for _, t, _ in gathered)
            try:
                summary = self._finish(runs, seconds, sum(a for a, _, _ in gathered), total,
                                       sum(c for _, _, c in gathered))
            except (EncodeError, OSError, RuntimeError) as err:  # incomplete shards, a failed push
                error = err
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if error is not None:
            raise error
        return summary

    def _my_shards(self, done: set[int]) -> Any:
        world, rank, size = self.accelerator.num_processes, self.accelerator.process_index, self.config.shard_size
        return lambda index: (index // size) % world == rank and index // size not in done

    def _loader(self, mine: Any) -> tuple[torch.utils.data.DataLoader, Optional[int]]:
        config = self.config
        reader = RowReader(int(self.model.sampling_rate),
                           int(config.max_seconds * self.model.sampling_rate) if config.max_seconds else 1 << 62,
                           config.id_column, self.keep)
        workers, cpu = config.dataloader_num_workers, self.accelerator.device.type == "cpu"
        if workers is None:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            workers = max(1, available_cores() // local) if cpu else data_lib.default_num_workers(local)
        if cpu and workers > 0:
            reader.encoder = RowEncoder(self.model, self.plan, functools.partial(cpu_autocast, config.mixed_precision))
        if self.streaming:
            rows: Any = StreamRows(self.sources, mine, reader)
            workers, total = min(workers, 1), None  # one reader of the stream (datasets splits it among workers)
        else:
            rows = MapRows(self.sources, [i for i in range(self.total_rows) if mine(i)], reader)
            total = len(rows)
        loader = torch.utils.data.DataLoader(rows, batch_size=None, collate_fn=identity, num_workers=workers,
                                             pin_memory=self.accelerator.device.type == "cuda")
        return loader, total

    def _encode_my_shards(self) -> tuple[float, Optional[int]]:
        from tqdm.auto import tqdm

        done = set(codes_lib.finished_shards(self.output))
        loader, total = self._loader(self._my_shards(done))
        audio_seconds, total_rows, current = 0.0, None, None
        bar = tqdm(total=total, desc="encoding rows", unit="row", disable=not self.accelerator.is_main_process)
        for item in loader:
            if "end" in item:
                total_rows = item["end"]
                break
            shard = item["index"] // self.config.shard_size
            if current is not None and current.shard != shard:
                audio_seconds += self._close(current)
                current = None
            current = current or OpenShard(shard)
            self._add(current, item)
            bar.update(1)
        if current is not None:
            audio_seconds += self._close(current)
        bar.close()
        return audio_seconds, total_rows

    def _add(self, shard: OpenShard, item: dict[str, Any]) -> None:
        audio = item.pop("audio")
        if "codes" in item:  # encoded in a loader worker
            shard.rows[item["index"]] = {**item, "parts": [item.pop("codes")]}
            return
        if audio is None:
            shard.skipped.append([item["index"], item["name"], item["problem"]])
            self.tracker.update([f"{item['name']}: {item['problem']}"], 0)
            return
        pieces = self.plan.pieces(item["index"], audio.shape[-1])
        shard.rows[item["index"]] = {**item, "length": audio.shape[-1], "parts": [None] * len(pieces)}
        for piece in pieces:
            for batch in self.batcher.add(piece, audio[piece.start:piece.end]):
                self._encode(shard, batch)

    def _encode(self, shard: OpenShard, batch: list[tuple[Piece, torch.Tensor]]) -> None:
        length = self.plan.padded(max(audio.shape[-1] for _, audio in batch))
        x = torch.zeros(len(batch), 1, length)
        for j, (_, audio) in enumerate(batch):
            x[j, 0, :audio.shape[-1]] = audio
        codes = encode_batch(self.model, x.to(self.accelerator.device), self.accelerator.autocast())
        for j, (piece, _) in enumerate(batch):
            row = shard.rows[piece.index]
            row["parts"][piece.part] = self.plan.keep(piece, row["length"], [c[j] for c in codes])

    def _close(self, shard: OpenShard) -> float:
        """Encode what waits, then write the shard and its progress record."""
        for batch in self.batcher.drain():
            self._encode(shard, batch)
        records = [self._record(shard.rows[index]) for index in sorted(shard.rows)]
        seconds = sum(r["duration"] for r in records)
        if records:
            codes_lib.write_shard(self.output, shard.shard, records, self.info["layout"], self.keep,
                                  self.sources[0][1].features)
        indices = range(shard.shard * self.config.shard_size, (shard.shard + 1) * self.config.shard_size)
        progress = {"shard": shard.shard, "first_index": indices.start, "rows": len(records),
                    "audio_seconds": seconds, "skipped": shard.skipped, "rank": self.accelerator.process_index,
                    "seconds": time.perf_counter() - shard.started}
        codes_lib.write_atomic(codes_lib.progress_path(self.output, shard.shard), json.dumps(progress) + "\n")
        if shard.skipped:
            logger.warning(f"shard {shard.shard}: {len(shard.skipped)} unusable files skipped", main_process_only=False)
        return seconds

    def _record(self, row: dict[str, Any]) -> dict[str, Any]:
        levels = [torch.cat([part[k] for part in row["parts"]]) for k in range(len(self.strides))]
        sample_rate = int(self.model.sampling_rate)
        record = {"index": row["index"], "id": row["id"], "duration": row["length"] / sample_rate,
                  "num_samples": row["length"]}
        if self.config.layout == "frames":
            record["codes"] = interleave(levels, self.strides, self.offsets).numpy().astype(self.dtype)
        else:
            for k, level in enumerate(shift_levels(levels, self.offsets)):
                record[f"codes_{k}"] = level.numpy().astype(self.dtype)
        record.update(row["columns"])
        return record

    # ------------------------------------------------------------------ the end

    def _finish(self, runs: list[dict[str, Any]], seconds: float, audio_seconds: float, total_rows: Optional[int],
                cpu: float) -> dict[str, Any]:
        """Totals, the info file and the card (main process, after every process is done); the push."""
        summary = codes_lib.summarize(self.output, total_rows, self.config.shard_size)
        device = self.accelerator.device
        run = {"command": codes_lib.command_line(self.argv, self.accelerator.num_processes),
               "processes": self.accelerator.num_processes, "seconds": seconds, "audio_seconds": audio_seconds,
               "cpu_seconds": cpu,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} "
               f"({torch.get_num_threads()} threads per process)", "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        info = {**self.info, "summary": summary, "runs": runs + [run]}
        codes_lib.write_atomic(self.output / codes_lib.INFO_FILE, json.dumps(info, indent=2) + "\n")
        codes_lib.write_atomic(self.output / "README.md", codes_lib.dataset_card(info))
        logger.info(f"{summary['rows']} rows ({summary['audio_seconds'] / 3600:.3f} h) in {self.output}, "
                    f"{summary['skipped']} unusable files skipped; this run encoded {audio_seconds:.1f} s of audio in "
                    f"{seconds:.1f} s ({audio_seconds / max(seconds, 1e-9):.1f} s/s)")
        if not summary["complete"]:
            raise EncodeError(f"{self.output} is missing shards ({summary['shards']} of {summary['expected_shards']}"
                              " finished): rerun the same command")
        if self.config.push_to_hub:
            codes_lib.push_dataset(self.output, self.config.push_to_hub, private=self.config.private)
        return summary


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the loader's decoding workers)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parse_args(argv)
        summary = DatasetEncoder(config, argv).run()
    except (EncodeError, SourceError, LayoutError, data_lib.DataError, OSError) as err:  # OSError: files, Hub, token
        sys.stderr.write(f"error: {err}\n")
        return 2
    if summary is not None and summary["rows"] == 0:
        sys.stderr.write("error: no usable audio: every file was skipped (see the card)\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
