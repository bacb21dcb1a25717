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

Read-only access to any run's checkpoints (no CheckpointManager, so nothing is cleaned up or moved aside, which
makes reading a run that is training right now safe): ``committed_steps``, ``find_checkpoint`` (config.resume /
config.init_from paths), ``restore_params`` (one network's parameters on the host: export, load_backbone,
init_from), ``restore_external`` (a whole TrainState: config.resume) and ``load_init_arrays`` /
``match_init_arrays`` (config.init_from).

Multi-process stops: ``Checkpointer.reached_preemption`` is JAX's preemption sync point (every process stops at the
same step); ``announce_preemption`` feeds a signal the trainer caught into it (train/trainer.py, ``_StopRequest``).

Python API: ``Checkpointer``, ``abstract_target``, ``config_dict``, ``committed_steps``, ``find_checkpoint``,
``restore_params``, ``restore_external``, ``load_init_arrays``, ``match_init_arrays``, ``announce_preemption``,
``preemption_reason``, ``preemption_service_available``; ``COMMIT_MARKER``, ``WHICH``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from simdino_jax import methods
from simdino_jax.errors import CheckpointMismatchError, ExportError, ResumeError
from simdino_jax.io import formats
from simdino_jax.tree import named_leaves

log = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"  # orbax writes it into the step directory as the last act of a save
CHECKSUMS = "checksums.json"  # SHA-256 of every file of a committed step directory (module docstring)
_ITEMS = ("state", "config")
WHICH = ("teacher", "student")  # the networks of a TrainState that restore_params reads


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
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    state = restored["state"]
    saved_step = getattr(state, "step", None)
    if saved_step is not None and int(np.asarray(jax.device_get(saved_step))) != step:
      raise ValueError(f"{self.path(step)} holds the state of step {int(saved_step)}, not {step}")
    return state

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
        _quiet_closed_loop_callbacks()
      # Every process must agree, or they would restore different steps (and hang in the next collective).
      ok = _all_processes_ok(error is None)
      diff = self._config_diff(step, config) if config is not None else []
      if ok:
        if diff:
          log.warning("resuming from %s, written with a different config: %s", self.path(step), "; ".join(diff))
        return state, step
      reason = f"{type(error).__name__}: {error}" if error is not None else "it failed on another process"
      if diff:
        raise CheckpointMismatchError(
          f"{self.path(step)} does not fit this run's config (it was written with {'; '.join(diff)}) and "
          f"restoring it failed ({_first_line(reason)}). Use another --workdir, or move {self.directory} "
          "away to start from scratch."
        )
      aside = self._move_aside(step)
      log.warning(
        "checkpoint %s is unusable (%s); moved it to %s and falling back to the previous checkpoint",
        self.path(step),
        _first_line(reason),
        aside,
      )
    if self.all_steps() or any(self.directory.glob("*.unusable-*")):
      log.warning("no usable checkpoint in %s; starting from scratch", self.directory)
    return None

  def _config_diff(self, step: int, config: dict) -> list[str]:
    """'field: checkpoint value -> run value' for each config field that differs (empty if unreadable)."""
    try:
      stored = self.restore_config(step)
    except Exception:  # pylint: disable=broad-except  (no readable config: nothing to compare)
      return []
    diff = [f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in _flat_diff(stored, config)]
    return diff if len(diff) <= 12 else diff[:12] + [f"... ({len(diff) - 12} more)"]

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


def _quiet_closed_loop_callbacks() -> None:
  """Silence the stderr noise of a failed restore's orphaned reads (the failure itself is reported once).

  When one array of a checkpoint cannot be read, orbax abandons the other reads: their coroutines are dropped
  and tensorstore's completions hit a closed event loop, each printing a traceback ("Event loop is closed",
  "Exception ignored in: <coroutine ...>"), hundreds in all. Every other unraisable error reaches the previous
  hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_simdino_quiet", False):
    return

  def hook(unraisable):
    exc, obj = unraisable.exc_value, unraisable.object
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    code = getattr(obj, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return
    previous(unraisable)

  hook._simdino_quiet = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_AbandonedReadFilter())


class _AbandonedReadFilter(logging.Filter):
  """asyncio's 'Future exception was never retrieved' reports of a failed restore's abandoned reads."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    abandoned = message.startswith(("Future exception was never retrieved", "Task exception was never retrieved"))
    return not (abandoned and ("tensorstore" in message or "orbax" in message))


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


def _flat_diff(a: Any, b: Any, prefix: str = "config") -> list[tuple[str, Any, Any]]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b), key=str):
      out += _flat_diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}.{k}")
    return out
  return [] if a == b else [(prefix, a, b)]


def _short(value: Any, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


def _all_processes_ok(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _first_line(text: str, limit: int = 300) -> str:
  line = text.strip().splitlines()[0] if text.strip() else text
  return line if len(line) <= limit else line[:limit] + "..."


def config_dict(config) -> dict:
  """A JSON-able dict of an ``ml_collections.ConfigDict`` (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


# -- read-only: any run's checkpoints (export, load_backbone, config.resume, config.init_from) -----------------------
def committed_steps(directory: str | os.PathLike) -> list[int]:
  """Steps under ``directory`` (a ``checkpoints/`` directory) whose save completed: orbax's commit marker and the
  state item present. Ascending."""
  return sorted(
    int(p.name)
    for p in epath.Path(directory).iterdir()
    if p.name.isdigit() and (p / COMMIT_MARKER).exists() and (p / "state").exists()
  )


def _stored_config(step_dir: epath.Path, workdir: str) -> dict:
  """The config stored with the checkpoint in ``step_dir`` (orbax JSON item ``config``), else workdir/config.json."""
  try:
    config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "config", args=ocp.args.JsonRestore())
  except Exception:  # pylint: disable=broad-except  (no or unreadable stored config: use the workdir's copy)
    config = None
  if config:
    return dict(config)
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise ExportError(f"checkpoint {step_dir} has no readable stored config and {path} does not exist")
  return json.loads(path.read_text())


def restore_params(
  workdir: str, *, which: str = "teacher", step: int | None = None, with_head: bool = False
) -> tuple[dict[str, np.ndarray], int, dict]:
  """({name: array}, step, config dict) of the ``which`` network of a checkpoint of ``workdir``, on the host.

  The newest committed checkpoint unless ``step`` is given. Names are slash paths starting with ``backbone/``
  (and ``head/``, ``patch_head/`` with ``with_head``). Only those parameters (and the step) are read: no optimizer
  state, no data source. The restore target is ``methods.build_network`` of the stored config. Raises ExportError
  naming the path when there is nothing to read.
  """
  if which not in WHICH:
    raise ExportError(f"which must be one of {WHICH}, got {which!r}")
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise ExportError(f"no checkpoints to export: {directory} does not exist (train into {workdir} first)")
  steps = committed_steps(directory)
  if not steps:
    raise ExportError(f"no checkpoints to export: {directory} holds no committed checkpoint")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ExportError(f"no committed checkpoint of step {step} in {directory}; available steps: {steps}")

  # Read-only: no orbax CheckpointManager here, whose start-up deletes unfinished saves ("*.orbax-checkpoint-tmp-*"),
  # i.e. those of a training run writing into the same workdir right now.
  step_dir = directory / str(step)
  config = _stored_config(step_dir, workdir)
  abstract = nnx.eval_shape(lambda: methods.build_network(ml_collections.ConfigDict(config)))
  params = nnx.split(abstract)[1]
  subtree = params if with_head else {"backbone": params["backbone"]}
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  target = {"step": jax.ShapeDtypeStruct((), np.int32, sharding=cpu), which: abstract_target(subtree, cpu)}
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  try:  # a partial restore: only `which` (and the step) are read
    restored = ocp.PyTreeCheckpointer().restore(
      step_dir / "state", args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    )
  except Exception as e:  # pylint: disable=broad-except  (re-raised with the path and the likely cause)
    raise ExportError(
      f"could not read the {which} parameters of {step_dir} with the network of its config "
      f"({type(e).__name__}: {_first_line(str(e) or type(e).__name__)})"
    ) from e
  saved_step = int(np.asarray(restored["step"]))
  if saved_step != step:
    raise ExportError(f"{step_dir} holds the state of step {saved_step}, not {step}")
  arrays = {name: np.asarray(a) for name, a in named_leaves(restored[which]).items()}
  return arrays, step, config


def find_checkpoint(path: str, field: str = "config.resume") -> epath.Path:
  """The committed step directory ``path`` designates: a workdir (its newest checkpoint), a ``checkpoints/``
  directory (its newest) or one ``checkpoints/<step>`` directory. ResumeError naming ``field`` otherwise."""
  root = epath.Path(path)
  if not root.exists():
    raise ResumeError(f"{field}: {path} does not exist")
  if root.name.isdigit() and (root / "state").exists():
    if not (root / COMMIT_MARKER).exists():
      raise ResumeError(f"{field}: {path} has no {COMMIT_MARKER} (its save did not complete)")
    return root
  for directory in (root / "checkpoints", root):
    if directory.is_dir():
      steps = committed_steps(directory)
      if steps:
        return directory / str(steps[-1])
  raise ResumeError(
    f"{field}: {path} holds no committed checkpoint (expected a workdir with checkpoints/<step>/, "
    "a checkpoints/ directory or one checkpoints/<step> directory)"
  )


def restore_external(path: str, target: Any) -> tuple[Any, int, str]:
  """(state, step, step directory) of the checkpoint ``path`` designates (``find_checkpoint``), restored onto
  ``target``'s shapes and shardings. Read-only: nothing in that run's directory is moved, cleaned up or written."""
  step_dir = find_checkpoint(path)
  try:
    with ocp.StandardCheckpointer() as reader:
      state = reader.restore(step_dir / "state", target)
  except Exception as e:  # pylint: disable=broad-except  (re-raised naming the path and the likely cause)
    _quiet_closed_loop_callbacks()  # the failed read's pending callbacks: noise, as in restore_latest
    raise ResumeError(
      f"config.resume: {step_dir} does not fit this run's state (a different model, head, method or "
      f"optimizer?): {type(e).__name__}: {_first_line(str(e) or type(e).__name__)}"
    ) from e
  return state, int(np.asarray(jax.device_get(state.step))), str(step_dir)


def load_init_arrays(path: str) -> tuple[dict[str, np.ndarray], str]:
  """({name: array}, description) of the weights ``config.init_from`` names: an exported ``.npz`` / ``.safetensors``
  file (``simdino_jax.export``) or a workdir / checkpoint directory (the teacher of its newest checkpoint, backbone
  and heads). Names are slash paths such as ``backbone/blocks/0/attn/qkv/kernel`` and ``head/mlp/0/kernel``."""
  root = epath.Path(path)
  if not root.exists():
    raise ResumeError(f"config.init_from: {path} does not exist")
  if root.is_file():
    try:
      return formats.load_arrays(str(root)), f"exported file {path}"
    except ExportError as e:
      raise ResumeError(f"config.init_from: {e}") from None
  step_dir = find_checkpoint(path, "config.init_from")
  workdir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent
  try:
    arrays, step, _ = restore_params(str(workdir), which="teacher", step=int(step_dir.name), with_head=True)
  except ExportError as e:
    raise ResumeError(f"config.init_from: {e}") from None
  return arrays, f"teacher of {step_dir} (step {step})"


def match_init_arrays(params: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Which of ``arrays`` initialise the network whose leaves are ``params`` ({name: array-like}).

  Every ``backbone/`` leaf must be present with the same shape (ResumeError naming the first parameter that is
  missing or differs). A head (``head/``, ``patch_head/``) is loaded whole when all its leaves are present with
  equal shapes, else it keeps its fresh initialisation. Returns ({name: float array to load}, notes on the heads)."""
  out, notes = {}, []
  backbone = sorted(n for n in params if n.startswith("backbone/"))
  for name in backbone:
    if name not in arrays:
      raise ResumeError(
        f"config.init_from: parameter {name} {tuple(np.shape(params[name]))} is not in the source "
        f"(it has {len([a for a in arrays if a.startswith('backbone/')])} backbone arrays)"
      )
    if tuple(np.shape(arrays[name])) != tuple(np.shape(params[name])):
      raise ResumeError(
        f"config.init_from: parameter {name} has shape {tuple(np.shape(arrays[name]))} in the source, "
        f"{tuple(np.shape(params[name]))} in this run's network (check model.variant, "
        "model.img_size, model.num_registers, ...)"
      )
    out[name] = arrays[name]
  for prefix in sorted({n.split("/", 1)[0] for n in params} - {"backbone"}):
    names = sorted(n for n in params if n.startswith(prefix + "/"))
    bad = [n for n in names if n not in arrays or tuple(np.shape(arrays[n])) != tuple(np.shape(params[n]))]
    if bad:
      notes.append(
        f"{prefix} not loaded ({bad[0]}: "
        f"{'absent' if bad[0] not in arrays else tuple(np.shape(arrays[bad[0]]))} in the source, "
        f"{tuple(np.shape(params[bad[0]]))} here)"
      )
    else:
      out.update({n: arrays[n] for n in names})
      notes.append(f"{prefix} loaded")
  return out, notes
