"""Bundled demo clips (espeak-ng speech, 24 kHz mono FLAC) and the script that makes them."""
