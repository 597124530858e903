"""Tokenizing datasets with real runs: the demo clips through `snac_accel.encode` in one process and in
two (gloo), a two-process run killed with SIGKILL and rerun, broken files, long files in chunks,
the frames layout, a manifest with kept columns pushed at the HfApi boundary, and decoding back.

The reference is `snac.SNAC.encode` of each file alone, decoded by torchcodec directly; codes must
equal it up to float near ties (`assert_codes_match`). Runs that do the same arithmetic (same shards,
batches and threads per process) must give identical rows. The codec is
a random-init `tiny` whose codebooks are re-seeded from encoder vectors of the demo clips (the
trainer's `DeadCodeRestarter`), so that its codes vary: a random codebook maps most audio to a
handful of codes, and equal codes would prove little.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import snac
import torch
from accelerate import PartialState
from torchcodec.decoders import AudioDecoder
from torchcodec.encoders import AudioEncoder

from snac_accel import decode as decode_cli
from snac_accel import encode as encode_cli
from snac_accel.tokenizer import codes as codes_lib
from snac_accel.tokenizer.chunks import ChunkPlan
from snac_accel.tokenizer.tokens import deinterleave, frame_positions, interleave, parse_offsets

from .conftest import DEMO
from .test_data import BROKEN, write_broken
from .test_distributed import ACCELERATE, ROOT, child_env, free_port, tail
from .test_hub import SENTINEL, HubRecorder, no_login  # noqa: F401 (a fixture)

TRAIN = DEMO / "train"
RATE = 24000


@pytest.fixture(scope="module", autouse=True)
def accelerate_state():
    PartialState(cpu=True)


@pytest.fixture(scope="module")
def codec(tmp_path_factory) -> Path:
    from snac_accel.config import MODEL_PRESETS
    from snac_accel.hub import save_pretrained
    from snac_accel.codebook import seed_codebooks
    from snac_accel.model import build_generator

    torch.manual_seed(0)
    model = build_generator({**MODEL_PRESETS["tiny"], "noise": False}).eval()
    clips = torch.stack([read(path)[..., :RATE] for path in sorted(TRAIN.glob("*.flac"))[:12]])
    seed_codebooks(model, [clips], "kmeans")  # codes spread over the clips, as after training
    return save_pretrained(model, tmp_path_factory.mktemp("codec") / "tiny")


def read(path: Path) -> torch.Tensor:
    """A file at 24 kHz mono [1, T], decoded by torchcodec directly (not through the data pipeline)."""
    return AudioDecoder(str(path), sample_rate=RATE, num_channels=1).get_all_samples().data


@functools.lru_cache(maxsize=2)
def snac_model(codec: Path) -> snac.SNAC:
    return snac.SNAC.from_pretrained(str(codec)).eval()


@torch.inference_mode()
def reference(codec: Path, path: Path) -> list[torch.Tensor]:
    """`snac.SNAC.encode` of one whole file alone."""
    return [c[0] for c in snac_model(codec).encode(read(path)[None])]


def assert_codes_match(mine: list, expected: list[torch.Tensor], what: str) -> None:
    """Per-level codes equal to the reference up to float near ties: a code whose two nearest codebook
    entries are almost equally near can flip with the batch size or the thread count (measured: 1 code
    of 3,960 over the 36 demo clips, level 1 of clip_006). At most 3 codes, or 0.2%, of a clip."""
    mine = [torch.as_tensor(level) for level in mine]
    assert [m.shape for m in mine] == [e.shape for e in expected], what
    differ = sum(int((m != e).sum()) for m, e in zip(mine, expected))
    total = sum(e.numel() for e in expected)
    assert differ <= max(3, 0.002 * total), f"{what}: {differ} of {total} codes differ"


def encode(*args) -> int:
    return encode_cli.main([str(a) for a in args])


def rows_of(folder: Path) -> list[dict]:
    """Every row, in the order `load_codes` gives (source order, which the tests check)."""
    return codes_lib.load_codes(folder).to_list()


@pytest.fixture(scope="module")
def one_process(codec, tmp_path_factory) -> Path:
    """The demo clips in one process. On a CPU rows are encoded in loader workers with one thread
    each, here 2 workers, in the 2-process runs 1 per process: the same arithmetic, so the same rows
    bit for bit (float rounding depends on the thread count and the batch)."""
    out = tmp_path_factory.mktemp("one") / "codes"
    assert encode(codec, TRAIN, "--output_dir", out, "--shard_size", 4, "--dataloader_num_workers", 2) == 0
    return out


def test_codes_equal_snac_encode_of_each_file_alone(one_process, codec):
    rows = rows_of(one_process)
    files = sorted(TRAIN.glob("*.flac"))
    assert [Path(r["id"]).name for r in rows] == [f.name for f in files] and [r["index"] for r in rows] == list(
        range(36))
    level0 = set()
    for row in rows[::6]:
        expected = reference(codec, Path(row["id"]))
        assert row["num_samples"] == read(Path(row["id"])).shape[-1] and row["duration"] == row["num_samples"] / RATE
        assert_codes_match([row[f"codes_{k}"] for k in range(3)], expected, row["id"])
        level0 |= set(row["codes_0"])
    assert len(level0) > 40, "the codec maps everything to a few codes: the comparison proves little"
    parquet = datasets.load_dataset("parquet", data_files=str(one_process / "data" / "*.parquet"), split="train")
    assert parquet.features["codes_0"] == datasets.List(datasets.Value("int16"))


def test_output_loads_with_datasets_and_the_card_records_the_codec(one_process, codec):
    loaded = datasets.load_dataset(str(one_process), split="train")
    assert loaded.num_rows == 36 and {"index", "id", "duration", "num_samples", "codes_0", "codes_1",
                                      "codes_2"} == set(loaded.column_names)
    card = (one_process / "README.md").read_text()
    sha = hashlib.sha256((codec / "model.safetensors").read_bytes()).hexdigest()
    hours = sum(read(f).shape[-1] for f in TRAIN.glob("*.flac")) / RATE / 3600
    for text in (sha, str(codec), "11.72, 23.44, 46.88 Hz", "0.656 kbps", "36 rows", f"{hours:.3f} hours",
                 "0 unusable files skipped", "python -m snac_accel.encode", "--shard_size 4", '"codebook_size": 256'):
        assert text in card, text
    info = codes_lib.read_info(one_process)
    assert info["summary"]["complete"] and info["codec"]["sha256"] == sha


def test_two_tokenized_folders_of_one_name_load_their_own_rows(one_process, tmp_path):
    import pyarrow.parquet as pq

    first, second = tmp_path / "x" / "codes", tmp_path / "y" / "codes"
    shutil.copytree(one_process, first)
    shutil.copytree(one_process, second)
    for shard in sorted((second / "data").glob("*.parquet"))[1:]:  # the second folder keeps its first shard
        shard.unlink()
    kept = pq.read_table(next((second / "data").glob("*.parquet"))).num_rows
    cache = tmp_path / "cache"  # a fresh cache: what a user who loads both first meets
    assert datasets.load_dataset(str(first), split="train", cache_dir=str(cache)).num_rows == 36
    assert datasets.load_dataset(str(second), split="train", cache_dir=str(cache)).num_rows == kept < 36


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (found through /proc), deepest first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    order, todo = [], [pid]
    while todo:
        order.append(todo.pop())
        todo += children.get(order[-1], [])
    for victim in reversed(order):
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_killed_two_process_run_resumes_to_the_rows_of_one_process(one_process, codec, tmp_path):
    """SIGKILL to the whole 2-process job once a few shards are written, then the same command again."""
    out, log = tmp_path / "codes", tmp_path / "log.txt"
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "snac_accel.encode",
           str(codec), str(TRAIN), "--output_dir", str(out), "--shard_size", "4"]
    env = child_env(ACCELERATE_USE_CPU="1")
    with open(log, "w") as f:
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while len(list((out / ".progress").glob("shard-*.json"))) < 2:
            assert job.poll() is None, tail(log)
            assert time.monotonic() < deadline, tail(log)
            time.sleep(0.02)
        kill_tree(job.pid)  # the launcher and both workers (torchrun starts them in sessions of their own)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            kill_tree(job.pid)
    before = {p.name: p.stat().st_mtime_ns for p in (out / ".progress").glob("shard-*.json")}
    assert 2 <= len(before) < 9, f"killed after {len(before)} of 9 shards: not mid-run"

    with open(log, "w") as f:
        rerun = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert rerun.returncode == 0, tail(log)
    assert rows_of(out) == rows_of(one_process)
    progress = {p.name: json.loads(p.read_text()) for p in (out / ".progress").glob("shard-*.json")}
    assert sorted(info["shard"] for info in progress.values()) == list(range(9))
    assert all(info["rank"] == info["shard"] % 2 for info in progress.values())  # each rank its own shards
    assert all((out / ".progress" / name).stat().st_mtime_ns == mtime for name, mtime in before.items()), \
        "finished shards were encoded again"
    assert not [p for p in out.rglob(".*tmp*")], "temporary files of the killed run remain"
    info = codes_lib.read_info(out)
    assert info["summary"]["complete"] and [run["processes"] for run in info["runs"]] == [2]


def test_launch_sh_two_processes_frames_layout_round_trips(codec, tmp_path):
    out, log = tmp_path / "frames", tmp_path / "log.txt"
    env = child_env(VENV=str(Path(sys.executable).parents[1]), MASTER_PORT=str(free_port()))
    with open(log, "w") as f:
        done = subprocess.run(["bash", str(ROOT / "launch.sh"), "encode", "--accelerate-config", "cpu", str(codec),
                               str(DEMO / "validation"), "--output_dir", str(out), "--shard_size", "2",
                               "--layout", "frames", "--level_offsets", "128266+4096k"],
                              cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, tail(log)
    assert {json.loads(p.read_text())["rank"] for p in (out / ".progress").glob("*.json")} == {0, 1}
    info, rows = codes_lib.read_info(out), rows_of(out)
    assert len(rows) == 9 and set(datasets.load_dataset(str(out), split="train").column_names) == {
        "index", "id", "duration", "num_samples", "codes"}
    model = snac_model(codec)
    for row in rows[::3]:
        flat = torch.tensor(row["codes"])
        # Orpheus order, by hand: per 7-token frame, position 0 is level 0, 1 and 4 are level 1,
        # 2, 3, 5, 6 are level 2; position k carries the offset 128266 + 4096 k
        frames = (flat.reshape(-1, 7) - torch.tensor([128266 + 4096 * k for k in range(7)])).T
        by_hand = [frames[0], torch.stack([frames[1], frames[4]], 1).reshape(-1),
                   torch.stack([frames[2], frames[3], frames[5], frames[6]], 1).reshape(-1)]
        back = codes_lib.row_codes(row, info)
        assert all(torch.equal(a, b) for a, b in zip(back, by_hand))
        assert_codes_match(back, reference(codec, Path(row["id"])), row["id"])
    with torch.inference_mode():  # the frames decode to the audio of the per-level codes
        audio = model.decode([c[None] for c in back])[..., :row["num_samples"]]
    assert torch.equal(decode_cli.decode_row(model, row, info), audio)


def test_frame_order_of_four_levels_and_offsets():
    levels = [level for level, _ in frame_positions([8, 4, 2, 1])]
    assert levels == [0, 1, 2, 3, 3, 2, 3, 3, 1, 2, 3, 3, 2, 3, 3]
    codes = [torch.randint(0, 4096, (3 * 8 // s,)) for s in (8, 4, 2, 1)]
    flat = interleave(codes, [8, 4, 2, 1], parse_offsets("10,20,30,40", [8, 4, 2, 1], "frames"))
    assert flat[:2].tolist() == [codes[0][0] + 10, codes[1][0] + 20] and flat[3:5].tolist() == [
        codes[3][0] + 40, codes[3][1] + 40]
    back = deinterleave(flat, [8, 4, 2, 1], parse_offsets("10,20,30,40", [8, 4, 2, 1], "frames"))
    assert all(torch.equal(a, b) for a, b in zip(back, codes))
    assert parse_offsets("5+1k", [4, 2, 1], "frames") == [5, 6, 7, 8, 9, 10, 11]
    with pytest.raises(ValueError, match="needs 3"):
        parse_offsets("1,2", [4, 2, 1], "levels")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_long_files_are_chunked_and_batches_keep_padded_lengths_apart(codec, tmp_path, workers):
    """Both CPU paths: batches in the process itself (0 workers), and rows encoded in 2 loader workers."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    clips = [read(path) for path in sorted(TRAIN.glob("*.flac"))[:3]]
    AudioEncoder(torch.cat(clips, -1), sample_rate=RATE).to_file(str(folder / "long.flac"))  # 7.5 s
    for seconds in (0.4, 1.0, 1.7):  # three padded lengths, batched together only if done wrong
        AudioEncoder(clips[1][..., :int(seconds * RATE)], sample_rate=RATE).to_file(str(folder / f"c{seconds}.flac"))
    model = snac.SNAC.from_pretrained(str(codec))
    plan = ChunkPlan(model, 1.0)
    assert len(plan.pieces(0, read(folder / "long.flac").shape[-1])) >= 6
    out = tmp_path / "codes"
    assert encode(codec, folder, "--output_dir", out, "--chunk_seconds", 1, "--max_batch_seconds", 60,
                  "--dataloader_num_workers", workers) == 0
    info = codes_lib.read_info(out)
    assert info["encoding"]["context_samples"] == plan.context
    for row in rows_of(out):  # the context covers the receptive field: equal up to float near ties
        assert_codes_match([row[f"codes_{k}"] for k in range(3)], reference(codec, Path(row["id"])), row["id"])


def test_streaming_reads_the_same_rows_and_a_rerun_encodes_nothing(codec, tmp_path):
    out = tmp_path / "codes"
    args = [codec, DEMO / "validation", "--output_dir", out, "--streaming", "--shard_size", 4]
    assert encode(*args) == 0
    rows = rows_of(out)
    files = sorted((DEMO / "validation").glob("*.flac"))
    assert [(r["index"], Path(r["id"]).name) for r in rows] == [(i, f.name) for i, f in enumerate(files)]
    for row in rows[::8]:
        assert_codes_match([row[f"codes_{k}"] for k in range(3)], reference(codec, Path(row["id"])), row["id"])
    info = codes_lib.read_info(out)
    assert info["read"]["streaming"] and info["summary"]["source_rows"] == 9 and info["summary"]["complete"]
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    assert encode(*args) == 0  # finished: the stream is read to count its rows, nothing is encoded again
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == written
    assert [run["audio_seconds"] for run in codes_lib.read_info(out)["runs"]][1] == 0


def test_broken_files_are_skipped_counted_and_listed(codec, tmp_path):
    folder = tmp_path / "data"
    write_broken(folder / "broken")
    for name in ("clip_000.flac", "clip_001.flac"):
        (folder / name).write_bytes((TRAIN / name).read_bytes())
    out = tmp_path / "codes"
    assert encode(codec, folder, "--output_dir", out, "--shard_size", 3) == 0
    assert [Path(r["id"]).name for r in rows_of(out)] == ["clip_000.flac", "clip_001.flac"]
    summary = codes_lib.read_info(out)["summary"]
    assert summary["skipped"] == len(BROKEN) and summary["complete"] and summary["source_rows"] == 2 + len(BROKEN)
    card = (out / "README.md").read_text()
    assert f"{len(BROKEN)} unusable files skipped" in card
    for name, problem in BROKEN.items():
        assert any(name in line and problem in line for line in card.splitlines()), name


def test_manifest_columns_are_kept_and_the_folder_is_pushed_as_a_dataset(codec, tmp_path, monkeypatch, no_login):
    hub_calls = HubRecorder(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    folder = tmp_path / "wavs"
    folder.mkdir()
    for name in ("clip_002.flac", "clip_003.flac"):
        (folder / name).write_bytes((TRAIN / name).read_bytes())
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["id", "path", "text", "speaker"], ["utt-a", "wavs/clip_002.flac", "first words", 7],
                          ["utt-b", "wavs/missing.flac", "lost", 8], ["utt-c", "wavs/clip_003.flac", "more words", 9]])
    out = tmp_path / "codes"
    assert encode(codec, manifest, "--output_dir", out, "--keep_columns", "text,speaker", "--push_to_hub",
                  "someone/codes", "--private") == 0
    rows = rows_of(out)
    assert [(r["index"], r["id"], r["text"], r["speaker"]) for r in rows] == [
        (0, "utt-a", "first words", 7), (2, "utt-c", "more words", 9)]
    assert_codes_match([rows[1][f"codes_{k}"] for k in range(3)], reference(codec, folder / "clip_003.flac"), "c")
    (repo,), (upload,) = hub_calls.named("create_repo"), hub_calls.named("upload_folder")
    assert repo["repo_id"] == "someone/codes" and repo["repo_type"] == "dataset" and repo["private"] is True
    assert repo["token"] == SENTINEL and upload["repo_type"] == "dataset" and upload["folder_path"] == str(out)
    assert set(upload["uploaded"]) == {"README.md", "snac_codes.json", "data/train-00000.parquet"}
    for path in out.rglob("*"):
        assert not path.is_file() or SENTINEL.encode() not in path.read_bytes(), path


def test_a_dataset_folder_gives_its_id_column_and_kept_columns(codec, tmp_path):
    """The path Hub datasets take (`load_hub_dataset`): a `save_to_disk` folder with an Audio column."""
    files = [str(TRAIN / name) for name in ("clip_005.flac", "clip_006.flac")]
    table = datasets.Dataset.from_dict({"sound": files, "id": ["a", "b"], "text": ["one", "two"], "other": [1, 2]})
    table.cast_column("sound", datasets.Audio()).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "codes"
    assert encode(codec, tmp_path / "ds", "--output_dir", out, "--audio_column", "sound", "--keep_columns",
                  "text") == 0
    rows = rows_of(out)
    assert [(r["id"], r["text"]) for r in rows] == [("a", "one"), ("b", "two")] and "other" not in rows[0]
    assert_codes_match([rows[1][f"codes_{k}"] for k in range(3)], reference(codec, Path(files[1])), files[1])
    assert encode(codec, tmp_path / "ds", "--output_dir", tmp_path / "x", "--keep_columns", "text") == 2


def test_push_without_a_token_is_refused_before_encoding(codec, tmp_path, monkeypatch, no_login, capsys):
    hub_calls = HubRecorder(monkeypatch)
    out = tmp_path / "codes"
    assert encode(codec, DEMO / "validation", "--output_dir", out, "--push_to_hub", "someone/codes") == 2
    assert "no Hugging Face token" in capsys.readouterr().err and not out.exists() and hub_calls.calls == []


def test_other_settings_are_refused_in_a_finished_folder(one_process, codec, capsys):
    assert encode(codec, TRAIN, "--output_dir", one_process, "--shard_size", 4, "--layout", "frames") == 2
    assert "other layout settings" in capsys.readouterr().err
    assert codes_lib.read_info(one_process)["layout"]["layout"] == "levels"


def test_decode_writes_wavs_and_checks_codes_against_the_sources(one_process, codec, tmp_path, capsys):
    wavs, report = tmp_path / "wavs", tmp_path / "check.json"
    assert decode_cli.main([str(one_process), "--rows", "1", "--output_dir", str(wavs), "--check", "1",
                            "--output_json", str(report)]) == 0
    row = rows_of(one_process)[0]
    name = f"{Path(row['id']).stem}.wav"  # named after the source file, not the row index
    assert [p.name for p in wavs.iterdir()] == [name]
    decoded = read(wavs / name)
    with torch.inference_mode():
        expected = snac_model(codec).decode([c[None] for c in reference(codec, Path(row["id"]))])
    assert decoded.shape[-1] == row["num_samples"] < expected.shape[-1]  # cut to the source's length
    assert (decoded - expected[0, :, :row["num_samples"]]).abs().max() < 1e-3  # a 16-bit WAV
    result = json.loads(report.read_text())
    assert result["clips"] == 1 and result["code_agreement"] == 1.0
    assert {"mel_distance", "stft_distance", "si_sdr"} <= set(result["metrics"])
    assert "codes equal to a one-pass encode" in capsys.readouterr().out
    chunks = [{"id": "/data/long talk.flac", "index": 3}, {"id": "/data/long talk.flac", "index": 4}, {"id": 7, "index": 5}]
    assert decode_cli.output_names(chunks) == ["long_talk_000003.wav", "long_talk_000004.wav", "7.wav"]
