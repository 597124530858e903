#!/usr/bin/env bash
# The project's GPU figures in one go, under 8 minutes on one GPU (the section limits add up to 7 min 45 s):
#   1. bf16 eager: ms per update, updates/s, audio-s/s, MFU, peak memory (snac_24khz, 16 x 0.8 s)
#   2. bf16 --torch_compile: the same, and the first update's compile time
#   3. the largest batch of 0.8 s clips that fits (bf16, eager)
#   4. fp16 with accumulation 2: updates skipped, loss scales, finite losses
#   5. host syncs per update: benchmarks/syncs.py, with torch.cuda.set_sync_debug_mode's count
#   6. a 3-minute snac_24khz training on synthetic speech (WAV made here): codebook usage, mel distance
# Usage, from anywhere:  bash benchmarks/gpu_check.sh [--dry_run]   (PYTHON=/path/to/python picks the interpreter)
# Needs torch, torchaudio, accelerate, transformers, matplotlib, tensorboard, pyarrow; the other packages come
# as wheels from benchmarks/gpu_wheels.sh (GPU_WHEELS, default benchmarks/wheels/, unpacked into GPU_SITE,
# default .gpu_site/, when missing). No
# FFmpeg or torchcodec: the audio is made by the scripts. Exits 1 without torch, or without CUDA unless
# --dry_run, which runs every section tiny on the CPU (a check of the script, not a measurement).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
DRY=0
[ "${1:-}" = "--dry_run" ] && DRY=1
WHEELS="${GPU_WHEELS:-benchmarks/wheels}" SITE="${GPU_SITE:-$PWD/.gpu_site}"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "gpu_check: $PY has no torch; run with PYTHON=/path/to/a/python/with/torch" >&2
    exit 1
fi
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: torch.cuda.is_available() is false for $PY: no GPU to measure (--dry_run checks the script on the CPU)" >&2
    exit 1
fi
needed="snac accelerate transformers datasets torchaudio safetensors torchmetrics einops matplotlib yaml pandas"
missing() { "$PY" -c "import importlib.util as u; print(' '.join(m for m in '$needed'.split() if u.find_spec(m) is None))"; }
if [ -n "$(missing)" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: unpacking $WHEELS/ into $SITE/ (missing: $(missing))"
    for wheel in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$wheel" "$SITE/" || exit 1; done
fi
if [ -n "$(missing)" ]; then
    echo "gpu_check: missing Python packages: $(missing); run bash benchmarks/gpu_wheels.sh where pip reaches PyPI" \
         "and bring benchmarks/wheels/ along, or: $PY -m pip install -e $PWD" >&2
    exit 1
fi

failed=0
section() {  # section NAME LIMIT_S COMMAND...: a failing or overrunning section is named and the next one runs
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name (limit ${limit} s, $(date -u +%H:%M:%S))"
    timeout --signal=INT --kill-after=15 "$limit" "$PY" "$@" 2>&1 | grep -v -i -E "warn|^\s*$|it/s\]|s/it\]"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ]; then echo "gpu_check: '$name' ran past its ${limit} s"; failed=1;
    elif [ "$rc" != 0 ]; then echo "gpu_check: '$name' failed (exit $rc)"; failed=1; fi
}
"$PY" -c "import torch, accelerate, transformers; c = torch.cuda.is_available(); \
p = torch.cuda.get_device_properties(0) if c else None; print((f'{p.name}, {p.total_memory / 2**30:.0f} GiB, ' if c \
else 'CPU dry run, ') + f'torch {torch.__version__}, CUDA {torch.version.cuda}, accelerate {accelerate.__version__}, \
transformers {transformers.__version__}')"

if [ "$DRY" = 1 ]; then  # every section, tiny, on the CPU; a shared CPU gets generous limits (DRY_LIMIT)
    DRY_LIMIT=${DRY_LIMIT:-480}
    size=(--cpu --preset tiny --batch 2 --seconds 0.5)
    section "1. bf16 eager (dry run)" $DRY_LIMIT benchmarks/gpu_check.py throughput "${size[@]}" --updates 2
    section "2. bf16 compiled (dry run, aot_eager)" $DRY_LIMIT benchmarks/gpu_check.py throughput "${size[@]}" \
        --updates 2 --compile --backend aot_eager
    section "3. largest batch (dry run)" $DRY_LIMIT benchmarks/gpu_check.py max_batch "${size[@]}" --max_try 4
    section "4. fp16, accumulation 2 (dry run)" $DRY_LIMIT benchmarks/gpu_check.py precision "${size[@]}" --updates 2
    section "5. host syncs per update (dry run)" $DRY_LIMIT benchmarks/syncs.py --cpu --updates 2 --warmup 1 \
        --logging_steps 3 --mixed_precision bf16 --adam_fused true
    section "6. training on synthetic speech (dry run)" $DRY_LIMIT benchmarks/gpu_check.py train "${size[@]}" \
        --minutes 0.25 --clips 8
else
    size=(--preset snac_24khz --batch 16 --seconds 0.8)
    section "1. bf16 eager, snac_24khz, 16 x 0.8 s" 35 benchmarks/gpu_check.py throughput "${size[@]}" --updates 10
    section "2. bf16 --torch_compile, snac_24khz, 16 x 0.8 s" 125 benchmarks/gpu_check.py throughput "${size[@]}" \
        --updates 10 --compile
    section "3. largest batch of 0.8 s clips, snac_24khz, bf16, eager" 30 benchmarks/gpu_check.py max_batch "${size[@]}"
    section "4. fp16, accumulation 2, snac_24khz, 8 x 0.8 s" 30 benchmarks/gpu_check.py precision \
        --preset snac_24khz --batch 8 --seconds 0.8 --updates 5
    section "5. host syncs per update, snac_24khz, bf16" 30 benchmarks/syncs.py --preset snac_24khz --batch 16 \
        --seconds 0.8 --mixed_precision bf16 --updates 4 --logging_steps 4 --dead_code_steps 57 --cuda_debug
    section "6. 3-minute training, snac_24khz, synthetic speech, bf16" 215 benchmarks/gpu_check.py train "${size[@]}" \
        --minutes 3 --clips 128
fi
echo
echo "== done ($(date -u +%H:%M:%S))"
exit "$failed"
