"""The training loop: config -> mesh, data, state (fresh or resumed) -> jitted steps with logging and
checkpoints -> k-NN evaluation.

One readable loop; everything numerical lives in ``step.py`` (the pure step), ``methods.py`` (the loss) and
``optim.py`` / ``schedules.py``. Files written under the workdir (process 0 only, but for checkpoint arrays):
  config.json        the resolved config
  metrics.jsonl      one JSON object per logged step
  checkpoints/<N>/   the TrainState after N steps (orbax; every ``checkpoint_every`` steps and at the end)
  eval/knn_init.json k-NN accuracy of the network at initialisation (computed once, read back on resume)
  eval/knn.json      k-NN accuracy of the teacher backbone at the end, and of the same network at init

Resume: if ``checkpoints/`` holds a checkpoint, the run continues from the newest usable one; the data stream
is a pure function of (seed, step) and so is the step's randomness, so an interrupted-then-resumed run ends
with the same parameters as an uninterrupted one. SIGTERM (single host) or a multi-host preemption notice
saves a checkpoint at the next step boundary and returns cleanly.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from simdino_jax import methods, optim, schedules, sharding
from simdino_jax.io import checkpointing
from simdino_jax import config as config_lib
from simdino_jax.data import device_augment, pipeline
from simdino_jax.data.multicrop import MultiCropConfig
from simdino_jax.data.sources import load_source
from simdino_jax.evals import fewshot, knn, linear, linear_dino
from simdino_jax.models.network import Network, build_backbone, compute_dtype
from simdino_jax.models.vit import parse_variant
from simdino_jax.tree import map_with_name, named_leaves
from simdino_jax.train.state import TrainState
from simdino_jax.train.step import make_feature_fn, make_train_step
from simdino_jax.errors import NonFiniteLossError




class _StopRequest:
  """Turns SIGTERM into a flag (``signal_name``) the loop reads at step boundaries, while in the ``with`` block.

  Single host only (``enabled``): multi-host runs leave SIGTERM to JAX's preemption service
  (``Checkpointer.reached_preemption``), which installs its own handler and agrees on one step for all hosts.
  """

  def __init__(self, enabled: bool = True):
    self.enabled = enabled
    self.signal_name = None
    self._previous = None

  def __enter__(self) -> "_StopRequest":
    if self.enabled:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: no handler, SIGTERM keeps its default action
        self._previous = None
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signal_name is not None:  # a second SIGTERM: terminate now (e.g. a step that hangs)
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signal_name = signal.Signals(signum).name  # no I/O here: the handler may interrupt a print

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class Durations:
  total_steps: int
  warmup_steps: int
  steps_per_epoch: int


def durations(config, num_train: int) -> Durations:
  steps_per_epoch = num_train // config.batch_size
  if config.total_steps > 0:
    total = config.total_steps
  else:
    if steps_per_epoch < 1:
      raise config_lib.ConfigError(f"config.batch_size: {config.batch_size} exceeds the {num_train} training "
                                 "examples, so an epoch has no step; lower it or set total_steps")
    total = config.total_epochs * steps_per_epoch
  warmup = config.warmup_steps if config.warmup_steps > 0 else int(round(config.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, total - 1)
  return Durations(total, warmup, max(steps_per_epoch, 1))


def multicrop_config(config) -> MultiCropConfig:
  d = config.data
  return MultiCropConfig(global_size=d.global_size, local_size=d.local_size, num_global=d.num_global,
                         num_local=d.num_local, global_scale=tuple(d.global_scale),
                         local_scale=tuple(d.local_scale), augment_mode=d.augment_mode,
                         **{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.augment.items()})


def load_data(config, split: str):
  """``config.data.source``'s ``split`` ("train" / "test"); tfds sources read ``config.data.tfds_data_dir`` (or
  $TFDS_DATA_DIR)."""
  return load_source(config.data.source, split, tfds_data_dir=config.data.get("tfds_data_dir") or None)


def make_optimizer(config, params, lr_fn, wd_fn, steps_per_epoch: int):
  """The student's optax chain: AdamW + the method's extras (layer-wise lr decay, prototype-layer freezing)."""
  o = config.optim
  lr_mults = None
  if o.layer_decay < 1.0 or o.patch_embed_lr_mult != 1.0:
    lr_mults = optim.lr_multipliers(params, depth=build_depth(config), layer_decay=o.layer_decay,
                                    patch_embed_mult=o.patch_embed_lr_mult)
  freezes = []
  if methods.get_method(config.method).prototypes:
    def prototype_mask(leaf_name):
      return map_with_name(lambda name, _: "last_layer/" in name and name.endswith(leaf_name), params)
    if config.head.norm_last_layer:  # unit prototypes: g stays 1 for good
      freezes.append((prototype_mask("weight_g"), -1))
    freeze_steps = int(round(o.freeze_last_layer_epochs * steps_per_epoch))
    if freeze_steps > 0:
      freezes.append((map_with_name(lambda name, _: "last_layer/" in name, params), freeze_steps))
  return optim.make_optimizer(o, params, lr_fn, wd_fn, lr_mults=lr_mults, freezes=tuple(freezes))


def build_depth(config) -> int:
  return config.model.depth or parse_variant(config.model.variant)["depth"]


class Trainer:
  """Holds the pieces built from a config; ``run()`` trains and evaluates."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count(),
                      num_local_devices=jax.local_device_count())
    self.config = config
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self.method = methods.get_method(config.method)
    self.mesh = sharding.make_mesh(config.mesh)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = sharding.replicated(self.mesh)
    self.skipped_local = self.skipped_base = 0  # undecodable images replaced in the batches used (data/skipped)

    self.train_source = load_data(config, "train")
    self.durations = durations(config, len(self.train_source))
    d = self.durations
    self.lr_fn = optim.lr_schedule(config.optim, config.batch_size, d.total_steps, d.warmup_steps)
    self.wd_fn = optim.wd_schedule(config.optim, d.total_steps)
    if config.teacher.self_distillation:
      self.momentum_fn = schedules.cosine(config.teacher.momentum, config.teacher.momentum_end, d.total_steps)
    else:  # the paper's ablation: the teacher is the current student (m = 0) at every step
      self.momentum_fn = schedules.constant(0.0)

    # Shapes first (no FLOPs), then the state is created directly with its sharding.
    abstract = nnx.eval_shape(lambda: methods.build_network(config))
    self.graphdef, abstract_params = nnx.split(abstract)
    self.tx = make_optimizer(config, abstract_params, self.lr_fn, self.wd_fn, d.steps_per_epoch)
    self.loss_fn = self.method.make_loss(config, d.steps_per_epoch)
    self.abstract_state()  # sets self.state_sharding: one sharding per leaf from config.sharding.rules
    self.feature_fn = jax.jit(make_feature_fn(self.graphdef),
                              in_shardings=(self.state_sharding.teacher, self.batch_sharding),
                              out_shardings=self.batch_sharding)

  # -- state ------------------------------------------------------------------------------------------
  def _init_fn(self):
    config = self.config

    def init():
      params = nnx.split(methods.build_network(config))[1]
      return TrainState(step=jnp.zeros((), jnp.int32), student=params, teacher=params,
                        opt_state=self.tx.init(params), loss_state=self.method.init_loss_state(config),
                        rng=jax.random.key_data(jax.random.key(config.seed + 1)))

    return init

  def abstract_state(self) -> TrainState:
    """The state's shapes, dtypes and shardings (no FLOPs): the target a checkpoint is restored onto.

    The shardings (``self.state_sharding``, a TrainState of NamedShardings) follow ``config.sharding.rules``:
    all replicated on a data-only mesh; big leaves split over the "fsdp" mesh axis when it has one."""
    abstract = jax.eval_shape(self._init_fn())
    self.state_sharding = sharding.state_shardings(abstract, self.mesh, self.config)
    return checkpointing.abstract_target(abstract, self.state_sharding)

  def init_state(self) -> TrainState:
    """The state at initialisation; a pure function of ``config.seed``."""
    self.abstract_state()
    return jax.jit(self._init_fn(), out_shardings=self.state_sharding)()

  def checkpointer(self) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                      max_to_keep=self.config.checkpoint_keep)

  def restore_or_init(self, ckpt: checkpointing.Checkpointer) -> tuple[TrainState, int]:
    """(state, step), by precedence: this workdir's newest usable checkpoint; else ``config.resume`` (another run's
    workdir, checkpoints/ directory or checkpoints/<step>: its full state, continuing from its step); else
    ``config.init_from`` (exported weights or a workdir: backbone, and heads whose shapes match, into student and
    teacher, at step 0 with a fresh optimizer); else the initial state and 0."""
    config = self.config
    restored = ckpt.restore_latest(self.abstract_state(), config=checkpointing.config_dict(config))
    if restored is not None:
      state, step = restored
      self.log(f"resumed from step {step} ({ckpt.path(step)})")
      return state, step
    if config.get("resume"):
      state, step, where = checkpointing.restore_external(config.resume, self.abstract_state())
      self.log(f"resumed from step {step} of {where} (config.resume)")
      return state, step
    if config.get("init_from"):
      return self.init_from(config.init_from), 0
    return self.init_state(), 0

  def init_from(self, path: str) -> TrainState:
    """The initial state with the student and teacher parameters replaced by the weights at ``path``
    (``checkpointing.load_init_arrays`` / ``match_init_arrays``), and the optimizer state initialised afresh."""
    arrays, source = checkpointing.load_init_arrays(path)
    state = self.init_state()
    params = named_leaves(state.student)
    loaded, notes = checkpointing.match_init_arrays(params, arrays)

    def place(name, leaf):
      if name not in loaded:
        return leaf
      value = np.asarray(loaded[name]).astype(leaf.dtype)
      return jax.make_array_from_callback(value.shape, leaf.sharding, lambda index: value[index])

    student = map_with_name(place, state.student)
    teacher = map_with_name(place, state.teacher)
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding.opt_state)(student)
    self.log(f"initialised from the {source} (config.init_from): {len(loaded)} of {len(params)} parameter arrays; "
             + ", ".join(["backbone loaded"] + notes))
    return state.replace(student=student, teacher=teacher, opt_state=opt_state)

  def compiled_step(self):
    step = make_train_step(self.graphdef, self.loss_fn, self.tx, lr_fn=self.lr_fn, wd_fn=self.wd_fn,
                           momentum_fn=self.momentum_fn, mask_positions=methods.mask_positions(self.config),
                           augment=device_augment.make_batch_augment(multicrop_config(self.config))
                           if self.config.data.augment_mode == "device" else None,
                           cast_params=self.param_cast())
    return jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding),
                   out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)

  def param_cast(self):
    """With a 16-bit model.dtype and an "fsdp" mesh axis: the step's ``cast_params``, casting the fsdp-sharded
    parameters to the compute dtype before they are all-gathered (sharding.cast_sharded); else None."""
    dtype = compute_dtype(self.config.model.dtype)
    if dtype == jnp.float32 or dict(self.mesh.shape).get(sharding.FSDP_AXIS, 1) <= 1:
      return None
    shardings = {"student": self.state_sharding.student, "teacher": self.state_sharding.teacher}
    return lambda which, params: sharding.cast_sharded(params, shardings[which], dtype)

  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    config = self.config
    masked = self.method.uses_masks
    it = pipeline.train_iterator(self.train_source, multicrop_config(config),
                                 batch_size=config.batch_size // jax.process_count(), seed=config.seed,
                                 num_workers=config.data.num_workers, shard_index=jax.process_index(),
                                 shard_count=jax.process_count(), start_step=start_step,
                                 mask_patch_size=parse_variant(config.model.variant)["patch_size"] if masked else 0,
                                 mask_probability=config.masking.probability,
                                 mask_ratio=tuple(config.masking.ratio),
                                 mask_min_patches=config.masking.min_num_patches)
    keys = ("global", "local", "mask") if masked else ("global", "local")
    try:
      for batch in it:
        # Undecodable images the source replaced in this batch: counted here, as the batch is used, so the count
        # does not depend on prefetching or on which (worker) process decoded them.
        self.skipped_local += int(np.sum(batch["skipped"])) if "skipped" in batch else 0
        yield sharding.to_global({k: batch[k] for k in keys}, self.batch_sharding)
    finally:
      if hasattr(it, "close"):
        it.close()  # grain worker processes, when data.num_workers > 0

  # -- evaluation -------------------------------------------------------------------------------------
  def features(self, params, source, feature_fn=None, image_size: int = 0, transform=None) -> tuple[Any, np.ndarray]:
    """Teacher-backbone cls features of every example of ``source`` (each exactly once), with their labels.

    ``feature_fn`` (params, images) -> array or dict of arrays with a leading batch axis (default: the cls
    features) replaces the network output; ``image_size`` (0: config.eval.image_size or the global crop size);
    ``transform`` (image -> normalised float32 view of that size) replaces the default eval view."""
    config = self.config
    fn = feature_fn or self.feature_fn
    size = image_size or config.eval.image_size or config.data.global_size
    n_dev = jax.device_count()
    batch_size = max(n_dev, (config.eval.batch_size // n_dev) * n_dev)
    feats, labels = [], []
    for batch in pipeline.eval_batches(source, image_size=size, batch_size=batch_size // jax.process_count(),
                                       shard_index=jax.process_index(), shard_count=jax.process_count(),
                                       transform=transform):
      images = jax.make_array_from_process_local_data(self.batch_sharding, batch["image"])
      out = multihost_utils.process_allgather(fn(params, images), tiled=True)
      valid = np.asarray(multihost_utils.process_allgather(batch["valid"], tiled=True))
      lab = multihost_utils.process_allgather(batch["label"], tiled=True)
      feats.append(jax.tree.map(lambda a: np.asarray(a)[valid], out))
      labels.append(np.asarray(lab)[valid])
    return jax.tree.map(lambda *a: np.concatenate(a), *feats), np.concatenate(labels)

  def knn_eval(self, params, train_src, test_src, feats: dict | None = None) -> dict:
    """Weighted k-NN of the cls features: top-1/top-5 at config.eval.knn_k, plus ``per_k`` for every
    config.eval.knn_ks, all from one similarity pass. ``feats`` (from ``eval_features``) skips the extraction."""
    config = self.config
    if feats is None:
      feats = {"train": self.features(params, train_src), "test": self.features(params, test_src)}
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    cls = lambda f: f["cls"] if isinstance(f, dict) else f  # noqa: E731
    ks = tuple(sorted(set(config.eval.knn_ks) | {config.eval.knn_k}))
    per_k = knn.knn_accuracy_multi_k(cls(train_f), train_y, cls(test_f), test_y, num_classes=_num_classes(
        train_src, test_src), ks=ks, temperature=config.eval.knn_temperature)
    at = per_k[config.eval.knn_k]
    return dict(top1=at["top1"], top5=at["top5"], per_k={str(k): v for k, v in per_k.items()},
                num_train=int(len(train_y)), num_test=int(len(test_y)))

  def eval_features(self, params, train_src, test_src, linear_features: bool = False) -> dict:
    """{"train": (feats, labels), "test": (feats, labels)}, one forward pass per split for every evaluator:
    feats["cls"] (k-NN, few-shot) and, with ``linear_features``, feats["linear"] (config.eval.linear)."""
    if linear_features:
      fn = self.linear_feature_fn()
    else:
      fn = lambda p, images: {"cls": self.feature_fn(p, images)}  # noqa: E731
    return {"train": self.features(params, train_src, fn), "test": self.features(params, test_src, fn)}

  def linear_feature_fn(self):
    """The jitted (params, images) -> {"cls", "linear"} of config.eval.linear's feature choice; built once, so that
    periodic evaluations reuse the compilation."""
    if getattr(self, "_linear_feature_fn", None) is None:
      lc = self.config.eval.linear
      self._linear_feature_fn = jax.jit(
          linear.make_feature_fn(self.graphdef, n_last_blocks=lc.n_last_blocks, avgpool=lc.avgpool),
          in_shardings=(self.state_sharding.teacher, self.batch_sharding), out_shardings=self.batch_sharding)
    return self._linear_feature_fn

  def linear_eval(self, feats: dict | None, num_classes: int, params=None, train_src=None, test_src=None) -> dict:
    """The linear evaluation of config.eval.linear.protocol: "frozen", the lr sweep on the cached features of
    ``eval_features(..., linear_features=True)`` (evals/linear.py); "dino", DINO's protocol on views re-augmented
    every epoch through the backbone ``params`` (evals/linear_dino.py, ``feats`` unused)."""
    lc = self.config.eval.linear
    what = f"cls of the last {lc.n_last_blocks} block(s)" + (" + avg-pooled patch tokens" if lc.avgpool else "")
    protocol = lc.get("protocol", "frozen")
    common = dict(protocol=protocol, features=what, n_last_blocks=lc.n_last_blocks, avgpool=lc.avgpool)
    if protocol == "dino":
      return dict(self.dino_linear_eval(params, train_src, test_src, num_classes), **common)
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    result = linear.linear_probe(train_f["linear"], train_y, test_f["linear"], test_y, num_classes=num_classes,
                                 lrs=tuple(lc.lrs), epochs=lc.epochs, batch_size=lc.batch_size, seed=self.config.seed)
    return dict(result, **common)

  def dino_linear_eval(self, params, train_src, test_src, num_classes: int) -> dict:
    """DINO's linear protocol (evals/linear_dino.py): per epoch, fresh RandomResizedCrop + flip views of the
    training set (host threads) through the frozen backbone and every lr's classifier (one jitted step, batch split
    over the devices); validation each epoch on the test set's resize + centre-crop features, extracted once."""
    config, lc = self.config, self.config.eval.linear
    crop, resize_to = linear_dino.resolve_sizes(lc.crop_size, lc.resize_size,
                                                config.eval.image_size or config.data.global_size)
    test_f, test_y = self.features(params, test_src, self.linear_feature_fn(), image_size=crop,
                                   transform=lambda image: linear_dino.eval_view(image, crop, resize_to))
    if getattr(self, "_dino_linear_step", None) is None:  # built once, as linear_feature_fn
      raw = linear.make_feature_fn(self.graphdef, n_last_blocks=lc.n_last_blocks, avgpool=lc.avgpool)
      b = self.batch_sharding
      self._dino_linear_step = jax.jit(linear_dino.make_train_step(raw), donate_argnums=0,
                                       in_shardings=(self.replicated, self.state_sharding.teacher, b, b, b,
                                                     self.replicated),
                                       out_shardings=(self.replicated, self.replicated))
    step = self._dino_linear_step
    n_dev, n_proc = jax.device_count(), jax.process_count()
    # Slots per step: the batch, or fewer when the whole training set is smaller (a tiny dataset would otherwise
    # push mostly padding through the backbone); a multiple of the devices either way. The lr scales with the
    # configured batch, as DINO's does.
    slots = min(lc.batch_size, -(-len(train_src) // n_dev) * n_dev)
    resize_backend = config.data.augment.get("resize", "cv2")
    self.log(f"linear (dino): {len(train_src)} train / {len(test_src)} test images, crop {crop} (eval: resize "
             f"{resize_to} + centre crop), batch {lc.batch_size}, {lc.epochs} epochs, {len(lc.lrs)} lrs")

    with concurrent.futures.ThreadPoolExecutor(linear_dino.default_threads()) as pool:
      def batches(epoch):
        for batch in linear_dino.train_batches(train_src, epoch=epoch, seed=config.seed, batch_size=slots, crop=crop,
                                               resize=resize_backend, shard_index=jax.process_index(),
                                               shard_count=n_proc, pool=pool):
          yield tuple(jax.make_array_from_process_local_data(self.batch_sharding, batch[k])
                      for k in ("image", "label", "weight"))

      result = linear_dino.run(
          step_fn=lambda state, images, labels, weights, lrs: step(state, params, images, labels, weights, lrs),
          batches_fn=batches, test_x=test_f["linear"], test_y=test_y, num_classes=num_classes,
          dim=int(test_f["linear"].shape[1]), lrs=tuple(lc.lrs), batch_size=lc.batch_size, epochs=lc.epochs,
          seed=config.seed, num_train=len(train_src), log=self.log)
    return dict(result, crop_size=crop, resize_size=resize_to)

  def fewshot_eval(self, feats: dict, num_classes: int) -> dict:
    """Few-shot logistic regression (evals/fewshot.py) on the cls features of ``eval_features``."""
    fc = self.config.eval.fewshot
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    return fewshot.fewshot_eval(train_f["cls"], train_y, test_f["cls"], test_y, num_classes=num_classes,
                                shots=tuple(fc.shots), fractions=tuple(fc.fractions), num_splits=fc.num_splits,
                                seed=self.config.seed, lambd=fc.lambd)

  def run_evals(self, params, names, train_src=None, test_src=None) -> dict:
    """{name: summary} for the feature evaluators in ``names`` (knn, linear, fewshot), features extracted once
    (the "dino" linear protocol extracts its own, see ``linear_eval``)."""
    train_src = self.train_source if train_src is None else train_src
    if test_src is None:
      test_src = getattr(self, "test_source", None) or load_data(self.config, "test")
    num_classes = _num_classes(train_src, test_src)
    frozen_linear = "linear" in names and self.config.eval.linear.get("protocol", "frozen") == "frozen"
    feats = None
    if frozen_linear or {"knn", "fewshot"} & set(names):
      feats = self.eval_features(params, train_src, test_src, linear_features=frozen_linear)
    out = {}
    if "knn" in names:
      out["knn"] = self.knn_eval(params, train_src, test_src, feats)
    if "linear" in names:  # "dino": its own views, through the backbone every epoch
      out["linear"] = self.linear_eval(feats, num_classes, params, train_src, test_src)
    if "fewshot" in names:
      out["fewshot"] = self.fewshot_eval(feats, num_classes)
    return out

  def periodic_metrics(self, params, step: int) -> dict:
    """Metrics of the config.eval.periodic evaluators (knn_top1/5, linear_top1/linear_lr, fewshot_<setting>)."""
    periodic = self.config.eval.periodic
    names = (periodic,) if isinstance(periodic, str) else tuple(periodic)
    results = self.run_evals(params, names)
    values = {}
    if "knn" in results:
      values.update(knn_top1=results["knn"]["top1"], knn_top5=results["knn"]["top5"])
    if "linear" in results:
      values.update(linear_top1=results["linear"]["accuracy"], linear_top5=results["linear"]["top5"],
                    linear_lr=results["linear"]["lr"])
    if "fewshot" in results:
      values.update({f"fewshot_{k}": v["mean"] for k, v in results["fewshot"]["settings"].items()})
    self.log(f"step {step}: " + " ".join(f"{k} {v:.4g}" + ("%" if k != "linear_lr" else "")
                                         for k, v in values.items()))
    return values

  # -- the loop ---------------------------------------------------------------------------------------
  def run(self) -> dict:
    """Train (resuming from ``workdir/checkpoints`` if it holds a checkpoint), then evaluate.

    Returns the k-NN summary written to ``eval/knn.json``; or, when stopped by SIGTERM or a preemption notice,
    ``{"stopped": reason, "step": N, "checkpoint": path}`` after saving that checkpoint (no evaluation).
    Raises NonFiniteLossError naming the step and the last checkpoint.
    """
    config, d = self.config, self.durations
    if self.is_main:
      self.wpath("eval").mkdir(parents=True, exist_ok=True)
      self.wpath("config.json").write_text(config.to_json_best_effort(indent=2))
    self.log(f"simdino_jax: method={config.method} model={config.model.variant} devices={jax.device_count()} "
             f"({jax.devices()[0].platform}) batch={config.batch_size} steps={d.total_steps} "
             f"(warm-up {d.warmup_steps}, {d.steps_per_epoch} steps/epoch) workdir={self.workdir}")

    # From here on SIGTERM (single host) means: save at the next step boundary and return.
    with _StopRequest(enabled=jax.process_count() == 1) as stop_request, self.checkpointer() as ckpt:
      state, start = self.restore_or_init(ckpt)
      test_source = self.test_source = load_data(config, "test")
      init_knn = self.init_knn(state if start == 0 else None, test_source)
      self.log(f"k-NN at init: top-1 {init_knn['top1']:.2f}%")
      state, stopped = self.train_loop(state, start, ckpt, stop_request)
      ckpt.wait()  # the final checkpoint is committed before the evaluation
    self.state = state
    self.draw_curves()
    if stopped is not None:
      return stopped

    final_knn = self.knn_eval(state.teacher, self.train_source, test_source)
    result = {
        "accuracy": final_knn["top1"], "top5": final_knn["top5"],
        "accuracy_at_init": init_knn["top1"], "top5_at_init": init_knn["top5"],
        "k": config.eval.knn_k, "temperature": config.eval.knn_temperature,
        "num_train": final_knn["num_train"], "num_test": final_knn["num_test"],
        "step": int(state.step), "features": "teacher backbone cls", "per_k": final_knn["per_k"],
    }
    if self.is_main:
      self.wpath("eval", "knn.json").write_text(json.dumps(result, indent=2))
    self.log(f"k-NN (k={result['k']}, T={result['temperature']}) top-1 {result['accuracy']:.2f}% "
             f"vs {result['accuracy_at_init']:.2f}% at init ({result['accuracy'] - result['accuracy_at_init']:+.2f})"
             f" -> {os.path.join(self.workdir, 'eval', 'knn.json')}")
    return result

  def train_loop(self, state: TrainState, start: int, ckpt: checkpointing.Checkpointer,
                 stop_request: _StopRequest):
    """Steps ``start`` .. total_steps with logging and checkpoints; returns (state, None | stop summary)."""
    config, d = self.config, self.durations
    config_json = checkpointing.config_dict(config)
    train_step = self.compiled_step()
    self.skipped_local = self.skipped_base = 0  # data/skipped: this run's count (+ the resumed run's, from metrics)
    batches = self.train_batches(start_step=start)
    metrics_file = self.open_metrics(start) if self.is_main else None
    pending = None  # (step, metrics) of the previous step: checked one step late to keep dispatch async
    t_last, step_last = time.time(), start
    try:
      for step in range(start, d.total_steps):
        state, metrics = train_step(state, next(batches))
        if pending is not None:
          self.check_finite(*pending)
        done = step + 1
        pending = (done, metrics)
        evaluate = config.eval_every > 0 and done % config.eval_every == 0 and done < d.total_steps
        if done % config.log_every == 0 or done == d.total_steps or evaluate:
          values = {k: float(v) for k, v in jax.device_get(metrics).items()}
          self.check_finite(done, values)
          if evaluate:  # periodic evaluation of the teacher (config.eval.periodic), logged with the step's metrics
            values.update(self.periodic_metrics(state.teacher, done))
          values["data/skipped"] = self.skipped_base + self.skipped_images()
          now = time.time()
          steps_per_sec = (done - step_last) / max(now - t_last, 1e-9)
          t_last, step_last = now, done
          record = dict(step=done, **values, steps_per_sec=steps_per_sec,
                        images_per_sec=steps_per_sec * config.batch_size)
          if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
          self.progress(record, d.total_steps)
        # Stop requests: SIGTERM on a single host, the preemption service's agreed step on a pod.
        reason = stop_request.signal_name
        if ckpt.reached_preemption(done):
          reason = reason or "preemption notice"
        periodic = config.checkpoint_every > 0 and done % config.checkpoint_every == 0
        if periodic or reason or done == d.total_steps:
          self.check_finite(*pending)  # never checkpoint the state of a step whose loss is not finite
          pending = None
          ckpt.save(done, state, config_json)  # async: the next step runs while it is written
        if reason and done < d.total_steps:
          ckpt.wait()
          self.log(f"{reason}: stopped at step {done}/{d.total_steps}, checkpoint {ckpt.path(done)}; "
                   "re-run the same command to resume")
          return state, {"stopped": reason, "step": done, "checkpoint": ckpt.path(done)}
      if pending is not None:
        self.check_finite(*pending)
    except NonFiniteLossError as e:
      raise self.non_finite_error(e, state, ckpt, config_json) from None
    finally:
      batches.close()
      if metrics_file:
        metrics_file.close()
    return state, None

  def non_finite_error(self, error: NonFiniteLossError, state: TrainState, ckpt: checkpointing.Checkpointer,
                       config_json: dict) -> NonFiniteLossError:
    """The error to raise, after checkpointing the last good state when it is the state before the bad step.

    The step refuses a non-finite update, so the state is the last good one; but the loss is checked one step
    late, and if the step after the bad one was finite, the state has moved on from it with the wrong batch:
    then it is not a state of this run and only the earlier checkpoints are named.
    """
    good = int(state.step)
    if good == error.step - 1 and good > 0:
      ckpt.save(good, state, config_json)
    ckpt.wait()
    latest = ckpt.latest_step()
    if latest is None:
      where = "No checkpoint was saved."
    else:
      where = f"Last checkpoint: {ckpt.path(latest)} (step {latest})."
    return NonFiniteLossError(f"{error} {where}", error.step)

  def skipped_images(self) -> int:
    """Undecodable images replaced in the batches used so far by this run, summed over the processes."""
    if jax.process_count() == 1:
      return self.skipped_local
    return int(np.sum(multihost_utils.process_allgather(np.int32(self.skipped_local))))

  def open_metrics(self, start: int):
    """metrics.jsonl for appending, first dropping records after ``start`` (steps that will be logged again)."""
    path = self.wpath("metrics.jsonl")
    kept = []
    if path.exists():
      with path.open() as f:
        for line in f:
          try:
            record = json.loads(line)
            if record["step"] <= start:
              kept.append(line if line.endswith("\n") else line + "\n")
              self.skipped_base = int(record.get("data/skipped", self.skipped_base))  # data/skipped goes on
          except (ValueError, KeyError, TypeError):  # e.g. a line cut short when the process was killed
            pass
    return _JsonLinesWriter(path, kept)

  def init_knn(self, state: TrainState | None, test_source) -> dict:
    """k-NN of the network at initialisation: evaluated once (from ``state``, the initial state, on a fresh start)
    and stored in eval/knn_init.json; a resumed run (``state`` None) reads it back, re-initialising only if the file
    is missing."""
    path = self.wpath("eval", "knn_init.json")
    if state is None:
      stored = None
      if self.is_main and path.exists():
        stored = json.loads(path.read_text())
      # Every process must agree on whether to evaluate (the evaluation is collective).
      found = bool(multihost_utils.broadcast_one_to_all(np.int32(stored is not None)))
      if found:
        return stored if self.is_main else {"top1": float("nan"), "top5": float("nan")}
      state = self.init_state()  # a pure function of the seed: the same network as at the first start
    result = self.knn_eval(state.teacher, self.train_source, test_source)
    if self.is_main:
      path.write_text(json.dumps(result, indent=2))
    return result

  # -- helpers ----------------------------------------------------------------------------------------
  def wpath(self, *parts: str) -> epath.Path:
    """A path under the workdir through etils.epath, so that a gs:// workdir works (pods) as a local one does."""
    return epath.Path(self.workdir).joinpath(*parts)

  def check_finite(self, step: int, metrics: dict) -> None:
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      raise NonFiniteLossError(
          f"non-finite loss ({loss}) at step {step}; the update of that step was not applied. "
          f"Metrics so far: {os.path.join(self.workdir, 'metrics.jsonl')}. Try a lower optim.lr, "
          "a smaller loss.eps, or model.dtype=float32.", step)

  def log(self, msg: str) -> None:
    if self.is_main:
      print(msg, flush=True)

  def draw_curves(self) -> None:
    """DIR/curves.png from metrics.jsonl (main process); a failure is a warning, never the end of a run."""
    if not self.is_main:
      return
    try:
      from simdino_jax import plot  # pylint: disable=g-import-not-at-top  (matplotlib: only at the end)
      panels = plot.plot_curves(self.workdir)
      self.log(f"training curves ({len(panels)} panels) -> {os.path.join(self.workdir, 'curves.png')}")
    except Exception as e:  # pylint: disable=broad-except  (a plot must never fail a finished run)
      import logging  # pylint: disable=g-import-not-at-top
      logging.getLogger(__name__).warning("could not draw the training curves: %s: %s", type(e).__name__, e)

  def progress(self, record: dict, total: int) -> None:
    step = record["step"]
    eta = (total - step) / max(record["steps_per_sec"], 1e-9)
    terms = " ".join(f"{k} {record[k]:.4g}" for k in _PROGRESS_KEYS if k in record)
    if record.get("data/skipped"):
      terms += f" | skipped {int(record['data/skipped'])} undecodable images"
    self.log(f"step {step}/{total} ({100 * step / total:.0f}%) | {terms} | lr {record['lr']:.3g} "
             f"m {record['momentum']:.4f} | {record['steps_per_sec']:.2f} steps/s "
             f"{record['images_per_sec']:.0f} img/s | ETA {_hms(eta)}")


_PROGRESS_KEYS = ("loss", "align", "patch_align", "rate", "regularizer", "ce", "ibot_ce", "koleo", "teacher_entropy",
                  "prototypes_used", "feature_std", "effective_rank")


def _num_classes(train_src, test_src) -> int:
  n = max(train_src.num_classes, test_src.num_classes)
  if n < 1:
    raise ValueError(f"evaluation needs labels: the sources {getattr(train_src, 'name', train_src)!r} / "
                     f"{getattr(test_src, 'name', test_src)!r} have none (npz without train_labels/test_labels?)")
  return n


class _JsonLinesWriter:
  """metrics.jsonl through etils.epath, starting from the ``kept`` lines: appended to on a local disk, rewritten whole
  at each flush on object stores (gs://), which cannot append. ``write`` / ``flush`` / ``close`` as a file's."""

  def __init__(self, path: epath.Path, kept: list[str], append: bool | None = None):
    self.path = path
    self.local = "://" not in str(path) if append is None else append  # gs://, s3://: an object store
    self.lines = list(kept)
    self.pending = []
    self._write_all()
    self.file = path.open("a") if self.local else None

  def _write_all(self) -> None:
    tmp = self.path.parent / (self.path.name + ".tmp")
    tmp.write_text("".join(self.lines))
    tmp.replace(self.path)

  def write(self, text: str) -> None:
    if self.file is not None:
      self.file.write(text)
    else:
      self.pending.append(text)

  def flush(self) -> None:
    if self.file is not None:
      self.file.flush()
    elif self.pending:
      self.lines += self.pending
      self.pending = []
      self._write_all()

  def close(self) -> None:
    self.flush()
    if self.file is not None:
      self.file.close()


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train with ``config``, writing into ``workdir``; returns the final k-NN summary."""
  return Trainer(config, workdir).run()
