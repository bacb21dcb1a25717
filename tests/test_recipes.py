"""The rule every file in configs/ follows (docs/training.md#how-a-recipe-is-written): a recipe assigns only what
differs from what it starts from, ``simdino_jax/config.py``'s ``base_config()`` (itself the official SimDINO ViT-B/16
recipe) or the recipe it loads; and its docstring gives the command, the runtime and the expected result.

"Only what differs" is checked by running each ``get_config`` with the assignments into the config traced, for every
config argument its docstring's commands pass and with the data variable $SIMDINO_CIFAR10 unset and set: a line whose
assignment leaves a field at the value it already holds in every run that reaches it (a restated default, or a
restated value of the parent recipe) fails with its file and line. A recipe's assignments are then exactly its
difference from its starting point.
"""

import ast
import collections
import dataclasses
import os
import re
import runpy
import sys

import ml_collections
import pytest

from simdino_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
CONFIG_FILES = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py"))
# Shared bases run only through the recipes that load them (their docstrings say which).
BASES = {"cifar10_common.py"}
DATA_ENV = "SIMDINO_CIFAR10"  # the one environment variable a recipe reads (configs/cifar10_common.py)


@dataclasses.dataclass(frozen=True)
class Assignment:
  file: str  # the configs/ file whose line assigned it
  line: int
  field: str  # dotted, as on the command line (config.<field>)
  old: object
  new: object

  @property
  def restates(self) -> bool:
    old, new = (v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v for v in (self.old, self.new))
    return type(old) is type(new) and old == new


def docstring(path: str) -> str:
  with open(path) as f:
    return ast.get_docstring(ast.parse(f.read())) or ""


def arguments(path: str) -> list:
  """None, and every ``:ARG`` the docstring's commands give ``--config=configs/<file>``."""
  pattern = rf"--config=configs/{re.escape(os.path.basename(path))}:([^\s`'\")]+)"
  return [None, *sorted(set(re.findall(pattern, docstring(path))))]


def trace(path: str, arg=None, env=None) -> tuple[bool, list[Assignment]]:
  """(whether the recipe at ``path`` started from base_config(), every assignment into that config a file of its
  directory made while ``get_config(arg)`` ran with $SIMDINO_CIFAR10 = ``env``, in order). The new value is read
  back after ConfigDict's own cast (an int given for a float field compares as the float it becomes)."""
  config_dir = os.path.dirname(os.path.abspath(path))
  prefixes = {}  # id(ConfigDict) -> its dotted prefix, for the tree base_config() returned
  base_config = config_lib.base_config
  setitem = ml_collections.ConfigDict.__setitem__
  assignments = []

  def register(node, prefix):
    prefixes[id(node)] = prefix
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        register(value, f"{prefix}{key}.")

  def traced_base_config():
    config = base_config()
    register(config, "")
    return config

  def traced_setitem(self, key, value):
    prefix = prefixes.get(id(self))
    if prefix is None:
      return setitem(self, key, value)
    old = self.get(key, None)
    setitem(self, key, value)
    new = self[key]
    if isinstance(new, ml_collections.ConfigDict):
      register(new, f"{prefix}{key}.")
    frame = sys._getframe(1)  # ConfigDict.__setattr__, then the recipe's line (or a helper's)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) != config_dir:
      frame = frame.f_back
    if frame is not None:
      assignments.append(Assignment(os.path.basename(frame.f_code.co_filename), frame.f_lineno, prefix + key, old, new))

  with pytest.MonkeyPatch.context() as mp:
    if env is None:
      mp.delenv(DATA_ENV, raising=False)
    else:
      mp.setenv(DATA_ENV, env)
    mp.setattr(config_lib, "base_config", traced_base_config)
    mp.setattr(ml_collections.ConfigDict, "__setitem__", traced_setitem)
    runpy.run_path(path)["get_config"](arg)
  return bool(prefixes), assignments


def restated_lines(path: str) -> list[str]:
  """The lines whose assignment restates the value it replaces in every traced run that reaches them."""
  runs = collections.defaultdict(list)  # (file, line, field) -> [Assignment], over every run
  for arg in arguments(path):
    for env in (None, "/env/data.tar"):
      started_from_base, assignments = trace(path, arg, env)
      assert started_from_base, f"{path} does not start from simdino_jax.config.base_config() (or a recipe that does)"
      assert assignments, f"{path}: no assignment traced"
      for a in assignments:
        runs[a.file, a.line, a.field].append(a)
  return [
    f"configs/{file}:{line}: config.{field} = {seen[0].new!r} is the value it already holds"
    for (file, line, field), seen in runs.items()
    if all(a.restates for a in seen)
  ]


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_recipe_assigns_only_what_differs_from_what_it_starts_from(name):
  restated = restated_lines(os.path.join(CONFIG_DIR, name))
  assert not restated, "\n".join(restated)


def test_the_tracer_sees_a_restated_value_and_its_line(tmp_path):
  """The check above can fail: a recipe restating base_config()'s batch size is caught at its line; a changed value,
  a changed nested field and an assignment that changes the field for one of the docstring's arguments are not."""
  (tmp_path / "recipe.py").write_text(
    'r"""python -m simdino_jax.train --config=configs/recipe.py:/photos --workdir=DIR"""\n'
    "from simdino_jax import config as config_lib\n"
    "def get_config(arg=None):\n"
    "  c = config_lib.base_config()\n"
    f"  c.batch_size = {config_lib.base_config().batch_size}\n"
    "  c.optim.lr, c.data.augment.flip_p = 1e-3, 0.0\n"
    '  c.data.source = "folder:" + arg if arg else config_lib.base_config().data.source\n'
    "  return c\n"
  )
  path = str(tmp_path / "recipe.py")
  assert arguments(path) == [None, "/photos"]
  started_from_base, assignments = trace(path, "/photos")
  assert started_from_base
  assert [(a.line, a.field, a.restates) for a in assignments] == [
    (5, "batch_size", True),
    (6, "optim.lr", False),
    (6, "data.augment.flip_p", False),
    (7, "data.source", False),
  ]
  assert restated_lines(path) == [
    f"configs/recipe.py:5: config.batch_size = {config_lib.base_config().batch_size} is the value it already holds"
  ]


@pytest.mark.parametrize("name", [f for f in CONFIG_FILES if f not in BASES])
def test_recipe_docstring_gives_the_command_the_runtime_and_the_expected_result(name):
  doc = docstring(os.path.join(CONFIG_DIR, name))
  assert f"python -m simdino_jax.train --config=configs/{name}" in doc, name
  assert "Runtime" in doc, name
  assert "Expected result" in doc, name


def official_simdino_run() -> tuple[dict, int]:
  """(main_dino.py's arguments for the official SimDINO ViT-B/16 run, its GPU count): the argparse defaults, read
  with ast (the file imports torch), overridden by the SimDINO README's training command."""
  clones = os.environ.get("SIMDINO_OFFICIAL_DIR")
  root = os.path.join(clones or "", "SimDINO")
  if not clones or not os.path.isdir(root):
    pytest.skip("needs SIMDINO_OFFICIAL_DIR holding the SimDINO clone")
  with open(os.path.join(root, "simdino", "main_dino.py")) as f:
    tree = ast.parse(f.read())
  args = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
      default = [kw.value for kw in node.keywords if kw.arg == "default"]
      if default:
        args[node.args[0].value.lstrip("-")] = ast.literal_eval(default[0])
  with open(os.path.join(root, "README.md")) as f:
    command = re.search(r"torchrun[^\n]*main_dino\.py(?:[^\n]*\\\n)*[^\n]*", f.read()).group(0)
  gpus = int(re.search(r"--nproc_per_node=(\d+)", command).group(1))
  for key, value in re.findall(r"--(\w+) ([^\s\\<-][^\s\\]*)", command.split("main_dino.py", 1)[1]):
    args[key] = type(args[key])(value) if isinstance(args.get(key), (int, float)) else value
  return args, gpus


def test_simdino_vitb16_recipe_is_the_official_run():
  """The SimDINO recipe now lives in config.py's defaults (the recipe file assigns only its differences), so a default
  changed by mistake must fail here: the resolved recipe against the official code's own arguments."""
  args, gpus = official_simdino_run()
  assert (args["arch"], args["patch_size"], args["local_crops_number"], args["eps"]) == ("vit_base", 16, 10, 0.05)
  c = runpy.run_path(os.path.join(CONFIG_DIR, "simdino_vitb16_in1k.py"))["get_config"]()
  assert c.method == "simdino" and args["use_simdino"]
  assert c.model.variant == {"vit_small": "S", "vit_base": "B"}[args["arch"]] + f"/{args['patch_size']}"
  assert c.batch_size == gpus * args["batch_size_per_gpu"]
  assert (c.total_epochs, c.warmup_epochs, c.total_steps, c.warmup_steps) == (
    args["epochs"],
    args["warmup_epochs"],
    0,
    0,
  )
  assert (c.data.num_global, c.data.num_local) == (2, args["local_crops_number"])
  assert (tuple(c.data.global_scale), tuple(c.data.local_scale)) == (
    args["global_crops_scale"],
    args["local_crops_scale"],
  )
  assert c.model.drop_path_rate == args["drop_path_rate"] and not c.model.drop_path_uniform
  assert (c.head.hidden_dim, c.head.out_dim) == (args["hidden_dim"], args["z_dim"])
  o = c.optim
  assert (o.lr, o.lr_scaling, o.min_lr) == (args["lr"], "linear_256", args["min_lr"])  # lr x B / 256 in main_dino.py
  assert (o.weight_decay, o.weight_decay_end) == (args["weight_decay"], args["weight_decay_end"])
  assert (o.clip_grad, o.clip_mode) == (args["clip_grad"], "per_tensor")  # utils.clip_gradients: per parameter
  assert (c.teacher.momentum, c.teacher.momentum_end) == (args["momentum_teacher"], 1.0)
  # reduce_cov 0: one covariance per GPU normalised by the global batch, i.e. loss.groups = GPUs, eps^2 = GPUs x eps.
  assert args["reduce_cov"] == 0 and c.loss.groups == gpus
  assert abs(c.loss.eps**2 - gpus * args["eps"]) < 1e-12
  assert args["expa_type"] == 1 and c.loss.expansion == "mean" and c.loss.exclude_same_view
