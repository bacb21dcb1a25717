"""Entry point: evaluate a checkpoint of a run with the evaluators declared in its config.

python -m simdino_jax.evaluate --workdir=DIR --eval=knn,linear,attention[,fewshot] [--which=teacher|student]
    [--config=configs/FILE.py] [--config.FIELD=VALUE ...] [--output=DIR2]

The config is the run's own (DIR/config.json, over today's defaults: stored_config.py) unless --config names a
recipe; --config.FIELD overrides apply on top either way. Reads the ``which`` backbone (teacher by default) of the
newest committed checkpoint of ``DIR/checkpoints`` without opening a checkpoint manager (read-only: a run training
into DIR is not disturbed), builds it from the model config stored WITH the checkpoint (so the weights always fit),
places it on this machine's mesh, and runs the evaluators ``--eval`` names (entries of ``config.evals``,
docs/evaluation.md) through the same runner the training loop uses: features shared by k-NN, few-shot and the frozen
linear probe are extracted once per split. Writes (process 0) DIR/eval/NAME.json per evaluator (and
DIR/eval/attention/*.png), or into --output; with --which=student the files are named NAME_student.json (and
attention_student/). A NAME.json of another step or other data (training's own result) is kept and the new result
named NAME-stepN-DATA.json. The k-NN result keeps the run's at-init figures (eval/knn_init.json, written by
training) when the teacher is evaluated on the same data.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath
from flax import nnx
from ml_collections import config_flags

from simdino_jax import cli
from simdino_jax import config as config_lib
from simdino_jax import evals, sharding, stored_config
from simdino_jax import workdir as workdir_lib
from simdino_jax.data import sources
from simdino_jax.errors import SimdinoError
from simdino_jax.evals import runner
from simdino_jax.io import checkpointing
from simdino_jax.models.network import build_backbone
from simdino_jax.tree import path_str

WHICH = ("teacher", "student")

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file (configs/*.py[:ARG]); default: the run's own DIR/config.json (stored_config.py). "
  "--config.FIELD=VALUE overrides apply on top either way.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training directory whose newest checkpoint is evaluated.")
_EVAL = flags.DEFINE_list("eval", ["knn", "linear", "attention"], "Evaluators to run: entries of config.evals.")
_WHICH = flags.DEFINE_enum("which", "teacher", list(WHICH), "The backbone to evaluate.")
_OUTPUT = flags.DEFINE_string(
  "output", None, "Directory for the results (default DIR/eval), e.g. when DIR is read-only."
)
flags.mark_flags_as_required(["workdir"])


def parse_names(names, valid=None) -> list[str]:
  """The evaluator names, deduplicated in order; ValueError listing the valid ones (``valid``: the config's evals,
  default the base config's) for an unknown name."""
  valid = list(valid if valid is not None else config_lib.base_config().evals)
  if isinstance(names, str):
    names = names.split(",")
  names = [n.strip() for n in names if n.strip()]
  unknown = [n for n in names if n not in valid]
  if unknown or not names:
    raise ValueError(f"--eval: unknown evaluation(s) {unknown or names}; valid: {', '.join(valid)}")
  return list(dict.fromkeys(names))


def load_params(config, workdir: str, which: str):
  """(backbone graphdef, params placed on the mesh with their shardings, param sharding, mesh, step, stored model
  config) of the newest committed checkpoint of ``workdir``; FileNotFoundError naming ``workdir`` if none."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):  # checked first, naming the workdir; nothing is created
    raise FileNotFoundError(
      f"no checkpoint to evaluate: {ckpt_dir} does not exist (train into --workdir={workdir} first)"
    )
  arrays, step, stored = checkpointing.restore_params(workdir, which=which)
  model_cfg = ml_collections.ConfigDict(stored["model"])
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_backbone(model_cfg, rngs=nnx.Rngs(0))))
  mesh = sharding.make_mesh(config.mesh)
  # The training run's sharding rules, on the names training gives these leaves ("teacher/backbone/...").
  param_sharding = sharding.state_shardings({which: {"backbone": abstract}}, mesh, config)[which]["backbone"]

  def place(path, leaf, s):
    value = np.asarray(arrays[f"backbone/{path_str(path)}"]).astype(leaf.dtype)
    return jax.make_array_from_callback(value.shape, s, lambda index: value[index])

  params = jax.tree_util.tree_map_with_path(place, abstract, param_sharding)
  return graphdef, params, param_sharding, mesh, step, model_cfg


def evaluate(
  config, workdir: str, names=("knn", "linear", "attention"), which: str = "teacher", output: str | None = None
) -> dict:
  """Runs the evaluators ``names`` on the newest checkpoint of ``workdir``; returns {name: result} (as written).
  ``config`` None: the run's own (DIR/config.json). ``output``: where the results go (default DIR/eval). A result
  file of another step or other data (training's own results, say) is kept: the new one is named after what it
  evaluated (runner.write_results)."""
  workdir = workdir_lib.resolve(workdir)
  if config is None:
    config = stored_config.get_config(workdir)
  names = parse_names(names, config.evals)
  if which not in WHICH:
    raise ValueError(f"--which: must be 'teacher' or 'student', got {which!r}")
  config_lib.validate(
    config,
    num_devices=jax.device_count(),
    num_processes=jax.process_count(),
    num_local_devices=jax.local_device_count(),
  )
  graphdef, params, param_sharding, mesh, step, model_cfg = load_params(config, workdir, which)
  if model_cfg.to_dict() != config.model.to_dict():
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy: the evaluators read the stored model
    config.model = model_cfg
  eval_dir = os.path.join(workdir, "eval")
  out_dir = workdir_lib.resolve(output) if output else eval_dir
  ctx = runner.Context(
    config,
    graphdef=graphdef,
    param_sharding=param_sharding,
    mesh=mesh,
    train_source=sources.from_config(config.data, "train", evaluation=True),
    test_source=sources.from_config(config.data, "test", evaluation=True),
    out_dir=out_dir,
    suffix="" if which == "teacher" else f"_{which}",
    log=print,
  )
  evaluators = evals.build(config, names)
  ctx.log(f"evaluating the {which} backbone of {os.path.join(workdir, 'checkpoints', str(step))}: {', '.join(names)}")
  results = runner.run_round(ctx, evaluators, params)
  init = {}
  for name in names:  # the at-init figures training stored (teacher only: training evaluates the teacher)
    path = epath.Path(eval_dir) / f"{name}_init.json"
    if which == "teacher" and path.exists():
      stored = json.loads(path.read_text())
      if stored.get("data", sources.eval_spec(config.data)) == sources.eval_spec(config.data):  # the same data only
        init[name] = stored
  return runner.write_results(
    ctx, evaluators, results, step=step, features=f"{which} backbone", init=init, keep_other_results=True
  )


def main(argv):
  del argv
  sharding.maybe_initialize_distributed()  # multi-host pods: before anything touches the devices
  try:
    evaluate(_CONFIG.value, _WORKDIR.value, _EVAL.value, _WHICH.value, _OUTPUT.value)
  except (SimdinoError, ValueError, FileNotFoundError) as e:  # bad --eval, no checkpoint, invalid config: one line
    sys.exit(f"simdino_jax.evaluate: error: {e}")


def with_stored_config(argv: list[str]) -> list[str]:
  """``argv`` with ``--config=<stored_config.py>:DIR`` added when it names no --config: the run's own config, which
  --config.FIELD overrides then modify as they would a recipe."""
  if any(a == "--config" or a.startswith("--config=") for a in argv):
    return argv
  workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), None)
  if workdir is None and "--workdir" in argv[:-1]:
    workdir = argv[argv.index("--workdir") + 1]
  if workdir is None:
    return argv  # absl reports the missing --workdir
  return argv[:1] + [f"--config={os.path.abspath(stored_config.__file__)}:{workdir_lib.resolve(workdir)}"] + argv[1:]


if __name__ == "__main__":
  from simdino_jax import tcmalloc  # stdlib only: re-executes with tcmalloc preloaded before jax starts

  tcmalloc.maybe_reexec("simdino_jax.evaluate")
  app.run(main, argv=with_stored_config(sys.argv), flags_parser=cli.flags_parser("simdino_jax.evaluate"))
