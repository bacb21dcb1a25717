r"""The paper's robustness claims in miniature: Tables 5, 6, 7 and 9 on CIFAR-10 at one fixed budget per run.

Every cell is a configs/cifar10_<recipe>.py recipe trained for the same budget (``--steps`` of batch 64, warm-up a
tenth of it; the batch-size cells keep the number of images, as the paper keeps the epochs, so batch 32 runs twice
the steps and 128 half, each with the recipe's linear lr rule) with one change, scored by the teacher's k-NN top-1
on the full 50k/10k split, its effective rank and whether the loss went non-finite. SimDINO's cells start from
cifar10_simdino_shared.py (the ViT, batch and optimiser of cifar10_dino.py), so that the two methods compare on one
backbone, as in the paper's tables:

  Table 6: DINO (recipe: teacher momentum 0.99 -> 1) with momentum 0.9, without last-layer normalisation, and with a
           constant teacher temperature 0.07 (no warm-up); SimDINO (recipe: 0.9 -> 1) with DINO's 0.99;
  Table 7: SimDINO at batch 32 / 64 / 128;
  Table 9: no self-distillation (the teacher is the current student, as benchmarks/collapse.py) for both;
  Table 5: SimDINO with the coding rate replaced by InfoNCE, the uniformity loss or Barlow Twins (loss.regularizer,
           weight 1).

Verdicts follow the rules fixed before any run (VERDICT RULES below) and are printed whatever they say: yes, no, or
inconclusive when the claim's reference cell did not learn (a perturbation cannot be said to break a run that did
not learn in the first place).

  python benchmarks/claims.py --data /path/to/cifar10.tar --out /tmp/claims [--steps 300] [--seeds 2] [--only t6,t9]

DINO's appendix (Tables 14 "Relation to MoCo-v2 and BYOL" and 15 "Relation to SwAV", ViT-S/16 300 epochs, linear
top-1) in miniature: each cell is a row of configs/dino_appendix.py (the same config as
``--config=configs/dino_appendix.py:ROW``: configs/cifar10_dino.py with the row's components switched, or the
MoCo-v2 / BYOL CIFAR recipe), on the shared ViT, plus one ResNet cell: DINO's row 1 with the backbone switched to
``resnet18_cifar`` at width 16 (a CIFAR-size ResNet-18-like variant: 3x3 stride-1 stem, no max-pool; a stand-in for
the paper's ResNet-50, not its architecture), scored against the k-NN of ITS network at initialisation. The paper's
figures are linear top-1; the miniature scores k-NN top-1, as for the other tables.

  python benchmarks/claims.py --data /path/to/cifar10.tar --out runs/appendix --steps 1000 --seeds 1 --only t14,t15,t13
  python benchmarks/claims.py ... --cells appendix_sk   # run one cell; the claims whose cells are stored are scored

Each finished cell is stored as OUT/cells/<cell>-seed<k>.json, so an interrupted run resumes where it stopped (and
--only re-scores a subset); OUT/claims.md gets the table: claim | paper | miniature | agrees?. Prints one JSON line.
Seeds: every cell runs seed 0; the cells of a claim whose decisive quantity is within ``--close`` k-NN points of its
threshold also run the further seeds up to ``--seeds`` and are scored on the mean.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import miniature  # benchmarks/miniature.py: one CIFAR-10 run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# cell name -> (recipe configs/cifar10_<recipe>.py, overrides, batch-size factor for the image budget)
CELLS = {
  "simdino": ("simdino_shared", [], 1.0),
  "dino": ("dino", [], 1.0),
  "simdino_momentum_0.99": ("simdino_shared", ["teacher.momentum=0.99"], 1.0),
  "dino_momentum_0.9": ("dino", ["teacher.momentum=0.9"], 1.0),
  "dino_no_last_layer_norm": ("dino", ["head.norm_last_layer=false"], 1.0),
  "dino_constant_teacher_temp": ("dino", ["dino.warmup_teacher_temp=0.07", "dino.teacher_temp=0.07"], 1.0),
  "simdino_batch_32": ("simdino_shared", ["batch_size=32"], 0.5),
  "simdino_batch_128": ("simdino_shared", ["batch_size=128"], 2.0),
  "simdino_no_self_distillation": ("simdino_shared", ["teacher.self_distillation=false"], 1.0),
  "dino_no_self_distillation": ("dino", ["teacher.self_distillation=false"], 1.0),
  "simdino_infonce": ("simdino_shared", ["loss.regularizer=infonce"], 1.0),
  "simdino_uniformity": ("simdino_shared", ["loss.regularizer=uniformity"], 1.0),
  "simdino_barlow": ("simdino_shared", ["loss.regularizer=barlow"], 1.0),
}

# DINO's appendix rows (configs/dino_appendix.py ROWS: row -> (base recipe, the paper's rows, components)) as cells.
# Rows 1 (plain DINO) and "no momentum" are the cells "dino" and "dino_no_self_distillation" above (the same configs).
APPENDIX_ROWS = runpy.run_path(os.path.join(ROOT, "configs", "dino_appendix.py"))["ROWS"]
APPENDIX_CELL = {"dino": "dino", "no_momentum": "dino_no_self_distillation"}


def _override(field, value):
  """A component as the FIELD=VALUE string miniature.apply_override reads."""
  if isinstance(value, bool):
    value = str(value).lower()
  return f"{field}={value}"


for _row, (_base, _, _components) in APPENDIX_ROWS.items():
  APPENDIX_CELL.setdefault(_row, f"appendix_{_row}")
  CELLS.setdefault(APPENDIX_CELL[_row], (_base, [_override(f, v) for f, v in _components.items()], 1.0))
# The ResNet cell: Table 14/15's row 1 (DINO's CIFAR recipe) with a CIFAR-size ResNet-18-like backbone.
CELLS["dino_resnet18_cifar"] = ("dino", ["model.arch=resnet18_cifar", "model.resnet_width=16"], 1.0)

# VERDICT RULES (fixed before measuring; k-NN points, means over the seeds run):
HURT = 2.0  # a perturbation "hurts" when k-NN drops >= HURT below its base cell, the loss goes non-finite, or k-NN
#             ends at or below the network at initialisation (no learning / collapse)
STABLE = 2.0  # "insensitive": |k-NN - base| < STABLE and finite; "robust to batch size": max - min < STABLE
LEARNS = 2.0  # "still learns": k-NN >= at-init + LEARNS
BEATS = 1.0  # "A beats B": k-NN(A) >= k-NN(B) + BEATS
# Fixed with the Table 13-15 cells, before any of them ran: "matches" and "ahead" are "insensitive" and "beats" whose
# reference (the first cell) must itself learn (k-NN >= its at-init + LEARNS), else inconclusive: two runs that did
# not learn are neither alike nor ordered in any sense these tables mean. "hurts", "learns" and "collapses" as above.

# claim id -> (table, claim, paper figure, cells, kind)
CLAIMS = [
  (
    "t6_dino_momentum",
    "Table 6",
    "DINO breaks when the teacher momentum drops (0.996 -> 0.9)",
    "DINO diverges / collapses",
    ["dino", "dino_momentum_0.9"],
    "hurts",
  ),
  (
    "t6_dino_last_layer_norm",
    "Table 6",
    "DINO breaks without last-layer normalisation",
    "DINO diverges / collapses",
    ["dino", "dino_no_last_layer_norm"],
    "hurts",
  ),
  (
    "t6_dino_teacher_temp",
    "Table 6",
    "DINO breaks with a constant teacher temperature 0.07 (no warm-up)",
    "DINO diverges / collapses",
    ["dino", "dino_constant_teacher_temp"],
    "hurts",
  ),
  (
    "t6_simdino_momentum",
    "Table 6",
    "SimDINO is insensitive to the teacher momentum (0.9 vs 0.99)",
    "SimDINO trains normally",
    ["simdino", "simdino_momentum_0.99"],
    "insensitive",
  ),
  (
    "t7_batch",
    "Table 7",
    "SimDINO is robust to the batch size",
    "68.3 / 69.7 / 69.6 k-NN at batch 256 / 512 / 1024 (ViT-S, 100 ep.)",
    ["simdino_batch_32", "simdino", "simdino_batch_128"],
    "robust",
  ),
  (
    "t9_simdino",
    "Table 9",
    "SimDINO still learns without self-distillation",
    "58.6 k-NN (69.7 with it; ViT-S, 100 ep.)",
    ["simdino_no_self_distillation"],
    "learns",
  ),
  (
    "t9_dino",
    "Table 9",
    "DINO collapses without self-distillation",
    "collapses ('-')",
    ["dino", "dino_no_self_distillation"],
    "hurts",
  ),
  (
    "t5_infonce",
    "Table 5",
    "the coding rate beats InfoNCE",
    "coding rate ahead",
    ["simdino", "simdino_infonce"],
    "beats",
  ),
  (
    "t5_uniformity",
    "Table 5",
    "the coding rate beats the uniformity loss",
    "coding rate ahead",
    ["simdino", "simdino_uniformity"],
    "beats",
  ),
  (
    "t5_barlow",
    "Table 5",
    "Barlow Twins in place of the coding rate collapses",
    "collapses",
    ["simdino_barlow"],
    "collapses",
  ),
  # DINO's appendix B, Table 15 "Relation to SwAV" (ViT-S/16, 300 epochs, linear top-1); cells: configs/dino_appendix.py
  (
    "t15_no_momentum",
    "Table 15",
    "without momentum, DINO with centering collapses",
    "0.1 (76.1 with momentum)",
    ["dino", "dino_no_self_distillation"],
    "hurts",
  ),
  (
    "t15_no_momentum_softmax_batch",
    "Table 15",
    "without momentum, Softmax(batch) still learns",
    "72.2",
    ["appendix_no_momentum_softmax_batch"],
    "learns",
  ),
  (
    "t15_swav",
    "Table 15",
    "without momentum, Sinkhorn-Knopp (SwAV) still learns",
    "71.8",
    ["appendix_swav"],
    "learns",
  ),
  (
    "t15_operation",
    "Table 15",
    "with momentum, the teacher output operation hardly matters",
    "76.1 / 75.8 / 76.0 (centering / Softmax(batch) / Sinkhorn-Knopp)",
    ["dino", "appendix_softmax_batch", "appendix_sk"],
    "matches",
  ),
  (
    "t15_momentum_sk",
    "Table 15",
    "momentum helps Sinkhorn-Knopp",
    "76.0 vs 71.8 without momentum",
    ["appendix_sk", "appendix_swav"],
    "ahead",
  ),
  (
    "t15_momentum_softmax_batch",
    "Table 15",
    "momentum helps Softmax(batch)",
    "75.8 vs 72.2 without momentum",
    ["appendix_softmax_batch", "appendix_no_momentum_softmax_batch"],
    "ahead",
  ),
  # Table 14 "Relation to MoCo-v2 and BYOL".
  (
    "t14_mse",
    "Table 14",
    "MSE in place of DINO's cross-entropy hurts",
    "62.4 vs 76.1",
    ["dino", "appendix_mse"],
    "hurts",
  ),
  (
    "t14_predictor",
    "Table 14",
    "BYOL's predictor on the student changes DINO little",
    "75.6 vs 76.1",
    ["dino", "appendix_predictor"],
    "matches",
  ),
  (
    "t14_multicrop",
    "Table 14",
    "multi-crop helps DINO",
    "76.1 vs 72.5 without",
    ["dino", "appendix_no_multicrop"],
    "ahead",
  ),
  (
    "t14_mse_no_multicrop",
    "Table 14",
    "without multi-crop, MSE in place of the cross-entropy hurts",
    "52.6 vs 72.5",
    ["appendix_no_multicrop", "appendix_mse_no_multicrop"],
    "hurts",
  ),
  (
    "t14_moco_v2",
    "Table 14",
    "DINO beats MoCo-v2",
    "76.1 vs 71.4",
    ["dino", "appendix_moco_v2"],
    "ahead",
  ),
  (
    "t14_byol",
    "Table 14",
    "DINO beats BYOL",
    "76.1 vs 71.4",
    ["dino", "appendix_byol"],
    "ahead",
  ),
  # The ResNet cell (Tables 10 / 13 report DINO on ResNet-50; here a CIFAR-size ResNet-18-like variant).
  (
    "t13_resnet",
    "Table 13",
    "DINO also trains a ResNet (here resnet18_cifar, width 16)",
    "ResNet-50: 67.5 k-NN / 75.3 linear",
    ["dino_resnet18_cifar"],
    "learns",
  ),
]


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--data", default=miniature.DEFAULT_DATA, help="CIFAR-10 folder or tar (train/ and test/ inside)")
  p.add_argument("--out", default="claims", help="folder for the cell results and claims.md (relative: to the cwd)")
  p.add_argument("--steps", type=int, default=300, help="training steps of batch 64 per run (the fixed budget)")
  p.add_argument("--seeds", type=int, default=2, help="seeds for the cells of close claims (all cells run seed 0)")
  p.add_argument("--close", type=float, default=1.5, help="k-NN points from a verdict threshold that count as close")
  p.add_argument(
    "--only",
    default="",
    help="comma-separated claim id prefixes, e.g. t6,t9; a full id selects that claim alone "
    "(t15_no_momentum, not t15_no_momentum_softmax_batch) (default: all)",
  )
  p.add_argument(
    "--cells",
    default="",
    help="comma-separated cell names to run (seed 0) before scoring; with it, only the claims whose cells are all "
    "stored are scored, the others listed as not run (default: every cell the selected claims need)",
  )
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override for every cell")
  return p.parse_args(argv)


class Cells:
  """Runs and stores cells: OUT/cells/<name>-seed<k>.json; the at-init k-NN is measured once per seed."""

  def __init__(self, args):
    self.args = args
    self.dir = os.path.join(os.path.abspath(os.path.expanduser(args.out)), "cells")
    os.makedirs(self.dir, exist_ok=True)

  def path(self, name, seed):
    return os.path.join(self.dir, f"{name}-seed{seed}.json")

  def get(self, name, seed):
    path = self.path(name, seed)
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    recipe, overrides, factor = CELLS[name]
    steps = max(1, round(self.args.steps / factor))
    overrides = [f"seed={seed}", *overrides, *self.args.set]
    config = miniature.recipe_config(recipe, self.args.data, overrides, steps=steps)
    backbone = backbone_key(config)
    init = self.init_knn(seed, backbone)
    print(f"claims: cell {name} seed {seed} ({recipe}, {steps} steps of {config.batch_size})", flush=True)
    result = miniature.run(config, knn_at_init=init is None)
    if init is None:
      init = result["knn_top1_at_init"]
      _write_json(self.init_path(seed, backbone), {"knn_top1_at_init": init})
    result.update(cell=name, seed=seed, method=config.method, recipe=recipe, overrides=overrides, knn_top1_at_init=init)
    _write_json(path, result)
    return result

  def stored(self, name, seed):
    return os.path.exists(self.path(name, seed))

  def init_path(self, seed, backbone):
    return os.path.join(self.dir, f"init-{backbone + '-' if backbone else ''}seed{seed}.json")

  def init_knn(self, seed, backbone=""):
    """The backbone at init is the same for every cell of a seed and backbone (heads and batch size do not change
    it): measured once per (seed, backbone)."""
    path = self.init_path(seed, backbone)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)["knn_top1_at_init"]

  def mean(self, name, seeds):
    runs = [self.get(name, s) for s in seeds]
    knn = [r["knn_top1"] for r in runs]
    ok = all(k is not None for k in knn)
    return {
      "knn": statistics.mean(knn) if ok else None,
      "knn_runs": knn,
      "init": statistics.mean(r["knn_top1_at_init"] for r in runs),
      "rank": statistics.mean(r["effective_rank"] for r in runs if r["effective_rank"] is not None)
      if any(r["effective_rank"] is not None for r in runs)
      else None,
      "nonfinite": [r["nonfinite_step"] for r in runs if r["nonfinite_step"] is not None],
      "minutes": sum(r["minutes"] for r in runs),
    }


def backbone_key(config) -> str:
  """ "" for the shared ViT (the init file of the ViT cells keeps its name), else the ResNet and its width."""
  if config.model.arch == "vit":
    return ""
  return f"{config.model.arch}_w{config.model.resnet_width}"


def judge(kind, cells):
  """(agrees: True / False / None (inconclusive), margin: distance of the decisive quantity from its threshold in
  k-NN points, or inf)."""
  inf = float("inf")
  if kind == "hurts":  # cells[0] is the base, every other cell must be hurt
    base = cells[0]
    if base["knn"] is None or base["knn"] < base["init"] + LEARNS:
      return None, inf
    margins = []
    for c in cells[1:]:
      if c["nonfinite"] or c["knn"] <= c["init"]:
        margins.append(inf if c["nonfinite"] else c["init"] - c["knn"])
      else:
        margins.append(base["knn"] - c["knn"] - HURT)
    worst = min(margins)
    return worst >= 0, abs(worst)
  if kind == "insensitive":
    base = cells[0]
    if any(c["knn"] is None for c in cells):
      return False, inf
    worst = max(abs(c["knn"] - base["knn"]) for c in cells[1:])
    return worst < STABLE, abs(STABLE - worst)
  if kind == "robust":
    if any(c["knn"] is None for c in cells):
      return False, inf
    spread = max(c["knn"] for c in cells) - min(c["knn"] for c in cells)
    return spread < STABLE, abs(STABLE - spread)
  if kind == "learns":
    c = cells[0]
    if c["knn"] is None:
      return False, inf
    return c["knn"] >= c["init"] + LEARNS, abs(c["knn"] - c["init"] - LEARNS)
  if kind == "beats":
    a, b = cells
    if b["knn"] is None:
      return True, inf
    return a["knn"] >= b["knn"] + BEATS, abs(a["knn"] - b["knn"] - BEATS)
  if kind in ("matches", "ahead"):  # "insensitive" / "beats" whose reference must learn
    ref = cells[0]
    if ref["knn"] is None or ref["knn"] < ref["init"] + LEARNS:
      return None, inf
    return judge({"matches": "insensitive", "ahead": "beats"}[kind], cells)
  if kind == "collapses":
    c = cells[0]
    if c["nonfinite"] or c["knn"] is None:
      return True, inf
    return c["knn"] <= c["init"], abs(c["knn"] - c["init"])
  raise ValueError(kind)


def _write_json(path, obj):
  """Written to a temporary name first: an interrupted run never leaves a truncated cell behind."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


def describe(name, c):
  if c["nonfinite"]:
    return f"{name}: non-finite loss at step {', '.join(map(str, c['nonfinite']))}"
  runs = "/".join(f"{k:.2f}" for k in c["knn_runs"])
  rank = "-" if c["rank"] is None else f"{c['rank']:.1f}"
  return f"{name}: k-NN {c['knn']:.2f} ({runs}; init {c['init']:.2f}), eff. rank {rank}"


def _selects(item: str, claim_id: str) -> bool:
  """--only's item selects claim_id: a full id selects itself alone, anything else is a prefix."""
  if item in (c[0] for c in CLAIMS):
    return item == claim_id
  return claim_id.startswith(item)


def main(argv=None):
  args = parse_args(argv)
  if argv is None:  # run as a script: sys.argv is what the re-executed process gets
    miniature.preload_tcmalloc(__file__)
  if not os.path.exists(args.data):
    sys.exit(f"claims.py: CIFAR-10 not found at {args.data} (pass --data)")
  miniature.mark_flags_parsed()
  cells = Cells(args)
  claims = [c for c in CLAIMS if not args.only or any(_selects(p, c[0]) for p in args.only.split(","))]
  start = time.time()
  selected = [n.strip() for n in args.cells.split(",") if n.strip()]
  unknown = [n for n in selected if n not in CELLS]
  if unknown:
    sys.exit(f"claims.py: --cells: unknown cell {', '.join(unknown)}; cells: {', '.join(CELLS)}")
  for name in selected:
    cells.get(name, 0)
  if selected:  # score only what is stored; list the rest
    not_run = [c for c in claims if not all(cells.stored(n, 0) for n in c[4])]
    claims = [c for c in claims if c not in not_run]
  else:
    not_run = []
  rows = []
  for cid, table, claim, paper, names, kind in claims:
    seeds = [0]
    scored = {n: cells.mean(n, seeds) for n in names}
    agrees, margin = judge(kind, [scored[n] for n in names])
    if margin < args.close and args.seeds > 1:  # close: more seeds, scored on the mean
      seeds = list(range(args.seeds))
      scored = {n: cells.mean(n, seeds) for n in names}
      agrees, margin = judge(kind, [scored[n] for n in names])
    rows.append(
      {
        "claim": cid,
        "table": table,
        "text": claim,
        "paper": paper,
        "seeds": len(seeds),
        "agrees": agrees,
        "margin": None if margin == float("inf") else round(margin, 2),
        "cells": {n: scored[n] for n in names},
      }
    )
  write_markdown(args, rows, not_run, cells)
  import jax

  from simdino_jax import tcmalloc

  print(
    json.dumps(
      {
        "benchmark": "claims",
        "steps": args.steps,
        "overrides": args.set,
        "device": jax.devices()[0].platform,
        "allocator": tcmalloc.allocator(),
        "minutes_this_call": round((time.time() - start) / 60, 1),
        "agree": sum(r["agrees"] is True for r in rows),
        "disagree": sum(r["agrees"] is False for r in rows),
        "claims": len(rows),
        "rows": rows,
        "not_run": [c[0] for c in not_run],
      }
    )
  )


def write_markdown(args, rows, not_run=(), cells=None):
  lines = [
    (
      f"Miniature claims: CIFAR-10, {args.steps} steps of batch 64 per run (batch-size cells: same images), "
      "k-NN top-1 (k=20, 50k/10k) of the evaluated network (the teacher; MoCo-v2 / BYOL: the student), mean over the "
      "seeds shown."
    ),
    "",
    "| table | claim | paper | miniature | agrees? |",
    "| --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    mini = "<br>".join(describe(n, c) for n, c in r["cells"].items())
    verdict = {True: "yes", False: "**no**", None: "inconclusive (the reference did not learn)"}[r["agrees"]]
    lines.append(f"| {r['table']} | {r['text']} | {r['paper']} | {mini} | {verdict} |")
  for cid, table, claim, paper, names, _ in not_run:
    missing = ", ".join(n for n in names if not cells.stored(n, 0))
    lines.append(f"| {table} | {claim} | {paper} | not run yet: {missing} | - |")
  path = os.path.join(os.path.abspath(os.path.expanduser(args.out)), "claims.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
