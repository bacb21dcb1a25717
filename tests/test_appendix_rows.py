"""configs/dino_appendix.py: every row of DINO's Tables 7, 14 and 15 that it provides resolves, validates, and differs
from its base in exactly the components the paper's table marks for that row (the tables transcribed below from the
paper, independently of the config file)."""

import os
import runpy

import pytest

from simdino_jax import config as config_lib
from simdino_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPENDIX = runpy.run_path(os.path.join(ROOT, "configs", "dino_appendix.py"))

# The paper's rows (ViT-S/16, 300 epochs), by the components that differ from DINO (Table 7: momentum, SK, multi-crop,
# loss, predictor; Table 14: loss, multi-crop, centering, BN, predictor; Table 15: momentum, teacher operation).
DINO = dict(momentum=True, operation="centering", multicrop=True, loss="CE", predictor=False, bn=False)
PAPER = {
  "dino": DINO,  # T7.1, T14.1, T15.1
  "no_momentum": dict(DINO, momentum=False),  # T7.2, T15.4
  "sk": dict(DINO, operation="sinkhorn_knopp"),  # T7.3, T15.3
  "no_multicrop": dict(DINO, multicrop=False),  # T7.4, T14.4
  "mse": dict(DINO, loss="MSE"),  # T7.5, T14.2
  "predictor": dict(DINO, predictor=True),  # T7.6, T14.3
  "swav": dict(DINO, momentum=False, operation="sinkhorn_knopp"),  # T7.9, T15.6
  "mse_no_multicrop": dict(DINO, loss="MSE", multicrop=False),  # T14.9
  "softmax_batch": dict(DINO, operation="softmax_batch"),  # T15.2
  "no_momentum_softmax_batch": dict(DINO, momentum=False, operation="softmax_batch"),  # T15.5
  # The classic systems are their own method's CIFAR recipe (two crops; BYOL's has BN in its MLPs, as the row).
  "byol": dict(method="byol", bn=True),  # T7.7, T14.7: MSE, no multi-crop, no centering, BN, predictor
  "moco_v2": dict(method="moco_v2"),  # T7.8, T14.5: InfoNCE, no multi-crop, no centering (BN: see the config)
}


def expected_fields(row: dict) -> dict:
  """The config fields a row's components change from its base (docs: configs/dino_appendix.py)."""
  if "method" in row:  # the method's own CIFAR recipe is the row (its BN column: test below)
    return {}
  fields = {}
  if not row["momentum"]:
    fields["teacher.self_distillation"] = False
  if row["operation"] != "centering":
    fields["dino.centering"] = row["operation"]
  if not row["multicrop"]:
    fields["data.num_local"], fields["data.global_scale"] = 0, (0.14, 1.0)
  if row["loss"] == "MSE":
    fields["dino.loss"] = "mse"
  if row["predictor"]:
    fields["head.predictor"] = True
  return fields


def flat(c, prefix=""):
  out = {}
  for k, v in c.items():
    if hasattr(v, "items"):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def base_of(row):
  name = {"byol": "cifar10_byol.py", "moco_v2": "cifar10_moco_v2.py"}.get(PAPER[row].get("method"), "cifar10_dino.py")
  return runpy.run_path(os.path.join(ROOT, "configs", name))["get_config"]("/data/cifar10.tar")


@pytest.mark.parametrize("row", sorted(PAPER))
def test_each_row_validates_and_differs_from_its_base_in_the_papers_components(row):
  c = APPENDIX["get_config"](f"{row},/data/cifar10.tar")
  config_lib.validate(c, num_devices=1)
  assert c.data.source == "folder:/data/cifar10.tar"
  ours, base = flat(c), flat(base_of(row))
  diff = {k: v for k, v in ours.items() if base.get(k) != v}
  assert diff == expected_fields(PAPER[row])
  if "method" in PAPER[row]:
    assert c.head.use_bn == PAPER[row].get("bn", False)


def test_the_config_provides_exactly_the_transcribed_rows_and_defaults_to_dino():
  assert set(APPENDIX["ROWS"]) == set(PAPER)
  assert flat(APPENDIX["get_config"]()) == flat(APPENDIX["get_config"]("dino"))


@pytest.mark.parametrize("row", sorted(r for r in PAPER if "method" not in PAPER[r]))
def test_in1k_rows_are_vit_s16_300_epochs_with_the_same_components(row):
  c = APPENDIX["get_config"](f"{row},in1k")
  config_lib.validate(c, num_devices=8)
  assert (c.model.variant, c.total_epochs, c.batch_size, c.method) == ("S/16", 300, 1024, "dino")
  base = flat(APPENDIX["in1k_base"]())
  assert {k: v for k, v in flat(c).items() if base.get(k) != v} == expected_fields(PAPER[row])


@pytest.mark.parametrize(
  "arg,match",
  [
    ("momentum", "ROW one of dino, no_momentum"),
    ("byol,in1k", "byol,in1k: the paper does not give"),
  ],
)
def test_a_missing_or_unknown_row_is_one_line(arg, match):
  with pytest.raises(ConfigError, match=match) as e:
    APPENDIX["get_config"](arg)
  assert "\n" not in str(e.value)
