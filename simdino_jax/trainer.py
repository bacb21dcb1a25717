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
from flax import nnx
from jax.experimental import multihost_utils

from simdino_jax import checkpointing, defaults, methods, optim, schedules, sharding
from simdino_jax.data import pipeline
from simdino_jax.data.multicrop import MultiCropConfig
from simdino_jax.data.sources import load_source
from simdino_jax.evals import knn
from simdino_jax.models.network import Network, build_backbone
from simdino_jax.models.vit import parse_variant
from simdino_jax.tree import map_with_name
from simdino_jax.state import TrainState
from simdino_jax.step import make_feature_fn, make_train_step


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss; the message names the step and the last checkpoint."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


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
  patch_head = methods.build_patch_head(config, backbone.embed_dim, rngs) if methods.patch_head_needed(config) \
      else None
  return Network(backbone, head, patch_head)


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
    defaults.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count(),
                      num_local_devices=jax.local_device_count())
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
    if config.teacher.self_distillation:
      self.momentum_fn = schedules.cosine(config.teacher.momentum, config.teacher.momentum_end, d.total_steps)
    else:  # the paper's ablation: the teacher is the current student (m = 0) at every step
      self.momentum_fn = schedules.constant(0.0)

    # Shapes first (no FLOPs), then the state is created directly with its sharding.
    abstract = nnx.eval_shape(lambda: create_network(config, self.method, config.seed))
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
      params = nnx.split(create_network(config, self.method, config.seed))[1]
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
    """(state, step): the newest usable checkpoint's, else the initial state and 0."""
    restored = ckpt.restore_latest(self.abstract_state(), config=checkpointing.config_dict(self.config))
    if restored is None:
      return self.init_state(), 0
    state, step = restored
    self.log(f"resumed from step {step} ({ckpt.path(step)})")
    return state, step

  def compiled_step(self):
    step = make_train_step(self.graphdef, self.loss_fn, self.tx, lr_fn=self.lr_fn, wd_fn=self.wd_fn,
                           momentum_fn=self.momentum_fn, mask_positions=methods.mask_positions(self.config))
    return jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding),
                   out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)

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
        yield sharding.to_global({k: batch[k] for k in keys}, self.batch_sharding)
    finally:
      if hasattr(it, "close"):
        it.close()  # grain worker processes, when data.num_workers > 0

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
    """Train (resuming from ``workdir/checkpoints`` if it holds a checkpoint), then evaluate.

    Returns the k-NN summary written to ``eval/knn.json``; or, when stopped by SIGTERM or a preemption notice,
    ``{"stopped": reason, "step": N, "checkpoint": path}`` after saving that checkpoint (no evaluation).
    Raises NonFiniteLossError naming the step and the last checkpoint.
    """
    config, d = self.config, self.durations
    if self.is_main:
      os.makedirs(os.path.join(self.workdir, "eval"), exist_ok=True)
      with open(os.path.join(self.workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    self.log(f"simdino_jax: method={config.method} model={config.model.variant} devices={jax.device_count()} "
             f"({jax.devices()[0].platform}) batch={config.batch_size} steps={d.total_steps} "
             f"(warm-up {d.warmup_steps}, {d.steps_per_epoch} steps/epoch) workdir={self.workdir}")

    # From here on SIGTERM (single host) means: save at the next step boundary and return.
    with _StopRequest(enabled=jax.process_count() == 1) as stop_request, self.checkpointer() as ckpt:
      state, start = self.restore_or_init(ckpt)
      test_source = self.test_source = load_source(config.data.source, "test")
      init_knn = self.init_knn(state if start == 0 else None, test_source)
      self.log(f"k-NN at init: top-1 {init_knn['top1']:.2f}%")
      state, stopped = self.train_loop(state, start, ckpt, stop_request)
      ckpt.wait()  # the final checkpoint is committed before the evaluation
    self.state = state
    if stopped is not None:
      return stopped

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
    return result

  def train_loop(self, state: TrainState, start: int, ckpt: checkpointing.Checkpointer,
                 stop_request: _StopRequest):
    """Steps ``start`` .. total_steps with logging and checkpoints; returns (state, None | stop summary)."""
    config, d = self.config, self.durations
    config_json = checkpointing.config_dict(config)
    train_step = self.compiled_step()
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
          if evaluate:  # periodic k-NN of the teacher, logged with the step's metrics
            knn = self.knn_eval(state.teacher, self.train_source, self.test_source)
            values.update(knn_top1=knn["top1"], knn_top5=knn["top5"])
            self.log(f"step {done}: k-NN top-1 {knn['top1']:.2f}% top-5 {knn['top5']:.2f}%")
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

  def open_metrics(self, start: int):
    """metrics.jsonl for appending, first dropping records after ``start`` (steps that will be logged again)."""
    path = os.path.join(self.workdir, "metrics.jsonl")
    kept = []
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            if json.loads(line)["step"] <= start:
              kept.append(line if line.endswith("\n") else line + "\n")
          except (ValueError, KeyError, TypeError):  # e.g. a line cut short when the process was killed
            pass
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a")

  def init_knn(self, state: TrainState | None, test_source) -> dict:
    """k-NN of the network at initialisation: evaluated once (from ``state``, the initial state, on a fresh start)
    and stored in eval/knn_init.json; a resumed run (``state`` None) reads it back, re-initialising only if the file
    is missing."""
    path = os.path.join(self.workdir, "eval", "knn_init.json")
    if state is None:
      stored = None
      if self.is_main and os.path.exists(path):
        with open(path) as f:
          stored = json.load(f)
      # Every process must agree on whether to evaluate (the evaluation is collective).
      found = bool(multihost_utils.broadcast_one_to_all(np.int32(stored is not None)))
      if found:
        return stored if self.is_main else {"top1": float("nan"), "top5": float("nan")}
      state = self.init_state()  # a pure function of the seed: the same network as at the first start
    result = self.knn_eval(state.teacher, self.train_source, test_source)
    if self.is_main:
      with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result

  # -- helpers ----------------------------------------------------------------------------------------
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

  def progress(self, record: dict, total: int) -> None:
    step = record["step"]
    eta = (total - step) / max(record["steps_per_sec"], 1e-9)
    terms = " ".join(f"{k} {record[k]:.4g}" for k in _PROGRESS_KEYS if k in record)
    self.log(f"step {step}/{total} ({100 * step / total:.0f}%) | {terms} | lr {record['lr']:.3g} "
             f"m {record['momentum']:.4f} | {record['steps_per_sec']:.2f} steps/s "
             f"{record['images_per_sec']:.0f} img/s | ETA {_hms(eta)}")


_PROGRESS_KEYS = ("loss", "align", "patch_align", "rate", "regularizer", "ce", "ibot_ce", "koleo", "teacher_entropy",
                  "prototypes_used", "feature_std", "effective_rank")


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train with ``config``, writing into ``workdir``; returns the final k-NN summary."""
  return Trainer(config, workdir).run()
