#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: one process per host, every host running the same command (--worker=all).
#
#   launch/tpu_pod.sh create                      create the slice
#   launch/tpu_pod.sh setup                       copy the code to every worker and install it with the [tpu] extra
#   launch/tpu_pod.sh train CONFIG GS_WORKDIR [--config.FIELD=VALUE ...]
#                                                 run training on every worker (re-run it to resume)
#   launch/tpu_pod.sh all CONFIG GS_WORKDIR [--config.FIELD=VALUE ...]
#                                                 create (unless it exists), setup, train
#   launch/tpu_pod.sh logs | status | stop | ssh | delete
#
# Example (SimDINO ViT-S/16 on ImageNet, built with launch/prepare_data.sh into gs://my-bucket/tfds):
#   TFDS_DATA_DIR=gs://my-bucket/tfds launch/tpu_pod.sh all configs/simdino_vits16_in1k.py gs://my-bucket/runs/vits16
#
# Settings (environment variables, [default]):
#   TPU_NAME [simdino-pod]  ZONE [us-central2-b]  ACCELERATOR_TYPE [v4-32]  PROJECT [gcloud's default]
#   TPU_VERSION [tpu-ubuntu2204-base]: the TPU VM image (v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
#                                      v6e: v2-alpha-tpuv6e)
#   SPOT [0]: 1 creates a Spot (preemptible) slice; a preempted run saves a checkpoint and `train` resumes it
#   CODE_SOURCE [scp]: scp copies this checkout (tracked + untracked non-ignored files) to every worker;
#                      git clones REPO_URL at REPO_REF [main] on every worker
#   REMOTE_DIR [simdino_jax], REMOTE_VENV [simdino_venv]: paths on the workers, relative to the home directory
#   TFDS_DATA_DIR [gs://YOUR_BUCKET/tensorflow_datasets]: where tfds: data sources are read from
#   DETACH [1]: run training under nohup (it outlives the ssh session; see `logs`); 0: in the foreground
#   DRY_RUN [0]: 1 prints the gcloud commands instead of running them
#
# GS_WORKDIR must be on Cloud Storage (gs://...): every host writes its shards of each checkpoint there.
set -euo pipefail

TPU_NAME=${TPU_NAME:-simdino-pod}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
TPU_VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
CODE_SOURCE=${CODE_SOURCE:-scp}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-main}
REMOTE_DIR=${REMOTE_DIR:-simdino_jax}
REMOTE_VENV=${REMOTE_VENV:-simdino_venv}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-gs://YOUR_BUCKET/tensorflow_datasets}
DETACH=${DETACH:-1}
DRY_RUN=${DRY_RUN:-0}
LOG_FILE=simdino_train.log  # on every worker, in the home directory
PID_FILE=simdino_train.pid
EXIT_FILE=simdino_train.exit  # the last run's exit code: 0 done, 75 stopped after a checkpoint (resume), else failed

SCRIPT=${BASH_SOURCE[0]}
ROOT=$(cd "$(dirname "$SCRIPT")/.." && pwd)

usage() {
  # The comment block at the top of this file, without the '#'.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SCRIPT" >&2
  exit 2
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 1
}

# Print a command (quoted so that it can be pasted into a shell), then run it unless DRY_RUN=1.
run() {
  printf '+' >&2
  printf ' %q' "$@" >&2
  printf '\n' >&2
  if [ "$DRY_RUN" != 1 ]; then
    "$@"
  fi
}

gcloud_tpu() {
  local extra=()
  if [ -n "$PROJECT" ]; then
    extra+=(--project="$PROJECT")
  fi
  run gcloud compute tpus tpu-vm "$@" --zone="$ZONE" ${extra[@]+"${extra[@]}"}
}

on_all_workers() {
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

check_remote_paths() {
  local p
  for p in "$REMOTE_DIR" "$REMOTE_VENV"; do
    [[ "$p" =~ ^[A-Za-z0-9._/-]+$ ]] || die "REMOTE_DIR and REMOTE_VENV may only use letters, digits and . _ / - ('$p')"
  done
}

cmd_create() {
  local extra=()
  if [ "$SPOT" = 1 ]; then
    extra+=(--spot)
  fi
  gcloud_tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$TPU_VERSION" \
    ${extra[@]+"${extra[@]}"}
}

slice_exists() {
  [ "$DRY_RUN" = 1 ] && return 1
  local extra=()
  if [ -n "$PROJECT" ]; then
    extra+=(--project="$PROJECT")
  fi
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" ${extra[@]+"${extra[@]}"} >/dev/null 2>&1
}

cmd_copy() {
  check_remote_paths
  case "$CODE_SOURCE" in
    scp)
      local tarball
      tarball=$(mktemp "${TMPDIR:-/tmp}/simdino_jax_code.XXXXXX")
      # shellcheck disable=SC2064  # expand now: $tarball is local to this function
      trap "rm -f '$tarball'" EXIT
      if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$tarball")
      else
        tar -C "$ROOT" --exclude=.venv --exclude=.git --exclude=__pycache__ -czf "$tarball" .
      fi
      gcloud_tpu scp "$tarball" "$TPU_NAME:simdino_jax_code.tar.gz" --worker=all
      on_all_workers "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/simdino_jax_code.tar.gz -C ~/$REMOTE_DIR && rm ~/simdino_jax_code.tar.gz"
      ;;
    git)
      [ -n "$REPO_URL" ] || die "CODE_SOURCE=git needs REPO_URL (e.g. REPO_URL=https://github.com/you/simdino_jax.git)"
      on_all_workers "rm -rf ~/$REMOTE_DIR && git clone --quiet $(printf '%q' "$REPO_URL") ~/$REMOTE_DIR && git -C ~/$REMOTE_DIR checkout --quiet $(printf '%q' "$REPO_REF")"
      ;;
    *)
      die "CODE_SOURCE must be scp or git, not '$CODE_SOURCE'"
      ;;
  esac
}

cmd_install() {
  check_remote_paths
  # Ubuntu images lack python3-venv; install it when creating the venv fails.
  on_all_workers "set -e; cd ~; python3 -m venv $REMOTE_VENV 2>/dev/null || { rm -rf $REMOTE_VENV; sudo apt-get update -qq; sudo apt-get install -y -qq python3-venv; python3 -m venv $REMOTE_VENV; }; . $REMOTE_VENV/bin/activate; pip install -q -U pip; pip install -q -e \"./${REMOTE_DIR}[tpu]\"; python -c 'import jax; print(\"jax\", jax.__version__, \"local devices:\", jax.local_device_count())'"
}

cmd_train() {
  [ $# -ge 2 ] || usage
  check_remote_paths
  local config=$1 workdir=$2
  shift 2
  case "$workdir" in
    gs://*) ;;
    *) die "the workdir must be a gs:// path that every host can write, not '$workdir'" ;;
  esac
  local setup python after
  setup="cd ~/$REMOTE_DIR && . ~/$REMOTE_VENV/bin/activate && export TFDS_DATA_DIR=$(printf '%q' "$TFDS_DATA_DIR")"
  python="python -m simdino_jax.train$(printf ' %q' "--config=$config" "--workdir=$workdir" "$@")"
  after="rc=\$?; echo \$rc > ~/$EXIT_FILE; if [ \$rc = 75 ]; then echo 'stopped after saving a checkpoint (exit 75, preemption or stop): run the same train command to resume'; fi; exit \$rc"
  if [ "$DETACH" = 1 ]; then
    # The pid file holds the TRAINER's pid (not the nohup wrapper's), so `stop` signals the trainer itself: it saves
    # a checkpoint and exits 75, and the wrapper, still waiting on it, records the exit code for `status`.
    local train="$setup || { echo 1 > ~/$EXIT_FILE; exit 1; }; rm -f ~/$EXIT_FILE; $python & echo \$! > ~/$PID_FILE; wait \$!; $after"
    on_all_workers "nohup bash -c $(printf '%q' "$train") > ~/$LOG_FILE 2>&1 < /dev/null &"
    echo "training started on every worker of $TPU_NAME; follow it with: $SCRIPT logs" >&2
  else
    on_all_workers "$setup && $python; $after"
  fi
}

cmd_logs() {
  gcloud_tpu ssh "$TPU_NAME" --worker="${WORKER:-0}" --command="tail -n 200 -f ~/$LOG_FILE"
}

cmd_status() {
  on_all_workers "if [ -f ~/$PID_FILE ] && kill -0 \$(cat ~/$PID_FILE) 2>/dev/null; then echo \"\$(hostname): training (pid \$(cat ~/$PID_FILE))\"; else echo \"\$(hostname): not training (last exit code: \$(cat ~/$EXIT_FILE 2>/dev/null || echo none); 75: stopped after a checkpoint, resume with train)\"; fi; tail -n 2 ~/$LOG_FILE 2>/dev/null || true"
}

cmd_stop() {
  # SIGTERM: the trainer saves a checkpoint at the next step and exits; `train` with the same arguments resumes.
  on_all_workers "if [ -f ~/$PID_FILE ]; then kill -TERM \$(cat ~/$PID_FILE) 2>/dev/null || true; fi"
}

[ $# -ge 1 ] || usage
command=$1
shift
case "$command" in
  create) cmd_create ;;
  copy) cmd_copy ;;
  install) cmd_install ;;
  setup) cmd_copy; cmd_install ;;
  train) cmd_train "$@" ;;
  all)
    [ $# -ge 2 ] || usage
    if slice_exists; then
      echo "tpu_pod.sh: $TPU_NAME exists in $ZONE; reusing it" >&2
    else
      cmd_create
    fi
    cmd_copy
    cmd_install
    cmd_train "$@"
    ;;
  logs) cmd_logs ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  ssh) gcloud_tpu ssh "$TPU_NAME" --worker="${WORKER:-0}" ;;
  delete) gcloud_tpu delete "$TPU_NAME" --quiet ;;
  -h | --help | help) usage ;;
  *) echo "tpu_pod.sh: unknown command '$command'" >&2; usage ;;
esac
