r"""What this CPU can do on float32 matrix multiplies: the ceiling for the train step's 71% of matmul time.

  python benchmarks/matmul_peak.py [--repeats 5]

Times float32 matmuls on the process's JAX CPU device (XLA) and in NumPy (its BLAS) for a large square product and
for the shapes of the cpu-vit-tiny step (batch 64, 2x32 + 6x16 crops at patch 4 = 14,848 tokens, width 192: the
qkv, attention-output, MLP-in and MLP-out projections, and the 2048-wide head), and prints one JSON line with
GFLOP/s per shape (2 m k n / median time) and the nominal FMA peak from /proc/cpuinfo (cores x 2 FMA units x 8
float32 lanes x 2 FLOP x the MHz the kernel reports, AVX2; x 2 lanes with AVX-512; boost clocks can exceed it, so the
measured square product is the better ceiling). Like the other benchmarks it re-executes itself with tcmalloc
preloaded when installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
from simdino_jax import tcmalloc  # pylint: disable=wrong-import-position

TOKENS = 64 * (2 * (32 // 4) ** 2 + 6 * (16 // 4) ** 2 + 8)  # batch x (patches + cls per crop) = 14,848
SHAPES = {  # name: (m, k, n)
  "square_2048": (2048, 2048, 2048),
  "qkv_192x576": (TOKENS, 192, 576),
  "proj_192x192": (TOKENS, 192, 192),
  "mlp_in_192x768": (TOKENS, 192, 768),
  "mlp_out_768x192": (TOKENS, 768, 192),
  "head_2048x2048": (512, 2048, 2048),
}


def nominal_peak_gflops() -> dict:
  cores = os.cpu_count() or 1
  mhz, flags = None, ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("cpu MHz") and mhz is None:
          mhz = float(line.split(":")[1])
        elif line.startswith("flags") and not flags:
          flags = line
  except OSError:
    pass
  lanes = 16 if " avx512f" in flags else 8 if " avx2" in flags else 4
  fma_units = 2
  peak = cores * fma_units * lanes * 2 * mhz / 1e3 if mhz else None
  return {
    "cores": cores,
    "cpu_mhz": mhz,
    "float32_lanes": lanes,
    "nominal_peak_gflops": round(peak, 1) if peak else None,
  }


def time_it(fn, repeats: int) -> float:
  fn()
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--tcmalloc", action=argparse.BooleanOptionalAction, default=True)
  args = parser.parse_args()
  if args.tcmalloc:
    tcmalloc.maybe_reexec(script=__file__)

  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  result = {
    "benchmark": "matmul_peak",
    **nominal_peak_gflops(),
    "allocator": tcmalloc.allocator(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "jax_version": jax.__version__,
    "numpy_version": np.__version__,
  }
  matmul = jax.jit(jnp.matmul)
  for name, (m, k, n) in SHAPES.items():
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    flop = 2.0 * m * k * n
    t_jax = time_it(lambda: matmul(ja, jb).block_until_ready(), args.repeats)  # pylint: disable=cell-var-from-loop
    t_np = time_it(lambda: a @ b, args.repeats)  # pylint: disable=cell-var-from-loop
    result[f"jax_gflops_{name}"] = round(flop / t_jax / 1e9, 1)
    result[f"numpy_gflops_{name}"] = round(flop / t_np / 1e9, 1)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
