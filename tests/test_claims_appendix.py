"""benchmarks/claims.py's cells for DINO's Tables 13-15 (no training here): each appendix cell is exactly the config
of its configs/dino_appendix.py row, every new claim is judged by the rules fixed before the runs (the reference of
"matches" / "ahead" must learn), the ResNet cell gets its own at-init k-NN, and ``--cells`` scores only the claims
whose cells are stored (cells written here by hand, so nothing is trained)."""

import json
import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import claims  # noqa: E402
import miniature  # noqa: E402

from simdino_jax import config as config_lib  # noqa: E402

APPENDIX = runpy.run_path(os.path.join(ROOT, "configs", "dino_appendix.py"))
DATA = "/data/cifar10.tar"
RUN_FIELDS = ("total_steps", "warmup_steps", "log_every", "checkpoint_every")  # what recipe_config sets per run


def flat(c, prefix=""):
  out = {}
  for k, v in c.items():
    if hasattr(v, "items"):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def cell(knn, init=30.0):
  return {"knn": knn, "init": init, "nonfinite": [], "rank": 5.0, "knn_runs": [knn]}


def test_every_appendix_row_is_a_cell_with_the_rows_config():
  for row in APPENDIX["ROWS"]:
    name = claims.APPENDIX_CELL[row]
    recipe, overrides, factor = claims.CELLS[name]
    built = miniature.recipe_config(recipe, DATA, overrides, steps=1000)
    expected = APPENDIX["get_config"](f"{row},{DATA}")
    expected.data.source = f"folder:{os.path.abspath(DATA)}"
    for field in RUN_FIELDS:
      expected[field] = built[field]
    assert factor == 1.0 and flat(built) == flat(expected), row
    config_lib.validate(built, num_devices=1)


def test_every_appendix_claim_names_rows_and_the_resnet_cell_is_a_resnet():
  appendix = [c for c in claims.CLAIMS if c[0][:3] in ("t13", "t14", "t15")]
  assert len(appendix) == 13
  used = {n for c in appendix for n in c[4]}
  assert used - {"dino_resnet18_cifar"} <= set(claims.APPENDIX_CELL.values())
  assert {c[5] for c in appendix} <= {"hurts", "learns", "matches", "ahead"}
  config = miniature.recipe_config("dino", DATA, claims.CELLS["dino_resnet18_cifar"][1], steps=10)
  config_lib.validate(config, num_devices=1)
  assert config.model.arch == "resnet18_cifar" and claims.backbone_key(config) == "resnet18_cifar_w16"
  vit = miniature.recipe_config("dino", DATA, steps=10)
  assert claims.backbone_key(vit) == "" and flat(config.head) == flat(vit.head)  # only the backbone differs


def test_matches_and_ahead_need_a_reference_that_learns():
  learnt, flat_run = cell(35.0), cell(31.0)  # +5 / +1 over init (LEARNS = 2)
  assert claims.judge("matches", [learnt, cell(34.0), cell(36.5)]) == (True, 0.5)
  assert claims.judge("matches", [learnt, cell(32.5)])[0] is False
  assert claims.judge("matches", [flat_run, cell(31.0)])[0] is None  # "insensitive" would say True
  assert claims.judge("ahead", [learnt, cell(33.5)]) == (True, 0.5)
  assert claims.judge("ahead", [learnt, cell(34.5)])[0] is False
  assert claims.judge("ahead", [flat_run, cell(20.0)])[0] is None  # "beats" would say True
  assert claims.judge("ahead", [learnt, {**cell(None), "nonfinite": [7]}])[0] is True


def _store(out, name, knn, init, seed=0):
  os.makedirs(out / "cells", exist_ok=True)
  result = {"knn_top1": knn, "knn_top1_at_init": init, "effective_rank": 3.0, "nonfinite_step": None, "minutes": 1}
  (out / "cells" / f"{name}-seed{seed}.json").write_text(json.dumps(result))


def test_cells_option_scores_only_stored_claims(tmp_path, capsys):
  data = tmp_path / "cifar.tar"
  data.write_bytes(b"")  # main() checks that the path exists; no cell here is trained
  out = tmp_path / "out"
  _store(out, "dino", 33.0, 29.85)
  _store(out, "dino_no_self_distillation", 25.7, 29.85)
  _store(out, "appendix_sk", 30.0, 29.85)
  claims.main(["--data", str(data), "--out", str(out), "--seeds", "1", "--only", "t15", "--cells", "appendix_sk"])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert {r["claim"]: r["agrees"] for r in result["rows"]} == {"t15_no_momentum": True}
  assert set(result["not_run"]) == {
    "t15_no_momentum_softmax_batch",
    "t15_swav",
    "t15_operation",
    "t15_momentum_sk",
    "t15_momentum_softmax_batch",
  }
  table = (out / "claims.md").read_text()
  assert "| Table 15 | without momentum, Softmax(batch) still learns | 72.2 | not run yet: " in table
  assert "not run yet: appendix_softmax_batch |" in table  # t15_operation: dino and appendix_sk are stored
  c = claims.Cells(claims.parse_args(["--out", str(out)]))
  assert c.init_path(0, "") == str(out / "cells" / "init-seed0.json")
  assert c.init_path(0, "resnet18_cifar_w16") == str(out / "cells" / "init-resnet18_cifar_w16-seed0.json")


def test_only_with_a_full_claim_id_selects_that_claim_alone(tmp_path, capsys):
  # t15_no_momentum is also the prefix of t15_no_momentum_softmax_batch, whose cell is not stored: a full id must not
  # start training it (the data file is empty, so any training would fail).
  data = tmp_path / "cifar.tar"
  data.write_bytes(b"")
  out = tmp_path / "out"
  _store(out, "dino", 33.0, 29.85)
  _store(out, "dino_no_self_distillation", 25.7, 29.85)
  claims.main(["--data", str(data), "--out", str(out), "--seeds", "1", "--only", "t15_no_momentum"])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert [r["claim"] for r in result["rows"]] == ["t15_no_momentum"]
  assert claims._selects("t15", "t15_no_momentum_softmax_batch") and claims._selects("t6_dino", "t6_dino_momentum")


def test_a_miniature_run_stopped_by_a_signal_says_so(monkeypatch):
  # A SIGTERM-stopped run returns {"stopped": ...} without an accuracy; its workdir is temporary, so the message
  # must say that running again starts afresh (not the trainer's "re-run to resume").
  from simdino_jax.train import trainer

  config = miniature.recipe_config("dino", DATA, steps=10)
  monkeypatch.setattr(trainer, "train", lambda c, w: {"stopped": "SIGTERM", "step": 3, "checkpoint": w})
  with pytest.raises(SystemExit, match=r"stopped by SIGTERM at step 3/10; .* starts this run afresh"):
    miniature.run(config)
