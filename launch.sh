#!/usr/bin/env bash
# snac-accel launcher.
#   ./launch.sh                 set up, then a ~5 minute demo training on the bundled clips
#   ./launch.sh setup           create/refresh .venv (seconds when nothing changed)
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

setup() {
  local stamp
  stamp=$(cat setup.cfg pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
  if [[ ! -x "$PY" || "$(cat "$VENV/.snac-accel-stamp" 2>/dev/null)" != "$stamp" ]]; then
    echo "setting up $VENV (first run or requirements changed)"
    [[ -x "$PY" ]] || "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -c constraints.txt -e ".[dev,tracking]"
    echo "$stamp" > "$VENV/.snac-accel-stamp"
  fi
  check_ffmpeg
}

check_ffmpeg() {
  if "$PY" -c "import torchcodec.decoders" 2>/dev/null; then
    return
  fi
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "torchcodec cannot load FFmpeg: installing Debian's ffmpeg"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
    "$PY" -c "import torchcodec.decoders" && return
  fi
  echo "torchcodec cannot load the FFmpeg shared libraries. Run: sudo apt-get install ffmpeg" >&2
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
  launch_forwarding_signals "$VENV/bin/accelerate" launch "${flags[@]}" -m "$module" "$@"
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
  trap 'pkill -TERM -P '"$launcher"' || true' TERM
  trap 'pkill -USR1 -P '"$launcher"' || true' USR1
  while true; do
    wait "$launcher" && status=0 || status=$?
    kill -0 "$launcher" 2>/dev/null || break
  done
  trap - TERM USR1
  exit "$status"
}

demo() {
  local out=outputs/demo
  "$PY" -m snac_accel.train --dataset demo --preset tiny --output_dir "$out" \
    --train_batch_size 4 --segment_seconds 1.0 --max_train_steps 300 --max_train_minutes 4.5 \
    --learning_rate 3e-4 --checkpointing_steps 100 --checkpoints_total_limit 2 --validation_steps 100 \
    --logging_steps 10
  echo
  echo "exported codec: $out/final"
  echo "load it with:   python -c \"import snac; m = snac.SNAC.from_pretrained('$out/final'); print(m)\""
}

cmd=${1:-demo}
[[ $# -gt 0 ]] && shift
case "$cmd" in
  setup) setup ;;
  test) setup; exec "$PY" -m pytest "$@" ;;
  train) setup; run_module snac_accel.train "$@" ;;
  encode) setup; run_module snac_accel.encode "$@" ;;
  demo) setup; demo ;;
  *) echo "usage: ./launch.sh [setup|test|train|encode [--accelerate-config NAME] ...]" >&2; exit 2 ;;
esac
