#!/usr/bin/env bash
# The project's GPU figures in one go (a few minutes on one GPU), for the day a GPU is lent:
#   1. bf16 and fp16 runs of snac_24khz with accumulation 2: updates skipped, loss scales, finite losses
#   2. the mel loss on CUDA: hand-written backward vs torch autograd (and torchaudio per scale)
#   3. the largest batch of 0.8 s clips that fits (bf16, eager)
#   4. eager vs --torch_compile: audio seconds per second, compile time, peak memory (bf16); 5. the generator alone
# Usage, from anywhere:  bash benchmarks/gpu_check.sh      (PYTHON=/path/to/python to pick the interpreter)
# Without a CUDA GPU it says so in one line and exits 0. Figures go to the README's Benchmarks section.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch missing or torch.cuda.is_available() false): nothing to measure"
    exit 0
fi
missing=$("$PY" -c "import importlib.util as u; print(' '.join(m for m in ('snac', 'accelerate', \
'transformers', 'datasets', 'torchaudio', 'torchcodec', 'safetensors', 'torchmetrics', 'matplotlib', 'yaml') \
if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing; install the project first: $PY -m pip install -e $PWD"
    exit 1
fi
clip=snac_accel/demo_data/train/clip_000.flac
if ! "$PY" -c "from torchcodec.decoders import AudioDecoder; AudioDecoder('$clip').get_all_samples()" >/dev/null 2>&1
then
    echo "gpu_check: torchcodec cannot decode $clip (FFmpeg shared libraries missing?): apt-get install ffmpeg"
    exit 1
fi

failed=0
section() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }
run() {  # a part's output without Python's warnings; a failing part is named and the next one runs
    "$PY" "$@" 2>&1 | grep -v -i "warn"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" != 0 ]; then echo "gpu_check: '$*' failed (exit $rc)"; failed=1; fi
}
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, \
torch {torch.__version__}, CUDA {torch.version.cuda}')"
section "1. precision: bf16 and fp16, snac_24khz, batch 8 x 0.8 s, accumulation 2"
run benchmarks/gpu_check.py precision
section "2. mel loss on CUDA, batch 16 x 1 s: hand-written backward vs torch autograd"
run benchmarks/losses.py --device cuda --batch 16 --repeats 20
section "3. largest batch of 0.8 s clips, snac_24khz, bf16, eager"
run benchmarks/gpu_check.py max_batch
section "4. eager vs --torch_compile, snac_24khz, bf16, batch 16 x 0.8 s"
run benchmarks/trainer.py --compile --preset snac_24khz --batch 16 --seconds 0.8 --mixed_precision bf16 \
    --rounds 3 --steps 3 --long 0
section "5. the same, the generator alone compiled (its graphs come from inductor's cache)"
run benchmarks/trainer.py --compile --compile_models generator --preset snac_24khz --batch 16 --seconds 0.8 \
    --mixed_precision bf16 --rounds 3 --steps 3 --long 0
section "done"
exit "$failed"
