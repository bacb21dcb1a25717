r"""Collapse without self-distillation, in miniature (paper section 4 / Table 3's qualitative result).

Trains each method on CIFAR-10 with the teacher replaced by the current student at every step
(``teacher.self_distillation=False``), for a fixed number of steps on CPU, and reports the teacher backbone's
k-NN top-1 next to the same network at initialisation, plus the collapse monitors at the end. The paper: SimDINO
without self-distillation still learns; DINO without it collapses.

  python benchmarks/collapse.py --steps 300 --methods simdino_shared,dino [--self_distillation both] \
      [--set batch_size=64 --set model.depth=4 ...]

Prints one JSON line: {"benchmark": "collapse", "steps": ..., "results": [{method, recipe, self_distillation,
knn_top1, knn_top1_at_init, gain, effective_rank, feature_std, prototypes_used, minutes}, ...]}.
Needs ../shared/data/cifar10/cifar10-jpeg.tar (or --data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import miniature  # benchmarks/miniature.py: one CIFAR-10 run


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--steps", type=int, default=400, help="training steps per run (the fixed budget)")
  p.add_argument(
    "--methods",
    default="simdino_shared,dino",
    help="comma-separated recipes configs/cifar10_<m>.py (simdino_shared: SimDINO on cifar10_dino.py's ViT and batch)",
  )
  p.add_argument(
    "--self_distillation",
    choices=["off", "on", "both"],
    default="off",
    help="train without the EMA teacher (off), with it (on), or both",
  )
  p.add_argument("--data", default=miniature.DEFAULT_DATA, help="CIFAR-10 folder or tar (train/ and test/ inside)")
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="config override applied to every run, e.g. --set batch_size=64 --set model.depth=4",
  )
  return p.parse_args(argv)


def run_one(recipe: str, self_distillation: bool, args) -> dict:
  overrides = [f"teacher.self_distillation={self_distillation}", *args.set]
  config = miniature.recipe_config(recipe, args.data, overrides, steps=args.steps)
  result = miniature.run(config)
  return {"method": config.method, "recipe": recipe, "self_distillation": self_distillation, **result}


def main(argv=None):
  args = parse_args(argv)
  if argv is None:  # run as a script: sys.argv is what the re-executed process gets
    miniature.preload_tcmalloc(__file__)
  if not os.path.exists(args.data):
    sys.exit(f"collapse.py: CIFAR-10 not found at {args.data} (pass --data)")
  miniature.mark_flags_parsed()
  modes = {"off": [False], "on": [True], "both": [False, True]}[args.self_distillation]
  results = [run_one(m, sd, args) for m in args.methods.split(",") for sd in modes]
  import jax

  from simdino_jax import tcmalloc

  print(
    json.dumps(
      {
        "benchmark": "collapse",
        "steps": args.steps,
        "overrides": args.set,
        "device": jax.devices()[0].platform,
        "allocator": tcmalloc.allocator(),
        "results": results,
      }
    )
  )


if __name__ == "__main__":
  main()
