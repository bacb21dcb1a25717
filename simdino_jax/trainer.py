"""The training loop: config -> mesh, data, state -> jitted steps with logging -> k-NN evaluation.

One readable loop; everything numerical lives in ``step.py`` (the pure step), ``methods.py`` (the loss) and
``optim.py`` / ``schedules.py``. Files written under the workdir (process 0 only):
  config.json      the resolved config
  metrics.jsonl    one JSON object per logged step
  eval/knn.json    k-NN accuracy of the teacher backbone at the end, and of the same network at init
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from simdino_jax import defaults, methods, optim, schedules, sharding
from simdino_jax.data import pipeline
from simdino_jax.data.multicrop import MultiCropConfig
from simdino_jax.data.sources import load_source
from simdino_jax.evals import knn
from simdino_jax.models.network import Network, build_backbone
from simdino_jax.state import TrainState
from simdino_jax.step import make_feature_fn, make_train_step


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss; the message names the step."""


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
      raise defaults.ConfigError(f"config.batch_size: {config.batch_size} exceeds the {num_train} training "
                                 "examples, so an epoch has no step; lower it or set total_steps")
    total = config.total_epochs * steps_per_epoch
  warmup = config.warmup_steps if config.warmup_steps > 0 else int(round(config.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, total - 1)
  return Durations(total, warmup, max(steps_per_epoch, 1))


def multicrop_config(config) -> MultiCropConfig:
  d = config.data
  return MultiCropConfig(global_size=d.global_size, local_size=d.local_size, num_global=d.num_global,
                         num_local=d.num_local, global_scale=tuple(d.global_scale),
                         local_scale=tuple(d.local_scale),
                         **{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.augment.items()})


def create_network(config, method: methods.Method, seed: int) -> Network:
  rngs = nnx.Rngs(params=seed)
  backbone = build_backbone(config.model, rngs=rngs)
  head = method.build_head(config, backbone.embed_dim, rngs)
  return Network(backbone, head)


class Trainer:
  """Holds the pieces built from a config; ``run()`` trains and evaluates."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    defaults.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    self.config = config
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self.method = methods.get_method(config.method)
    self.mesh = sharding.make_mesh(config.mesh)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = sharding.replicated(self.mesh)

    self.train_source = load_source(config.data.source, "train")
    self.durations = durations(config, len(self.train_source))
    d = self.durations
    self.lr_fn = optim.lr_schedule(config.optim, config.batch_size, d.total_steps, d.warmup_steps)
    self.wd_fn = optim.wd_schedule(config.optim, d.total_steps)
    self.momentum_fn = schedules.cosine(config.teacher.momentum, config.teacher.momentum_end, d.total_steps)

    # Shapes first (no FLOPs), then the state is created directly with its sharding.
    abstract = nnx.eval_shape(lambda: create_network(config, self.method, config.seed))
    self.graphdef, abstract_params = nnx.split(abstract)
    self.tx = optim.make_optimizer(config.optim, abstract_params, self.lr_fn, self.wd_fn)
    self.loss_fn = self.method.make_loss(config)
    self.feature_fn = jax.jit(make_feature_fn(self.graphdef), in_shardings=(self.replicated, self.batch_sharding),
                              out_shardings=self.batch_sharding)

  # -- state ------------------------------------------------------------------------------------------
  def init_state(self) -> TrainState:
    config = self.config

    def init():
      params = nnx.split(create_network(config, self.method, config.seed))[1]
      return TrainState(step=jnp.zeros((), jnp.int32), student=params, teacher=params,
                        opt_state=self.tx.init(params), loss_state=self.method.init_loss_state(config),
                        rng=jax.random.key_data(jax.random.key(config.seed + 1)))

    abstract_state = jax.eval_shape(init)
    self.state_sharding = jax.tree_util.tree_map(lambda _: self.replicated, abstract_state)
    return jax.jit(init, out_shardings=self.state_sharding)()

  def compiled_step(self):
    step = make_train_step(self.graphdef, self.loss_fn, self.tx, lr_fn=self.lr_fn, wd_fn=self.wd_fn,
                           momentum_fn=self.momentum_fn)
    return jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding),
                   out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)

  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    config = self.config
    it = pipeline.train_iterator(self.train_source, multicrop_config(config),
                                 batch_size=config.batch_size // jax.process_count(), seed=config.seed,
                                 num_workers=config.data.num_workers, shard_index=jax.process_index(),
                                 shard_count=jax.process_count(), start_step=start_step)
    for batch in it:
      yield sharding.to_global({"global": batch["global"], "local": batch["local"]}, self.batch_sharding)

  # -- evaluation -------------------------------------------------------------------------------------
  def features(self, params, source) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-backbone cls features of every example of ``source`` (each exactly once)."""
    config = self.config
    size = config.eval.image_size or config.data.global_size
    n_dev = jax.device_count()
    batch_size = max(n_dev, (config.eval.batch_size // n_dev) * n_dev)
    feats, labels = [], []
    for batch in pipeline.eval_batches(source, image_size=size, batch_size=batch_size // jax.process_count(),
                                       shard_index=jax.process_index(), shard_count=jax.process_count()):
      images = jax.make_array_from_process_local_data(self.batch_sharding, batch["image"])
      out = multihost_utils.process_allgather(self.feature_fn(params, images), tiled=True)
      valid = multihost_utils.process_allgather(batch["valid"], tiled=True)
      lab = multihost_utils.process_allgather(batch["label"], tiled=True)
      feats.append(np.asarray(out)[np.asarray(valid)])
      labels.append(np.asarray(lab)[np.asarray(valid)])
    return np.concatenate(feats), np.concatenate(labels)

  def knn_eval(self, params, train_src, test_src) -> dict:
    config = self.config
    train_f, train_y = self.features(params, train_src)
    test_f, test_y = self.features(params, test_src)
    num_classes = max(train_src.num_classes, test_src.num_classes)
    acc = knn.knn_accuracy(train_f, train_y, test_f, test_y, num_classes=num_classes, k=config.eval.knn_k,
                           temperature=config.eval.knn_temperature)
    return dict(acc, num_train=int(len(train_y)), num_test=int(len(test_y)))

  # -- the loop ---------------------------------------------------------------------------------------
  def run(self) -> dict:
    config, d = self.config, self.durations
    if self.is_main:
      os.makedirs(os.path.join(self.workdir, "eval"), exist_ok=True)
      with open(os.path.join(self.workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    self.log(f"simdino_jax: method={config.method} model={config.model.variant} devices={jax.device_count()} "
             f"({jax.devices()[0].platform}) batch={config.batch_size} steps={d.total_steps} "
             f"(warm-up {d.warmup_steps}, {d.steps_per_epoch} steps/epoch) workdir={self.workdir}")

    state = self.init_state()
    test_source = load_source(config.data.source, "test")
    init_knn = self.knn_eval(state.teacher, self.train_source, test_source)
    self.log(f"k-NN at init: top-1 {init_knn['top1']:.2f}%")

    train_step = self.compiled_step()
    batches = self.train_batches(start_step=0)
    metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    metrics_file = open(metrics_path, "a") if self.is_main else None
    pending = None  # (step, metrics) of the previous step: checked one step late to keep dispatch async
    t_last, step_last = time.time(), 0
    try:
      for step in range(d.total_steps):
        state, metrics = train_step(state, next(batches))
        if pending is not None:
          self.check_finite(*pending)
        pending = (step + 1, metrics)
        if (step + 1) % config.log_every == 0 or step + 1 == d.total_steps:
          values = {k: float(v) for k, v in jax.device_get(metrics).items()}
          self.check_finite(step + 1, values)
          now = time.time()
          steps_per_sec = (step + 1 - step_last) / max(now - t_last, 1e-9)
          t_last, step_last = now, step + 1
          record = dict(step=step + 1, **values, steps_per_sec=steps_per_sec,
                        images_per_sec=steps_per_sec * config.batch_size)
          if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
          self.progress(record, d.total_steps)
      self.check_finite(*pending)
    finally:
      if metrics_file:
        metrics_file.close()

    final_knn = self.knn_eval(state.teacher, self.train_source, test_source)
    result = {
        "accuracy": final_knn["top1"], "top5": final_knn["top5"],
        "accuracy_at_init": init_knn["top1"], "top5_at_init": init_knn["top5"],
        "k": config.eval.knn_k, "temperature": config.eval.knn_temperature,
        "num_train": final_knn["num_train"], "num_test": final_knn["num_test"],
        "step": int(state.step), "features": "teacher backbone cls",
    }
    if self.is_main:
      with open(os.path.join(self.workdir, "eval", "knn.json"), "w") as f:
        json.dump(result, f, indent=2)
    self.log(f"k-NN (k={result['k']}, T={result['temperature']}) top-1 {result['accuracy']:.2f}% "
             f"vs {result['accuracy_at_init']:.2f}% at init ({result['accuracy'] - result['accuracy_at_init']:+.2f})"
             f" -> {os.path.join(self.workdir, 'eval', 'knn.json')}")
    self.state = state
    return result

  # -- helpers ----------------------------------------------------------------------------------------
  def check_finite(self, step: int, metrics: dict) -> None:
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      raise NonFiniteLossError(
          f"non-finite loss ({loss}) at step {step}; the update of that step was not applied. "
          f"Metrics so far: {os.path.join(self.workdir, 'metrics.jsonl')}. Try a lower optim.lr, "
          "a smaller loss.eps, or model.dtype=float32.")

  def log(self, msg: str) -> None:
    if self.is_main:
      print(msg, flush=True)

  def progress(self, record: dict, total: int) -> None:
    step = record["step"]
    eta = (total - step) / max(record["steps_per_sec"], 1e-9)
    terms = " ".join(f"{k} {record[k]:.4g}" for k in ("loss", "align", "rate") if k in record)
    self.log(f"step {step}/{total} ({100 * step / total:.0f}%) | {terms} | lr {record['lr']:.3g} "
             f"m {record['momentum']:.4f} | {record['steps_per_sec']:.2f} steps/s "
             f"{record['images_per_sec']:.0f} img/s | ETA {_hms(eta)}")


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train with ``config``, writing into ``workdir``; returns the final k-NN summary."""
  return Trainer(config, workdir).run()
