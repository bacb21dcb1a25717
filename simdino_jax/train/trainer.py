"""The trainer: config -> mesh, data, state (fresh, resumed or initialised from weights) -> the jitted step in one
readable loop with logging, checkpoints and the config's evaluators.

Everything numerical is assembled once by ``train/setup.py`` (durations, schedules, network, optimiser, loss,
initial state, the jitted step: the same assembly the parity harnesses and benchmarks use) from the pieces below
it: ``train/step.py`` (the pure step), ``methods/`` (heads, losses, per-method optimiser extras), ``optim.py`` /
``schedules.py``. The trainer adds the workdir, the restore policy, the data, the loop and the evaluation; metrics
go through ``train/metrics.py``, evaluation through ``evals/`` (plug-ins run on the teacher's backbone), checkpoints
through ``io/checkpointing.py``. Files written under the workdir (process 0 only, but for checkpoint arrays):
  run.lock           while the run holds the directory (simdino_jax/workdir.py)
  config.json        the resolved config
  metrics.jsonl      one JSON object per logged step (+ tensorboard/ event files; W&B when configured)
  curves.png         the training curves, drawn at the end
  checkpoints/<N>/   the TrainState after N steps (orbax; every ``checkpoint_every`` steps and at the end)
  eval/NAME_init.json  the ``at_init`` evaluators' results on the network at initialisation (k-NN by default)
  eval/NAME.json     the ``final`` evaluators' results on the final teacher backbone (k-NN by default), each written
                     as soon as its evaluator finishes
  nonfinite.json     only after a stop on a non-finite loss: where to restart from (config.restart_from_step)

Resume: if ``checkpoints/`` holds a checkpoint, the run continues from the newest usable one; the data stream
is a pure function of (seed, step) and so is the step's randomness, so an interrupted-then-resumed run ends
with the same parameters as an uninterrupted one. SIGTERM / SIGINT (on any or every process) or a multi-host
preemption notice saves a checkpoint at the next (on several processes: agreed) step boundary and returns cleanly;
a second signal aborts (``_StopRequest``). A checkpoint already at or past ``total_steps`` trains nothing and says so
in one line ("raise config.total_steps to train further"), then runs the final evaluation: warned, not refused,
because re-running the same command is how a run is resumed, and a job requeued after its last step (a scheduler
restarting it during the final evaluation) must finish that evaluation, not fail with exit 1.

Evaluation: the teacher's backbone runs in ``config.eval.dtype`` (float32 by default, whatever ``model.dtype``
trains in). An evaluator that fails (an exception: out of memory, unreadable evaluation data ...) costs only its
own figures: it is logged in one line, its metrics are absent at that step, the other evaluators' results are kept
(and written), training goes on, and the end of the run lists the failed evaluators with the ``evaluate`` command
that re-runs them on the saved checkpoint (``self.eval_failures``). A ConfigError is the exception: a setting that
cannot work (which ``config.validate`` should have refused) stops the run after the round, as it would fail again.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Iterator

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from simdino_jax import config as config_lib
from simdino_jax import evals, sharding
from simdino_jax import workdir as workdir_lib
from simdino_jax.data import pipeline, sources
from simdino_jax.errors import NonFiniteLossError, ResumeError
from simdino_jax.evals import runner
from simdino_jax.io import checkpointing, restore
from simdino_jax.train import distill, init_from
from simdino_jax.train import gram as gram_lib
from simdino_jax.train import setup as setup_lib
from simdino_jax.train.metrics import MetricsLog
from simdino_jax.train.state import TrainState

NONFINITE_MARKER = "nonfinite.json"  # written when a run stops on a non-finite loss: where to restart from


class _StopRequest:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a stop at a step boundary, with a checkpoint, while in the ``with``
  block; a second signal of either kind aborts this process at once (a step that hangs, an impatient Ctrl-C), dying
  of that signal as it would without the handler (a shell reports 143 / 130).

  The signals are counted by a watcher thread that reads the bytes Python's C-level handler writes to a wakeup fd
  (``signal.set_wakeup_fd``), not by the Python-level handler: that one runs only when the main thread is back in
  the interpreter, so during a long (or hung) step two signals would merge into one and the second could not abort.

  One process: the loop stops at the next step boundary after the first signal (``reason``). Several processes: they
  must stop at the same step, or the others wait forever in the next step's collective. The first signal on any
  process is forwarded, at this process's next step boundary, into JAX's preemption sync service
  (``checkpointing.announce_preemption``), which agrees on one step for all processes within a step or two; the
  loop stops where ``reached_preemption`` says. This costs nothing per step (``reached_preemption`` is a local
  comparison, called at every step anyway for TPU maintenance notices) and works whether the signal reached every
  process (Ctrl-C in a terminal, a scheduler) or one only. A second signal kills the process that gets it; the
  others then fail in their next collective or, at the latest, when the coordination service misses its heartbeats
  (JAX's default: 100 s) and ends them.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled: bool = True, *, multiprocess: bool = False, log=print):
    self.multiprocess = multiprocess
    self.enabled = enabled
    self.log = log
    self.signal_name = None  # the first signal's name, set by the watcher thread
    self._announced = False
    self._previous = {}
    self._previous_wakeup = -1
    self._fds = None
    self._thread = None

  def __enter__(self) -> "_StopRequest":
    if self.enabled and self.multiprocess and not checkpointing.preemption_service_available():
      self.log(
        "SIGTERM / SIGINT keep their default action (no checkpoint): the processes cannot agree on a stop step "
        "without JAX's preemption service (jax_enable_preemption_service)"
      )
      self.enabled = False
    if not self.enabled or threading.current_thread() is not threading.main_thread():
      return self  # handlers can only be installed by the main thread: the signals keep their default action
    self._fds = os.pipe()
    os.set_blocking(self._fds[1], False)  # set_wakeup_fd requires it
    self._thread = threading.Thread(target=self._watch, name="simdino_jax-stop-request", daemon=True)
    self._thread.start()
    self._previous_wakeup = signal.set_wakeup_fd(self._fds[1], warn_on_full_buffer=False)
    for signum in self.SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  @staticmethod
  def _handle(signum, frame) -> None:
    """The Python-level handler: nothing to do (the watcher thread counts the signal); it replaces the default
    actions (KeyboardInterrupt, termination, JAX's own SIGTERM notifier)."""
    del signum, frame

  def _watch(self) -> None:
    while True:
      try:
        received = os.read(self._fds[0], 64)
      except OSError:
        return
      if not received:  # the write end was closed: the block is over
        return
      for signum in received:
        if signum not in self.SIGNALS:
          continue  # another signal with a Python handler
        name = signal.Signals(signum).name
        if self.signal_name is not None:
          self._abort(signum, name)
        self.signal_name = name
        where = "a step boundary all processes agree on" if self.multiprocess else "the next step boundary"
        print(f"{name}: stopping at {where} with a checkpoint (a second signal aborts without one)", flush=True)

  @staticmethod
  def _abort(signum: int, name: str) -> None:
    """Dies of ``signum`` now, from the watcher thread (the main thread may be blocked in a step)."""
    print(f"{name} again: aborting without a checkpoint", file=sys.stderr, flush=True)
    try:  # the default action back at the C level (signal.signal is for the main thread only), then the signal
      libc = ctypes.CDLL(None, use_errno=True)
      libc.signal.argtypes, libc.signal.restype = (ctypes.c_int, ctypes.c_void_p), ctypes.c_void_p
      libc.signal(signum, None)  # SIG_DFL
      os.kill(os.getpid(), signum)
      time.sleep(10)
    finally:
      os._exit(128 + signum)  # the exit code a shell reports for a death by that signal

  def reason(self, step: int, ckpt: checkpointing.Checkpointer) -> str | None:
    """At the boundary after ``step`` (every process, every step): why to stop here, or None."""
    agreed = ckpt.reached_preemption(step)  # JAX counts these calls: at every step, on every process
    if not self.multiprocess:
      return self.signal_name or ("preemption notice" if agreed else None)
    if self.signal_name is not None and not self._announced:
      self._announced = True  # forwarded only now that reached_preemption has counted a step (announce_preemption)
      checkpointing.announce_preemption(f"{self.signal_name} on process {jax.process_index()}")
    if not agreed:
      return None
    reason = checkpointing.preemption_reason() or "preemption notice"
    return self.signal_name if self.signal_name and reason.startswith(self.signal_name) else reason

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Puts the previous handlers back (idempotent)."""
    if self._thread is None:
      return
    signal.set_wakeup_fd(self._previous_wakeup)
    for signum, previous in self._previous.items():
      # None: a handler installed outside Python (JAX's SIGTERM notifier), which cannot be put back: the default.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    os.close(self._fds[1])  # ends the watcher
    self._thread.join(timeout=10)
    os.close(self._fds[0])
    self._previous, self._thread, self._fds = {}, None, None


def process_batch_rows(batch_sharding, batch_size: int) -> np.ndarray:
  """The rows of a ``batch_size`` global batch that this process's devices hold under ``batch_sharding``, ascending:
  ``jax.make_array_from_process_local_data`` (sharding.to_global) places the local batch's rows there in that
  order. The mesh may list another process's devices first (a two-process CPU pod does), so the process index alone
  does not say where its rows land; feeding these rows makes the global array the one-process batch row for row."""
  index_map = batch_sharding.addressable_devices_indices_map((batch_size,))
  rows = sorted({r for index in index_map.values() for r in range(*index[0].indices(batch_size))})
  return np.asarray(rows, np.int64)


def _model_name(model_cfg) -> str:
  """The backbone in the start line: the ViT variant, or the ResNet arch and its width."""
  if model_cfg.get("arch", "vit") == "vit":
    return model_cfg.variant
  return f"{model_cfg.arch}" + (f" (width {model_cfg.resnet_width})" if model_cfg.get("resnet_width", 0) else "")


class Trainer:
  """A run in a workdir: ``run()`` trains and evaluates. The numerical pieces come from ``train/setup.py``
  (``self.setup``); the trainer adds the workdir, the restore policy, the data, the evaluation and the loop, and is
  defined below in the order it runs: run -> _run -> restore_or_init -> check_restart -> init_results ->
  train_loop, then what those call."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, force: bool = False):
    config_lib.validate(
      config,
      num_devices=jax.device_count(),
      num_processes=jax.process_count(),
      num_local_devices=jax.local_device_count(),
    )
    self.config = config
    self.workdir = workdir_lib.resolve(workdir)  # absolute (orbax needs it), ~ expanded; gs:// unchanged
    self.force = force  # take over a workdir lock whose owner cannot be checked (another host)
    self.is_main = jax.process_index() == 0
    self.mesh = sharding.make_mesh(config.mesh)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = sharding.replicated(self.mesh)
    self.skipped_local = 0  # undecodable images replaced in the batches used (data/skipped)

    self.train_source = sources.from_config(config.data, "train")
    # config.distill: a resumed run reads its frozen teacher's config from its own workdir (train/distill.py).
    self.setup = setup_lib.build(config, len(self.train_source), distill_source=distill.recorded(self.workdir))
    self.method = self.setup.method
    # One sharding per state leaf (config.sharding.rules) and the target a checkpoint is restored onto.
    self.state_sharding = setup_lib.state_sharding(self.setup, self.mesh)
    self._abstract_state = checkpointing.abstract_target(self.setup.abstract_state, self.state_sharding)
    self.evaluators = self.labelled_evaluators(evals.build(config))
    self._eval_ctx = None
    self.eval_failures: dict[str, str] = {}  # name -> "step N: one-line error" of the evaluators that failed

  # -- the run, in the order it happens ---------------------------------------------------------------------------
  def run(self) -> dict:
    """Train (resuming from ``workdir/checkpoints`` if it holds a checkpoint), then evaluate.

    Returns the final k-NN result written to ``eval/knn.json`` (every final evaluator's result is in
    ``self.results``); or, when stopped by SIGTERM or a preemption notice, ``{"stopped": reason, "step": N,
    "checkpoint": path}`` after saving that checkpoint (no evaluation). Raises NonFiniteLossError naming the step and
    the last checkpoint.
    """
    # Process 0 takes the lock; every process learns its verdict before anything compiles (workdir.WorkdirLock).
    share = functools.partial(sharding.process_0_says, "workdir_lock") if jax.process_count() > 1 else None
    # From here on SIGTERM / SIGINT mean: save at the (agreed) next step boundary and return. Installed first: on
    # several processes JAX's own SIGTERM notifier, left in place, would offer the sync protocol a step count of 0,
    # which a resumed run never reaches (checkpointing.announce_preemption).
    with (
      _StopRequest(multiprocess=jax.process_count() > 1, log=self.log) as stop_request,
      workdir_lib.WorkdirLock(self.workdir, force=self.force, enabled=self.is_main, log=self.log, share=share),
    ):
      return self._run(stop_request)

  def _run(self, stop_request: _StopRequest) -> dict:
    config, d = self.config, self.setup.durations
    if self.is_main:
      self.wpath("eval").mkdir(parents=True, exist_ok=True)
      self.wpath("config.json").write_text(config.to_json_best_effort(indent=2))
    self.log(
      f"simdino_jax: method={config.method} model={_model_name(config.model)} devices={jax.device_count()} "
      f"({jax.devices()[0].platform}) batch={config.batch_size} steps={d.total_steps} "
      f"(warm-up {d.warmup_steps}, {d.steps_per_epoch} steps/epoch) workdir={self.workdir}"
    )

    with self.checkpointer() as ckpt:
      state, start = self.restore_or_init(ckpt)
      init = self.init_results(state if start == 0 else None)
      stopped = None
      if start >= d.total_steps:  # a finished run re-run (a requeued job): no step left, the final evaluation
        self.log(
          f"the checkpoint is at step {start}, config.total_steps is {d.total_steps}: nothing to train, going "
          "straight to the final evaluation (raise config.total_steps to train further)"
        )
      else:
        state, stopped = self.train_loop(state, start, ckpt, stop_request)
        self.metrics_log.draw_curves()  # DIR/curves.png; a failure is only a warning
      ckpt.wait()  # the final checkpoint is committed before the evaluation
    stop_request.close()  # the final evaluation has no step boundary to stop at: signals act as usual again
    self.state = state
    if stopped is not None:
      return stopped

    final = {name: e for name, e in self.evaluators.items() if e.cfg.final}
    self.results = {}
    step = int(state.step)

    def write(name, result):  # as soon as each evaluator finishes: a later failure loses nothing
      self.results[name] = runner.write_result(
        self.eval_context(),
        final[name],
        result,
        step=step,
        features=f"{self.method.evaluated} backbone",
        init=init.get(name),
      )

    if final:  # none, e.g. on unlabelled data: no evaluation data is even opened
      self.evaluate(getattr(state, self.method.evaluated), final, step, on_result=write)
    if self.eval_failures:
      names = ",".join(self.eval_failures)
      self.log(
        "evaluators that failed in this run (their figures are missing): "
        + "; ".join(f"{n} ({why})" for n, why in self.eval_failures.items())
        + ". Re-run them on the saved checkpoint: "
        + f"python -m simdino_jax.evaluate --workdir={self.workdir} --eval={names}"
      )
    return self.results.get("knn", {"step": step})

  def restore_or_init(self, ckpt: checkpointing.Checkpointer) -> tuple[TrainState, int]:
    """(state, step), by precedence: this workdir's newest usable checkpoint; else ``config.resume`` (another run's
    workdir, checkpoints/ directory or checkpoints/<step>: its full state, continuing from its step); else
    ``config.init_from`` (exported weights or a workdir: backbone, and heads whose shapes match, into student and
    teacher, at step 0 with a fresh optimizer); else the initial state and 0. A fresh start with config.distill
    loads the frozen teacher (train/distill.py); a resumed one restores it with the rest of the state."""
    config = self.config
    self.check_restart(ckpt)
    restored = ckpt.restore_latest(self.abstract_state(), config=checkpointing.config_dict(config))
    if restored is not None:
      state, step = restored
      self.log(f"resumed from step {step} ({ckpt.path(step)})")
      return state, step
    if config.get("resume"):
      state, step, where = restore.restore_external(
        config.resume, self.abstract_state(), config=checkpointing.config_dict(config)
      )
      self.log(f"resumed from step {step} of {where} (config.resume)")
      return state, step
    if config.get("init_from"):
      state = init_from.load(
        config.init_from, self.init_state(), self.setup.tx, self.state_sharding.opt_state, self.log
      )
      return self.fresh_distill(state), 0
    return self.fresh_distill(self.init_state()), 0

  def fresh_distill(self, state: TrainState) -> TrainState:
    """A fresh start's state with config.distill's frozen teacher loaded and its config recorded (train/distill.py),
    and config.gram.teacher's backbone in the Gram teacher (train/gram.py); ``state`` itself without them."""
    if self.is_main:
      distill.record(self.setup, self.workdir)
    state = distill.fill(self.setup, state, self.state_sharding, self.log)
    return gram_lib.fill(self.setup, state, self.state_sharding, self.log)

  def check_restart(self, ckpt: checkpointing.Checkpointer) -> None:
    """Never resume silently into a divergence: after a run stopped on a non-finite loss (DIR/nonfinite.json), a
    re-run must say where to restart from (``config.restart_from_step``); the checkpoints after that step are
    moved aside (kept, ``N.superseded-TIME``) and the marker removed."""
    marker = self.wpath(NONFINITE_MARKER)
    restart = self.config.restart_from_step
    if restart > 0:
      for moved in ckpt.move_aside_after(restart):
        self.log(f"restart_from_step={restart}: moved a later checkpoint aside to {moved}")
      if self.is_main and marker.exists():
        marker.unlink()
    elif marker.exists():
      stopped = json.loads(marker.read_text())
      raise ResumeError(
        f"config.restart_from_step: this run stopped on a non-finite loss at step {stopped['step']} "
        f"({marker}); resuming it as it is would diverge again. {stopped['restart']}"
      )

  def init_results(self, state: TrainState | None) -> dict:
    """{name: result} of the ``at_init`` evaluators on the network at initialisation: evaluated once (``state``, the
    initial state, on a fresh start) and stored as eval/NAME_init.json; a resumed run (``state`` None) reads them
    back, re-initialising (a pure function of the seed) only if a file is missing."""
    at_init = {name: e for name, e in self.evaluators.items() if e.cfg.at_init}
    if not at_init:
      return {}
    paths = {name: self.wpath("eval", f"{name}_init.json") for name in at_init}
    if state is None:
      stored = {name: json.loads(p.read_text()) for name, p in paths.items() if self.is_main and p.exists()}
      # Every process must agree on whether to evaluate (the evaluation is collective).
      if bool(multihost_utils.broadcast_one_to_all(np.int32(len(stored) == len(at_init)))):
        return stored
      state = self.init_state()

    def write(name, result):
      spec, dtype = sources.eval_spec(self.config.data), self.config.eval.dtype
      if self.is_main:
        paths[name].write_text(json.dumps(dict(result, step=0, data=spec, dtype=dtype), indent=2))
      self.log(f"{name} at init: {at_init[name].summary(result)}")

    return self.evaluate(getattr(state, self.method.evaluated), at_init, 0, on_result=write)

  def train_loop(self, state: TrainState, start: int, ckpt: checkpointing.Checkpointer, stop_request: _StopRequest):
    """Steps ``start`` .. total_steps with logging and checkpoints; returns (state, None | stop summary)."""
    config, d = self.config, self.setup.durations
    config_json = checkpointing.config_dict(config)
    train_step = self.compiled_step()
    self.skipped_local = 0  # data/skipped: this run's count, plus the resumed run's (its last metrics record)
    batches = self.train_batches(start_step=start)
    pending = None  # (step, metrics) of the previous step: checked one step late to keep dispatch async
    metrics_log = self.metrics_log = MetricsLog(
      self.workdir,
      total_steps=d.total_steps,
      start_step=start,
      batch_size=config.batch_size,
      progress_keys=self.method.progress_line_keys + (("gram_loss",) if self.setup.gram is not None else ()),
      config=config,
      is_main=self.is_main,
    )
    skipped_base = int((metrics_log.last_record or {}).get("data/skipped", 0))
    try:
      for step in range(start, d.total_steps):
        state, metrics = train_step(state, next(batches))
        if pending is not None:
          self.check_finite(*pending)
        done = step + 1
        pending = (done, metrics)
        due = self.due_evaluators(done)
        if done % config.log_every == 0 or done == d.total_steps or due:
          values = {k: float(v) for k, v in jax.device_get(metrics).items()}
          self.check_finite(done, values)
          if due:  # periodic evaluation of the teacher (Method.evaluated), logged with the step's metrics
            values.update(self.periodic_metrics(getattr(state, self.method.evaluated), done, due))
          values["data/skipped"] = skipped_base + self.skipped_images()
          metrics_log.write(done, values)
        # Stop requests: a signal on a single host, the preemption service's agreed step on several (_StopRequest).
        reason = stop_request.reason(done, ckpt)
        periodic = config.checkpoint_every > 0 and done % config.checkpoint_every == 0
        if periodic or reason or done == d.total_steps:
          self.check_finite(*pending)  # never checkpoint the state of a step whose loss is not finite
          pending = None
          ckpt.save(done, state, config_json)  # async: the next step runs while it is written
        if reason and done < d.total_steps:
          ckpt.wait()
          self.log(
            f"{reason}: stopped at step {done}/{d.total_steps}, checkpoint {ckpt.path(done)}; "
            "re-run the same command to resume"
          )
          return state, {"stopped": reason, "step": done, "checkpoint": ckpt.path(done)}
      if pending is not None:
        self.check_finite(*pending)
    except NonFiniteLossError as e:
      raise self.non_finite_error(e, state, ckpt, config_json) from None
    finally:
      batches.close()
      metrics_log.finish()
    return state, None

  # -- state and step ---------------------------------------------------------------------------------------------
  def checkpointer(self) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(
      os.path.join(self.workdir, "checkpoints"), max_to_keep=self.config.checkpoint_keep
    )

  def abstract_state(self) -> TrainState:
    """The state's shapes, dtypes and shardings (``self.state_sharding``): the target a checkpoint is restored onto."""
    return self._abstract_state

  def init_state(self) -> TrainState:
    """The state at initialisation on the mesh; a pure function of ``config.seed`` (setup.init_state)."""
    return setup_lib.init_state(self.setup, self.state_sharding)

  def compiled_step(self, pack_masks: bool = True):
    """The jitted, donated step on the mesh (setup.make_step)."""
    return setup_lib.make_step(self.setup, self.mesh, pack_masks=pack_masks, shardings=self.state_sharding)

  # -- data -------------------------------------------------------------------------------------------------------
  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    config, s = self.config, self.setup
    masked = self.method.uses_masks
    it = pipeline.train_iterator(
      self.train_source,
      s.multicrop,
      batch_size=s.process_batch,
      seed=config.seed,
      num_workers=config.data.num_workers,
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
      rows=process_batch_rows(self.batch_sharding, config.batch_size),  # the global batch in one-process order
      start_step=start_step,
      mask_patch_size=s.patch_size if masked else 0,
      mask_probability=config.masking.probability,
      mask_ratio=tuple(config.masking.ratio),
      mask_min_patches=config.masking.min_num_patches,
    )
    keys = ("global", "local", "mask") if masked else ("global", "local")
    keys += ("gram_global",) if s.multicrop.gram_size else ()  # config.gram.crop_size (train/gram.py)
    try:
      for batch in it:
        # Undecodable images the source replaced in this batch: counted here, as the batch is used, so the count
        # does not depend on prefetching or on which (worker) process decoded them.
        self.skipped_local += int(np.sum(batch["skipped"])) if "skipped" in batch else 0
        yield sharding.to_global({k: batch[k] for k in keys}, self.batch_sharding)
    finally:
      if hasattr(it, "close"):
        it.close()  # grain worker processes, when data.num_workers > 0

  def skipped_images(self) -> int:
    """Undecodable images replaced in the batches used so far by this run, summed over the processes."""
    if jax.process_count() == 1:
      return self.skipped_local
    return int(np.sum(multihost_utils.process_allgather(np.int32(self.skipped_local))))

  # -- non-finite losses ------------------------------------------------------------------------------------------
  def check_finite(self, step: int, metrics: dict) -> None:
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      raise NonFiniteLossError(
        f"non-finite loss ({loss}) at step {step}; the update of that step was not applied. "
        f"Metrics so far: {os.path.join(self.workdir, 'metrics.jsonl')}.",
        step,
      )

  def non_finite_error(
    self, error: NonFiniteLossError, state: TrainState, ckpt: checkpointing.Checkpointer, config_json: dict
  ) -> NonFiniteLossError:
    """The error to raise, after checkpointing the last good state when it is the state before the bad step.

    The step refuses a non-finite update, so the state is the last good one; but the loss is checked one step
    late, and if the step after the bad one was finite, the state has moved on from it with the wrong batch:
    then it is not a state of this run and only the earlier checkpoints are named.
    """
    good = int(state.step)
    if good == error.step - 1 and good > 0:
      ckpt.save(good, state, config_json)
    ckpt.wait()
    steps = ckpt.all_steps()  # every checkpoint was saved after a finite loss (check_finite runs before each save)
    if not steps:
      return NonFiniteLossError(
        f"{error} No checkpoint was saved: re-run with other settings, e.g. a lower "
        "--config.optim.lr, a smaller --config.loss.eps or --config.model.dtype=float32.",
        error.step,
      )
    latest = steps[-1]
    restart = (
      f"Restart from a checkpoint with other settings (e.g. a lower --config.optim.lr, a smaller "
      f"--config.loss.eps or --config.model.dtype=float32): re-run with --config.restart_from_step={latest} "
      f"(or an earlier step: its parameters may already be diverging), or continue in a new workdir with "
      f"--config.resume={ckpt.path(latest)}."
    )
    if self.is_main:
      self.wpath(NONFINITE_MARKER).write_text(
        json.dumps({"step": error.step, "checkpoints": steps, "restart": restart}, indent=2)
      )
    return NonFiniteLossError(
      f"{error} Checkpoints with finite metrics: steps {', '.join(map(str, steps))} in {ckpt.directory}. {restart}",
      error.step,
    )

  # -- evaluation -------------------------------------------------------------------------------------------------
  def due_evaluators(self, step: int) -> dict:
    """The evaluators whose ``every`` (runner.every) divides ``step``; never the last step (the final evaluation)."""
    if step >= self.setup.durations.total_steps:
      return {}
    return {
      name: e
      for name, e in self.evaluators.items()
      if runner.every(e, self.config) > 0 and step % runner.every(e, self.config) == 0
    }

  def periodic_metrics(self, params, step: int, due: dict) -> dict:
    """The ``due`` evaluators' scalars as metrics named NAME_KEY (knn_top1, linear_lr, fewshot_5shot, ...)."""
    results = self.evaluate(params, due, step)
    values = {
      f"{name}_{k}": v for name, e in due.items() if name in results for k, v in e.metrics(results[name]).items()
    }
    if values:  # none when every due evaluator failed (each said so in its own line)
      self.log(
        f"step {step}: " + " ".join(f"{k} {v:.4g}" + ("" if k.endswith("_lr") else "%") for k, v in values.items())
      )
    return values

  def evaluate(self, params, evaluators: dict, step: int, on_result=None) -> dict:
    """{name: result} of ``evaluators`` on the backbone of the network parameters ``params`` (the teacher's) after
    ``step`` steps; ``on_result(name, result)`` as each finishes. A failed evaluator is left out and recorded in
    ``eval_failures`` (module docstring); a ConfigError is raised once the others have run."""
    failed = {}
    results = runner.run_round(self.eval_context(), evaluators, params["backbone"], on_result=on_result, failed=failed)
    for name, error in failed.items():
      self.eval_failures[name] = f"step {step}: {runner.failure_line(error)}"
    config_errors = [e for e in failed.values() if isinstance(e, config_lib.ConfigError)]
    if config_errors:
      raise config_errors[0]
    return results

  def eval_context(self) -> runner.Context:
    """The evaluators' view of this run: the teacher's backbone on the mesh, the train / test data, DIR/eval.
    Built once (its compiled feature functions are reused by every periodic evaluation)."""
    if self._eval_ctx is None:
      self._eval_ctx = runner.Context(
        self.config,
        graphdef=self.setup.eval_graphdef,
        param_sharding=getattr(self.state_sharding, self.method.evaluated)["backbone"],
        mesh=self.mesh,
        train_source=self.eval_train_source(),
        test_source=sources.from_config(self.config.data, "test", evaluation=True),
        out_dir=os.path.join(self.workdir, "eval"),
        log=self.log,
        dtype=self.config.eval.dtype,
        checkpointer=checkpointing.Checkpointer,
        metrics_log=MetricsLog,
      )
    return self._eval_ctx

  def eval_train_source(self):
    """The evaluators' train split: the training source itself unless data.eval_source names other data."""
    if sources.eval_spec(self.config.data) == self.config.data.source:
      return self.train_source
    return sources.from_config(self.config.data, "train", evaluation=True)

  def labelled_evaluators(self, evaluators: dict) -> dict:
    """``evaluators`` without those that need labels when the evaluation data (data.eval_source, else data.source)
    has no labelled train and test split: unlabelled pre-training, said once, decided before anything compiles."""
    data = self.config.data
    spec, tfds_dir = sources.eval_spec(data), data.get("tfds_data_dir") or None
    if all(sources.has_labelled_split(spec, split, tfds_data_dir=tfds_dir) for split in ("train", "test")):
      return evaluators
    off = [name for name, e in evaluators.items() if e.needs_labels]
    if off:
      self.log(
        f"{spec!r} has no labelled train and test split: evaluators {', '.join(off)} are off (set "
        "config.data.eval_source to labelled data to evaluate while training)"
      )
    return {name: e for name, e in evaluators.items() if not e.needs_labels}

  # -- helpers ----------------------------------------------------------------------------------------------------
  def wpath(self, *parts: str) -> epath.Path:
    """A path under the workdir through etils.epath, so that a gs:// workdir works (pods) as a local one does."""
    return epath.Path(self.workdir).joinpath(*parts)

  def log(self, msg: str) -> None:
    if self.is_main:
      print(msg, flush=True)


def train(config: ml_collections.ConfigDict, workdir: str, *, force: bool = False) -> dict:
  """Train with ``config``, writing into ``workdir``; returns the final k-NN summary."""
  return Trainer(config, workdir, force=force).run()
