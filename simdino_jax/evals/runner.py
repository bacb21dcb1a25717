"""What every evaluator is given, the one feature-extraction loop they share, and an evaluation round.

An evaluator (``Evaluator`` below, one file per evaluator in this package, registered in ``evals/__init__.py``) is
declared in the config as ``config.evals.NAME = {type, every, ...}`` and run the same way by the training loop (the
teacher, periodically and at the end) and by ``python -m simdino_jax.evaluate`` (any checkpoint). It sees a frozen
ViT backbone only: ``Context`` holds the backbone's graph, its parameter sharding on the mesh, the data sources and
the output directory; the evaluator's ``run(ctx, params, feats)`` returns its JSON result.

Shared features: evaluators name the features they read (``feature_specs``: "cls", or a linear-probe feature of the
last n blocks' cls tokens with optional patch average); a round extracts their union in ONE pass per split
(``extract``) and hands the same arrays to every evaluator of the round (k-NN, few-shot and the frozen linear probe
share one pass). Evaluators with their own protocol (DINO's linear views, attention maps) extract for themselves
through ``ctx.extract`` with their own function and transform.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from simdino_jax import sharding
from simdino_jax.data import pipeline, sources
from simdino_jax.errors import ConfigError
from simdino_jax.models.network import DTYPES, backbone_kwargs
from simdino_jax.models.vit import VisionTransformer

# A feature spec: ("cls",), ("prenorm_cls",) or ("linear", n_last_blocks, avgpool). Its key in the feature dicts is
# ``spec_key``.
FeatureSpec = tuple


def spec_key(spec: FeatureSpec) -> str:
  if spec[0] in ("cls", "prenorm_cls"):
    return spec[0]
  _, n, avgpool = spec
  return f"linear_{n}" + ("_avgpool" if avgpool else "")


def make_feature_fn(graphdef: nnx.GraphDef, specs) -> Callable:
  """(backbone params, images (B, H, W, 3)) -> {spec_key: (B, F) float32} for every spec, from ONE deterministic
  forward pass (no drop path). "cls": the output's cls token (after the final norm); "prenorm_cls": the last
  block's cls token before the final norm (MSN's few-shot feature). A linear spec is the cls tokens of the last n
  blocks after the final norm, concatenated oldest first, then (avgpool) the average of the last block's patch
  tokens (registers excluded)."""
  specs = tuple(sorted(set(specs)))
  depth_needed = max([s[1] for s in specs if s[0] == "linear"] + [1])

  def features(params, images):
    backbone = nnx.merge(graphdef, params)
    layers = backbone.get_intermediate_layers(images, depth_needed)  # oldest first; the last = the output
    out = {}
    for spec in specs:
      if spec[0] in ("cls", "prenorm_cls"):
        out[spec[0]] = layers[-1][spec[0]].astype(jnp.float32)
      else:
        _, n, avgpool = spec
        parts = [layer["cls"].astype(jnp.float32) for layer in layers[-n:]]
        if avgpool:
          parts.append(jnp.mean(layers[-1]["patch"].astype(jnp.float32), axis=1))
        out[spec_key(spec)] = jnp.concatenate(parts, axis=-1)
    return out

  return features


def eval_graphdef(vit_kwargs: dict, dtype: str) -> nnx.GraphDef:
  """The graph of ``VisionTransformer(**vit_kwargs)`` computing in ``dtype`` (config.eval.dtype: "float32", as
  DINO's evaluation scripts, or "bfloat16"), whatever dtype it trained in: the parameters are float32 either way,
  so the trained ones plug into it. Nothing is computed (shapes only)."""
  kwargs = dict(vit_kwargs, dtype=DTYPES[dtype])
  return nnx.split(nnx.eval_shape(lambda: VisionTransformer(**kwargs, rngs=nnx.Rngs(0))))[0]


def device_batch(batch_size: int, num_devices: int | None = None) -> int:
  """The batch an evaluator feeds per call: ``batch_size`` rounded DOWN to a multiple of the devices (all of them,
  over every process), at least one image per device. Down, because an evaluation batch size is a memory bound
  (what fits next to the model), so the device-rounded batch never exceeds it unless it is smaller than the device
  count. Every evaluator rounds through here (config.eval.batch_size and each evaluator's own batch_size)."""
  n = jax.device_count() if num_devices is None else num_devices
  return max(n, (batch_size // n) * n)


def eval_image_size(config) -> int:
  """The evaluation image size: config.eval.image_size, else the global crop size."""
  return config.eval.image_size or config.data.global_size


class Context:
  """A frozen backbone on the mesh and the data an evaluation reads; built by the trainer or by evaluate.py.

  graphdef: the backbone's NNX graph (a VisionTransformer); param_sharding: a tree of NamedShardings matching the
  backbone parameters the evaluators are called with; train_source / test_source: labelled sources (the train split
  is what k-NN / linear / few-shot fit on, the test split what they score); out_dir: DIR/eval (results, pictures);
  suffix: appended to every result file and picture folder (evaluate.py's "_student"); dtype: the compute dtype
  ``graphdef`` runs in (default config.eval.dtype; build it with ``eval_graphdef``), stated in every result.
  Compiled functions are cached on the context, so periodic evaluations compile once per run."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    *,
    graphdef: nnx.GraphDef,
    param_sharding: Any,
    mesh,
    train_source,
    test_source,
    out_dir: str,
    suffix: str = "",
    log: Callable[[str], None] = print,
    dtype: str | None = None,
    checkpointer: Callable | None = None,
    metrics_log: Callable | None = None,
  ):
    self.config = config
    # Factories of io.checkpointing.Checkpointer and train.metrics.MetricsLog for the evaluators that train for hours
    # (fine-tuning): handed over by the entry points, since evals/ imports neither layer.
    self.checkpointer, self.metrics_log = checkpointer, metrics_log
    self.graphdef = graphdef
    self.dtype = dtype or config.eval.get("dtype", "float32")
    self.param_sharding = param_sharding
    self.mesh = mesh
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.replicated = sharding.replicated(mesh)
    self.train_source = train_source
    self.test_source = test_source
    self.out_dir = out_dir
    self.suffix = suffix  # appended to result names: "_student" when evaluate.py evaluates the student
    self.is_main = jax.process_index() == 0
    self._log = log
    self._compiled: dict[Any, Callable] = {}

  def log(self, msg: str) -> None:
    if self.is_main:
      self._log(msg)

  @property
  def image_size(self) -> int:
    return eval_image_size(self.config)

  @functools.cached_property
  def patch_size(self) -> int:
    """The backbone's patch size, derived once per context (as train/setup.py derives it once per run)."""
    return backbone_kwargs(self.config.model)["patch_size"]

  @property
  def num_classes(self) -> int:
    n = max(self.train_source.num_classes, self.test_source.num_classes)
    if n < 1:
      raise ConfigError(
        f"config.data.source: {self.config.data.source!r} has no labels, which this evaluation "
        "needs (npz without train_labels/test_labels, or an unlabelled folder)"
      )
    return n

  def compiled(self, key, build: Callable[[], Callable]) -> Callable:
    """``build()`` once per ``key`` for the context's lifetime (a jitted function, typically)."""
    if key not in self._compiled:
      self._compiled[key] = build()
    return self._compiled[key]

  def backbone_fn(self, key, fn: Callable) -> Callable:
    """``fn(params, images)`` jitted with the backbone's parameter sharding and batch-sharded images/outputs."""
    return self.compiled(
      ("backbone_fn", key),
      lambda: jax.jit(fn, in_shardings=(self.param_sharding, self.batch_sharding), out_shardings=self.batch_sharding),
    )

  def extract(self, params, source, fn: Callable, *, image_size: int = 0, transform=None) -> tuple[Any, np.ndarray]:
    """(features, labels) of every example of ``source`` exactly once, in the source's order: ``fn`` (a
    ``backbone_fn``) on the eval view of each image (resize + centre crop to ``image_size``, default
    ``self.image_size``, or ``transform``), batches of config.eval.batch_size split over the devices and processes;
    padding and undecodable images dropped.

    The same arrays, in the same order, on any number of processes: each process feeds its contiguous slice of every
    global batch (``pipeline.eval_batches``), and each row's example index, label and validity travel beside its
    features as one more batch-sharded array, so the gathered rows are sorted back into dataset order whatever the
    mesh's device order. (Before, process k fed the examples k, k + n, ...: few-shot and the linear probe, which
    depend on the order, gave other figures on a pod.)"""
    n_proc = jax.process_count()
    batch_size = device_batch(self.config.eval.batch_size)
    feats, rows = [], []
    for batch in pipeline.eval_batches(
      source,
      image_size=image_size or self.image_size,
      batch_size=batch_size // n_proc,
      shard_index=jax.process_index(),
      shard_count=n_proc,
      transform=transform,
    ):
      images = jax.make_array_from_process_local_data(self.batch_sharding, batch["image"])
      meta = np.stack([batch["index"], batch["label"], batch["valid"].astype(np.int32)], axis=1)
      meta = jax.make_array_from_process_local_data(self.batch_sharding, meta)
      out, meta = multihost_utils.process_allgather((fn(params, images), meta), tiled=True)
      meta = np.asarray(meta)
      valid = meta[:, 2] == 1
      feats.append(jax.tree.map(lambda a: np.asarray(a)[valid], out))
      rows.append(meta[valid, :2])
    feats = jax.tree.map(lambda *a: np.concatenate(a), *feats)
    index, labels = np.ascontiguousarray(np.concatenate(rows).T)
    if np.any(np.diff(index) <= 0):  # not already in dataset order (a mesh whose devices interleave the processes)
      order = np.argsort(index, kind="stable")
      feats, labels = jax.tree.map(lambda a: a[order], feats), labels[order]
    return feats, labels

  def shared_features(self, params, specs) -> dict:
    """{"train": (feats, labels), "test": (feats, labels)} with feats = {spec_key: array} for ``specs``."""
    specs = tuple(sorted(set(specs)))
    fn = self.backbone_fn(("features", specs), make_feature_fn(self.graphdef, specs))
    return {"train": self.extract(params, self.train_source, fn), "test": self.extract(params, self.test_source, fn)}


class Evaluator:
  """Base of the evaluator plug-ins. ``name``: the key in config.evals (and the result file DIR/eval/NAME.json);
  ``cfg``: config.evals[name] (``type``, ``every`` and the type's own fields, defaults in ``DEFAULTS``).

  Subclasses set ``DEFAULTS`` (their fields with default values), ``needs_labels`` and implement ``run``; they may
  read shared features (``feature_specs``), report scalars for the metrics log (``metrics``) and a log line
  (``summary``), and check their fields (``validate``, raising ConfigError naming ``config.evals.NAME.FIELD``)."""

  DEFAULTS: dict = {}
  needs_labels = True
  init_keys: tuple = ()  # result keys also reported "at init" (<key>_at_init) when the evaluator runs at init

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict):
    self.name, self.cfg, self.config = name, cfg, config

  def feature_specs(self) -> tuple:
    return ()

  def run(self, ctx: Context, params, feats: dict | None) -> dict:
    raise NotImplementedError

  def metrics(self, result: dict) -> dict:
    return {}

  def summary(self, result: dict) -> str:
    return ""

  @classmethod
  def validate(cls, cfg, field: str, *, config, patch: int, depth: int, num_devices: int) -> None:
    """Raise ConfigError naming ``field`` (e.g. "evals.knn") for an invalid value; the default checks nothing."""


def positive_ints(values) -> bool:
  return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def every(evaluator: Evaluator, config) -> int:
  """Steps between this evaluator's runs during training: its ``every``; -1 means config.eval_every; 0 never."""
  e = evaluator.cfg.get("every", 0)
  return config.eval_every if e == -1 else e


def failure_line(error: BaseException, limit: int = 300) -> str:
  """``error`` as one line of at most ``limit`` characters: its type and the start of its message (XLA's
  out-of-memory messages run to pages)."""
  text = " ".join(str(error).split())
  text = text if len(text) <= limit else text[: limit - 3] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def run_round(
  ctx: Context,
  evaluators: dict[str, Evaluator],
  params,
  *,
  on_result: Callable[[str, dict], Any] | None = None,
  failed: dict[str, Exception] | None = None,
) -> dict[str, dict]:
  """{name: result} of ``evaluators`` on the backbone ``params``, the shared features extracted once.

  ``on_result(name, result)`` is called as soon as each evaluator finishes (evaluate.py and training write the
  result file then), so a later failure loses nothing. ``failed``: when given, an evaluator that raises an Exception
  (out of memory, unreadable data ...; a kill or Ctrl-C still stops everything) is logged in one line naming it and
  the error, left out of the results and recorded as ``failed[name] = error``, and the others still run; a failure
  of the shared feature extraction fails every evaluator that reads those features. Without ``failed`` the first
  exception propagates. On several processes every process must fail alike (an out-of-memory does): a failure on
  one process alone leaves the others waiting in the next collective."""
  specs = {spec for e in evaluators.values() for spec in e.feature_specs()}
  feats, feats_error = None, None
  if specs:
    try:
      feats = ctx.shared_features(params, specs)
    except Exception as error:  # pylint: disable=broad-except  (recorded per evaluator below)
      if failed is None:
        raise
      feats_error = error
      readers = [name for name, e in evaluators.items() if e.feature_specs()]
      ctx.log(f"{', '.join(readers)}: FAILED in the shared feature extraction: {failure_line(error)}")
  results = {}
  for name, e in evaluators.items():
    if feats_error is not None and e.feature_specs():
      failed[name] = feats_error
      continue
    try:
      results[name] = e.run(ctx, params, feats)
    except Exception as error:  # pylint: disable=broad-except  (one evaluator must not discard the others)
      if failed is None:
        raise
      failed[name] = error
      ctx.log(f"{name}: FAILED: {failure_line(error)}")
      continue
    if on_result is not None:
      on_result(name, results[name])
  return results


def write_result(
  ctx: Context,
  evaluator: Evaluator,
  result: dict,
  *,
  step: int | None,
  features: str,
  init: dict | None = None,
  keep_other_results: bool = False,
  weights: str | None = None,
) -> dict:
  """Adds ``step``, ``data`` (the evaluation data), ``features`` (what was evaluated), ``dtype`` (the compute dtype
  of the backbone, ctx.dtype), ``weights`` (the weights file evaluated, when given) and the at-init figures
  (``init``: the result at step 0) to ``result``, writes DIR/eval/NAME{ctx.suffix}.json (main process) and logs a
  line; returns the result as written.

  ``keep_other_results`` (evaluate.py): a NAME.json of another step, other data or other weights (e.g. training's
  final result) is never overwritten; this result goes beside it, to NAME{suffix}-step{step}-{data}.json (a weights
  file without a step: NAME{suffix}-{file name}-{data}.json)."""
  name = evaluator.name
  data = sources.eval_spec(ctx.config.data)
  r = dict(result)
  if init:
    r.update({f"{k}_at_init": init[k] for k in evaluator.init_keys if k in init})
  r["step"] = None if step is None else int(step)
  r["data"] = data
  r["features"] = f"{features}: {result['features']}" if "features" in result else features
  r["dtype"] = ctx.dtype
  if weights is not None:
    r["weights"] = weights
  path = epath.Path(ctx.out_dir) / f"{name}{ctx.suffix}.json"  # epath: a gs:// workdir works as a local one
  if keep_other_results and path.exists():
    try:
      existing = json.loads(path.read_text())
    except ValueError:
      existing = {}
    if (existing.get("step"), existing.get("data", data), existing.get("weights")) != (r["step"], data, weights):
      slug = re.sub(r"[^A-Za-z0-9]+", "_", data).strip("_")[-60:]
      what = f"step{step}" if weights is None else re.sub(r"[^A-Za-z0-9]+", "_", epath.Path(weights).stem)[-60:]
      ctx.log(f"{path} holds the result of step {existing.get('step')} on {existing.get('data', '?')!r}: kept")
      path = path.parent / f"{name}{ctx.suffix}-{what}-{slug}.json"
  if ctx.is_main:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=2))
  ctx.log(f"{name}: {evaluator.summary(r)} -> {path}")
  return r


def write_results(
  ctx: Context,
  evaluators: dict[str, Evaluator],
  results: dict[str, dict],
  *,
  step: int | None,
  features: str,
  init: dict[str, dict] | None = None,
  keep_other_results: bool = False,
  weights: str | None = None,
) -> dict[str, dict]:
  """``write_result`` for each of ``results`` ({name: result}; ``init``: {name: result at step 0}); returns them."""
  return {
    name: write_result(
      ctx,
      evaluators[name],
      result,
      step=step,
      features=features,
      init=(init or {}).get(name),
      keep_other_results=keep_other_results,
      weights=weights,
    )
    for name, result in results.items()
  }
