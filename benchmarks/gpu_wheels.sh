#!/usr/bin/env bash
# The wheels that benchmarks/gpu_check.sh needs on a machine with torch, torchaudio, accelerate,
# transformers, matplotlib, tensorboard and pyarrow but no package registry: the project's other
# packages and their dependencies missing there, pinned, binary only, for one Python version.
#   bash benchmarks/gpu_wheels.sh                 # Python 3.12 (the GPU machine's), into benchmarks/wheels/
#   PY_VERSION=3.11 bash benchmarks/gpu_wheels.sh # another Python (the CPU dry run of this machine)
# The folder is git-ignored; pass it along with the work tree (the device tool's carry). No FFmpeg,
# torchcodec or visqol: gpu_check.sh makes its audio as PCM WAV, which the loader reads without them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
DEST=${WHEELS_DIR:-benchmarks/wheels}
ABI="cp${PY_VERSION/./}"
# What `pip install --dry-run` of snac, datasets, torchmetrics and einops adds to that machine's set.
PACKAGES=(snac==1.2.1 datasets==5.2.0 torchmetrics==1.9.0 einops==0.8.2 dill==0.4.1 lightning-utilities==0.15.3
          multiprocess==0.70.19 pandas==3.1.1 xxhash==4.1.0 tzdata==2025.2)
rm -rf "$DEST" && mkdir -p "$DEST"
if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --abi "$ABI" --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$DEST" "${PACKAGES[@]}"; then
    echo "gpu_wheels: pip could not download the wheels for Python $PY_VERSION (no registry reachable?)" >&2
    exit 1
fi
size=$(du -sm "$DEST" | cut -f1)
echo "gpu_wheels: $(ls "$DEST" | wc -l) wheels for Python $PY_VERSION in $DEST (${size} MiB)"
if [ "$size" -ge 64 ]; then
    echo "gpu_wheels: $DEST is ${size} MiB, over the 64 MiB that travels to the GPU machine" >&2
    exit 1
fi
