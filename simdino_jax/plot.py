r"""Training curves: DIR/metrics.jsonl -> DIR/curves.png.

  python -m simdino_jax.plot --workdir=DIR [--output=FILE.png]

One panel per quantity logged, found from the records themselves (no list per method): the loss, each loss term
the method logs (align, rate, patch_align, ce, ibot_ce, koleo, regularizer, ... and any other number it adds),
the schedules (lr, wd, teacher momentum, teacher temperature), the collapse monitors (feature_std,
effective_rank, teacher_entropy, prototypes_used), gradient norm, throughput, namespaced counters such as
``data/skipped``, and the periodic evaluations (knn_top1 / knn_top5, linear_*, one panel, drawn at the steps
where they were logged). The trainer calls ``plot_curves`` at the end of
every run. Matplotlib with the Agg backend (no display needed).

Python API: ``read_metrics(path)``, ``plot_curves(workdir_or_metrics_path, output=None)`` -> the panels drawn.
"""

from __future__ import annotations

import json
import math
import os
import sys

from simdino_jax.errors import PlotError

# Panel order and grouping. Keys not named here are loss terms of some method: they get a panel each, after the
# loss. A panel is drawn only when one of its keys is present.
_SCHEDULES = (
  ("lr", ("lr",)),
  ("weight decay", ("wd",)),
  ("teacher momentum", ("momentum",)),
  ("teacher temperature", ("teacher_temp",)),
)
_MONITORS = (
  ("feature_std", ("feature_std",)),
  ("effective_rank", ("effective_rank",)),
  ("teacher_entropy", ("teacher_entropy",)),
  ("prototypes_used", ("prototypes_used",)),
)
_OTHER = (("grad_norm", ("grad_norm",)), ("images/s", ("images_per_sec",)))
_NOT_TERMS = {
  "step",
  "loss",
  "steps_per_sec",
  "images_per_sec",
  "grad_norm",
  "lr",
  "wd",
  "momentum",
  "teacher_temp",
  "feature_std",
  "effective_rank",
  "teacher_entropy",
  "prototypes_used",
}
_TERM_ORDER = ("align", "patch_align", "rate", "gamma", "regularizer", "ce", "ibot_ce", "koleo")


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl, sorted by step (the last record wins for a repeated step).

  Lines that do not parse (a line cut short when a run was killed) are skipped."""
  if not os.path.isfile(path):
    raise PlotError(
      f"{path}: no such file (metrics.jsonl is written by a training run: python -m simdino_jax.train "
      "... --workdir=DIR)"
    )
  by_step = {}
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
        by_step[int(record["step"])] = record
      except (ValueError, KeyError, TypeError):
        continue
  if not by_step:
    raise PlotError(f"{path}: no records with a 'step' (empty or unreadable)")
  return [by_step[s] for s in sorted(by_step)]


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def panels_for(records: list[dict]) -> list[tuple[str, tuple[str, ...]]]:
  """[(title, keys)] to draw for these records, in display order."""
  present = {k for r in records for k, v in r.items() if _is_number(v)}
  evals = tuple(sorted(k for k in present if k.startswith(("knn_", "linear_"))))
  rest = [k for k in present if k not in _NOT_TERMS and k not in evals]
  # Namespaced keys ("data/skipped") are bookkeeping of some component, not loss terms: after the monitors.
  terms = sorted(
    (k for k in rest if "/" not in k), key=lambda k: (_TERM_ORDER.index(k) if k in _TERM_ORDER else len(_TERM_ORDER), k)
  )
  panels = [("loss", ("loss",))] if "loss" in present else []
  panels += [(k, (k,)) for k in terms]
  panels += [(title, keys) for title, keys in _SCHEDULES + _MONITORS + _OTHER if any(k in present for k in keys)]
  panels += [(k, (k,)) for k in sorted(k for k in rest if "/" in k)]
  if evals:
    panels.append(("k-NN accuracy (%)" if all(k.startswith("knn_") for k in evals) else "evaluation", evals))
  return panels


def plot_curves(path: str, output: str | None = None, *, columns: int = 4) -> list[str]:
  """Draw the curves of ``path`` (a workdir or its metrics.jsonl) into ``output`` (default: next to the metrics,
  curves.png); returns the titles of the panels drawn."""
  path = os.fspath(path)
  metrics_path = path if path.endswith(".jsonl") and not os.path.isdir(path) else os.path.join(path, "metrics.jsonl")
  records = read_metrics(metrics_path)
  if output is None:
    output = os.path.join(os.path.dirname(os.path.abspath(metrics_path)), "curves.png")
  panels = panels_for(records)
  if not panels:
    raise PlotError(f"{metrics_path}: no numeric metrics to plot")
  # A bare Figure renders with Agg and leaves pyplot's global backend and figure list alone (notebooks, the trainer).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (slow import: only when drawing)
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top

  cols = min(columns, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig = Figure(figsize=(4.0 * cols, 2.8 * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax, (title, keys) in zip(axes.flat, panels):
    for key in keys:
      points = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
      steps, values = [p[0] for p in points], [p[1] for p in points]
      # Sparse series (k-NN every eval_every steps) get markers so a single point shows.
      marker = "o" if len(points) < 0.5 * len(records) or len(points) < 3 else None
      ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.2, label=key)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
    ax.grid(alpha=0.3)
    if len(keys) > 1:
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels) :]:
    ax.axis("off")
  fig.suptitle(f"{metrics_path} (steps {records[0]['step']}-{records[-1]['step']})", fontsize=9)
  # Fixed margins (in inches, so they hold for any grid): tight_layout measured every tick label and took
  # more time than drawing the figure.
  width, height = fig.get_size_inches()
  fig.subplots_adjust(
    left=0.6 / width, right=1 - 0.2 / width, bottom=0.45 / height, top=1 - 0.5 / height, wspace=0.35, hspace=0.6
  )
  if os.path.dirname(output):
    os.makedirs(os.path.dirname(output), exist_ok=True)
  fig.savefig(output + ".tmp.png", dpi=90)
  os.replace(output + ".tmp.png", output)  # never leave a half-written PNG where a viewer may look
  return [title for title, _ in panels]


def main(argv) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  output = f.output or os.path.join(f.workdir, "curves.png")
  try:
    drawn = plot_curves(f.workdir, output)
  except PlotError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"{len(drawn)} panels ({', '.join(drawn)}) -> {output}", flush=True)


if __name__ == "__main__":
  from absl import app as _app
  from absl import flags as _flags

  _flags.DEFINE_string("workdir", None, "Training directory holding metrics.jsonl.")
  _flags.DEFINE_string("output", None, "PNG to write (default: WORKDIR/curves.png).")
  _flags.mark_flags_as_required(["workdir"])
  _app.run(main)
