"""Training curves: metrics.jsonl -> curves.png with panels found from the logged keys (any method), clear errors,
and the metrics log's end-of-run hook that never fails a run."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from simdino_jax import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_metrics(workdir, records, tail=""):
  path = workdir / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
  return path


def simdino_records(n=12):
  out = []
  for s in range(1, n + 1):
    r = dict(
      step=s,
      loss=-1.0 - 0.1 * s,
      align=0.5 / s,
      rate=3.0 + 0.1 * s,
      gamma=0.01,
      lr=1e-4 * s,
      wd=0.04,
      momentum=0.996,
      grad_norm=1.0,
      feature_std=0.05,
      effective_rank=10.0 + s,
      steps_per_sec=2.0,
      images_per_sec=64.0,
    )
    if s % 4 == 0:
      r.update(knn_top1=20.0 + s, knn_top5=50.0 + s)
    out.append(r)
  return out


def decode(path):
  with Image.open(path) as im:
    im.load()
    return np.asarray(im.convert("RGB"))


def test_simdino_metrics_draw_a_png_with_loss_terms_schedules_monitors_and_knn(tmp_path):
  # A cut-short last line (killed run) and a re-logged step (resume) must not break the plot.
  write_metrics(tmp_path, simdino_records() + [dict(simdino_records()[-1], loss=-5.0)], tail='{"step": 13, "lo')
  panels = plot.plot_curves(str(tmp_path))
  assert panels == [
    "loss",
    "align",
    "rate",
    "gamma",
    "lr",
    "weight decay",
    "teacher momentum",
    "feature_std",
    "effective_rank",
    "grad_norm",
    "images/s",
    "k-NN accuracy (%)",
  ]
  pixels = decode(tmp_path / "curves.png")
  assert pixels.shape == (3 * 252, 4 * 360, 3)  # 12 panels in a 3 x 4 grid at 90 dpi
  colours = np.unique(pixels.astype(np.int64) @ np.array([65536, 256, 1]))
  assert len(colours) > 50  # lines and anti-aliased text, not a blank canvas
  assert not (tmp_path / "curves.png.tmp.png").exists()


def test_dino_family_and_unknown_terms_are_discovered_not_hard_coded(tmp_path):
  records = [
    dict(
      step=s,
      loss=5.0 - s,
      ce=4.0,
      ibot_ce=3.0,
      koleo=-0.1,
      my_new_term=s * 2.0,
      teacher_temp=0.04,
      teacher_entropy=2.0,
      prototypes_used=100 + s,
      lr=1e-3,
      wd=0.04,
      momentum=0.99,
      note="text",
      **{"data/skipped": 0},
    )
    for s in range(1, 6)
  ]
  out = tmp_path / "plots" / "dino.png"
  panels = plot.plot_curves(str(write_metrics(tmp_path, records)), str(out))
  assert panels == [
    "loss",
    "ce",
    "ibot_ce",
    "koleo",
    "my_new_term",
    "lr",
    "weight decay",
    "teacher momentum",
    "teacher temperature",
    "teacher_entropy",
    "prototypes_used",
    "data/skipped",
  ]
  assert decode(out).shape == (3 * 252, 4 * 360, 3)


def test_missing_or_empty_metrics_fail_naming_the_path(tmp_path):
  with pytest.raises(plot.PlotError, match=f"{tmp_path / 'metrics.jsonl'}: no such file"):
    plot.plot_curves(str(tmp_path))
  (tmp_path / "metrics.jsonl").write_text("not json\n")
  with pytest.raises(plot.PlotError, match="metrics.jsonl: no records"):
    plot.plot_curves(str(tmp_path))


def test_command_line_writes_curves_png_and_reports_a_missing_file(tmp_path):
  write_metrics(tmp_path, simdino_records(3))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  ok = subprocess.run(
    [sys.executable, "-m", "simdino_jax.plot", f"--workdir={tmp_path}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "-> " + str(tmp_path / "curves.png") in ok.stdout and decode(tmp_path / "curves.png").size
  missing = tmp_path / "nowhere"
  bad = subprocess.run(
    [sys.executable, "-m", "simdino_jax.plot", f"--workdir={missing}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode == 1 and f"{missing / 'metrics.jsonl'}: no such file" in bad.stderr


def test_end_of_run_hook_draws_and_never_raises(tmp_path, caplog):
  from simdino_jax.train.metrics import MetricsLog

  with caplog.at_level(logging.WARNING):
    MetricsLog(str(tmp_path / "empty"), total_steps=4, tensorboard=False).draw_curves()  # no records: a warning
  assert "could not draw the training curves" in caplog.text and "metrics.jsonl" in caplog.text
  write_metrics(tmp_path, simdino_records(4))
  MetricsLog(str(tmp_path), total_steps=4, start_step=4, tensorboard=False).draw_curves()  # start_step keeps them
  assert decode(tmp_path / "curves.png").size
  MetricsLog(str(tmp_path / "x"), total_steps=4, is_main=False).draw_curves()  # not the main process: nothing
  assert not (tmp_path / "x").exists()
