r"""Train-step throughput of the real SimDINO step (the Trainer's own jitted step) on random crops.

  python benchmarks/step_throughput.py --preset cpu-vit-tiny [--steps 10] [--warmup 3]
  python benchmarks/step_throughput.py --preset vit-b16 [--dtype bfloat16] [--batch_size 256] \
      [--peak_tflops 989] [--profile /tmp/trace] [--dump_hlo /tmp/hlo] [--set model.remat=True]
  python benchmarks/step_throughput.py --preset cpu-vit-tiny --rounds 3 \
      --torch_python /path/to/torch-venv/bin/python --official_repo /path/to/SimDINO

Presets (SimDINO, 2 global crops + local crops, head hidden 2048 / out 256, drop path 0.1):
  cpu-vit-tiny  ViT-Ti/4 (width 192, depth 12, 3 heads), 2x32 + 6x16 crops, batch 64, float32
  vit-s16       ViT-S/16, 2x224 + 10x96 crops, batch 64 per device
  vit-b16       ViT-B/16, 2x224 + 10x96 crops, batch 64 per device
  vit-l16       ViT-L/16, 2x224 + 10x96 crops, batch 32 per device
The dtype defaults to bfloat16 on GPU/TPU and float32 on CPU for the ViT presets.

The step is built by ``simdino_jax.train.setup`` (``build`` + ``make_step``: mesh, sharded state, donated jitted step)
from the preset's config, so it is the program training runs; only the batches are random (no data pipeline in the loop). After
``--warmup`` steps (compilation included) each of ``--steps`` steps is timed to completion.

Prints one JSON line: images_per_sec (batch / median step time), step_time_ms (median, min, max), peak memory
(device ``memory_stats()`` peak when the backend reports it, else the host's peak RSS), flops_per_image (XLA's
compiled cost analysis of the whole step: student and teacher forward, backward, optimizer; one device's share
times the device count, divided by the global batch),
mfu (against --peak_tflops or the table below, per device), plus the allocator (tcmalloc preloaded or not), XLA_FLAGS,
device kind and count, and the jax version. With --torch_python, the official PyTorch step
(official_step_torch.py, a separate process) is timed after each round of ours, never at the same time, and the
line adds its images/s per round and ratio_to_reference (ours / official, median over rounds). On Linux the script
re-executes itself with tcmalloc preloaded when it is installed (``--notcmalloc`` or SIMDINO_NO_TCMALLOC=1 opts
out), as the training entry point does.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
from simdino_jax import tcmalloc  # pylint: disable=wrong-import-position  # stdlib only, cheap

PRESETS = ("cpu-vit-tiny", "vit-s16", "vit-b16", "vit-l16")

_PRESET = flags.DEFINE_enum("preset", "cpu-vit-tiny", PRESETS, "Model / crop / batch preset.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after the warm-up).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first.", lower_bound=0)
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch; 0: the preset's.")
_DTYPE = flags.DEFINE_enum(
  "dtype",
  "",
  ["", "float32", "bfloat16", "float16"],
  "Compute dtype; empty: the preset's (bfloat16 on GPU/TPU, float32 on CPU).",
)
_METHOD = flags.DEFINE_string("method", "simdino", "Method of the step (any of simdino_jax.methods).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of ONE device for the MFU; 0: from the device table.")
_PROFILE = flags.DEFINE_string("profile", "", "Write a jax.profiler trace of the timed steps to this directory.")
_DUMP_HLO = flags.DEFINE_string("dump_hlo", "", "Dump XLA's HLO (before and after optimisation) to this directory.")
_SET = flags.DEFINE_multi_string("set", [], "Config override FIELD=VALUE (Python literal), e.g. model.remat=True.")
_TCMALLOC = flags.DEFINE_bool("tcmalloc", True, "Re-execute with tcmalloc preloaded when it is installed (Linux).")
_TORCH_PYTHON = flags.DEFINE_string(
  "torch_python",
  "",
  "A Python with PyTorch: also time the official PyTorch step (official_step_torch.py) on the "
  "cpu-vit-tiny preset, alternating with ours, one at a time, and report the ratio.",
)
_OFFICIAL_REPO = flags.DEFINE_string("official_repo", "", "Clone of RobinWu218/SimDINO, for --torch_python.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "With --torch_python: alternations of (ours, official).", lower_bound=1)

# Dense bfloat16 peak TFLOP/s of one device (vendor datasheets; SXM parts). Matched in order against the lower-cased
# device_kind, so the more specific names come first.
PEAK_TFLOPS = (
  ("h200", 989.0),
  ("h100 pcie", 756.0),
  ("h100", 989.0),
  ("gh200", 989.0),
  ("b200", 2250.0),
  ("a100", 312.0),
  ("l40s", 362.0),
  ("a10g", 70.0),
  ("l4", 121.0),
  ("v100", 125.0),
  ("tpu v6", 918.0),
  ("tpu v5p", 459.0),
  ("tpu v5 lite", 197.0),
  ("tpu v5e", 197.0),
  ("tpu v5", 459.0),
  ("tpu v4", 275.0),
  ("tpu v3", 123.0),
)


# The training split's size the schedules are built for (setup.build): the batches are random, and the presets set
# total_steps and warmup_steps, so it only sizes an epoch (the DINO methods' epoch-based freezes and temperatures).
NUM_TRAIN = 50_000


def preset_config(name: str, platform: str, num_devices: int):
  """The preset's config (a full trainer config; no data is read: the batches are random)."""
  from simdino_jax import config as config_lib

  c = config_lib.base_config()
  c.method = "simdino"
  c.total_steps = 10_000
  c.warmup_steps = 100
  c.log_every = 10_000
  c.checkpoint_every = 0
  c.head.hidden_dim, c.head.out_dim = 2048, 256
  c.model.drop_path_rate = 0.1
  accel = platform != "cpu"
  if name == "cpu-vit-tiny":
    c.model.variant = "Ti/4"
    c.model.img_size = 32
    c.data.num_global, c.data.num_local = 2, 6
    c.data.global_size, c.data.local_size = 32, 16
    c.batch_size = 64
    c.model.dtype = "float32"
  else:
    c.model.variant = {"vit-s16": "S/16", "vit-b16": "B/16", "vit-l16": "L/16"}[name]
    c.model.img_size = 224
    c.data.num_global, c.data.num_local = 2, 10
    c.data.global_size, c.data.local_size = 224, 96
    c.batch_size = (32 if name == "vit-l16" else 64) * num_devices
    c.model.dtype = "bfloat16" if accel else "float32"
  return c


def apply_overrides(config, items) -> None:
  import ast
  import functools

  for item in items:
    if "=" not in item:
      raise app.UsageError(f"--set {item!r}: expected FIELD=VALUE")
    field, value = item.split("=", 1)
    try:
      current = functools.reduce(lambda node, key: node[key], field.split("."), config)
    except (KeyError, AttributeError):
      raise app.UsageError(f"--set {item!r}: config has no field {field!r}") from None
    parsed = value if isinstance(current, str) else ast.literal_eval(value)
    config.update_from_flattened_dict({field: parsed})


def random_batch(config, rng):
  import numpy as np

  d = config.data
  b = config.batch_size
  batch = {
    "global": rng.standard_normal((b, d.num_global, d.global_size, d.global_size, 3), dtype=np.float32),
    "local": rng.standard_normal((b, d.num_local, d.local_size, d.local_size, 3), dtype=np.float32),
  }
  return batch


def random_masks(config, rng, n: int):
  """(B, global crops, n patches) masks, a quarter of each crop's ``n`` patches masked."""
  import numpy as np

  mask = np.zeros((config.batch_size, config.data.num_global, n), bool)
  mask[..., : n // 4] = True  # a quarter of the patches masked, below the mask generator's bound
  return mask


def peak_memory(devices) -> dict:
  stats = [d.memory_stats() for d in devices]
  if all(s and "peak_bytes_in_use" in s for s in stats):
    return {
      "peak_memory_gib": round(max(s["peak_bytes_in_use"] for s in stats) / 2**30, 3),
      "peak_memory_source": "device memory_stats peak_bytes_in_use (max over devices)",
    }
  rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return {"peak_memory_gib": round(rss_kib / 2**20, 3), "peak_memory_source": "host peak RSS (ru_maxrss)"}


def peak_tflops(device_kind: str) -> float | None:
  if _PEAK.value > 0:
    return _PEAK.value
  kind = device_kind.lower()
  for key, value in PEAK_TFLOPS:
    if key in kind:
      return value
  return None


def step_flops(compiled, num_devices: int) -> float | None:
  """FLOPs of one whole step over all devices. XLA's cost analysis describes the SPMD-partitioned program, i.e. ONE
  device's share (on 2 devices it reports half of the 1-device figure), so it is scaled by the device count."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"]) * num_devices


def official_reference(batch_size: int) -> dict:
  """Runs benchmarks/official_step_torch.py with --torch_python (a separate process: torch is not our dependency)."""
  import subprocess

  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_step_torch.py")
  cmd = [
    _TORCH_PYTHON.value,
    script,
    "--official_repo",
    _OFFICIAL_REPO.value,
    "--batch_size",
    str(batch_size),
    "--steps",
    str(_STEPS.value),
    "--warmup",
    str(_WARMUP.value),
  ]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  if _TORCH_PYTHON.value and (not _OFFICIAL_REPO.value or _PRESET.value != "cpu-vit-tiny"):
    raise app.UsageError("--torch_python needs --official_repo and --preset=cpu-vit-tiny (the official step's preset)")
  if _TCMALLOC.value:
    tcmalloc.maybe_reexec(script=__file__)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DUMP_HLO.value:  # read when the backend starts, i.e. before the first computation below
    os.makedirs(_DUMP_HLO.value, exist_ok=True)
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={_DUMP_HLO.value} --xla_dump_hlo_as_text"
    ).strip()

  import jax
  import numpy as np

  from simdino_jax import config as config_lib
  from simdino_jax import methods, sharding
  from simdino_jax.train import setup

  devices = jax.devices()
  platform = devices[0].platform
  config = preset_config(_PRESET.value, platform, len(devices))
  config.method = _METHOD.value
  if _DTYPE.value:
    config.model.dtype = _DTYPE.value
  if _BATCH.value:
    config.batch_size = _BATCH.value
  apply_overrides(config, _SET.value)

  config_lib.validate(config, num_devices=len(devices), num_processes=jax.process_count())
  t0 = time.time()
  # The trainer's own assembly and step, without a workdir, a data source or an evaluator.
  built = setup.build(config, NUM_TRAIN)
  mesh = sharding.make_mesh(config.mesh)
  shardings = setup.state_sharding(built, mesh)
  state = setup.init_state(built, shardings)
  rng = np.random.default_rng(0)
  host = random_batch(config, rng)
  if methods.get_method(config.method).uses_masks:
    host["mask"] = random_masks(config, rng, built.num_patches)
  batch = sharding.to_global(host, sharding.batch_sharding(mesh))
  compiled = setup.make_step(built, mesh, shardings=shardings).lower(state, batch).compile()
  compile_s = time.time() - t0
  flops = step_flops(compiled, mesh.size)

  for _ in range(_WARMUP.value):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  if _PROFILE.value:
    jax.profiler.start_trace(_PROFILE.value)
  rounds = _ROUNDS.value if _TORCH_PYTHON.value else 1
  times, round_medians, references = [], [], []
  for _ in range(rounds):
    round_times = []
    for _ in range(_STEPS.value):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      round_times.append(time.perf_counter() - start)
    times += round_times
    round_medians.append(statistics.median(round_times))
    if _TORCH_PYTHON.value:  # after ours, never at the same time
      references.append(official_reference(config.batch_size))
  if _PROFILE.value:
    jax.profiler.stop_trace()
  loss = float(metrics["loss"])

  median = statistics.median(times)
  reference = {}
  if references:
    # ours / official, images/s over images/s, in each round
    ratios = [config.batch_size / m / r["images_per_sec"] for r, m in zip(references, round_medians)]
    reference = {
      "reference": "official PyTorch SimDINO step (benchmarks/official_step_torch.py), eager",
      "reference_images_per_sec": [r["images_per_sec"] for r in references],
      "reference_torch_version": references[0]["torch_version"],
      "reference_threads": references[0]["threads"],
      "images_per_sec_per_round": [round(config.batch_size / m, 2) for m in round_medians],
      "ratio_to_reference_per_round": [round(r, 3) for r in ratios],
      "ratio_to_reference": round(statistics.median(ratios), 3),
    }
  kind = devices[0].device_kind
  peak = peak_tflops(kind)
  result = {
    "benchmark": "step_throughput",
    "preset": _PRESET.value,
    "method": config.method,
    "model": config.model.variant,
    "dtype": config.model.dtype,
    "remat": bool(config.model.get("remat", False)),
    "batch_size": config.batch_size,
    "crops": f"{config.data.num_global}x{config.data.global_size} + {config.data.num_local}x{config.data.local_size}",
    "images_per_sec": round(config.batch_size / median, 2),
    "step_time_ms": round(1e3 * median, 2),
    "step_time_ms_min": round(1e3 * min(times), 2),
    "step_time_ms_max": round(1e3 * max(times), 2),
    "steps": len(times),
    "warmup": _WARMUP.value,
    "compile_s": round(compile_s, 1),
    "flops_per_image": flops / config.batch_size if flops else None,
    "step_tflops": round(flops / 1e12, 4) if flops else None,
    "achieved_tflops_per_device": round(flops / median / 1e12 / len(devices), 3) if flops else None,
    "peak_tflops_per_device": peak,
    "mfu": round(flops / median / len(devices) / (peak * 1e12), 4) if flops and peak else None,
    **peak_memory(devices),
    "loss": loss,
    "device_kind": kind,
    "platform": platform,
    "num_devices": len(devices),
    "allocator": tcmalloc.allocator(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "jax_version": jax.__version__,
    "overrides": list(_SET.value),
    "profile": _PROFILE.value or None,
    "dump_hlo": _DUMP_HLO.value or None,
    **reference,
  }
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
