"""The data pipeline on real files written at test time: formats, rates, broken input, manifests,
HF datasets, weighted mixing, streaming across two ranks with a saved position, and determinism."""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
from pathlib import Path

import datasets
import pytest
import torch
from accelerate import PartialState
from torchcodec.encoders import AudioEncoder

from snac_accel import data as D
from snac_accel.config import TrainConfig

from .conftest import DEMO

RATE = 24000
LENGTH = 12288  # 0.512 s, a multiple of the tiny preset's padding
SPEC = D.ExcerptSpec(sample_rate=RATE, length=LENGTH)

# (name, source rate, channels, tone in Hz, seconds): a tone each, so the decoded rate can be checked.
GOOD_FILES = [
    ("wav8k.wav", 8000, 1, 300.0, 1.5),
    ("wav16k.wav", 16000, 1, 500.0, 1.2),
    ("sub/wav48k_stereo.wav", 48000, 2, 700.0, 1.5),
    ("flac22k.flac", 22050, 1, 900.0, 1.3),
    ("mp3_44k.mp3", 44100, 1, 1100.0, 1.6),
    ("sub/deeper/opus48k.opus", 48000, 1, 1300.0, 1.4),
    ("vorbis32k.ogg", 32000, 1, 1500.0, 1.5),
    ("long24k.wav", 24000, 1, 1700.0, 4.0),  # longer than a segment + 1 s: decoded by seeking
]
BROKEN = {
    "empty.wav": "cannot be decoded",
    "truncated.flac": "cannot be decoded",
    "truncated.mp3": "cannot be decoded",
    "not_audio.wav": "cannot be decoded",
    "nan.wav": "NaN or inf",
    "silent.wav": "silent",
}


def speech_like(rate: int, seconds: float, tone: float, seed: int) -> torch.Tensor:
    """A tone under a syllable-rate envelope with a little noise: loud enough, not stationary."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(rate * seconds)) / rate
    envelope = 0.55 + 0.45 * torch.sin(2 * math.pi * 4.0 * t + float(torch.rand((), generator=g)) * 6)
    return 0.3 * envelope * torch.sin(2 * math.pi * tone * t) + 0.003 * torch.randn(t.shape, generator=g)


def write_float_wav(path: Path, audio: torch.Tensor, rate: int) -> None:
    """A 32-bit float WAV, the one common format that can carry NaN."""
    payload = audio.numpy().astype("<f4").tobytes()
    header = (b"RIFF" + struct.pack("<I", 36 + len(payload)) + b"WAVEfmt "
              + struct.pack("<IHHIIHH", 16, 3, 1, rate, rate * 4, 4, 32) + b"data" + struct.pack("<I", len(payload)))
    path.write_bytes(header + payload)


def write_good(folder: Path) -> list[Path]:
    paths = []
    for i, (name, rate, channels, tone, seconds) in enumerate(GOOD_FILES):
        audio = speech_like(rate, seconds, tone, i)[None]
        if channels == 2:
            audio = torch.cat([audio, speech_like(rate, seconds, tone, 100 + i)[None] * 0.8])
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        AudioEncoder(audio, sample_rate=rate).to_file(str(path))
        paths.append(path)
    return paths


def write_broken(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    tone = speech_like(RATE, 2.0, 440.0, 7)[None]
    (folder / "empty.wav").write_bytes(b"")
    for ext in ("flac", "mp3"):
        AudioEncoder(tone, sample_rate=RATE).to_file(str(folder / f"whole.{ext}"))
        whole = (folder / f"whole.{ext}").read_bytes()
        (folder / f"truncated.{ext}").write_bytes(whole[:len(whole) // 2] if ext == "flac" else whole[:200])
        (folder / f"whole.{ext}").unlink()
    (folder / "not_audio.wav").write_text("these are words, not samples\n" * 20)
    nan = speech_like(RATE, 1.0, 440.0, 8)
    nan[5000:5100] = float("nan")
    write_float_wav(folder / "nan.wav", nan, RATE)
    AudioEncoder(torch.zeros(1, RATE), sample_rate=RATE).to_file(str(folder / "silent.wav"))
    return [folder / name for name in BROKEN]


@pytest.fixture(scope="module", autouse=True)
def accelerate_state():
    """accelerate's logger needs a state; a plain CPU one, as a single-process run has."""
    PartialState(cpu=True)


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    write_good(folder)
    return folder


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("broken")
    write_broken(folder)
    return folder


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory, good_dir, broken_dir) -> Path:
    folder = tmp_path_factory.mktemp("mixed")
    shutil.copytree(good_dir, folder, dirs_exist_ok=True)
    shutil.copytree(broken_dir, folder / "broken", dirs_exist_ok=True)
    return folder


def dominant_hz(audio: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(audio.flatten() * torch.hann_window(audio.shape[-1])).abs()
    return float(spectrum.argmax()) * rate / audio.shape[-1]


def clips_of(folder: Path, **kwargs) -> D.AudioClips:
    return D.AudioClips(D.files_dataset(D.list_audio_files(folder)), SPEC, **kwargs)


# ----------------------------------------------------------------------------- formats and rates


def test_mixed_formats_and_rates_give_batches_of_the_right_shape_and_rate(good_dir):
    files = D.list_audio_files(good_dir)
    assert len(files) == len(GOOD_FILES)  # found recursively
    clips = clips_of(good_dir, seed=3)
    loader = D.make_loader(clips, D.EpochBatchSampler(len(clips), 4, seed=3), num_workers=0, pin_memory=False)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert batch["audio"].shape == (4, 1, LENGTH) and batch["audio"].dtype == torch.float32
        assert batch["bad"] == [] and batch["good"] == 4
        assert torch.isfinite(batch["audio"]).all() and batch["audio"].abs().max() <= 1.0
    for index, (name, _, _, tone, _) in enumerate(GOOD_FILES):
        path = files.index(str(good_dir / name))
        clip = clips[(0, path)]["audio"]
        # Each file's tone is where it belongs at the model's rate, whatever the file's own rate.
        assert abs(dominant_hz(clip, RATE) - tone) < 10, name
        assert abs(D.loudness(clip, RATE) - SPEC.target_loudness) < 1.0, name


def test_stereo_is_mixed_down_to_mono(tmp_path):
    left = speech_like(48000, 1.0, 600.0, 1)
    right = speech_like(48000, 1.0, 1200.0, 2)
    AudioEncoder(torch.stack([left, right]), sample_rate=48000).to_file(str(tmp_path / "stereo.wav"))
    spec = D.ExcerptSpec(sample_rate=RATE, length=RATE, target_loudness=None)
    clip = D.AudioClips(D.files_dataset([str(tmp_path / "stereo.wav")]), spec, train=False)[0]["audio"]
    assert clip.shape == (1, RATE)
    spectrum = torch.fft.rfft(clip.flatten()).abs()  # 1 Hz bins
    assert spectrum[600] > 0.3 * spectrum.max() and spectrum[1200] > 0.3 * spectrum.max()


def test_short_clips_are_padded_or_skipped(tmp_path):
    AudioEncoder(speech_like(RATE, 0.2, 400.0, 0)[None], sample_rate=RATE).to_file(str(tmp_path / "short.wav"))
    ds = D.files_dataset([str(tmp_path / "short.wav")])
    padded = D.AudioClips(ds, SPEC).load(0, 0)
    assert padded.audio.shape == (1, LENGTH) and padded.audio[0, int(0.25 * RATE):].abs().max() == 0
    skipped = D.AudioClips(ds, D.ExcerptSpec(sample_rate=RATE, length=LENGTH, short_clips="skip")).load(0, 0)
    assert skipped.audio is None and "shorter than a segment" in skipped.problem


def test_salient_excerpt_is_retried_out_of_silence(tmp_path):
    noise = 1e-3 * torch.randn(3 * RATE, generator=torch.Generator().manual_seed(0))  # about -63 LUFS
    audio = torch.cat([noise, speech_like(RATE, 3.0, 500.0, 4)])  # 3 s of near-silence, then 3 s of signal
    AudioEncoder(audio[None], sample_rate=RATE).to_file(str(tmp_path / "half.wav"))
    ds = D.files_dataset([str(tmp_path / "half.wav")])
    salient = D.AudioClips(ds, D.ExcerptSpec(sample_rate=RATE, length=LENGTH, salience_retries=8))
    plain = D.AudioClips(ds, D.ExcerptSpec(sample_rate=RATE, length=LENGTH, salience_threshold=None,
                                           salience_retries=1, target_loudness=None))
    quiet_plain = sum(D.loudness(plain.load(e, 0).audio, RATE) < -40 for e in range(12))
    quiet_salient = sum(abs(dominant_hz(salient.load(e, 0).audio, RATE) - 500) > 20 for e in range(12))
    assert quiet_plain >= 3 and quiet_salient == 0


def test_loudness_matches_torchaudio_and_normalisation_keeps_peaks_in_range():
    import torchaudio

    g = torch.Generator().manual_seed(0)
    for rate in (16000, 24000, 44100):
        for seconds, level in ((0.45, 0.05), (1.3, 0.3), (3.0, 0.5)):  # torchaudio clips its filtered signal at 1
            audio = speech_like(rate, seconds, 200 + 2000 * float(torch.rand((), generator=g)), 1)[None] * level / 0.3
            assert abs(D.loudness(audio, rate) - float(torchaudio.functional.loudness(audio, rate))) < 0.05
    spiky = speech_like(RATE, 1.0, 300.0, 2)[None] * 0.01
    spiky[0, 1000] = 0.9  # normalising to -16 LUFS would push this far beyond 1
    out = D.normalize_loudness(spiky, RATE, -16.0)
    assert out.abs().max() <= 1.0 and out.abs().max() > 0.99


# ----------------------------------------------------------------------------- bad input


def test_broken_files_are_skipped_counted_and_named_once(mixed_dir, caplog):
    clips = clips_of(mixed_dir, seed=0)
    assert len(clips) == len(GOOD_FILES) + len(BROKEN)
    tracker = D.BadFileTracker(max_fraction=0.9)
    sampler = D.EpochBatchSampler(len(clips), 2, seed=0)
    loader = D.make_loader(clips, sampler, num_workers=0, pin_memory=False)
    with caplog.at_level(logging.WARNING):
        for epoch in range(2):
            sampler.set_epoch(epoch)
            for batch in loader:
                assert batch["audio"].shape == (2, 1, LENGTH)  # broken rows were replaced by good ones
                tracker.update(batch["bad"], batch["good"])
    named = {problem.split(": ")[0] for problem in tracker.seen}
    assert named == {str(mixed_dir / "broken" / name) for name in BROKEN}
    for problem in tracker.seen:
        assert BROKEN[Path(problem.split(": ")[0]).name] in problem
    assert tracker.total >= 2 * len(BROKEN)  # every epoch meets each broken file at least once
    warnings = [r.getMessage() for r in caplog.records if "skipped unusable audio" in r.getMessage()]
    assert len(warnings) == len(tracker.seen)


def test_too_many_bad_samples_stop_with_one_error_naming_examples(broken_dir, good_dir, tmp_path):
    folder = tmp_path / "mostly_broken"
    shutil.copytree(broken_dir, folder)
    shutil.copy(good_dir / "wav16k.wav", folder)
    clips = clips_of(folder)
    tracker = D.BadFileTracker()  # default: stop above 50%
    with pytest.raises(D.DataError, match=r"samples were unusable \(more than 50%\), e\.g\. ") as err:
        for epoch in range(20):
            for index in range(len(clips)):
                item = clips[(epoch, index)]
                tracker.update(item["bad"], int(item["audio"] is not None))
    assert any(str(folder / name) in str(err.value) for name in BROKEN)


def test_a_source_of_only_broken_files_is_refused_before_training(broken_dir, tmp_path):
    # Every file of a small source is probed; a truncated FLAC still gives excerpts from its first half, so
    # the truly unusable files alone make the source that must be refused.
    folder = tmp_path / "unusable"
    shutil.copytree(broken_dir, folder, ignore=shutil.ignore_patterns("truncated.*"))
    with pytest.raises(D.DataError, match="no usable clip") as err:
        D.check_source(clips_of(folder, names=[str(folder)]), "training")
    assert str(folder) in str(err.value) and "cannot be decoded" in str(err.value)
    assert D.probe_rows(len(list(folder.iterdir())), 16) == list(range(len(list(folder.iterdir()))))


def test_a_folder_without_audio_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no audio here")
    with pytest.raises(D.DataError, match="holds no audio files"):
        D.list_audio_files(tmp_path)


# ----------------------------------------------------------------------------- sources


def config_for(tmp_path: Path, **values) -> TrainConfig:
    config = TrainConfig(preset="tiny", output_dir=str(tmp_path / "out"), segment_seconds=0.5, report_to="none",
                         **values)
    config.apply_dataset_preset()
    config.validate()
    return config


def test_csv_and_jsonl_manifests(good_dir, tmp_path):
    names = [name for name, *_ in GOOD_FILES]
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("path,text\n" + "".join(f"{good_dir / n},hello\n" for n in names[:4]))
    jsonl_dir = good_dir  # relative paths are read from the manifest's folder
    jsonl_path = tmp_path / "m.jsonl"
    jsonl_path.write_text("".join(json.dumps({"file": str(Path(n)), "speaker": 1}) + "\n" for n in names[4:]))
    shutil.move(str(jsonl_path), str(jsonl_dir / "m.jsonl"))
    config = config_for(tmp_path, train_file=f"{csv_path},{jsonl_dir / 'm.jsonl'}", path_column="file")
    with pytest.raises(D.DataError, match="no column 'file'"):
        D.load_sources(config, "train")
    csv_path.write_text(csv_path.read_text().replace("path,text", "file,text"))
    sources = D.load_sources(config, "train")
    assert [len(ds) for _, ds in sources] == [4, len(names) - 4]
    clips = D.AudioClips([ds for _, ds in sources], D.train_spec(config), names=[n for n, _ in sources])
    assert {clips.describe(*clips.locate(0, i)) for i in range(len(clips))} == {str(good_dir / n) for n in names}
    assert all(clips[(0, i)]["audio"].shape == (1, config.segment_samples) for i in range(len(clips)))
    (jsonl_dir / "m.jsonl").unlink()


def test_hf_dataset_with_an_audio_column(good_dir):
    files = D.list_audio_files(good_dir)
    ds = datasets.Dataset.from_dict({"speech": files, "text": ["x"] * len(files)})
    ds = ds.cast_column("speech", datasets.Audio(sampling_rate=16000))  # decoded at another rate on purpose
    clips = D.AudioClips(D.audio_column(ds, "speech"), SPEC, seed=1)
    assert len(clips) == len(files)
    assert all(clips[(0, i)]["audio"].shape == (1, LENGTH) for i in range(len(clips)))
    with pytest.raises(D.DataError, match="no column 'audio'"):
        D.audio_column(ds)


def test_local_dataset_folders_stand_in_for_hub_ids(good_dir, tmp_path):
    """--dataset_name takes what load_dataset takes: here an audiofolder, and a save_to_disk folder."""
    audiofolder = tmp_path / "audiofolder" / "train"
    shutil.copytree(good_dir, audiofolder)
    config = config_for(tmp_path, dataset_name=str(tmp_path / "audiofolder"))
    [(name, ds)] = D.load_sources(config, "train")
    assert len(ds) == len(GOOD_FILES) and name.endswith("[train]")
    clips = D.AudioClips(ds, D.train_spec(config))
    D.check_source(clips, "training")

    saved = tmp_path / "saved"
    table = datasets.Dataset.from_dict({"voice": D.list_audio_files(good_dir)})
    datasets.DatasetDict({"train": table, "dev": table.select([0, 1])}).save_to_disk(str(saved))
    config = config_for(tmp_path, dataset_name=str(saved), audio_column="voice", eval_split="dev",
                        max_validation_clips=4)
    assert len(D.load_sources(config, "train")[0][1]) == len(GOOD_FILES)
    assert D.validation_batch(config).shape == (2, 1, D.validation_spec(config).length)


def test_weighted_mixing_is_a_pure_function_of_seed_and_epoch(good_dir, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    shutil.copy(good_dir / "wav16k.wav", small)
    config = config_for(tmp_path, train_data_dir=f"{good_dir},{small}", source_weights="1,1")
    sources = D.load_sources(config, "train")
    weights = D.source_weights(config, len(sources))
    clips = D.AudioClips([ds for _, ds in sources], SPEC, seed=5, weights=weights)
    total = len(GOOD_FILES) + 1
    assert len(clips) == total
    drawn = [clips.locate(0, i) for i in range(total)]
    assert sum(source == 1 for source, _ in drawn) == total // 2  # the one-file source fills half an epoch
    assert drawn == [D.AudioClips([ds for _, ds in sources], SPEC, seed=5, weights=weights).locate(0, i)
                     for i in range(total)]
    big_rows = [row for source, row in drawn if source == 0]
    assert len(set(big_rows)) == len(big_rows)  # without replacement inside a pass
    epochs = {tuple(D.mixing_map([40, 10], [0.5, 0.5], 5, e).tolist()) for e in range(3)}
    assert len(epochs) == 3
    with pytest.raises(Exception, match="source_weights"):
        config_for(tmp_path, train_data_dir=f"{good_dir},{small}", source_weights="1,1,1")


# ----------------------------------------------------------------------------- determinism


def test_same_seed_epoch_index_gives_the_same_excerpt(good_dir):
    files = D.list_audio_files(good_dir)
    for name in ("long24k.wav", "wav16k.wav"):  # seeking decode and whole-file decode
        index = files.index(str(good_dir / name))
        first = clips_of(good_dir, seed=11)[(2, index)]["audio"]
        again = clips_of(good_dir, seed=11)[(2, index)]["audio"]
        assert torch.equal(first, again), name
        assert not torch.equal(first, clips_of(good_dir, seed=11)[(3, index)]["audio"]), name
        assert not torch.equal(first, clips_of(good_dir, seed=12)[(2, index)]["audio"]), name
    validation = clips_of(good_dir, train=False)
    assert torch.equal(validation[(0, 0)]["audio"], validation[(9, 0)]["audio"])


def test_loader_workers_do_not_change_the_stream(good_dir):
    clips = clips_of(good_dir, seed=2)
    streams = []
    for workers in (0, 2):
        loader = D.make_loader(clips, D.EpochBatchSampler(len(clips), 2, seed=2), num_workers=workers,
                               pin_memory=False)
        streams.append(torch.cat([batch["audio"] for batch in loader]))
    assert torch.equal(*streams)


# ----------------------------------------------------------------------------- streaming


def local_stream(files: list[str], shards: int) -> datasets.IterableDataset:
    return D.files_dataset(files).to_iterable_dataset(num_shards=shards)


@pytest.mark.parametrize("shards", [8, 7])  # by shard, and by example when shards do not divide
def test_streaming_two_ranks_read_disjoint_parts_that_cover_the_data(mixed_dir, shards):
    files = D.list_audio_files(mixed_dir)[:14]
    seen = []
    for rank in (0, 1):
        clips = D.StreamingClips(local_stream(files, shards), SPEC, seed=4, rank=rank, world_size=2,
                                 shuffle_buffer_size=4)
        seen.append([row["audio"]["path"] for row in clips.rows(epoch=0)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(files)
    again = D.StreamingClips(local_stream(files, shards), SPEC, seed=4, rank=0, world_size=2, shuffle_buffer_size=4)
    assert [row["audio"]["path"] for row in again.rows(epoch=0)] == seen[0]
    assert [row["audio"]["path"] for row in again.rows(epoch=1)] != seen[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_position_is_saved_and_restored(mixed_dir, workers):
    """Broken files are skipped and counted; a restored loader continues exactly where it stopped."""
    files = D.list_audio_files(mixed_dir)

    def loader() -> D.StreamingLoader:
        clips = D.StreamingClips(local_stream(files, len(files)), SPEC, seed=9, shuffle_buffer_size=5)
        return D.StreamingLoader(clips, batch_size=2, num_workers=workers, pin_memory=False)

    straight = loader()
    batches = iter(straight)
    reference = [next(batches) for _ in range(12)]  # 24 clips: more than an epoch of 8 good files
    assert all(b["audio"].shape == (2, 1, LENGTH) for b in reference)
    bad = [p for b in reference for p in b["bad"]]
    assert {Path(p.split(": ")[0]).name for p in bad} == set(BROKEN)

    first = loader()
    batches = iter(first)
    for _ in range(5):
        next(batches)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    continued = iter(resumed)
    for expected in reference[5:]:
        got = next(continued)
        assert torch.equal(got["audio"], expected["audio"]) and got["bad"] == expected["bad"]


def test_streaming_training_run_checkpoints_its_position(tmp_path, demo_dir):
    from snac_accel import SnacTrainer

    from .conftest import tiny_config

    config = tiny_config(tmp_path / "run", streaming=True, max_train_steps=2, checkpointing_steps=2,
                         train_batch_size=2, validation_data_dir=None, shuffle_buffer_size=8)
    trainer = SnacTrainer(config)
    trainer.fit()
    checkpoint = Path(config.output_dir) / "checkpoints" / "checkpoint_2"
    states = [torch.load(p, weights_only=False) for p in checkpoint.glob("custom_checkpoint_*.pkl")]
    [position] = [s for s in states if "ranks" in s]
    assert position["ranks"][0]["positions"][0][1] >= 4  # rank 0, worker 0: at least 2 batches of 2 rows read


def write_pcm_wav(path: Path, width: int, channels: int, rate: int = RATE, frames: int = 36000) -> Path:
    """Random PCM samples written by the standard library (8, 16, 24 or 32 bits)."""
    import wave

    import numpy as np

    x = np.random.default_rng(width * 10 + channels).uniform(-0.9, 0.9, (frames, channels))
    if width == 1:
        raw = (x * 127 + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = (x * 2 ** 23).astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        raw = (x * 2 ** (8 * width - 1)).astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(raw)
    return path


def test_pcm_wav_at_the_model_rate_is_read_without_ffmpeg_as_torchcodec_reads_it(tmp_path, monkeypatch):
    from snac_accel.data.wav import open_pcm_wav

    feature = datasets.Audio(sampling_rate=RATE, num_channels=1)
    for width, channels in [(1, 1), (2, 1), (3, 1), (4, 1), (2, 2)]:
        path = str(write_pcm_wav(tmp_path / f"pcm{width}_{channels}.wav", width, channels))
        row = {"path": path, "bytes": None}
        fast, ffmpeg = open_pcm_wav(row, RATE), feature.decode_example(row)
        assert torch.equal(fast.get_all_samples().data, ffmpeg.get_all_samples().data), (width, channels)
        assert torch.equal(fast.get_samples_played_in_range(0.5, 1.0).data,
                           ffmpeg.get_samples_played_in_range(0.5, 1.0).data), (width, channels)
        with open(path, "rb") as f:  # rows of a datasets folder carry the bytes
            in_bytes = open_pcm_wav({"path": None, "bytes": f.read()}, RATE)
        assert torch.equal(in_bytes.get_all_samples().data, ffmpeg.get_all_samples().data)
    # Another rate, a float WAV, another container: FFmpeg's path (its resampler, its formats).
    assert open_pcm_wav({"path": str(write_pcm_wav(tmp_path / "16k.wav", 2, 1, rate=16000))}, RATE) is None
    write_float_wav(tmp_path / "float.wav", torch.zeros(100), RATE)
    assert open_pcm_wav({"path": str(tmp_path / "float.wav")}, RATE) is None
    assert open_pcm_wav({"path": str(DEMO / "train" / "clip_000.flac")}, RATE) is None
    # A training excerpt of a WAV file never reaches torchcodec.
    monkeypatch.setattr(datasets.Audio, "decode_example", lambda *a, **k: pytest.fail("decoded with torchcodec"))
    clip = D.excerpt_from_row(feature, {"path": str(tmp_path / "pcm2_1.wav"), "bytes": None}, SPEC,
                              torch.Generator().manual_seed(0))
    assert clip.audio is not None and clip.audio.shape == (1, LENGTH)
