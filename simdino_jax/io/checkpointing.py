"""Checkpoints of the whole TrainState under ``DIR/checkpoints/`` (orbax), resumable past unusable ones.

A thin wrapper around ``orbax.checkpoint.CheckpointManager``. Each checkpoint is one step directory:

  DIR/checkpoints/<step>/state/     the TrainState (step, student, teacher, opt_state, loss_state, rng) as a
                                    standard pytree (OCDBT array store; every process writes its own shards)
  DIR/checkpoints/<step>/config/    the resolved config, JSON (written by process 0 only)
  DIR/checkpoints/<step>/commit_success.txt   orbax's commit marker, written last

Saves are asynchronous: ``save`` returns once the arrays are copied off the device, so the next step can run
(and donate the state's buffers) while the files are written; ``wait`` blocks until they are committed. An
interrupted save leaves only a ``<step>.orbax-checkpoint-tmp-*`` directory, which orbax ignores and removes.

``restore_latest`` restores into an abstract target whose leaves carry the *current* shardings, so a checkpoint
written on N devices restores onto M devices. A checkpoint that cannot be read (no commit marker, a missing
metadata or array file, a truncated file) is reported with a warning and moved aside to
``<step>.unusable-<time>`` (kept for inspection; a resumed run will write that step again), and the previous
one is tried; if none is usable, ``restore_latest`` returns None and training starts from scratch.

Integrity: once a checkpoint is committed, process 0 writes ``<step>/checksums.json`` (SHA-256 of every file of the
step directory; orbax itself verifies nothing), and ``restore`` checks it first, so a silently corrupted file (a
flipped byte, same size) makes the checkpoint unusable like an unreadable one instead of resuming into garbage.
A checkpoint without the file (killed between commit and checksum) restores unverified.

The data stream is a pure function of (seed, step) (``pipeline.train_iterator(start_step=...)``) and the step's
randomness is ``fold_in(state.rng, state.step)``, so the restored state alone resumes the run exactly: no data
iterator state is stored.

Read-only access to any run's checkpoints (export, load_backbone, config.resume, config.init_from) is
``io/restore.py``.

Multi-process stops: ``Checkpointer.reached_preemption`` is JAX's preemption sync point (every process stops at the
same step); ``announce_preemption`` feeds a signal the trainer caught into it (train/trainer.py, ``_StopRequest``).

Python API: ``Checkpointer``, ``abstract_target``, ``config_dict``, ``announce_preemption``, ``preemption_reason``,
``preemption_service_available``; ``COMMIT_MARKER`` (from ``io.restore``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from jax.experimental import multihost_utils

from simdino_jax.errors import CheckpointMismatchError
from simdino_jax.io import restore
from simdino_jax.io.restore import COMMIT_MARKER

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"  # SHA-256 of every file of a committed step directory (module docstring)
_ITEMS = ("state", "config")


def abstract_target(abstract_tree: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves of ``abstract_tree`` (e.g. from ``jax.eval_shape``) with ``shardings``.

  ``shardings`` is one ``jax.sharding.Sharding`` for every leaf, or a pytree of them matching the tree.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree_util.tree_map(lambda _: shardings, abstract_tree)
  return jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings
  )


class Checkpointer:
  """Saves and restores TrainStates in ``directory`` (``DIR/checkpoints``), keeping the newest ``max_to_keep``.

  Every process must construct it and call ``save`` / ``restore_latest`` / ``wait`` at the same points
  (orbax synchronises the processes there); only process 0 writes non-array files.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      cleanup_tmp_directories=True,  # leftovers of a save that was killed midway
      enable_async_checkpointing=async_save,
    )
    _quiet_orbax_info_logs()
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  # -- queries -------------------------------------------------------------------------------------------
  def path(self, step: int) -> str:
    """The directory of the checkpoint of ``step`` (whether or not it exists)."""
    return str(self.directory / str(step))

  def all_steps(self) -> list[int]:
    """Steps of the checkpoints on disk (committed or not; see ``restore_latest``), ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def reached_preemption(self, step: int) -> bool:
    """True when the multi-host preemption service has announced a preemption at ``step`` (TPU pods).

    Must be called by every process at every step: JAX agrees on the step by comparing ``step`` with the sync point
    it computed (the largest step any process had reached when the notice came, plus one). Always False on a single
    host without the service. A notice comes from JAX's own SIGTERM notifier or from ``announce_preemption``.
    """
    return self._manager.reached_preemption(step)

  # -- save ----------------------------------------------------------------------------------------------
  def save(self, step: int, state: Any, config: dict | None = None) -> bool:
    """Start an asynchronous save of ``state`` (and the ``config`` dict as JSON) as checkpoint ``step``.

    Waits for the previous save first. Returns False (and saves nothing) when a checkpoint of ``step`` or a
    later one already exists, e.g. at the end of a run that resumed from its final checkpoint.
    """
    latest = self.latest_step()
    if latest is not None and latest >= step:
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config or {}))
    # force: orbax's own policy may skip a step while the previous save is in flight; we decide when to save.
    started = self._manager.save(step, args=args, force=True)  # waits for the previous save: it is committed now
    self._seal(exclude=step)
    return started

  def wait(self) -> None:
    """Block until every started save is committed (call before exiting or reading the files)."""
    self._manager.wait_until_finished()
    self._seal()

  # -- integrity -----------------------------------------------------------------------------------------
  def _seal(self, exclude: int | None = None) -> None:
    """Writes checksums.json into every committed step directory that lacks it (process 0; ``exclude``: a step
    whose save may still be in flight)."""
    if jax.process_index() != 0:
      return
    for step in self.all_steps():
      step_dir = self.directory / str(step)
      if step != exclude and (step_dir / COMMIT_MARKER).exists() and not (step_dir / CHECKSUMS).exists():
        tmp = step_dir / (CHECKSUMS + ".tmp")
        tmp.write_text(json.dumps(_checksums(step_dir), indent=1, sort_keys=True))
        tmp.replace(step_dir / CHECKSUMS)

  def verify(self, step: int) -> str | None:
    """None if checkpoint ``step`` matches its checksums.json (or has none); else what differs."""
    step_dir = self.directory / str(step)
    path = step_dir / CHECKSUMS
    if not path.exists():
      return None
    want, got = json.loads(path.read_text()), _checksums(step_dir)
    bad = sorted(name for name in want.keys() | got.keys() if want.get(name) != got.get(name))
    if bad:
      return f"{len(bad)} file(s) differ from {CHECKSUMS} (e.g. {bad[0]}): the checkpoint was corrupted after saving"
    return None

  # -- restore -------------------------------------------------------------------------------------------
  def restore(self, step: int, target: Any) -> Any:
    """The state of checkpoint ``step``, placed as ``target``'s ``ShapeDtypeStruct`` leaves say. Raises on failure."""
    missing = [name for name in (COMMIT_MARKER, "state") if not (self.directory / str(step) / name).exists()]
    if missing:
      raise FileNotFoundError(f"{self.path(step)} has no {' or '.join(missing)} (the save did not complete)")
    problem = self.verify(step) if jax.process_index() == 0 else None
    # Every process must refuse together (process 0 checked), or the others would enter orbax's collective restore.
    if bool(multihost_utils.broadcast_one_to_all(np.int32(problem is not None))):
      raise ValueError(f"{self.path(step)}: {problem or 'corrupted (checked by process 0)'}")
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except ValueError as e:
      state = self._restore_without_empty_fields(step, target, e)
    saved_step = getattr(state, "step", None)
    if saved_step is not None and int(np.asarray(jax.device_get(saved_step))) != step:
      raise ValueError(f"{self.path(step)} holds the state of step {int(saved_step)}, not {step}")
    return state

  def _restore_without_empty_fields(self, step: int, target: Any, error: ValueError) -> Any:
    """A checkpoint written before the state gained optional fields (TrainState.gram_teacher, distill_teacher: None
    when off) has no entry for them, and orbax refuses the tree; restored into a dict of the target's other fields
    it is the same state. Any other mismatch raises ``error``."""
    if not dataclasses.is_dataclass(target) or "tree structures do not match" not in str(error):
      raise error
    fields = {f.name: getattr(target, f.name) for f in dataclasses.fields(target)}
    present = {k: v for k, v in fields.items() if v is not None}
    if len(present) == len(fields):
      raise error
    try:
      item = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(present)))["state"]
    except ValueError:
      raise error from None
    return target.replace(**item)

  def restore_config(self, step: int) -> dict:
    """The config dict stored with checkpoint ``step``."""
    return dict(self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])

  def restore_latest(self, target: Any, config: dict | None = None) -> tuple[Any, int] | None:
    """(state, step) of the newest usable checkpoint, restored onto ``target``'s shardings; None if none.

    An unusable checkpoint is reported with a warning, moved aside and the previous one tried. With ``config``
    (the run's config dict), a checkpoint that fails to restore and was written with a different config is
    not taken for a corrupt one: CheckpointMismatchError names the differing fields and nothing is moved. A
    checkpoint that restores despite config differences is used, with a warning listing them.
    """
    for step in reversed(self.all_steps()):
      error = None
      try:
        state = self.restore(step, target)
      except Exception as e:  # pylint: disable=broad-except  (any unreadable checkpoint: try the previous one)
        error = e
        restore.quiet_failed_restore()
      # Every process must agree, or they would restore different steps (and hang in the next collective).
      ok = _all_processes_ok(error is None)
      diff = self._config_diff(step, config) if config is not None else []
      if ok:
        if diff:
          log.warning("resuming from %s, written with a different config: %s", self.path(step), "; ".join(diff))
        return state, step
      reason = f"{type(error).__name__}: {error}" if error is not None else "it failed on another process"
      if diff:
        # The differing fields say why; orbax's tree-structure / array-shape message would not.
        raise CheckpointMismatchError(
          f"{self.path(step)} does not fit this run's config ({'; '.join(diff)}): run with the checkpoint's "
          f"settings, use another --workdir, or move {self.directory} away to start from scratch"
        )
      aside = self._move_aside(step)
      log.warning(
        "checkpoint %s is unusable (%s); moved it to %s and falling back to the previous checkpoint",
        self.path(step),
        restore.first_line(reason),
        aside,
      )
    if self.all_steps() or any(self.directory.glob("*.unusable-*")):
      log.warning("no usable checkpoint in %s; starting from scratch", self.directory)
    return None

  def _config_diff(self, step: int, config: dict) -> list[str]:
    """'field: checkpoint A, this run B' for each config field that differs (``restore.config_diff``; empty if the
    stored config is unreadable)."""
    try:
      stored = self.restore_config(step)
    except Exception:  # pylint: disable=broad-except  (no readable config: nothing to compare)
      return []
    return restore.config_diff(stored, config)

  def move_aside_after(self, step: int) -> list[str]:
    """Moves the checkpoints later than ``step`` aside (``N.superseded-TIME``: kept, no longer resumed from), so that
    a run restarted from ``step`` can write those steps again; returns where they went."""
    return [self._move_aside(s, "superseded") for s in self.all_steps() if s > step]

  def _move_aside(self, step: int, why: str = "unusable") -> str:
    src = self.directory / str(step)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dst, n = self.directory / f"{step}.{why}-{stamp}", 1
    while dst.exists():  # the same step moved aside twice within a second
      dst, n = self.directory / f"{step}.{why}-{stamp}-{n}", n + 1
    if jax.process_index() == 0 and src.exists():
      src.rename(dst)
    multihost_utils.sync_global_devices(f"simdino_jax checkpoint moved aside {step}")
    self._manager.reload()  # forget the step, so that it can be written again
    return str(dst)

  def close(self) -> None:
    """Wait for pending saves and release orbax's resources."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# -- multi-process stop: JAX's preemption sync service -----------------------------------------------------------
# JAX's preemption notifier (xla/pjrt/distributed/preemption/preemption_sync_manager.cc) writes this key, holding the
# time of death in RFC 3339, into the coordination service when its process gets SIGTERM; every process's sync manager
# watches the key, and on it they exchange their step counters and agree on one step (``reached_preemption``).
# Writing the key ourselves is how a signal the trainer catches (SIGINT, or SIGTERM once the trainer's own handler
# replaced JAX's) reaches the same protocol; tests/test_multihost_signals.py checks it still does.
_PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"
_STOP_REASON_KEY = "simdino_jax/stop_reason"  # who asked, for process 0's log line


def _distributed_state():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  return distributed.global_state


def preemption_service_available() -> bool:
  """Whether this process runs JAX's preemption sync service (several processes, jax_enable_preemption_service)."""
  state = _distributed_state()
  return state.client is not None and state.preemption_sync_manager is not None


def announce_preemption(reason: str) -> bool:
  """Announces a stop to every process through JAX's preemption sync service, as JAX's SIGTERM notifier would: each
  process's ``reached_preemption`` then turns True at one agreed step. ``reason`` (e.g. "SIGINT on process 1") is
  what ``preemption_reason`` returns on every process; the first announcement wins. False without the service.

  Call it only once this process has called ``reached_preemption`` in its loop: a process that has not yet counted a
  step offers 0 to the agreement, and a sync point below the first step of a resumed run would never be reached.
  """
  if not preemption_service_available():
    return False
  client = _distributed_state().client
  for key, value in (
    (_STOP_REASON_KEY, reason),
    (_PREEMPTION_NOTICE_KEY, time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())),
  ):
    try:
      client.key_value_set(key, value)
    except Exception:  # pylint: disable=broad-except  (ALREADY_EXISTS: another process announced first)
      pass
  return True


def preemption_reason() -> str | None:
  """The ``reason`` of the first ``announce_preemption`` of this run; None when none was made (a notice from JAX's
  own SIGTERM notifier, a TPU maintenance event)."""
  if not preemption_service_available():
    return None
  try:
    return _distributed_state().client.key_value_try_get(_STOP_REASON_KEY)
  except Exception:  # pylint: disable=broad-except  (NOT_FOUND)
    return None


class _OrbaxInfoFilter(logging.Filter):
  """Drops orbax's INFO records (about 50 per save) unless absl's verbosity asks for more (--verbosity=1)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    return absl_logging.get_verbosity() > absl_logging.INFO


def _quiet_orbax_info_logs() -> None:
  absl_logger = logging.getLogger("absl")  # orbax logs through absl.logging, i.e. this logger
  if not any(isinstance(f, _OrbaxInfoFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxInfoFilter())


def _checksums(step_dir: epath.Path) -> dict[str, str]:
  """{path relative to ``step_dir``: SHA-256} of every file under it but the checksum file itself."""
  out = {}

  def walk(directory: epath.Path, prefix: str) -> None:  # epath has no recursive glob on object stores
    for path in sorted(directory.iterdir(), key=lambda p: p.name):
      rel = prefix + path.name
      if path.is_dir():
        walk(path, rel + "/")
      elif rel not in (CHECKSUMS, CHECKSUMS + ".tmp"):
        digest = hashlib.sha256()
        with path.open("rb") as f:
          for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
        out[rel] = digest.hexdigest()

  walk(step_dir, "")
  return out


def _all_processes_ok(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def config_dict(config) -> dict:
  """A JSON-able dict of an ``ml_collections.ConfigDict`` (tuples become lists)."""
  return json.loads(config.to_json_best_effort())
