"""evaluate --weights=FILE on an official-layout PyTorch checkpoint: the same k-NN figures as DINO's own
``eval_knn.py`` classifier fed with ``load_backbone`` features of the file; and a .pth without PyTorch installed is
refused in one line. (--weights on our own npz export: tests/test_evaluate_run.py.)

The official comparison needs PyTorch and the DINO clone, neither a dependency of the package: it runs when
SIMDINO_TORCH_PYTHON is a Python with torch and simdino_jax and SIMDINO_OFFICIAL_DIR holds the clones (dino/);
otherwise it is skipped with the reason.
"""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "official_weights_knn.py")


def test_official_dino_pth_gives_the_knn_of_the_official_classifier(tmp_path):
  python, clones = os.environ.get("SIMDINO_TORCH_PYTHON"), os.environ.get("SIMDINO_OFFICIAL_DIR")
  if not python or not clones:
    pytest.skip(
      "needs SIMDINO_TORCH_PYTHON (a Python with torch and simdino_jax) and SIMDINO_OFFICIAL_DIR (a folder holding "
      "the dino clone) to save an official DINO ViT with torch and run eval_knn.py's knn_classifier"
    )
  out = subprocess.run(
    [python, DRIVER, os.path.join(clones, "dino"), str(tmp_path)],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  ours, official = r["ours"], r["official"]
  assert set(ours["per_k"]) == {"10", "20", "100", "200"}
  assert ours["per_k"] == official  # top-1 and top-5 at every k, exactly (both count the same hits)
  assert ours["accuracy"] == official[str(ours["k"])]["top1"] and ours["top5"] == official[str(ours["k"])]["top5"]
  assert r["feature_diff"] < 1e-4  # load_backbone vs the torch model on the same views
  assert ours["weights"] == r["pth"] and ours["step"] is None and ours["dtype"] == "float32"
  assert ours["num_train"] == 1438 and ours["num_test"] == 359


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="PyTorch is installed here")
def test_a_pth_without_pytorch_is_refused_in_one_line(tmp_path):
  path = tmp_path / "dino.pth"
  with zipfile.ZipFile(path, "w") as z:  # torch.save's zip layout, as far as the file-type check reads it
    z.writestr("archive/data.pkl", b"")
  out = subprocess.run(
    [sys.executable, "-m", "simdino_jax.evaluate", f"--weights={path}", "--config=configs/demo.py"]
    + [f"--output={tmp_path / 'out'}", "--eval=knn"],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu", SIMDINO_NO_TCMALLOC="1"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 1 and len(lines) == 1, out.stderr
  assert lines[0].startswith(f"simdino_jax.evaluate: error: {path}: reading a PyTorch .pth file needs PyTorch")
