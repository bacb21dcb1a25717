r"""Collapse without self-distillation, in miniature (paper section 4 / Table 3's qualitative result).

Trains each method on CIFAR-10 with the teacher replaced by the current student at every step
(``teacher.self_distillation=False``), for a fixed number of steps on CPU, and reports the teacher backbone's
k-NN top-1 next to the same network at initialisation, plus the collapse monitors at the end. The paper: SimDINO
without self-distillation still learns; DINO without it collapses.

  python benchmarks/collapse.py --steps 300 --methods simdino,dino [--self_distillation both] \
      [--set batch_size=64 --set model.depth=4 ...]

Prints one JSON line: {"benchmark": "collapse", "steps": ..., "results": [{method, self_distillation,
knn_top1, knn_top1_at_init, gain, effective_rank, feature_std, prototypes_used, minutes}, ...]}.
Needs ../shared/data/cifar10/cifar10-jpeg.tar (or --data).
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import runpy
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--steps", type=int, default=400, help="training steps per run (the fixed budget)")
  p.add_argument("--methods", default="simdino,dino", help="comma-separated methods with a configs/cifar10_<m>.py")
  p.add_argument(
    "--self_distillation",
    choices=["off", "on", "both"],
    default="off",
    help="train without the EMA teacher (off), with it (on), or both",
  )
  p.add_argument(
    "--data",
    default=os.path.join(ROOT, "..", "shared", "data", "cifar10", "cifar10-jpeg.tar"),
    help="CIFAR-10 folder or tar (train/ and test/ inside)",
  )
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="config override applied to every run, e.g. --set batch_size=64 --set model.depth=4",
  )
  return p.parse_args(argv)


def run_one(method: str, self_distillation: bool, args) -> dict:
  from simdino_jax.train import trainer

  config = runpy.run_path(os.path.join(ROOT, "configs", f"cifar10_{method}.py"))["get_config"]()
  config.data.source = f"folder:{os.path.abspath(args.data)}"
  config.total_steps = args.steps
  config.warmup_steps = min(config.warmup_steps, args.steps // 10)
  config.log_every = max(1, args.steps // 10)
  config.checkpoint_every = 0
  config.teacher.self_distillation = self_distillation
  for item in args.set:
    field, value = item.split("=", 1)
    current = functools.reduce(lambda node, key: node[key], field.split("."), config)
    parsed = value if isinstance(current, str) else type(current)(ast.literal_eval(value))
    config.update_from_flattened_dict({field: parsed})
  start = time.time()
  with tempfile.TemporaryDirectory() as workdir:
    result = trainer.train(config, workdir)
    last = json.loads(open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()[-1])
  return {
    "method": method,
    "self_distillation": self_distillation,
    "knn_top1": round(result["accuracy"], 2),
    "knn_top1_at_init": round(result["accuracy_at_init"], 2),
    "gain": round(result["accuracy"] - result["accuracy_at_init"], 2),
    "effective_rank": round(last["effective_rank"], 2),
    "feature_std": round(last["feature_std"], 4),
    "prototypes_used": last.get("prototypes_used"),
    "minutes": round((time.time() - start) / 60, 1),
  }


def main(argv=None):
  args = parse_args(argv)
  if not os.path.exists(args.data):
    sys.exit(f"collapse.py: CIFAR-10 not found at {args.data} (pass --data)")
  from absl import flags

  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
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
