r"""What packing the masked patch tokens per batch shard saves: the trainer's SimDINOv2 / DINOv2 step against the same
step gathering floor(N x max ratio) positions for every global crop (the gather before it; train/step.py
masked_gather with ``tokens=None``), side by side in one process, on the same random crops and DINOv2 masks.

  python benchmarks/masked_gather.py [--config configs/cifar10_simdinov2.py] [--rounds 3] [--steps 10]

The rounds alternate (packed, per-crop), each timing ``--steps`` steps to completion after two untimed ones; prints
one JSON line: images/s of each (median step), their ratio, XLA's FLOPs per image of each step, the patch tokens
each gathers, the allocator (tcmalloc re-exec as in training) and XLA_FLAGS.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
from simdino_jax import tcmalloc  # pylint: disable=wrong-import-position  # stdlib only, cheap


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "cifar10_simdinov2.py"))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  tcmalloc.maybe_reexec(script=__file__)

  import jax
  import numpy as np

  from simdino_jax import config as config_lib
  from simdino_jax import methods, sharding
  from simdino_jax.data.masking import batch_masks
  from simdino_jax.train import setup

  config = runpy.run_path(args.config)["get_config"]()
  config.data.source = "digits"  # never opened (the batches are random), but a config names its data
  if not methods.get_method(config.method).uses_masks:
    raise SystemExit(f"masked_gather.py: {args.config} trains {config.method!r}, which masks no patch")
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  # The trainer's own assembly, without a workdir, a data source or an evaluator: the batches are random, and the
  # training split's size (CIFAR-10's 50,000, the default recipe's) only sizes the schedules.
  built = setup.build(config, 50_000)
  mesh = sharding.make_mesh(config.mesh)
  shardings = setup.state_sharding(built, mesh)
  rng = np.random.default_rng(0)
  d, b = config.data, config.batch_size
  grid = d.global_size // built.patch_size
  host = {
    "global": rng.standard_normal((b, d.num_global, d.global_size, d.global_size, 3), dtype=np.float32),
    "local": rng.standard_normal((b, d.num_local, d.local_size, d.local_size, 3), dtype=np.float32),
    "mask": batch_masks(
      rng, b * d.num_global, grid, grid, mask_probability=config.masking.probability, ratio_min_max=config.masking.ratio
    ).reshape(b, d.num_global, grid * grid),
  }
  batch = sharding.to_global(host, sharding.batch_sharding(mesh))
  steps = {
    "packed": setup.make_step(built, mesh, shardings=shardings),
    "per_crop": setup.make_step(built, mesh, shardings=shardings, pack_masks=False),
  }
  compiled, states, flops, times = {}, {}, {}, {k: [] for k in steps}
  for name, fn in steps.items():
    states[name] = setup.init_state(built, shardings)
    compiled[name] = fn.lower(states[name], batch).compile()
    analysis = compiled[name].cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    flops[name] = float(analysis["flops"]) * mesh.size / b if analysis and "flops" in analysis else None
    for _ in range(2):
      states[name], _ = compiled[name](states[name], batch)
    jax.block_until_ready(states[name])
  losses = {}
  for _ in range(args.rounds):
    for name in steps:  # one after the other, never at the same time
      for _ in range(args.steps):
        start = time.perf_counter()
        states[name], metrics = compiled[name](states[name], batch)
        jax.block_until_ready((states[name], metrics))
        times[name].append(time.perf_counter() - start)
      losses[name] = float(metrics["loss"])
  ips = {name: b / statistics.median(t) for name, t in times.items()}
  shards = mesh.size
  print(
    json.dumps(
      {
        "benchmark": "masked_gather",
        "config": os.path.relpath(args.config, ROOT),
        "method": config.method,
        "batch_size": b,
        "devices": shards,
        "images_per_sec_packed": round(ips["packed"], 2),
        "images_per_sec_per_crop": round(ips["per_crop"], 2),
        "speedup": round(ips["packed"] / ips["per_crop"], 3),
        "flops_per_image_packed": flops["packed"],
        "flops_per_image_per_crop": flops["per_crop"],
        "patch_tokens_packed": shards * methods.masked_token_budget(config, host_batch=b, shards=shards),
        "patch_tokens_per_crop": b * d.num_global * methods.mask_positions(config),
        "masked_tokens_in_batch": int(host["mask"].sum()),
        "loss_after_packed": losses["packed"],
        "loss_after_per_crop": losses["per_crop"],
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "allocator": tcmalloc.allocator(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_version": jax.__version__,
      }
    )
  )


if __name__ == "__main__":
  main()
