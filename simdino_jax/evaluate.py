"""Entry point: evaluate a checkpoint of a run, or a weights file, with the evaluators declared in a config.

python -m simdino_jax.evaluate --workdir=DIR --eval=knn,linear,attention[,fewshot] [--which=teacher|student]
    [--config=configs/FILE.py] [--config.FIELD=VALUE ...] [--output=DIR2]
python -m simdino_jax.evaluate --weights=FILE --config=configs/FILE.py --output=DIR2 --eval=knn,... [--which=...]
    [--config.model.FIELD=VALUE ...]

--workdir: the config is the run's own (DIR/config.json, over today's defaults: stored_config.py) unless --config
names a recipe; --config.FIELD overrides apply on top either way. Reads the ``which`` backbone (by default the one
training evaluates, the method's ``Method.evaluated``: the teacher, or the student for moco_v2 / byol) of the newest committed checkpoint of ``DIR/checkpoints`` without opening a checkpoint manager (read-only: a run
training into DIR is not disturbed), builds it from the model config stored WITH the checkpoint (so the weights
always fit), places it on this machine's mesh, and runs the evaluators ``--eval`` names (entries of
``config.evals``, docs/evaluation.md) through the same runner the training loop uses: features shared by k-NN,
few-shot and the frozen linear probe are extracted once per split. Writes (process 0) DIR/eval/NAME.json per
evaluator (and DIR/eval/attention/*.png), or into --output; with the other network (e.g. --which=student for DINO)
the files are named NAME_student.json (and attention_student/). A NAME.json of another step or other data (training's own result) is
kept and the new result named NAME-stepN-DATA.json. The k-NN result keeps the run's at-init figures
(eval/knn_init.json, written by training) when training's network is evaluated on the same data.

--weights: a released or exported backbone instead of a run: an official DINO / DINOv2 / SimDINO / SimDINOv2
PyTorch ``.pth`` (read with PyTorch, which must then be installed; never a dependency), the state dict bare or under
``teacher`` / ``student`` / ``model`` with ``module.`` / ``backbone.`` prefixes, or our own ``.safetensors`` /
``.npz`` export (simdino_jax.export), read by ``io.torch_interop`` as ``load_backbone`` reads them. Width, depth,
patch size, registers, LayerScale and FFN come from the shapes; our exports carry their run's model config. The
head count (not in official weights) is the config's when its width is the file's (or ``--config.model.num_heads``
alone), else width / 64 as in every official ViT; the positional-embedding interpolation (``model.interpolate_*``)
and ``token_init`` are the config's (a DINOv2-family recipe for DINOv2-family weights). --config (required) gives
the data and the evaluators; --output (required: there is no run directory) receives the results, which record
the file as ``weights`` (and ``step`` when the file has one).

Every evaluator runs in ``config.eval.dtype`` (float32 by default, as DINO's scripts) whatever the weights trained
in, and each result is written as soon as its evaluator finishes. An evaluator that fails (an exception, e.g. out
of memory) is logged in one line and the others still run; the command then exits with status 1 and one line
listing the failed evaluators (``evaluate()`` re-raises the first failure unless given a ``failed`` dict).
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

from simdino_jax import cli, evals, methods, sharding, stored_config
from simdino_jax import config as config_lib
from simdino_jax import workdir as workdir_lib
from simdino_jax.data import sources
from simdino_jax.errors import ConfigError, InteropError, SimdinoError
from simdino_jax.evals import runner
from simdino_jax.io import checkpointing, restore, torch_interop, torchvision_resnet
from simdino_jax.models.network import (
  RESNET_VARIANTS,
  backbone_kwargs,
  build_backbone,
  eval_backbone_graphdef,
  is_resnet,
)
from simdino_jax.models.vit import VisionTransformer
from simdino_jax.train import metrics
from simdino_jax.tree import path_str

WHICH = ("teacher", "student")


class EvaluatorsFailed(SimdinoError):
  """Some evaluators failed; the others' results are written. ``failed``: {name: exception}."""

  def __init__(self, failed: dict):
    self.failed = dict(failed)
    super().__init__(
      f"evaluator(s) {', '.join(failed)} failed, their figures are missing: "
      + "; ".join(f"{name}: {runner.failure_line(e, 200)}" for name, e in failed.items())
    )


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


def place_params(config, vit_kwargs: dict, arrays: dict, which: str, model_cfg=None):
  """(params on the mesh with the training run's sharding rules, param sharding, mesh) of a VisionTransformer with
  ``vit_kwargs`` (or of ``model_cfg``'s ResNet, weights and running statistics); ``arrays``: {our parameter name
  (blocks/0/attn/qkv/kernel): array}, cast to float32."""
  if model_cfg is not None and is_resnet(model_cfg):
    abstract = nnx.split(nnx.eval_shape(lambda: build_backbone(model_cfg, rngs=nnx.Rngs(0))))[1]
  else:
    abstract = nnx.split(nnx.eval_shape(lambda: VisionTransformer(**vit_kwargs, rngs=nnx.Rngs(0))))[1]
  mesh = sharding.make_mesh(config.mesh)
  # The training run's sharding rules, on the names training gives these leaves ("teacher/backbone/...").
  param_sharding = sharding.state_shardings({which: {"backbone": abstract}}, mesh, config)[which]["backbone"]

  def place(path, leaf, s):
    value = np.asarray(arrays[path_str(path)]).astype(leaf.dtype)
    return jax.make_array_from_callback(value.shape, s, lambda index: value[index])

  return jax.tree_util.tree_map_with_path(place, abstract, param_sharding), param_sharding, mesh


def load_params(config, workdir: str, which: str):
  """(VisionTransformer kwargs, params placed on the mesh, param sharding, mesh, step, stored model config) of the
  newest committed checkpoint of ``workdir``; FileNotFoundError naming ``workdir`` if none."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):  # checked first, naming the workdir; nothing is created
    raise FileNotFoundError(
      f"no checkpoint to evaluate: {ckpt_dir} does not exist (train into --workdir={workdir} first)"
    )
  arrays, step, stored = restore.restore_params(workdir, which=which)
  model_cfg = ml_collections.ConfigDict(stored["model"])
  vit_kwargs = backbone_kwargs(model_cfg)
  prefix = "backbone/"
  backbone = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
  params, param_sharding, mesh = place_params(config, vit_kwargs, backbone, which, model_cfg)
  return vit_kwargs, params, param_sharding, mesh, step, model_cfg


def _heads(config, width: int, where: str) -> int:
  """The head count of official weights of ``width`` (not stored in them): the config's when its width is the file's,
  or config.model.num_heads set alone (embed_dim 0), else width / 64 (every official ViT)."""
  cfg = backbone_kwargs(config.model)
  if cfg["embed_dim"] == width:
    heads = cfg["num_heads"]
  elif config.model.num_heads > 0 and not config.model.embed_dim:
    heads = config.model.num_heads
  else:
    heads = width // 64
  if heads < 1 or width % heads:
    raise ConfigError(
      f"config.model.num_heads: {where} has width {width}, which {heads} heads do not divide and the file does "
      f"not store its head count; set --config.model.num_heads (and --config.model.embed_dim={width})"
    )
  return heads


def load_weights(config, path: str, which: str):
  """(VisionTransformer kwargs, {our name: float32 array}, step or None, model config) of a weights file: an official
  PyTorch state dict (.pth; .safetensors / .npz with official names) or our export (its run's model config)."""
  obj, metadata = torch_interop.read_state_dict(path)  # InteropError naming the file (e.g. .pth without PyTorch)
  stored = json.loads(metadata["config"]) if metadata.get("config") else None
  if (stored or {}).get("model", {}).get("arch", "vit") != "vit":
    return _load_resnet_weights(config, obj, metadata, stored, path, which)
  # The head count does not change a parameter's shape: import with one, decide it below.
  try:
    imported = torch_interop.load_state_dict(obj, which=which, num_heads=1, where=path)
  except InteropError as error:  # not a ViT: a torchvision / DINO ResNet state dict?
    try:
      return _load_resnet_weights(config, obj, metadata, stored, path, which)
    except InteropError:
      raise error from None
  kw = imported.kwargs
  if stored and stored.get("model"):  # our export: the run's own model config, as evaluating its workdir
    model_cfg = config_lib.from_dict({"model": stored["model"]}).model
    vit_kwargs = backbone_kwargs(model_cfg)
    for key in ("embed_dim", "depth", "patch_size", "num_registers"):
      if vit_kwargs[key] != kw[key]:
        raise InteropError(f"{path}: its weights have {key}={kw[key]} but its stored config says {vit_kwargs[key]}")
  else:  # official weights: the shapes, plus the config's head count and interpolation settings
    model_cfg = ml_collections.ConfigDict(config.model.to_dict())
    heads = _heads(config, kw["embed_dim"], path)
    model_cfg.variant = f"{'g' if kw['ffn'] == 'swiglu' else 'B'}/{kw['patch_size']}"
    model_cfg.embed_dim, model_cfg.depth, model_cfg.num_heads = kw["embed_dim"], kw["depth"], heads
    model_cfg.img_size, model_cfg.num_registers = kw["img_size"], kw["num_registers"]
    model_cfg.layerscale = float(kw["layerscale_init"] or 0.0)
    vit_kwargs = dict(
      kw,
      num_heads=heads,
      token_init=model_cfg.token_init,
      interpolate_offset=model_cfg.interpolate_offset,
      interpolate_antialias=model_cfg.interpolate_antialias,
    )
  step = metadata.get("step")
  return vit_kwargs, imported.params, int(step) if str(step).isdigit() else None, model_cfg


def _load_resnet_weights(config, obj, metadata, stored, path: str, which: str):
  """load_weights for a ResNet: a torchvision / DINO state dict, or a ResNet run's export (its stored model config);
  the model config of an official file comes from its shapes (a named variant, its width)."""
  imported = torchvision_resnet.load_resnet_state_dict(obj, which=which, where=path)
  kw = imported.kwargs
  if stored and stored.get("model"):
    model_cfg = config_lib.from_dict({"model": stored["model"]}).model
  else:
    model_cfg = ml_collections.ConfigDict(config.model.to_dict())
    names = [
      n
      for n, v in RESNET_VARIANTS.items()
      if (v[0], tuple(v[1]), v[3]) == (kw["block"], kw["layers"], kw["cifar_stem"])
    ]
    if not names:
      raise InteropError(
        f"{path}: a ResNet of {kw['block']} blocks {list(kw['layers'])} is none of {sorted(RESNET_VARIANTS)}"
      )
    model_cfg.arch, model_cfg.resnet_width = names[0], kw["width"]
  step = metadata.get("step")
  return kw, imported.params, int(step) if str(step).isdigit() else None, model_cfg


def _prepare(config, names, num_devices=None):
  names = parse_names(names, config.evals)
  if is_resnet(config.model):  # named on the command line: refused like an enabled one (config.validate)
    for name in names:
      kind = config.evals[name].type
      if kind not in config_lib.POOLED_FEATURE_EVALUATORS:
        raise ConfigError(
          f"config.evals.{name}: the {kind!r} evaluator reads a ViT's patch tokens or attention, which "
          f"model.arch={config.model.arch!r} does not have (a ResNet runs "
          f"{', '.join(config_lib.POOLED_FEATURE_EVALUATORS)})"
        )
  config_lib.validate(
    config,
    num_devices=jax.device_count() if num_devices is None else num_devices,
    num_processes=jax.process_count(),
    num_local_devices=jax.local_device_count(),
  )
  return names


def require_labels(config, names) -> None:
  """ConfigError naming data.eval_source when an evaluator of ``names`` needs labels and the evaluation data (the
  run's data.eval_source, else data.source) has no labelled train and test split (unlabelled pre-training, as a
  flat folder of photos): checked before a checkpoint is read. Training turns those evaluators off instead."""
  data = config.data
  spec, tfds_dir = sources.eval_spec(data), data.get("tfds_data_dir") or None
  labelled = [evals.TYPES[config.evals[n].type].needs_labels for n in names]
  if not any(labelled):
    return
  if all(sources.has_labelled_split(spec, split, tfds_data_dir=tfds_dir) for split in ("train", "test")):
    return
  need = [n for n, needs in zip(names, labelled) if needs]
  raise ConfigError(
    f"config.data.eval_source: {spec!r} has no labelled train and test split, which {', '.join(need)} "
    f"need{'s' if len(need) == 1 else ''}: point --config.data.eval_source at labelled data (folder:DIR with "
    "train/ and test/ class folders, npz:PATH, tfds:NAME or digits)"
  )


def _with_model(config, model_cfg):
  """``config`` with ``model_cfg`` as its model (an unlocked copy when they differ): the evaluators read it."""
  if model_cfg.to_dict() == config.model.to_dict():
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = model_cfg
  return config


def _context(
  config, vit_kwargs: dict, param_sharding, mesh, out_dir: str, which: str, default: str = "teacher"
) -> runner.Context:
  """The evaluation context of a backbone built in config.eval.dtype (float32 by default) whatever it trained in,
  reading the config's labelled train / test splits and writing into ``out_dir`` (``_{which}`` names unless
  ``which`` is ``default``, the network training evaluates)."""
  return runner.Context(
    config,
    graphdef=eval_backbone_graphdef(config.model, config.eval.dtype)  # a ResNet in evaluation mode
    if is_resnet(config.model)
    else runner.eval_graphdef(vit_kwargs, config.eval.dtype),
    param_sharding=param_sharding,
    mesh=mesh,
    train_source=sources.from_config(config.data, "train", evaluation=True),
    test_source=sources.from_config(config.data, "test", evaluation=True),
    out_dir=out_dir,
    suffix="" if which == default else f"_{which}",
    log=print,
    dtype=config.eval.dtype,
    checkpointer=checkpointing.Checkpointer,
    metrics_log=metrics.MetricsLog,
  )


def _run(ctx, evaluators, params, failed, write) -> dict:
  """One round, each result written as it finishes; the first failure re-raised at the end unless ``failed``."""
  collected = {} if failed is None else failed
  results = {}
  runner.run_round(
    ctx, evaluators, params, on_result=lambda name, r: results.update({name: write(name, r)}), failed=collected
  )
  if failed is None and collected:
    raise next(iter(collected.values()))
  return results


def evaluate(
  config,
  workdir: str,
  names=("knn", "linear", "attention"),
  which: str | None = None,
  output: str | None = None,
  failed: dict | None = None,
) -> dict:
  """Runs the evaluators ``names`` on the newest checkpoint of ``workdir``; returns {name: result} (as written).
  ``config`` None: the run's own (DIR/config.json). ``output``: where the results go (default DIR/eval). A result
  file of another step or other data (training's own results, say) is kept: the new one is named after what it
  evaluated (runner.write_result). Each result is written as its evaluator finishes; a failed evaluator is recorded
  in ``failed`` ({name: exception}) when given, else the first failure is raised once the others have run."""
  workdir = workdir_lib.resolve(workdir)
  if config is None:
    config = stored_config.get_config(workdir)
  default = methods.get_method(config.method).evaluated  # the network training evaluated (results, at-init figures)
  which = which or default
  if which not in WHICH:
    raise ValueError(f"--which: must be 'teacher' or 'student', got {which!r}")
  names = _prepare(config, names)
  require_labels(config, names)
  vit_kwargs, params, param_sharding, mesh, step, model_cfg = load_params(config, workdir, which)
  config = _with_model(config, model_cfg)  # the evaluators read the stored model
  eval_dir = os.path.join(workdir, "eval")
  out_dir = workdir_lib.resolve(output) if output else eval_dir
  ctx = _context(config, vit_kwargs, param_sharding, mesh, out_dir, which, default)
  evaluators = evals.build(config, names)
  ctx.log(
    f"evaluating the {which} backbone of {os.path.join(workdir, 'checkpoints', str(step))} in {ctx.dtype}: "
    + ", ".join(names)
  )
  init = {}
  for name in names:  # the at-init figures training stored, of the network training evaluates
    path = epath.Path(eval_dir) / f"{name}_init.json"
    if which == default and path.exists():
      stored = json.loads(path.read_text())
      if stored.get("data", sources.eval_spec(config.data)) == sources.eval_spec(config.data):  # the same data only
        init[name] = stored

  def write(name, result):
    return runner.write_result(
      ctx,
      evaluators[name],
      result,
      step=step,
      features=f"{which} backbone",
      init=init.get(name),
      keep_other_results=True,
    )

  return _run(ctx, evaluators, params, failed, write)


def evaluate_weights(
  config,
  weights: str,
  names=("knn",),
  which: str | None = None,
  output: str | None = None,
  failed: dict | None = None,
) -> dict:
  """Runs the evaluators ``names`` of ``config`` on the backbone in the file ``weights`` (module docstring) and
  writes the results into ``output`` (required); returns {name: result}. ``failed``: as in ``evaluate``."""
  if config is None:
    raise ValueError("--weights: name the data and evaluators with --config=configs/FILE.py")
  if not output:
    raise ValueError("--weights: name the directory for the results with --output=DIR")
  which = which or "teacher"  # the file's teacher when it holds both
  if which not in WHICH:
    raise ValueError(f"--which: must be 'teacher' or 'student', got {which!r}")
  require_labels(config, parse_names(names, config.evals))  # a bad --eval or unlabelled data before a large file
  weights = workdir_lib.resolve(weights)
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"--weights: {weights}: no such file")
  vit_kwargs, arrays, step, model_cfg = load_weights(config, weights, which)
  config = _with_model(config, model_cfg)  # the evaluators read the weights' architecture (patch size, depth ...)
  names = _prepare(config, names)
  params, param_sharding, mesh = place_params(config, vit_kwargs, arrays, which, model_cfg)
  ctx = _context(config, vit_kwargs, param_sharding, mesh, workdir_lib.resolve(output), which)
  evaluators = evals.build(config, names)
  k = vit_kwargs
  what = (
    f"{model_cfg.arch}, width {k['width']}"
    if is_resnet(model_cfg)
    else f"width {k['embed_dim']}, depth {k['depth']}, {k['num_heads']} heads, patch {k['patch_size']}, "
    f"{k['num_registers']} registers"
  )
  ctx.log(f"evaluating {weights} ({what}) in {ctx.dtype}: " + ", ".join(names))
  features = f"backbone of {os.path.basename(weights)}"

  def write(name, result):
    return runner.write_result(
      ctx, evaluators[name], result, step=step, features=features, keep_other_results=True, weights=weights
    )

  return _run(ctx, evaluators, params, failed, write)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagValues:
  """This command's flags, defined when it runs (not at import: importing this module next to another entry point,
  as the tests do, must not define a second --config)."""
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file (configs/*.py[:ARG]); default with --workdir: the run's own DIR/config.json (stored_config.py). "
    "--config.FIELD=VALUE overrides apply on top either way. Required with --weights (the data and evaluators).",
    flag_values=flag_values,
    lock_config=True,
  )
  flags.DEFINE_string(
    "workdir", None, "Training directory whose newest checkpoint is evaluated.", flag_values=flag_values
  )
  flags.DEFINE_string(
    "weights",
    None,
    "A backbone weights file to evaluate instead of a run: an official DINO / DINOv2 / SimDINO .pth (needs "
    "PyTorch), or a .safetensors / .npz export. Needs --config and --output.",
    flag_values=flag_values,
  )
  flags.DEFINE_list(
    "eval", ["knn", "linear", "attention"], "Evaluators to run: entries of config.evals.", flag_values=flag_values
  )
  flags.DEFINE_enum(
    "which",
    None,
    list(WHICH),
    "The backbone to evaluate (default: the one training evaluates, the teacher or, for moco_v2 / byol, the student; "
    "with --weights the teacher).",
    flag_values=flag_values,
  )
  flags.DEFINE_string(
    "output",
    None,
    "Directory for the results (default DIR/eval, e.g. when DIR is read-only; required with --weights).",
    flag_values=flag_values,
  )
  return flag_values


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  f = flag_values
  workdir, weights = f.workdir, f.weights
  if bool(workdir) == bool(weights):
    sys.exit("simdino_jax.evaluate: error: name what to evaluate: --workdir=DIR (a run) or --weights=FILE, not both")
  failed = {}
  try:
    sharding.maybe_initialize_distributed()  # multi-host pods: before anything touches the devices
    if weights:
      evaluate_weights(f.config, weights, f.eval, f.which, f.output, failed=failed)
    else:
      evaluate(f.config, workdir, f.eval, f.which, f.output, failed=failed)
  except (SimdinoError, ValueError, FileNotFoundError) as e:  # bad --eval, no checkpoint, invalid config: one line
    sys.exit(f"simdino_jax.evaluate: error: {cli.one_line(e)}")
  if failed:  # each failure was logged when it happened; the others' results are written
    sys.exit(f"simdino_jax.evaluate: error: {EvaluatorsFailed(failed)}")


def with_stored_config(argv: list[str]) -> list[str]:
  """``argv`` with ``--config=<stored_config.py>:DIR`` added when it names no --config: the run's own config, which
  --config.FIELD overrides then modify as they would a recipe."""
  if any(a in ("--config", "--weights") or a.startswith(("--config=", "--weights=")) for a in argv):
    return argv  # --weights needs --config; main refuses --weights with --workdir in one line
  workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), None)
  if workdir is None and "--workdir" in argv[:-1]:
    workdir = argv[argv.index("--workdir") + 1]
  if workdir is None:
    return argv  # main reports a missing --workdir / --weights in one line
  return argv[:1] + [f"--config={os.path.abspath(stored_config.__file__)}:{workdir_lib.resolve(workdir)}"] + argv[1:]


if __name__ == "__main__":
  from simdino_jax import tcmalloc  # stdlib only: re-executes with tcmalloc preloaded before jax starts

  tcmalloc.maybe_reexec("simdino_jax.evaluate")
  define_flags()
  app.run(main, argv=with_stored_config(sys.argv), flags_parser=cli.flags_parser("simdino_jax.evaluate"))
