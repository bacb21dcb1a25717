#!/usr/bin/env bash
# Train on one machine with all its local GPUs (one process; the batch is split over every visible GPU).
#
#   launch/gpu.sh CONFIG WORKDIR [--config.FIELD=VALUE ...]
#
# Example:
#   launch/gpu.sh configs/cifar10_simdino.py runs/cifar10_simdino
#   CUDA_VISIBLE_DEVICES=0,1 launch/gpu.sh configs/simdino_vitb16_in1k.py /data/runs/vitb16 --config.batch_size=256
#
# Installs the project with the [cuda] extra (jax[cuda12]: CUDA and cuDNN come as pip wheels, only the NVIDIA
# driver is needed) into a virtual environment, then runs python -m simdino_jax.train in the directory it was started
# from: WORKDIR, data paths and config arguments are read relative to it, and a CONFIG that does not exist there is
# taken from the repository (configs/NAME.py works from any directory). Re-running the same command
# resumes from the newest checkpoint in WORKDIR; exit code 75 means the run was stopped (SIGTERM, Ctrl-C, preemption)
# after saving a checkpoint: re-run to resume.
#
# Settings (environment variables, [default]):
#   VENV [.venv-cuda]: the virtual environment (a relative path is under the repository root); PYTHON [python3]
#     creates it
#   SKIP_INSTALL [0]: 1 uses VENV as it is
#   XLA_PYTHON_CLIENT_MEM_FRACTION [0.9]: fraction of each GPU's memory JAX preallocates
#   XLA_FLAGS: appended after this script's GPU flags (so they win): GPU_XLA_FLAGS
#   TFDS_DATA_DIR: where tfds: data sources are read from (tfds's default: ~/tensorflow_datasets)
#   DRY_RUN [0]: 1 prints the commands instead of running them
set -euo pipefail

SCRIPT=${BASH_SOURCE[0]}
ROOT=$(cd "$(dirname "$SCRIPT")/.." && pwd)
VENV=${VENV:-.venv-cuda}
PYTHON=${PYTHON:-python3}
SKIP_INSTALL=${SKIP_INSTALL:-0}
DRY_RUN=${DRY_RUN:-0}

# Overlap the data-parallel all-reduces with compute (XLA's latency-hiding scheduler).
GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SCRIPT" >&2
  exit 2
}

run() {
  printf '+' >&2
  printf ' %q' "$@" >&2
  printf '\n' >&2
  if [ "$DRY_RUN" != 1 ]; then
    "$@"
  fi
}

case "${1:-}" in
  -h | --help | help) usage ;;
esac
[ $# -ge 2 ] || usage
config=$1
workdir=$2
shift 2

# Paths: the trainer runs here (the caller's directory); the virtual environment and the install live in the
# repository. CONFIG is FILE or FILE:ARG; a FILE missing here but present in the repository is taken from there.
case "$VENV" in
  /*) ;;
  *) VENV="$ROOT/$VENV" ;;
esac
config_file=${config%%:*}
if [ ! -e "$config_file" ] && [ -e "$ROOT/$config_file" ]; then
  config="$ROOT/$config"
fi

if [ "$SKIP_INSTALL" != 1 ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    run "$PYTHON" -m venv "$VENV"
  fi
  run "$VENV/bin/python" -m pip install -q -U pip
  (
    cd "$ROOT"
    run "$VENV/bin/python" -m pip install -q -e ".[cuda]"
  )
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  echo "GPUs: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | sed 's/^ *//' | paste -sd, -)" >&2
else
  echo "gpu.sh: nvidia-smi not found; JAX will fall back to the CPU if it finds no GPU" >&2
fi

export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export XLA_FLAGS="$GPU_XLA_FLAGS${XLA_FLAGS:+ $XLA_FLAGS}"
echo "XLA_FLAGS=$XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION" >&2
# exec: this script's process becomes the trainer (same pid), so `kill -TERM <pid of gpu.sh>`, Ctrl-C or a
# scheduler's SIGTERM reach the trainer itself, which saves a checkpoint and exits 75; the same command resumes.
echo "gpu.sh: exit code 75 means stopped after saving a checkpoint: re-run the same command to resume" >&2
printf '+' >&2
printf ' %q' "$VENV/bin/python" -m simdino_jax.train --config="$config" --workdir="$workdir" "$@" >&2
printf '\n' >&2
if [ "$DRY_RUN" = 1 ]; then
  exit 0
fi
exec "$VENV/bin/python" -m simdino_jax.train --config="$config" --workdir="$workdir" "$@"
