"""Build the bundled real speech: recorded voices from Debian packages, 24 kHz mono FLAC.

``python -m snac_accel.demo_data.real_speech`` (as root or with apt-get access to the package
lists; needs ``apt-get`` and ``dpkg``) downloads the packages below into a temporary folder,
unpacks them, picks lines spoken by each speaker, and writes ``demo_data/real_speech/`` with a
``LICENSES.md`` that names every clip's package, source file and licence.

Why these: the demo's espeak voices are synthetic, and the metrics a user compares with the papers
(ViSQOL, PESQ, STOI) mean something only on recorded speech. The game Fish Fillets NG ships its
dialogue recorded by voice actors (22.05 kHz Ogg Vorbis), in Czech and Dutch, two fish per language
(``m``: the small fish, ``v``: the big one), four speakers in all. The choice is fixed by sorted
file names, so the same clips come out on every machine.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import torch
import torchaudio

PACKAGES = {"cs": "fillets-ng-data-cs", "nl": "fillets-ng-data-nl"}
SPEAKERS = {"m": "small fish", "v": "big fish"}
SAMPLE_RATE = 24000
MIN_SECONDS, MAX_SECONDS = 2.5, 6.0
SECONDS_PER_SPEAKER = 16.0
PEAK = 0.99
LICENCE = ("GPL-2 (Fish Fillets NG by ALTAR interactive and the Danihelka brothers; Debian's copyright file: "
           "\"This package is free software; you can redistribute it and/or modify it under the terms of the "
           "GNU General Public License as published by the Free Software Foundation; version 2\")")
OUTPUT = Path(__file__).resolve().parent / "real_speech"


def unpack(package: str, where: Path) -> tuple[Path, str]:
    """`apt-get download` + `dpkg -x` of one package; its unpacked root and version."""
    subprocess.run(["apt-get", "download", package], cwd=where, check=True, capture_output=True)
    deb = next(where.glob(f"{package}_*.deb"))
    root = where / package
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root, deb.name.split("_")[1]


def speaker_of(path: Path) -> str:
    """The speaker letter of a Fish Fillets line (``room-SPEAKER-words.ogg``), or '' for other sounds."""
    parts = path.stem.split("-")
    return parts[1] if len(parts) >= 3 else ""


def load(path: Path) -> torch.Tensor:
    """A file as mono float32 at 24 kHz, [1, T]."""
    from torchcodec.decoders import AudioDecoder

    samples = AudioDecoder(str(path)).get_all_samples()
    audio = samples.data.mean(0, keepdim=True)
    return torchaudio.functional.resample(audio, samples.sample_rate, SAMPLE_RATE)


def pick(root: Path, language: str) -> list[tuple[str, Path, torch.Tensor]]:
    """(speaker, source file, audio) lines of each speaker, in file-name order, up to SECONDS_PER_SPEAKER."""
    chosen = []
    files = sorted(root.glob(f"usr/share/games/fillets-ng/sound/*/{language}/*.ogg"))
    for speaker in SPEAKERS:
        total = 0.0
        for path in (p for p in files if speaker_of(p) == speaker):
            audio = load(path)
            seconds = audio.shape[-1] / SAMPLE_RATE
            if MIN_SECONDS <= seconds <= MAX_SECONDS and audio.abs().max() > 0.05:
                chosen.append((speaker, path, audio))
                total += seconds
            if total >= SECONDS_PER_SPEAKER:
                break
    return chosen


def build(output: Path = OUTPUT) -> list[dict]:
    """Write the clips and LICENSES.md into ``output``; returns one record per clip."""
    from torchcodec.encoders import AudioEncoder

    output.mkdir(parents=True, exist_ok=True)
    for old in output.glob("*.flac"):
        old.unlink()
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        for language, package in PACKAGES.items():
            root, version = unpack(package, Path(scratch))
            counts = dict.fromkeys(SPEAKERS, 0)
            for speaker, path, audio in pick(root, language):
                name = f"{language}_{speaker}_{counts[speaker]:02d}.flac"
                counts[speaker] += 1
                audio = audio * min(1.0, PEAK / float(audio.abs().max()))  # resampling overshoots full-scale peaks
                AudioEncoder(audio, sample_rate=SAMPLE_RATE).to_file(str(output / name))
                records.append({"file": name, "language": language, "speaker": f"{language}-{speaker}",
                                "seconds": round(audio.shape[-1] / SAMPLE_RATE, 2), "package": f"{package} {version}",
                                "source": str(path.relative_to(root))})
    total = sum(r["seconds"] for r in records)
    lines = ["# Real speech clips: sources and licences", "",
             f"{len(records)} clips, {total:.1f} s, {len({r['speaker'] for r in records})} speakers, "
             f"{len(PACKAGES)} languages (Czech, Dutch): recorded voice actors of the game Fish Fillets NG, "
             "taken from Debian's packages by `python -m snac_accel.demo_data.real_speech`, resampled from "
             "22.05 kHz Ogg Vorbis to 24 kHz mono FLAC (16-bit), peaks above "
             f"{PEAK} scaled down to it, otherwise unchanged.", "",
             f"Licence of every clip: {LICENCE}.", "",
             "| file | speaker | seconds | package | source file |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['file']} | {r['speaker']} ({SPEAKERS[r['speaker'][-1]]}) | {r['seconds']:.2f} | {r['package']} "
              f"| `{r['source']}` |" for r in records]
    (output / "LICENSES.md").write_text("\n".join(lines) + "\n")
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(OUTPUT), help="folder of the clips (default: the bundled one)")
    records = build(Path(parser.parse_args().output))
    print(f"wrote {len(records)} clips ({sum(r['seconds'] for r in records):.1f} s) to {parser.parse_args().output}")


if __name__ == "__main__":
    main()
