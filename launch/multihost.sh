#!/usr/bin/env bash
# Train on several hosts without SLURM or ssh: start this same command on EVERY host (by hand, a cluster's own
# launcher, a container orchestrator...), each with its own PROCESS_ID. One process per host, all its GPUs.
#
#   COORDINATOR=HOST:PORT NUM_PROCESSES=N PROCESS_ID=K launch/multihost.sh CONFIG WORKDIR [--config.FIELD=VALUE ...]
#
# Example (two hosts; node0 listens on port 12345 for the others: open it in the firewall):
#   node0$ COORDINATOR=node0:12345 NUM_PROCESSES=2 PROCESS_ID=0 launch/multihost.sh configs/demo.py /nfs/run
#   node1$ COORDINATOR=node0:12345 NUM_PROCESSES=2 PROCESS_ID=1 launch/multihost.sh configs/demo.py /nfs/run
#
# COORDINATOR is process 0's host and a free port on it; every process connects there (jax.distributed), so the
# processes may start in any order. WORKDIR must be one directory shared by every host (NFS, Lustre, gs://...): every
# process writes its shards of each checkpoint there, process 0 the metrics, config.json and eval/. Each host runs
# the same code, CONFIG and overrides. The script exports JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
# JAX_PROCESS_ID, then `exec`s the trainer: its pid is the trainer's, so SIGTERM to every process (what schedulers
# send) saves a checkpoint at a step all agree on and exits 75; the same commands resume. (TPU VMs: launch/tpu_pod.sh.)
#
# Settings (environment variables, [default]):
#   COORDINATOR, NUM_PROCESSES, PROCESS_ID: required, as above (0 <= PROCESS_ID < NUM_PROCESSES)
#   VENV [.venv-cuda]: the virtual environment with the project installed (relative to the repository root), e.g.
#                      by launch/gpu.sh or `python3 -m venv .venv-cuda && .venv-cuda/bin/pip install -e ".[cuda]"`
#                      once per host (or once on a shared filesystem); PYTHON [$VENV/bin/python] overrides it
#   XLA_PYTHON_CLIENT_MEM_FRACTION [0.9], XLA_FLAGS: as in launch/gpu.sh
#   DRY_RUN [0]: 1 prints the variables and the command instead of running it
set -euo pipefail

SCRIPT=${BASH_SOURCE[0]}
ROOT=$(cd "$(dirname "$SCRIPT")/.." && pwd)
VENV=${VENV:-.venv-cuda}
PYTHON=${PYTHON:-$VENV/bin/python}
DRY_RUN=${DRY_RUN:-0}

# Overlap the data-parallel all-reduces with compute (XLA's latency-hiding scheduler), as launch/gpu.sh does.
GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SCRIPT" >&2
  exit 2
}

die() {
  echo "multihost.sh: $*" >&2
  exit 1
}

case "${1:-}" in
  -h | --help | help) usage ;;
esac
[ $# -ge 2 ] || usage
config=$1
workdir=$2
shift 2

# Checked here, in one line each, on every host: a wrong value would otherwise hang until jax's time-out.
is_count() { [[ $1 =~ ^[0-9]+$ ]]; }
if [ -z "${COORDINATOR:-}" ]; then
  die "COORDINATOR is not set: HOST:PORT of process 0 (e.g. COORDINATOR=node0:12345)"
fi
if ! [[ $COORDINATOR =~ ^[^:]+:[0-9]+$ || $COORDINATOR =~ ^\[.+\]:[0-9]+$ ]]; then
  die "COORDINATOR=$COORDINATOR is not HOST:PORT (e.g. node0:12345)"
fi
if [ -z "${NUM_PROCESSES:-}" ]; then
  die "NUM_PROCESSES is not set: the number of hosts (processes) in the run"
fi
if ! is_count "$NUM_PROCESSES" || [ "$NUM_PROCESSES" -lt 1 ]; then
  die "NUM_PROCESSES=$NUM_PROCESSES is not a positive integer"
fi
if [ -z "${PROCESS_ID:-}" ]; then
  die "PROCESS_ID is not set: this host's index, 0 to $((NUM_PROCESSES - 1)) (0 on the COORDINATOR host)"
fi
if ! is_count "$PROCESS_ID" || [ "$PROCESS_ID" -ge "$NUM_PROCESSES" ]; then
  die "PROCESS_ID=$PROCESS_ID is not an integer from 0 to $((NUM_PROCESSES - 1)) (NUM_PROCESSES=$NUM_PROCESSES)"
fi

cd "$ROOT"
if [ "$DRY_RUN" != 1 ] && [ ! -x "$PYTHON" ]; then
  die "$PYTHON not found: install the project first (VENV, PYTHON: see launch/multihost.sh -h)"
fi

export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$NUM_PROCESSES JAX_PROCESS_ID=$PROCESS_ID
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export XLA_FLAGS="$GPU_XLA_FLAGS${XLA_FLAGS:+ $XLA_FLAGS}"
echo "JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES" \
  "JAX_PROCESS_ID=$JAX_PROCESS_ID" >&2
echo "XLA_FLAGS=$XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION" >&2
echo "multihost.sh: exit code 75 means stopped after saving a checkpoint: re-run the same commands to resume" >&2
printf '+' >&2
printf ' %q' "$PYTHON" -m simdino_jax.train --config="$config" --workdir="$workdir" "$@" >&2
printf '\n' >&2
if [ "$DRY_RUN" = 1 ]; then
  exit 0
fi
# exec: this process becomes the trainer (same pid), so signals sent to it reach the trainer.
exec "$PYTHON" -m simdino_jax.train --config="$config" --workdir="$workdir" "$@"
