r"""One miniature training run on CIFAR-10, shared by benchmarks/collapse.py and benchmarks/claims.py.

A run is a ``configs/cifar10_<method>.py`` recipe with the data path, a step budget and ``FIELD=VALUE`` overrides,
trained in a temporary workdir. The result reports the teacher's k-NN top-1 (the full 50k/10k split, as the
recipes), the collapse monitors of the last logged step, whether the loss went non-finite, and the wall time.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import runpy
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "cifar10", "cifar10-jpeg.tar")


def apply_override(config, item: str) -> None:
  """``FIELD=VALUE`` (e.g. ``model.depth=4``, ``data.global_scale=(0.25, 1.0)``) on a ConfigDict, typed as the field."""
  field, value = item.split("=", 1)
  current = functools.reduce(lambda node, key: node[key], field.split("."), config)
  if isinstance(current, str):
    parsed = value
  elif isinstance(current, bool):
    parsed = {"true": True, "false": False}.get(value.lower())
    if parsed is None:
      raise ValueError(f"override {item!r}: {field} is a bool (true / false)")
  elif isinstance(current, (tuple, list)):
    parsed = tuple(ast.literal_eval(value))
  else:
    parsed = type(current)(ast.literal_eval(value))
  config.update_from_flattened_dict({field: parsed})


def recipe_config(recipe: str, data: str, overrides=(), steps: int | None = None):
  """The CIFAR-10 recipe configs/cifar10_<recipe>.py (a method's name, or e.g. "simdino_shared") on ``data``;
  ``steps`` (when given) replaces total_steps and shortens the warm-up to at most a tenth of it. Overrides are
  applied last."""
  config = runpy.run_path(os.path.join(ROOT, "configs", f"cifar10_{recipe}.py"))["get_config"]()
  config.data.source = f"folder:{os.path.abspath(data)}"
  if steps is not None:
    config.total_steps = steps
    config.warmup_steps = min(config.warmup_steps, max(1, steps // 10))
  config.log_every = max(1, config.total_steps // 20)
  config.checkpoint_every = 0
  for item in overrides:
    apply_override(config, item)
  return config


def run(config, *, knn_at_init: bool = True) -> dict:
  """Train ``config`` in a temporary workdir. Returns knn_top1 (None when the loss went non-finite), knn_top1_at_init
  (when measured), nonfinite_step, effective_rank / feature_std / prototypes_used of the last logged step, steps
  run, images/s over the logged steps after the first, gain (k-NN over init, when both were measured) and minutes
  of wall time (compilation and k-NN included)."""
  from simdino_jax.errors import NonFiniteLossError
  from simdino_jax.train import trainer

  config.evals.knn.at_init = knn_at_init
  start = time.time()
  out = {"knn_top1": None, "knn_top1_at_init": None, "nonfinite_step": None}
  with tempfile.TemporaryDirectory() as workdir:
    try:
      result = trainer.train(config, workdir)
      if "stopped" in result:  # the workdir is temporary: nothing to resume, so say so instead of a KeyError
        raise SystemExit(
          f"miniature run stopped by {result['stopped']} at step {result['step']}/{config.total_steps}; it trains in "
          "a temporary workdir, so running the command again starts this run afresh (stored results are kept)"
        )
      out["knn_top1"] = round(result["accuracy"], 2)
      if "accuracy_at_init" in result:
        out["knn_top1_at_init"] = round(result["accuracy_at_init"], 2)
    except NonFiniteLossError as e:
      out["nonfinite_step"] = e.step
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f if line.strip()]
  finite = [r for r in records if all(_finite(v) for k, v in r.items() if k in ("effective_rank", "feature_std"))]
  last = finite[-1] if finite else {}
  rates = [r["images_per_sec"] for r in records[1:] if r.get("images_per_sec")]
  out.update(
    effective_rank=_round(last.get("effective_rank"), 2),
    feature_std=_round(last.get("feature_std"), 4),
    prototypes_used=last.get("prototypes_used"),
    steps=records[-1]["step"] if records else 0,
    images_per_sec=round(sum(rates) / len(rates), 1) if rates else None,
    minutes=round((time.time() - start) / 60, 1),
  )
  measured = out["knn_top1"] is not None and out["knn_top1_at_init"] is not None
  out["gain"] = round(out["knn_top1"] - out["knn_top1_at_init"], 2) if measured else None
  return out


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(v)


def _round(v, n):
  return None if v is None else round(float(v), n)


def mark_flags_parsed() -> None:
  """grain's workers read absl flags; a plain-argparse script has to mark them parsed."""
  from absl import flags

  flags.FLAGS.mark_as_parsed()


def preload_tcmalloc(script: str) -> None:
  """Re-executes the script with tcmalloc preloaded when installed (XLA on CPU ~1.5x faster; docs/performance.md);
  SIMDINO_NO_TCMALLOC=1 keeps the default allocator. Call before jax is imported."""
  from simdino_jax import tcmalloc

  tcmalloc.maybe_reexec(script=os.path.abspath(script))
