"""Regenerate the bundled demo clips: short espeak-ng speech, 24 kHz mono FLAC.

Run from the repository root: ``python -m snac_accel.demo_data.generate``. Needs the Debian
packages ``espeak-ng`` and ``sox``. The split (every fifth clip to validation) is fixed by index,
so the same files land in the same split on every machine.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A codec squeezes sound into a handful of tokens.",
    "Rain fell softly on the old tin roof all night.",
    "Please bring three apples and a loaf of bread.",
    "The train to the coast leaves at half past nine.",
    "She painted the fence a bright shade of green.",
    "Every spring the river floods the lower fields.",
    "Turn left at the bakery and walk two blocks.",
    "The violin played a slow and mournful tune.",
    "We measured the room twice before cutting the carpet.",
    "His garden grows tomatoes, beans and tall sunflowers.",
    "The library closes early on public holidays.",
    "A sudden gust of wind scattered the papers.",
    "Children laughed as the puppet danced on stage.",
    "The engineer checked every bolt on the bridge.",
    "Fresh snow covered the mountain path by morning.",
    "Can you hear the difference between these two sounds?",
    "The market sells spices from many distant lands.",
    "Our neighbour fixed the bicycle in ten minutes.",
    "Thunder rolled across the valley after midnight.",
    "The lighthouse keeper wrote letters every evening.",
    "Seven small boats drifted slowly into the harbour.",
    "The recipe calls for two cups of flour.",
    "A quiet voice is sometimes the clearest one.",
    "The museum opened a new hall for ancient maps.",
    "Birds gathered on the wire before flying south.",
    "He whistled a cheerful song while he worked.",
    "The clock in the hallway is five minutes fast.",
    "Coffee tastes better when the beans are fresh.",
    "The final chapter was the hardest one to write.",
    "Waves crashed against the rocks below the cliff.",
    "The teacher asked everyone to speak a little louder.",
    "Bright lanterns lit the narrow street at dusk.",
    "A good map saves hours of wandering around.",
    "The kettle began to sing on the stove.",
    "Music carried from the open window upstairs.",
    "They planted an oak tree in the village square.",
    "The parcel arrived two days earlier than promised.",
    "Silver fish darted between the stones in the stream.",
    "Remember to water the plants while I am away.",
    "The orchestra tuned their instruments in silence.",
    "An old map hung above the fireplace.",
    "The robot repeated the words in a steady voice.",
    "Warm bread smells wonderful on a cold morning.",
    "The path winds through the forest to the lake.",
]

VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f3", "en-gb+f2", "en-us+m3", "en-gb-x-rp+f4"]
SAMPLE_RATE = 24000
MIN_SECONDS, MAX_SECONDS = 2.0, 2.5


def synthesize(text: str, voice: str, speed: int, pitch: int, out: Path) -> None:
    """Speak ``text`` with espeak-ng and convert it to a 2 to 4 s, 24 kHz mono 16-bit FLAC."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), text],
            check=True,
        )
        subprocess.run(
            [
                "sox", "-q", "-D", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-C", "8", str(out),
                "silence", "1", "0.02", "0.5%", "trim", "0", str(MAX_SECONDS), "norm", "-3",
            ],
            check=True,
        )
        seconds = float(subprocess.run(["soxi", "-D", str(out)], check=True, capture_output=True, text=True).stdout)
        if seconds < MIN_SECONDS:
            padded = Path(tmp) / "padded.flac"
            subprocess.run(["sox", "-q", str(out), str(padded), "pad", "0", f"{MIN_SECONDS - seconds:.3f}"], check=True)
            shutil.move(padded, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run `apt-get install espeak-ng sox` and retry.")
    for split in ("train", "validation"):
        target = args.output_dir / split
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
    for i, text in enumerate(SENTENCES):
        voice = VOICES[i % len(VOICES)]
        speed = 130 + (i * 17) % 60
        pitch = 30 + (i * 23) % 45
        split = "validation" if i % 5 == 4 else "train"
        synthesize(text, voice, speed, pitch, args.output_dir / split / f"clip_{i:03d}.flac")


if __name__ == "__main__":
    main()
