"""benchmarks/claims.py scores each claim by rules fixed in advance, stores every cell so a second call trains
nothing, and writes its Markdown table; benchmarks/recipe_transfer.py gives a recipe a downscaled copy of another
image folder as its only change. End to end on a generated 2-class folder with a shrunken backbone (2 steps)."""

import io
import json
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import claims  # noqa: E402
import miniature  # noqa: E402
import pod
import recipe_transfer  # noqa: E402

from simdino_jax import config as config_lib  # noqa: E402

TINY = [
  "model.embed_dim=32",
  "model.depth=1",
  "model.num_heads=2",
  "head.hidden_dim=64",
  "head.out_dim=16",
  "data.num_local=2",
  "batch_size=8",
  "eval.batch_size=32",
]


def cell(knn, init=30.0, nonfinite=(), rank=10.0):
  return {"knn": knn, "init": init, "nonfinite": list(nonfinite), "rank": rank, "knn_runs": [knn]}


def test_verdict_rules_follow_the_fixed_thresholds():
  base = cell(40.0)
  # "hurts": every perturbed cell must lose >= HURT points, go non-finite or end at/below init.
  assert claims.judge("hurts", [base, cell(37.5)]) == (True, 0.5)
  assert claims.judge("hurts", [base, cell(39.0)])[0] is False
  assert claims.judge("hurts", [base, cell(None, nonfinite=[12])]) == (True, math.inf)
  assert claims.judge("hurts", [base, cell(29.0), cell(39.5)])[0] is False  # the weakest perturbation decides
  assert claims.judge("hurts", [base, cell(30.5, init=30.5)])[0] is True  # no learning counts as broken
  assert claims.judge("hurts", [cell(31.0), cell(20.0)])[0] is None  # the reference itself did not learn
  # "insensitive" / "robust": within STABLE points.
  assert claims.judge("insensitive", [base, cell(41.0), cell(39.2)])[0] is True
  assert claims.judge("insensitive", [base, cell(37.0)])[0] is False
  assert claims.judge("insensitive", [base, cell(None, nonfinite=[3])])[0] is False
  assert claims.judge("robust", [cell(39.0), base, cell(40.5)]) == (True, 0.5)
  assert claims.judge("robust", [cell(37.0), base, cell(40.5)])[0] is False
  # "learns": >= LEARNS over init; "beats": >= BEATS ahead; "collapses": at/below init or non-finite.
  assert claims.judge("learns", [cell(32.5)]) == (True, 0.5)
  assert claims.judge("learns", [cell(31.0)])[0] is False
  assert claims.judge("beats", [base, cell(38.5)])[0] is True
  assert claims.judge("beats", [base, cell(39.5)])[0] is False
  assert claims.judge("collapses", [cell(29.0)])[0] is True
  assert claims.judge("collapses", [cell(35.0)])[0] is False


def test_every_claim_names_known_cells_and_every_cell_a_recipe():
  for cid, _, _, _, names, kind in claims.CLAIMS:
    assert names and all(n in claims.CELLS for n in names), cid
    assert kind in ("hurts", "insensitive", "robust", "learns", "beats", "collapses", "matches", "ahead")
  for name, (method, overrides, _) in claims.CELLS.items():
    config = miniature.recipe_config(method, "/data/cifar10.tar", overrides, steps=10)
    assert config.total_steps == 10 and config.warmup_steps == 1, name
    config_lib.validate(config, num_devices=1)  # every cell is a valid config (the path is not opened)


def test_every_cell_of_a_seed_starts_from_one_backbone():
  # Cells.init_knn measures the network at init once per seed: every cell must build the same ViT (the SimDINO cells
  # start from cifar10_simdino_shared.py, cifar10_dino.py's backbone, not from SimDINO's CIFAR recipe).
  def backbone(config):
    return config.model.to_dict()

  # The ResNet cell is the one exception: Cells keys its at-init k-NN by claims.backbone_key.
  reference = backbone(miniature.recipe_config("dino", "/data/cifar10.tar"))
  for name, (recipe, overrides, _) in claims.CELLS.items():
    config = miniature.recipe_config(recipe, "/data/cifar10.tar", overrides, steps=10)
    assert (backbone(config) == reference) == (claims.backbone_key(config) == ""), name
  assert backbone(miniature.recipe_config("simdino", "/data/cifar10.tar")) != reference  # the recipe moved on


def test_overrides_are_typed_as_the_field():
  config = miniature.recipe_config("dino", "/data/cifar10.tar")
  miniature.apply_override(config, "head.norm_last_layer=false")
  miniature.apply_override(config, "teacher.momentum=0.9")
  miniature.apply_override(config, "batch_size=32")
  miniature.apply_override(config, "data.global_scale=(0.25, 1.0)")
  miniature.apply_override(config, "loss.regularizer=barlow")
  assert config.head.norm_last_layer is False and config.teacher.momentum == 0.9 and config.batch_size == 32
  assert tuple(config.data.global_scale) == (0.25, 1.0) and config.loss.regularizer == "barlow"
  with pytest.raises(ValueError, match="head.norm_last_layer is a bool"):
    miniature.apply_override(config, "head.norm_last_layer=0")


def _image_tar(path, splits=("train", "test"), per_class=8, size=40):
  rng = np.random.default_rng(0)
  with tarfile.open(path, "w") as tar:
    for split in splits:
      for c, colour in enumerate([(200, 40, 40), (40, 40, 200)]):
        for i in range(per_class):
          pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
          buf = io.BytesIO()
          Image.fromarray(pixels).save(buf, format="JPEG")
          info = tarfile.TarInfo(f"top/{split}/class{c}/{i:03d}.JPEG")
          info.size = len(buf.getvalue())
          tar.addfile(info, io.BytesIO(buf.getvalue()))


def _run(script, args, cwd):
  env = pod.env(1)
  out = subprocess.run(
    [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
  assert len(lines) == 1, out.stdout
  return json.loads(lines[0]), out.stdout


def test_recipe_transfer_makes_a_downscaled_copy_once(tmp_path):
  _image_tar(tmp_path / "src.tar", splits=("train", "val"), per_class=3, size=50)
  out = tmp_path / "copy"
  assert recipe_transfer.downscaled_copy(str(tmp_path / "src.tar"), str(out), 16) == 12
  files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
  assert len(files) == 12 and files[0] == "train/class0/000.png" and "val/class1/002.png" in files
  assert Image.open(out / files[0]).size == (16, 16)
  (out / files[0]).unlink()  # the marker says the copy is complete: it is not rebuilt
  assert recipe_transfer.downscaled_copy(str(tmp_path / "src.tar"), str(out), 16) == 12
  assert not (out / files[0]).exists()


def test_claims_end_to_end_scores_stores_and_reuses_cells(tmp_path):
  _image_tar(tmp_path / "cifar.tar", size=32)
  args = ["--data", str(tmp_path / "cifar.tar"), "--out", "claims_out", "--steps", "2", "--seeds", "1"]
  args += ["--only", "t9_simdino,t5_barlow"] + [a for item in TINY for a in ("--set", item)]
  result, stdout = _run("claims.py", args, tmp_path)
  assert result["benchmark"] == "claims" and result["claims"] == 2 and stdout.count("claims: cell") == 2
  rows = {r["claim"]: r for r in result["rows"]}
  assert set(rows) == {"t9_simdino", "t5_barlow"}
  for r in rows.values():
    (c,) = r["cells"].values()
    assert 0 <= c["knn"] <= 100 and 0 <= c["init"] <= 100 and r["agrees"] in (True, False, None)
  stored = sorted(os.listdir(tmp_path / "claims_out" / "cells"))
  assert stored == ["init-seed0.json", "simdino_barlow-seed0.json", "simdino_no_self_distillation-seed0.json"]
  cell_json = json.loads((tmp_path / "claims_out" / "cells" / "simdino_barlow-seed0.json").read_text())
  assert "loss.regularizer=barlow" in cell_json["overrides"] and cell_json["steps"] == 2
  table = (tmp_path / "claims_out" / "claims.md").read_text()
  assert "| Table 9 | SimDINO still learns without self-distillation |" in table and "| Table 5 |" in table
  again, stdout = _run("claims.py", args, tmp_path)  # every cell stored: nothing is trained again
  assert "claims: cell" not in stdout and again["rows"] == result["rows"]


def test_recipe_transfer_end_to_end_changes_only_the_data(tmp_path):
  _image_tar(tmp_path / "src.tar", splits=("train", "val"), per_class=8, size=48)
  args = ["--config", os.path.join(ROOT, "configs", "cifar10_simdino.py"), "--source", str(tmp_path / "src.tar")]
  args += ["--size", "24", "--out", str(tmp_path / "copy"), "--set", "total_steps=2", "--set", "warmup_steps=1"]
  args += [a for item in TINY for a in ("--set", item)]
  result, _ = _run("recipe_transfer.py", args, tmp_path)
  assert result["benchmark"] == "recipe_transfer" and result["images"] == 32 and result["steps"] == 2
  assert 0 <= result["knn_top1"] <= 100 and result["gain"] == pytest.approx(
    result["knn_top1"] - result["knn_top1_at_init"]
  )
