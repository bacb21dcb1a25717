"""configs/dino_resnet50_in1k.py and configs/simdino_resnet50_in1k.py: they resolve and validate, the DINO one holds
the official command's values, the SimDINO one takes each field from the recipe its docstring names.

The official text is quoted below (facebookresearch/dino README.md's ResNet-50 command and main_dino.py's argparse
defaults for every argument it leaves out); with SIMDINO_OFFICIAL_DIR the quotes are checked against the clone
itself (the README line verbatim, the defaults read from main_dino.py with ast, as the file imports torch).
"""

import ast
import math
import os
import re
import runpy

import jax
import optax
import pytest

from simdino_jax import config as config_lib
from simdino_jax import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# facebookresearch/dino README.md, "ResNet-50 and other convnets trainings".
README_COMMAND = (
  "python -m torch.distributed.launch --nproc_per_node=8 main_dino.py --arch resnet50 --optimizer sgd --lr 0.03 "
  "--weight_decay 1e-4 --weight_decay_end 1e-4 --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14 "
  "--data_path /path/to/imagenet/train --output_dir /path/to/saving_dir"
)
# main_dino.py get_args_parser() defaults of the arguments the command leaves out (and the ones it sets).
MAIN_DINO_DEFAULTS = {
  "out_dim": 65536,
  "norm_last_layer": True,
  "momentum_teacher": 0.996,
  "use_bn_in_head": False,
  "warmup_teacher_temp": 0.04,
  "teacher_temp": 0.04,
  "warmup_teacher_temp_epochs": 0,
  "use_fp16": True,
  "weight_decay": 0.04,
  "weight_decay_end": 0.4,
  "clip_grad": 3.0,
  "batch_size_per_gpu": 64,
  "epochs": 100,
  "freeze_last_layer": 1,
  "lr": 0.0005,
  "warmup_epochs": 10,
  "min_lr": 1e-6,
  "optimizer": "adamw",
  "global_crops_scale": (0.4, 1.0),
  "local_crops_number": 8,
  "local_crops_scale": (0.05, 0.4),
}


def recipe(name):
  return runpy.run_path(os.path.join(ROOT, "configs", name))["get_config"]()


def official_args() -> tuple[dict, int]:
  """(main_dino.py's arguments for the README's ResNet-50 run, its GPU count) from the quoted text."""
  args = dict(MAIN_DINO_DEFAULTS)
  command = README_COMMAND.split("main_dino.py", 1)[1]
  for key, values in re.findall(r"--(\w+) ((?:[^\s-][^\s]*\s?)+)", command):
    values = values.split()
    default = args.get(key)
    if isinstance(default, tuple):
      args[key] = tuple(float(v) for v in values)
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
      args[key] = type(default)(float(values[0]))
    else:
      args[key] = values[0]
  return args, int(re.search(r"--nproc_per_node=(\d+)", README_COMMAND).group(1))


def test_the_quoted_official_text_is_the_clones():
  clones = os.environ.get("SIMDINO_OFFICIAL_DIR")
  root = os.path.join(clones or "", "dino")
  if not clones or not os.path.isdir(root):
    pytest.skip("needs SIMDINO_OFFICIAL_DIR holding the dino clone")
  with open(os.path.join(root, "README.md")) as f:
    assert README_COMMAND in f.read()
  with open(os.path.join(root, "main_dino.py")) as f:
    tree = ast.parse(f.read())
  defaults = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
      default = [kw.value for kw in node.keywords if kw.arg == "default"]
      if default:
        defaults[node.args[0].value.lstrip("-")] = ast.literal_eval(default[0])
  assert {k: defaults[k] for k in MAIN_DINO_DEFAULTS} == MAIN_DINO_DEFAULTS
  # The SGD branch main_dino.py builds (momentum 0.9), which config.optim.momentum's default is.
  with open(os.path.join(root, "main_dino.py")) as f:
    assert "torch.optim.SGD(params_groups, lr=0, momentum=0.9)" in f.read()


def test_dino_resnet50_recipe_is_the_readme_command():
  args, gpus = official_args()
  c = recipe("dino_resnet50_in1k.py")
  config_lib.validate(c, num_devices=1)
  assert c.method == "dino" and c.model.arch == args["arch"] == "resnet50"
  assert c.batch_size == gpus * args["batch_size_per_gpu"] == 512
  assert (c.total_epochs, c.warmup_epochs, c.total_steps, c.warmup_steps) == (
    args["epochs"],
    args["warmup_epochs"],
    0,
    0,
  )
  assert (c.data.num_global, c.data.num_local) == (2, args["local_crops_number"])
  assert tuple(c.data.global_scale) == args["global_crops_scale"] == (0.14, 1.0)
  assert tuple(c.data.local_scale) == args["local_crops_scale"] == (0.05, 0.14)
  o = c.optim
  assert (o.name, o.momentum) == (args["optimizer"], 0.9) == ("sgd", 0.9)
  assert (o.lr, o.lr_scaling, o.min_lr) == (args["lr"], "linear_256", args["min_lr"])  # lr x B / 256 in main_dino.py
  assert (o.weight_decay, o.weight_decay_end) == (args["weight_decay"], args["weight_decay_end"]) == (1e-4, 1e-4)
  assert (o.clip_grad, o.clip_mode) == (args["clip_grad"], "per_tensor")
  assert o.freeze_last_layer_epochs == args["freeze_last_layer"] and o.freeze_mode == "drop_grads"
  h = c.head
  assert (h.num_prototypes, h.norm_last_layer, h.get("use_bn", False)) == (
    args["out_dim"],
    args["norm_last_layer"],
    args["use_bn_in_head"],
  )
  assert (h.hidden_dim, h.out_dim, h.num_layers) == (2048, 256, 3)  # DINOHead's defaults
  d = c.dino
  assert (d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs) == (
    args["warmup_teacher_temp"],
    args["teacher_temp"],
    args["warmup_teacher_temp_epochs"],
  )
  assert (d.student_temp, d.center_momentum) == (0.1, 0.9)  # DINOLoss's defaults in main_dino.py
  assert (c.teacher.momentum, c.teacher.momentum_end) == (args["momentum_teacher"], 1.0)
  assert args["use_fp16"] and c.model.dtype == "bfloat16"


def test_simdino_resnet50_recipe_takes_each_field_from_the_recipe_it_names():
  c, dino, vit = recipe("simdino_resnet50_in1k.py"), recipe("dino_resnet50_in1k.py"), recipe("simdino_vitb16_in1k.py")
  config_lib.validate(c, num_devices=1)
  assert c.method == "simdino"
  for field in ("model.arch", "model.dtype", "batch_size", "total_epochs", "warmup_epochs", "data", "optim.name"):
    assert config_lib._get(c, field) == config_lib._get(dino, field), field
  for field in ("lr", "lr_scaling", "min_lr", "weight_decay", "weight_decay_end", "clip_grad", "momentum"):
    assert c.optim[field] == dino.optim[field], field
  assert c.teacher == dino.teacher
  assert c.optim.freeze_last_layer_epochs == 0  # SimDINO has no prototype layer
  assert c.loss == vit.loss and (c.head.hidden_dim, c.head.out_dim) == (vit.head.hidden_dim, vit.head.out_dim)
  assert c.loss.groups == 8 and math.isclose(c.loss.eps**2, 8 * 0.05)


def test_the_resnet_recipes_train_with_sgd():
  """The recipe's optimiser is what training builds (setup.build, shapes only): an SGD momentum buffer, no Adam."""
  from simdino_jax.train import setup

  c = recipe("dino_resnet50_in1k.py")
  c.head.num_prototypes, c.model.arch = 16, "resnet18"  # a smaller network to trace; the optimiser is the same
  s = setup.build(c, num_train=1_281_167)
  states = jax.tree_util.tree_leaves(
    s.abstract_state.opt_state, is_leaf=lambda x: isinstance(x, (optax.TraceState, optim.MomentumState))
  )
  assert any(isinstance(x, optim.MomentumState) for x in states)  # drop_grads freeze of the prototypes: held buffer
  assert not any(
    isinstance(x, optax.ScaleByAdamState)
    for x in jax.tree_util.tree_leaves(
      s.abstract_state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
    )
  )
  assert s.durations.steps_per_epoch == 1_281_167 // 512
  assert math.isclose(float(s.lr_fn(s.durations.warmup_steps)), 0.03 * 512 / 256, rel_tol=1e-6)
  assert math.isclose(float(s.wd_fn(s.durations.total_steps // 2)), 1e-4, rel_tol=1e-6)
