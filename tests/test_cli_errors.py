"""Every mistake a user can make on the train / evaluate command line is one line naming the flag, field or file.

In-process: each case runs an entry point's own flag definitions, ``cli.flags_parser`` and ``main`` (as
``app.run`` would) on a fresh FlagValues, and checks the exit: status 1 with one line ``PROG: error: ...`` (absl
and ml_collections tracebacks would surface here as the exception itself), or 0 after --help.
"""

import importlib
import os
import sys

import numpy as np
import pytest
from absl import app, flags
from PIL import Image

from simdino_jax import cli, evaluate
from simdino_jax import config as config_lib
from simdino_jax.errors import ConfigError
from simdino_jax.models.network import backbone_kwargs
from simdino_jax.models.vit import parse_variant

train_main = importlib.import_module("simdino_jax.train.__main__")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRIES = {"simdino_jax.train": train_main, "simdino_jax.evaluate": evaluate}


def parse(prog, args, monkeypatch):
  """(flag values, remaining argv) after parsing ``args`` as ``python -m PROG ARGS`` does."""
  monkeypatch.chdir(ROOT)
  argv = [prog, *args]
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the --config.FIELD overrides from sys.argv
  if prog == "simdino_jax.evaluate":
    argv = evaluate.with_stored_config(argv)
  fv = ENTRIES[prog].define_flags(flags.FlagValues())
  for help_flag in (app.HelpFlag(), app.HelpshortFlag(), app.HelpfullFlag()):  # as app.run defines them
    flags.DEFINE_flag(help_flag, fv)
  return fv, cli.flags_parser(prog, fv)(argv)


def run(prog, args, monkeypatch):
  """The exit of ``python -m PROG ARGS``: (status, message); the message is one line by construction of sys.exit."""
  with pytest.raises(SystemExit) as exit_:
    fv, rest = parse(prog, args, monkeypatch)
    ENTRIES[prog].main(rest, fv)
  code = exit_.value.code
  return (1, code) if isinstance(code, str) else (code, "")


def assert_one_line(status, message, prog, expected):
  assert status == 1 and "\n" not in message and message.startswith(f"{prog}: error: "), message
  assert expected in message, message


@pytest.mark.parametrize("prog", list(ENTRIES))
def test_help_exits_0(prog, monkeypatch, capsys):
  assert run(prog, ["--help"], monkeypatch) == (0, "")
  assert "--helpfull" in capsys.readouterr().out


@pytest.mark.parametrize("prog", list(ENTRIES))
def test_a_missing_config_file_is_one_line_naming_it(prog, monkeypatch, tmp_path):
  status, message = run(prog, ["--config=configs/qqqqxz.py", f"--workdir={tmp_path}"], monkeypatch)
  assert_one_line(status, message, prog, "--config=configs/qqqqxz.py: no such config file (configs holds ")
  status, message = run(prog, ["--config=configs/dem.py", f"--workdir={tmp_path}", "--config.seed=1"], monkeypatch)
  assert_one_line(status, message, prog, "--config=configs/dem.py: no such config file; did you mean configs/demo.py?")


@pytest.mark.parametrize(
  "body,expected",
  [
    ("raise ValueError(f'unknown mode {arg!r}: use cpu or gpu')", "ValueError: unknown mode 'tpu': use cpu or gpu"),
    ("return {}[arg]", "KeyError: tpu"),  # not taken for an unknown --config.FIELD
    ("return undefined_name", "NameError: name 'undefined_name' is not defined"),
  ],
)
def test_a_config_file_that_raises_is_one_line_naming_it_and_the_line(body, expected, monkeypatch, tmp_path):
  recipe = tmp_path / "recipe.py"
  recipe.write_text(f"def get_config(arg=None):\n  {body}\n")
  status, message = run("simdino_jax.train", [f"--config={recipe}:tpu", f"--workdir={tmp_path}"], monkeypatch)
  assert_one_line(status, message, "simdino_jax.train", f"--config={recipe}:tpu: {expected} ({recipe}, line 2)")


@pytest.mark.parametrize("prog", list(ENTRIES))
@pytest.mark.parametrize(
  "override,suggestion",
  [("optim.learning_rate", "did you mean config.optim.lr?"), ("optimizer.lr", "did you mean config.optim.lr?")],
)
def test_an_unknown_field_is_named_with_the_closest_existing_ones(prog, override, suggestion, monkeypatch, tmp_path):
  args = ["--config=configs/demo.py", f"--workdir={tmp_path}", f"--config.{override}=1e-3"]
  status, message = run(prog, args, monkeypatch)
  assert_one_line(status, message, prog, f"config.{override}: no such config field; {suggestion}")


@pytest.mark.parametrize(
  "override,expected",
  [
    ("mesh=foo", "config.mesh: expected (name, size) pairs, e.g. --config.mesh="),
    ("data.global_scale=0.5", "config.data.global_scale: expected 2 numbers, (min, max) area fraction"),
    ("data.augment.blur_p=0.5", "config.data.augment.blur_p: expected 3 numbers"),
    ("model.img_size=18", "config.model.img_size: 18 is not a positive multiple of the patch size 4"),
  ],
)
def test_a_malformed_value_is_one_line_naming_the_field(override, expected, monkeypatch, tmp_path):
  args = ["--config=configs/demo.py", f"--workdir={tmp_path}", f"--config.{override}"]
  status, message = run("simdino_jax.train", args, monkeypatch)
  assert_one_line(status, message, "simdino_jax.train", expected)


@pytest.mark.parametrize("prog", list(ENTRIES))
def test_a_stray_argument_is_refused_not_ignored(prog, monkeypatch, tmp_path):
  args = ["--config=configs/demo.py", f"--workdir={tmp_path}", "total_steps=3"]  # trained 600 steps without a word
  status, message = run(prog, args, monkeypatch)
  assert_one_line(status, message, prog, "unexpected argument(s) total_steps=3: give flags as --NAME=VALUE")


def test_an_empty_workdir_is_refused_rather_than_training_into_the_working_directory(monkeypatch):
  status, message = run("simdino_jax.train", ["--config=configs/demo.py", "--workdir="], monkeypatch)
  assert_one_line(status, message, "simdino_jax.train", "--workdir is empty: name the run's directory")


def test_evaluate_on_a_directory_that_is_not_a_run_says_what_a_run_holds(monkeypatch, tmp_path):
  status, message = run("simdino_jax.evaluate", [f"--workdir={tmp_path}"], monkeypatch)
  assert_one_line(status, message, "simdino_jax.evaluate", f"--workdir={tmp_path} is not a training run's directory")
  assert "a run holds config.json, checkpoints/" in message
  status, message = run("simdino_jax.evaluate", [f"--workdir={tmp_path / 'nope'}"], monkeypatch)
  assert_one_line(status, message, "simdino_jax.evaluate", f"--workdir={tmp_path / 'nope'}: no such directory")


def test_evaluate_on_an_unlabelled_run_points_at_data_eval_source(monkeypatch, tmp_path):
  images = tmp_path / "photos"
  images.mkdir()
  for i in range(4):  # a flat folder: no splits, no classes
    Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
  config = importlib.import_module("runpy").run_path(os.path.join(ROOT, "configs", "demo.py"))["get_config"]()
  config.data.source = f"folder:{images}"
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text(config.to_json())
  status, message = run("simdino_jax.evaluate", [f"--workdir={tmp_path / 'run'}", "--eval=knn,attention"], monkeypatch)
  assert_one_line(status, message, "simdino_jax.evaluate", "config.data.eval_source: ")
  assert "has no labelled train and test split, which knn needs: point --config.data.eval_source at" in message


def test_a_command_line_variant_decides_the_architecture(monkeypatch, capsys):
  fv, _ = parse(
    "simdino_jax.train", ["--config=configs/demo.py", "--workdir=x", "--config.model.variant=S/4"], monkeypatch
  )
  kw, s4 = backbone_kwargs(fv.config.model), parse_variant("S/4")
  assert (
    (kw["embed_dim"], kw["depth"], kw["num_heads"], kw["patch_size"])
    == (384, 12, 6, 4)
    == tuple(s4[k] for k in ("embed_dim", "depth", "num_heads", "patch_size"))
  )
  assert "model.embed_dim=96, model.depth=4, model.num_heads=3 reset to the variant's" in capsys.readouterr().out
  args = ["--config=configs/demo.py", "--workdir=x", "--config.model.variant=S/4", "--config.model.depth=2"]
  fv, _ = parse("simdino_jax.train", args, monkeypatch)  # what the command line sets itself is kept
  kw = backbone_kwargs(fv.config.model)
  assert (kw["embed_dim"], kw["depth"], kw["num_heads"]) == (384, 2, 6)


@pytest.mark.parametrize("recipe", sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py")))
def test_without_flags_every_recipe_resolves_as_written(recipe, monkeypatch):
  path = os.path.join("configs", recipe)
  fv, _ = parse("simdino_jax.train", [f"--config={path}", "--workdir=x"], monkeypatch)
  written = importlib.import_module("runpy").run_path(os.path.join(ROOT, path))["get_config"]()
  assert fv.config.to_dict() == written.to_dict()


def test_a_patch_size_change_names_every_size_that_must_follow(monkeypatch, tmp_path):
  args = ["--config=configs/demo.py", f"--workdir={tmp_path}", "--config.model.variant=S/16"]
  status, message = run("simdino_jax.train", args, monkeypatch)
  assert_one_line(status, message, "simdino_jax.train", "config.data.local_size: 8 is not a positive multiple of")
  assert "(data.global_size, data.local_size, model.img_size) change together" in message
  assert "--config.data.local_size=16 (keeping data.global_size=16, model.img_size=16)" in message
  with pytest.raises(ConfigError, match="config.model.img_size: 16 is not"):  # the stored grid too
    config = config_lib.base_config()
    config.data.source, config.model.variant, config.model.img_size = "digits", "B/32", 16
    config.data.global_size, config.data.local_size = 32, 32
    config_lib.validate(config, num_devices=1)
