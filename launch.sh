#!/usr/bin/env bash
# snac-accel launcher.
#   ./launch.sh                 set up, then a ~12 minute demo GAN training on the bundled clips
#   ./launch.sh setup           create/refresh .venv (seconds when nothing changed) and check that
#                               FFmpeg decodes audio (as root with apt-get: installs Debian's ffmpeg)
#   ./launch.sh test [ARGS]     set up, then the test suite (pytest ARGS)
#   ./launch.sh train [--accelerate-config NAME] [training options]
#       NAME: a file of accelerate_configs/ (cpu, single_gpu, multi_gpu, multi_node); without it,
#       one process. Multi-node reads NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE
#       (or SLURM's variables); TERM and USR1 make the trainers checkpoint and exit 0.
#   ./launch.sh encode [--accelerate-config NAME] CODEC DATA --output_dir DIR [options]
#       tokenize a dataset (python -m snac_accel.encode), with the same NAME handling as train.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
DEMO_CLIP=snac_accel/demo_data/validation/clip_004.flac

setup() {
  local stamp
  stamp=$(cat setup.cfg pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
  if [[ ! -x "$PY" || "$(cat "$VENV/.snac-accel-stamp" 2>/dev/null)" != "$stamp" ]]; then
    echo "setting up $VENV: installing the Python packages (first run or requirements changed; minutes)"
    [[ -x "$PY" ]] || make_venv
    quietly "upgrading pip" "$PY" -m pip install --upgrade pip
    quietly "installing snac-accel and its packages" \
      "$PY" -m pip install -c constraints.txt -e ".[dev]"
    echo "$stamp" > "$VENV/.snac-accel-stamp"
  fi
  check_ffmpeg
}

# Run a noisy command with its output in $VENV/setup.log; show the log's end only when it fails.
quietly() {
  local what=$1
  shift
  mkdir -p "$VENV"
  if ! "$@" > "$VENV/setup.log" 2>&1; then
    echo "setup failed while $what; the end of $VENV/setup.log:" >&2
    grep -v "^WARNING: Location .* is ignored" "$VENV/setup.log" | tail -n 25 >&2
    exit 1
  fi
}

# Debian's package(s), installed when we may (root with apt-get); false when not installed.
apt_install() {
  [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null || return 1
  echo "installing Debian's $* (apt-get)"
  local log
  log=$(mktemp)
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } > "$log" 2>&1; then
    tail -n 10 "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}

# The one command that installs a system package (Debian's name), for the error line.
install_hint() {
  local sudo="sudo "
  [[ $(id -u) -eq 0 ]] && sudo=""
  if command -v apt-get >/dev/null; then
    echo "Run: ${sudo}apt-get install $*"
  else
    echo "Install with your package manager what Debian calls: $*"
  fi
}

# A Python of 3.10 or newer with a working venv module (Debian ships it apart: python3-venv).
make_venv() {
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "snac-accel needs Python 3.10 or newer; $PYTHON is $("$PYTHON" --version 2>&1 || echo missing)." \
      "Run with PYTHON=python3.11 (or another 3.10+) ./launch.sh" >&2
    exit 1
  fi
  if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    local package
    package="python$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
    apt_install "$package" || {
      echo "$PYTHON cannot create a virtual environment (no ensurepip). $(install_hint "$package")" >&2
      exit 1
    }
  fi
  "$PYTHON" -m venv "$VENV"
}

# torchcodec (0.17) loads FFmpeg only when it first decodes, so importing it proves nothing:
# decode a bundled demo clip.
ffmpeg_decodes() {
  "$PY" -c 'import sys
from torchcodec.decoders import AudioDecoder
sys.exit(AudioDecoder(sys.argv[1]).get_all_samples().data.numel() == 0)' "$DEMO_CLIP" >/dev/null 2>&1
}

check_ffmpeg() {
  ffmpeg_decodes && return
  if apt_install ffmpeg && ffmpeg_decodes; then
    return
  fi
  echo "torchcodec cannot decode audio: FFmpeg's shared libraries are missing or do not load." \
    "$(install_hint ffmpeg)" >&2
  exit 1
}

# run_module MODULE [--accelerate-config NAME] [options]: one process, or accelerate launch with NAME.
run_module() {
  local module=$1 accelerate_config=""
  shift
  if [[ "${1:-}" == "--accelerate-config" ]]; then
    accelerate_config="$2"
    shift 2
  fi
  if [[ -z "$accelerate_config" ]]; then
    # One process: run the module itself so that SIGTERM reaches it directly.
    exec "$PY" -m "$module" "$@"
  fi
  if [[ "$module" == snac_accel.train ]]; then
    # Bad options as one line and exit 2 here: accelerate's launcher turns a trainer's exit 2 into 1.
    "$PY" -m "$module" --check_only "$@" || exit $?
  fi
  local name=${accelerate_config%.yaml}
  local file="accelerate_configs/$name.yaml"
  [[ -f "$file" ]] || { echo "no accelerate config $file (choose from: $(ls accelerate_configs))" >&2; exit 2; }
  local flags=(--config_file "$file")
  if [[ "$name" == cpu ]]; then
    # Without it accelerate looks for CUDA, finds none and starts unsynchronised copies.
    export ACCELERATE_USE_CPU=1
    # torchrun would give each of the 2 processes one thread: share the cores instead.
    local cores
    cores=$(nproc)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores > 3 ? cores / 2 : 1))}
  fi
  local nnodes=${NNODES:-${SLURM_NNODES:-1}}
  if [[ "$name" == multi_node || "$nnodes" -gt 1 ]]; then
    local rendezvous
    rendezvous=$(rendezvous_flags "$nnodes") || exit 2
    mapfile -t -O "${#flags[@]}" flags <<< "$rendezvous"
  else
    if [[ "$name" == multi_gpu && -n "$(gpus_per_node)" ]]; then
      flags+=(--num_processes "$(gpus_per_node)")
    fi
    # Two jobs on one machine need two rendezvous ports.
    if [[ -n "${MASTER_PORT:-}" ]]; then
      flags+=(--main_process_port "$MASTER_PORT")
    fi
  fi
  # --quiet: a trainer's own one-line error is not followed by the launcher's traceback.
  launch_forwarding_signals "$VENV/bin/accelerate" launch --quiet "${flags[@]}" -m "$module" "$@"
}

# Processes on this machine: GPUS_PER_NODE, else what SLURM or nvidia-smi report; one on a CPU run.
gpus_per_node() {
  if [[ -n "${GPUS_PER_NODE:-}" ]]; then
    echo "$GPUS_PER_NODE"
  elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [[ "${ACCELERATE_USE_CPU:-0}" == 1 ]]; then
    echo 1
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | wc -l
  fi
}

# accelerate launch flags of one machine of a multi-node job, one per line; they override the yaml.
rendezvous_flags() {
  local nnodes=$1 node_rank master_addr master_port per_node
  node_rank=${NODE_RANK:-${SLURM_NODEID:-}}
  master_addr=${MASTER_ADDR:-}
  if [[ -z "$master_addr" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    master_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  fi
  master_port=${MASTER_PORT:-29500}
  per_node=$(gpus_per_node)
  if [[ "$nnodes" -lt 2 || -z "$node_rank" || -z "$master_addr" || -z "$per_node" ]]; then
    echo "multi-node needs NNODES (>1), NODE_RANK, MASTER_ADDR [MASTER_PORT, GPUS_PER_NODE]" \
      "or a SLURM allocation; got NNODES=$nnodes NODE_RANK=$node_rank MASTER_ADDR=$master_addr" \
      "GPUS_PER_NODE=$per_node" >&2
    exit 2
  fi
  printf '%s\n' --num_machines "$nnodes" --machine_rank "$node_rank" --num_processes "$((nnodes * per_node))" \
    --main_process_ip "$master_addr" --main_process_port "$master_port" --rdzv_backend static
}

# accelerate's one-process launcher dies on SIGTERM and leaves the trainer running, and torchrun
# does not forward SIGUSR1: hand TERM and USR1 to the trainer processes (the launcher's children),
# which checkpoint and exit 0, then wait for the launcher to finish.
launch_forwarding_signals() {
  "$@" &
  local launcher=$! status=0
  trap 'signal_children TERM '"$launcher" TERM
  trap 'signal_children USR1 '"$launcher" USR1
  while true; do
    wait "$launcher" && status=0 || status=$?
    kill -0 "$launcher" 2>/dev/null || break
  done
  trap - TERM USR1
  exit "$status"
}

# kill -SIGNAL the children of a process, found in /proc (procps' pkill is not on every machine).
signal_children() {
  local stat line fields
  for stat in /proc/[0-9]*/stat; do
    { read -r line < "$stat"; } 2>/dev/null || continue
    read -ra fields <<< "${line##*) }"  # after the command name: state, parent pid, ...
    if [[ "${fields[1]}" == "$2" ]]; then
      kill "-$1" "${stat//[^0-9]/}" 2>/dev/null || true
    fi
  done
}

# The demo's options are in snac_accel/demo_data/demo.yaml: the tiny preset and the "cpu" recipe on the
# bundled espeak clips, the discriminators on from step 250 of 420 (about 12 minutes on 2 cores; the
# share measured with benchmarks/quality.py --gan_from), validated on the bundled real speech. It ends
# with the paper row of the exported codec on those recordings (never trained on).
demo() {
  local out=outputs/demo
  "$PY" -m snac_accel.train --config snac_accel/demo_data/demo.yaml --output_dir "$out"
  if [[ ! -f "$out/final/config.json" ]]; then  # stopped by a signal: checkpointed, not exported
    echo "the demo stopped before its last step; continue it with: $PY -m snac_accel.train" \
      "--config snac_accel/demo_data/demo.yaml --output_dir $out --resume_from_checkpoint latest"
    return 0
  fi
  echo
  echo "the paper row of the demo codec on the bundled real speech (recorded voices, never trained on):"
  "$PY" -m snac_accel.evaluate "$out/final" snac_accel/demo_data/real_speech \
    --output_json "$out/eval_real_speech.json" --output_markdown "$out/paper_row.md"
  echo
  echo "exported codec: $out/final"
  echo "load it with:   python -c \"import snac; m = snac.SNAC.from_pretrained('$out/final'); print(m)\""
}

cmd=${1:-demo}
[[ $# -gt 0 ]] && shift
case "$cmd" in
  setup) setup; echo "ready: $VENV (packages installed, FFmpeg decodes audio)" ;;
  test) setup; exec "$PY" -m pytest "$@" ;;
  train) setup; run_module snac_accel.train "$@" ;;
  encode) setup; run_module snac_accel.encode "$@" ;;
  demo) setup; demo ;;
  *) echo "usage: ./launch.sh [setup|test|train|encode [--accelerate-config NAME] ...]" >&2; exit 2 ;;
esac
