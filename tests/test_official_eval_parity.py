"""benchmarks/official_eval_parity.py: our evaluators against the official evaluation code on the same inputs.

The parity run needs PyTorch (plus opencv, scikit-image and cyanure) and the official clones, none of them a
dependency of the package: it runs when SIMDINO_TORCH_PYTHON is such a Python with simdino_jax and
SIMDINO_OFFICIAL_DIR holds the clones (dino/, dinov2/, CutLER/, msn/, revisitop/, davis2017-evaluation/); otherwise
it is skipped with the reason. The command-line checks run everywhere (without torch).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "official_eval_parity.py")
CHECKS = ("knn", "dino_linear", "dinov2_linear", "fewshot", "retrieval", "davis", "maskcut", "segmentation")


def _run(args, python=sys.executable, timeout=60):
  return subprocess.run([python, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_help_works_without_torch():
  out = _run(["--help"])
  assert out.returncode == 0, out.stderr
  assert "--official_dir" in out.stdout and "--check" in out.stdout


@pytest.mark.parametrize("extra", [[], ["--official_dir", "/nonexistent/official/clones"]])
def test_refuses_a_missing_official_dir_with_one_line(extra):
  out = _run(extra)
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, out.stderr
  assert "--official_dir" in lines[0] and lines[0].startswith("official_eval_parity.py: error:")
  assert out.stdout == ""


def test_refuses_an_unknown_check_or_a_missing_clone_with_one_line(tmp_path):
  out = _run(["--official_dir", str(tmp_path), "--check", "knn,nearest"])
  assert out.returncode == 2 and "nearest" in out.stderr and len(out.stderr.strip().splitlines()) == 1
  out = _run(["--official_dir", str(tmp_path), "--check", "maskcut"])
  assert out.returncode == 2 and "CutLER/" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_parity_with_the_official_evaluation_code():
  python, clones = os.environ.get("SIMDINO_TORCH_PYTHON"), os.environ.get("SIMDINO_OFFICIAL_DIR")
  if not python or not clones:
    pytest.skip(
      "needs SIMDINO_TORCH_PYTHON (a Python with torch, simdino_jax, opencv, scikit-image and cyanure) and "
      "SIMDINO_OFFICIAL_DIR (the clones dino/, dinov2/, CutLER/, msn/, revisitop/, davis2017-evaluation/)"
    )
  out = _run(["--official_dir", clones, "--threads", "2"], python=python, timeout=1800)
  assert out.returncode == 0, out.stderr[-4000:]
  lines = [l for l in out.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, out.stdout[-2000:]
  r = json.loads(lines[0])
  assert set(r["checks"]) == set(CHECKS), sorted(r["checks"])
  for name, row in r["checks"].items():
    report = json.dumps({k: row.get(k) for k in ("note", "max_abs_diff", "ours", "official")})[:3000]
    if name == "dinov2_linear" and row["ok"] is None:  # its official side is a separate module, maybe absent
      assert row["note"].startswith("skipped:"), report
      continue
    assert row["ok"] is True, f"{name}: {report}"
  assert r["ok"]
