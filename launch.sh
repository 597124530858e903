#!/usr/bin/env bash
# snac-accel launcher.
#   ./launch.sh                 set up, then a ~5 minute demo training on the bundled clips
#   ./launch.sh setup           create/refresh .venv (seconds when nothing changed)
#   ./launch.sh test [ARGS]     set up, then the test suite (pytest ARGS)
#   ./launch.sh train [--accelerate-config NAME] [training options]
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

train() {
  local accelerate_config=""
  if [[ "${1:-}" == "--accelerate-config" ]]; then
    accelerate_config="$2"
    shift 2
  fi
  if [[ -z "$accelerate_config" ]]; then
    # One process: run the trainer itself so that SIGTERM reaches it directly.
    exec "$PY" -m snac_accel.train "$@"
  fi
  local file="accelerate_configs/${accelerate_config%.yaml}.yaml"
  [[ -f "$file" ]] || { echo "no accelerate config $file (choose from: $(ls accelerate_configs))" >&2; exit 2; }
  exec "$VENV/bin/accelerate" launch --config_file "$file" -m snac_accel.train "$@"
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
  train) setup; train "$@" ;;
  demo) setup; demo ;;
  *) echo "usage: ./launch.sh [setup|test|train [--accelerate-config NAME] ...]" >&2; exit 2 ;;
esac
