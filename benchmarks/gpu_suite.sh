#!/usr/bin/env bash
# One-command GPU measurement suite for simdino_jax (one GPU, e.g. an NVIDIA H200).
#
# Command (from the repository root, on the device machine, with the wheels in .whl/ carried along):
#   bash benchmarks/gpu_suite.sh OUTDIR
#
# What it measures, in this order, one JSON line per part appended to OUTDIR/gpu_suite.jsonl (each with "part",
# "status", "rc", "wall_s"; full log: OUTDIR/gpu_suite.log, each part's output: OUTDIR/parts/PART.out):
#   env       python / jax / flax / optax / orbax / grain versions, jax devices, `nvidia-smi -L`, and whether the
#             benchmark imports work (import_errors).
#   data-w0   benchmarks/data_throughput.py, dino224 recipe (2x224 + 10x96 multi-crop, host augmentation: JPEG
#   data-wN   decode, crops, colour ops, batching), on a synthetic folder of 320 224x224 JPEGs made here (the device
#             has no datasets; GPU_SUITE_DATA_SOURCE=folder:PATH overrides): in-process (0 workers), then one grain
#             worker process per core (N = nproc): images/s in total and per process. CPU only.
#   step-s16  benchmarks/step_throughput.py --preset vit-s16|vit-b16|vit-l16 --dtype bfloat16 --steps 20 --warmup 5:
#   step-b16  the real jitted SimDINO train step (the Trainer's own; 2x224 + 10x96 crops; batch 64 for S and B, 32 for
#   step-l16  L, per device) on random crops: images/s, median step time, compile time, XLA FLOPs, MFU (peak from
#             the script's device table: 989 TFLOP/s bf16 dense for H200; PEAK_TFLOPS=... overrides), peak device
#             memory (memory_stats peak_bytes_in_use).
# Each part runs under `timeout` (env 90 s, data 45 s + 75 s, S 120 s, B 120 s, L 200 s), capped by an overall
# budget (GPU_SUITE_BUDGET_S, default 450 s) past which the remaining parts are cut short or skipped; a failed or
# timed-out part is recorded ({"part": ..., "status": "failed"|"timeout"|"skipped", "tail": [...]}) and the rest
# still runs. A short summary table is printed at the end.
#
# Expected runtime on one H200 with 16 cores: wheels + env ~20 s, JPEGs ~5 s, data ~15 s + ~30 s, step presets
# ~40-70 s each for S and B and ~60-120 s for L (mostly XLA compilation + autotuning); about 4-5 minutes in all,
# never more than ~7.8 minutes (the budget + kill grace). Give the device call timeout_s 540.
#
# Setup: the wheels in .whl/ (grain, array_record, cloudpickle, portpicker, ml_collections, tensorboardX; cp312 /
# py3, x86-64) are installed with pip --no-index --no-deps into /tmp/site and put first on PYTHONPATH; the
# device's own jax / flax / optax / orbax / numpy are used. To make .whl/ for a machine without network access
# (Python 3.12, x86-64), on any machine with pip:
#   for w in grain==0.2.18 array_record==0.8.6 cloudpickle==3.1.3 portpicker==1.6.0 ml_collections==1.1.0 \
#            tensorboardX==2.6.5; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w"
#   done
# With network access, `pip install -e ".[cuda]"` instead: without .whl/ the suite uses the installed packages.
#
# Dry run on a CPU machine (tiny presets and sizes, no wheel install; uses the python on PATH):
#   GPU_SUITE_DRY=1 bash benchmarks/gpu_suite.sh /tmp/gs
set -u

if [ $# -lt 1 ]; then
  echo "usage: bash benchmarks/gpu_suite.sh OUTDIR" >&2
  exit 2
fi
OUT=$1
mkdir -p "$OUT/parts"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_suite.log
JSONL=$OUT/gpu_suite.jsonl
: > "$LOG"
: > "$JSONL"
exec > >(tee -a "$LOG") 2>&1
MAIN_TEE=${!:-}

DRY=${GPU_SUITE_DRY:-0}
PY=${GPU_SUITE_PYTHON:-python3}
if [ "$DRY" = 1 ]; then BUDGET=${GPU_SUITE_BUDGET_S:-900}; else BUDGET=${GPU_SUITE_BUDGET_S:-450}; fi
NPROC=$(nproc)
SUITE_START=$(date +%s)
SITE=${GPU_SUITE_SITE:-/tmp/site}
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}

echo "=== gpu_suite start $(date -u +%FT%TZ) dry=$DRY out=$OUT budget=${BUDGET}s nproc=$NPROC pwd=$PWD"

# ---------------------------------------------------------------------------------------------------------------
# Wheels
if [ "$DRY" != 1 ]; then
  if ls .whl/*.whl > /dev/null 2>&1; then
    echo "=== installing $(ls .whl/*.whl | wc -l) wheels into $SITE"
    t0=$(date +%s)
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl; then
      echo "pip install failed; unpacking the wheels with zipfile instead"
      "$PY" - "$SITE" <<'EOF'
import glob, os, sys, zipfile
os.makedirs(sys.argv[1], exist_ok=True)
for whl in sorted(glob.glob(".whl/*.whl")):
  with zipfile.ZipFile(whl) as z:
    z.extractall(sys.argv[1])
  print("unpacked", whl)
EOF
    fi
    echo "wheels installed in $(( $(date +%s) - t0 )) s"
  else
    echo "=== no .whl/*.whl here: using the installed packages only"
  fi
  export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
echo "PYTHONPATH=$PYTHONPATH"

# ---------------------------------------------------------------------------------------------------------------
# Helpers

# record PART RC WALL_S STDOUT_FILE: append the part's last JSON line (with part / rc / wall_s added) to the JSONL,
# or a failure record with the tail of its output.
record() {
  "$PY" - "$1" "$2" "$3" "$4" "$JSONL" <<'EOF'
import json, sys
part, rc, wall, out_file, jsonl = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
try:
  lines = open(out_file, errors="replace").read().splitlines()
except OSError:
  lines = []
result = None
for line in reversed(lines):
  line = line.strip()
  if line.startswith("{"):
    try:
      result = json.loads(line)
      break
    except ValueError:
      pass
if result is None:
  status = "timeout" if rc in (124, 137) else ("skipped" if rc == -1 else "failed")
  result = {"status": status, "tail": [l for l in lines if l.strip()][-15:]}
else:
  result.setdefault("status", "ok" if rc == 0 else "failed")
record = {"part": part, "rc": rc, "wall_s": wall, **result}
with open(jsonl, "a") as f:
  f.write(json.dumps(record) + "\n")
EOF
}

# run_part NAME TIMEOUT_S CMD...: runs CMD under timeout (capped by the suite's remaining budget), its stdout and
# stderr to OUT/parts/NAME.out and the log; then records its last JSON line (or the failure) in the JSONL.
run_part() {
  local name=$1 limit=$2
  shift 2
  local now left rc t0 t1 wall outf=$OUT/parts/$name.out
  now=$(date +%s)
  left=$(( BUDGET - (now - SUITE_START) ))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  echo
  if [ "$limit" -lt 15 ]; then
    echo "=== [$name] skipped: suite budget spent ($BUDGET s): $*"
    echo "" > "$outf"
    record "$name" -1 0 "$outf"
    return
  fi
  echo "=== [$name] $(date -u +%TZ) timeout ${limit}s: $*"
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" > >(tee "$outf") 2>&1
  rc=$?
  t1=$(date +%s.%N)
  # the tee (bash >= 4.4 sets $! to it), so that the .out file is complete; never the suite's own tee
  if [ -n "${!:-}" ] && [ "${!:-}" != "$MAIN_TEE" ]; then wait "$!" 2> /dev/null; fi
  sleep 0.2
  wall=$("$PY" -c "print(round($t1 - $t0, 1))")
  echo "=== [$name] rc=$rc wall=${wall}s"
  record "$name" "$rc" "$wall" "$outf"
}

# ---------------------------------------------------------------------------------------------------------------
# Environment
echo
echo "=== nvidia-smi"
if command -v nvidia-smi > /dev/null 2>&1; then
  nvidia-smi -L
  nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit,clocks.max.sm --format=csv 2>/dev/null
else
  echo "(no nvidia-smi)"
fi

run_part env 90 "$PY" - <<'EOF'
import importlib, json, os, subprocess, sys
info = {"python": sys.version.split()[0], "executable": sys.executable}
errors = {}
for mod in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "numpy", "grain", "ml_collections",
            "tensorboardX", "array_record", "cv2", "PIL", "sklearn"):
  try:
    m = importlib.import_module(mod)
    v = getattr(m, "__version__", None)
    if v is None and mod == "grain":
      import importlib.metadata as md
      v = md.version("grain")
    info[mod] = str(v)
    if mod in ("grain", "ml_collections", "tensorboardX", "array_record"):
      info[mod + "_path"] = os.path.dirname(m.__file__)
  except Exception as e:  # pylint: disable=broad-except
    errors[mod] = f"{type(e).__name__}: {e}"
for mod in ("simdino_jax.train.trainer", "simdino_jax.methods", "simdino_jax.sharding", "simdino_jax.data.pipeline",
            "simdino_jax.data.sources"):
  try:
    importlib.import_module(mod)
  except Exception as e:  # pylint: disable=broad-except
    errors[mod] = f"{type(e).__name__}: {e}"
try:
  import jax
  devs = jax.devices()
  info["devices"] = [str(d) for d in devs]
  info["device_kind"] = devs[0].device_kind
  info["platform"] = devs[0].platform
except Exception as e:  # pylint: disable=broad-except
  errors["jax.devices"] = f"{type(e).__name__}: {e}"
try:
  info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception:  # pylint: disable=broad-except
  info["nvidia_smi"] = None
info["cpu_count"] = os.cpu_count()
info["import_errors"] = errors
info["status"] = "ok" if not errors else "import_errors"
for k, v in info.items():
  print(f"{k}: {v}", file=sys.stderr)
print(json.dumps(info))
EOF

# ---------------------------------------------------------------------------------------------------------------
# Host data-pipeline throughput (CPU only) on a synthetic JPEG folder
if [ -n "${GPU_SUITE_DATA_SOURCE:-}" ]; then
  DATA_SOURCE=$GPU_SUITE_DATA_SOURCE
else
  DATA_DIR=/tmp/gpu_suite_jpegs
  if [ "$DRY" = 1 ]; then NJPEG=48; else NJPEG=320; fi
  echo
  echo "=== making $NJPEG synthetic 224x224 JPEGs in $DATA_DIR"
  rm -rf "$DATA_DIR"
  "$PY" - "$DATA_DIR" "$NJPEG" <<'EOF'
# 224x224 RGB, quality 85, smooth random shapes + texture: about the size (~11 KiB) and decode cost of the
# project's imagenette224-mini JPEGs (ImageNet photographs resized to 224x224).
import os, sys, time
import numpy as np
from PIL import Image
root, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
t0, total = time.time(), 0
yy, xx = np.mgrid[0:224, 0:224].astype(np.float32) / 224.0
for i in range(n):
  d = os.path.join(root, "train", f"class{i % 10}")
  os.makedirs(d, exist_ok=True)
  img = np.zeros((224, 224, 3), np.float32)
  for c in range(3):  # low-frequency colour field
    a, b, p = rng.uniform(1, 6, 3)
    img[..., c] = 128 + 80 * np.sin(a * xx * 3.14 + p) * np.cos(b * yy * 3.14 + p)
  for _ in range(6):  # a few blobs
    cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
    m = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
    img[m] = rng.uniform(0, 255, 3)
  img += rng.normal(0, 7, img.shape).astype(np.float32)  # texture / sensor noise
  path = os.path.join(d, f"{i:05d}.jpg")
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=85)
  total += os.path.getsize(path)
print(f"{n} JPEGs, mean {total / n / 1024:.1f} KiB, {time.time() - t0:.1f} s", file=sys.stderr)
EOF
  DATA_SOURCE=folder:$DATA_DIR
fi
if [ "$DRY" = 1 ]; then
  run_part data-w0 120 "$PY" benchmarks/data_throughput.py --source "$DATA_SOURCE" --workers 0 \
    --num_images 16 --batch_size 8 --warmup_batches 1
  run_part data-wN 120 "$PY" benchmarks/data_throughput.py --source "$DATA_SOURCE" --workers 2 \
    --num_images 32 --batch_size 8 --warmup_batches 2
else
  run_part data-w0 45 "$PY" benchmarks/data_throughput.py --source "$DATA_SOURCE" --workers 0 \
    --num_images 512 --batch_size 32 --warmup_batches 2
  # one worker per core; warm-up of 2 batches per worker so that every worker has started before the timing
  run_part data-wN 75 "$PY" benchmarks/data_throughput.py --source "$DATA_SOURCE" --workers "$NPROC" \
    --num_images $(( NPROC * 32 * 12 )) --batch_size 32 --warmup_batches $(( NPROC * 2 ))
fi

# ---------------------------------------------------------------------------------------------------------------
# Train-step throughput (bfloat16)
STEP_ARGS=(--peak_tflops "${PEAK_TFLOPS:-0}")
if [ "$DRY" = 1 ]; then
  for p in s16 b16 l16; do
    run_part "step-$p" 240 "$PY" benchmarks/step_throughput.py --preset cpu-vit-tiny --batch_size 8 \
      --steps 1 --warmup 1 "${STEP_ARGS[@]}"
  done
else
  STEPS=${GPU_SUITE_STEPS:-20}
  WARMUP=${GPU_SUITE_WARMUP:-5}
  run_part step-s16 120 "$PY" benchmarks/step_throughput.py --preset vit-s16 --dtype bfloat16 \
    --steps "$STEPS" --warmup "$WARMUP" "${STEP_ARGS[@]}"
  run_part step-b16 120 "$PY" benchmarks/step_throughput.py --preset vit-b16 --dtype bfloat16 \
    --steps "$STEPS" --warmup "$WARMUP" "${STEP_ARGS[@]}"
  run_part step-l16 200 "$PY" benchmarks/step_throughput.py --preset vit-l16 --dtype bfloat16 \
    --steps "$STEPS" --warmup "$WARMUP" "${STEP_ARGS[@]}"
fi

# ---------------------------------------------------------------------------------------------------------------
# Summary
echo
echo "=== summary ($(( $(date +%s) - SUITE_START )) s in all; $JSONL)"
"$PY" - "$JSONL" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def fmt(v, spec=""):
  return "-" if v is None else format(v, spec)
print(f"{'part':9} {'status':13} {'wall_s':>7}  details")
for r in rows:
  p, st, w = r.get("part"), r.get("status"), r.get("wall_s")
  if p == "env":
    d = (f"python {r.get('python')} jax {r.get('jax')} flax {r.get('flax')} grain {r.get('grain')} "
         f"{r.get('device_kind')} x{len(r.get('devices') or [])}")
    if r.get("import_errors"):
      d += f" import_errors={r['import_errors']}"
  elif r.get("benchmark") == "step_throughput":
    d = (f"{r.get('model')} {r.get('dtype')} b={r.get('batch_size')}: {fmt(r.get('images_per_sec'))} img/s, "
         f"{fmt(r.get('step_time_ms'))} ms/step, MFU {fmt(r.get('mfu'))}, "
         f"{fmt(r.get('achieved_tflops_per_device'))} TFLOP/s, peak mem {fmt(r.get('peak_memory_gib'))} GiB, "
         f"compile {fmt(r.get('compile_s'))} s")
  elif r.get("benchmark") == "data_throughput":
    d = "; ".join(f"{x['workers']} workers: {x['images_per_sec']} img/s ({x['images_per_sec_per_process']}/proc)"
                  for x in r.get("runs", []))
  else:
    d = " | ".join(str(t) for t in (r.get("tail") or [])[-3:])[-300:]
  print(f"{p:9} {st:13} {fmt(w):>7}  {d}")
EOF
echo "=== gpu_suite end $(date -u +%FT%TZ)"
sleep 0.3
