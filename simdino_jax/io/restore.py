"""Read-only access to any run's checkpoints: export, load_backbone, ``config.resume`` and ``config.init_from``.

No orbax CheckpointManager here (its start-up deletes unfinished saves, ``*.orbax-checkpoint-tmp-*``, i.e. those of
a run training into that workdir right now), so nothing is cleaned up, moved aside or written: reading a run that
is training is safe. The Checkpointer of a run's own checkpoints (saving, resuming past unusable ones) is
``io/checkpointing.py``.

What to read is taken from the checkpoint itself (orbax's tree metadata: names, shapes, dtypes), not from a network
built from the stored config, so this module needs nothing from ``methods``: ``restore_params`` reads one network's
parameters of whatever model wrote the checkpoint.

A checkpoint that does not fit the run restoring it is reported by the config fields that differ between the
checkpoint's stored config and this run's (``config.model.depth: checkpoint 4, this run 6``), not by orbax's
tree-structure or array-shape message (``config_diff``).

Python API: ``committed_steps``, ``find_checkpoint`` (config.resume / config.init_from paths), ``stored_config``,
``restore_params`` (one network's parameters on the host), ``restore_external`` (a whole TrainState:
config.resume), ``load_init_arrays`` / ``match_init_arrays`` (config.init_from), ``config_diff``, ``first_line``,
``quiet_failed_restore``; ``COMMIT_MARKER``, ``WHICH``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from simdino_jax.errors import CheckpointMismatchError, ExportError, InteropError, ResumeError
from simdino_jax.io import torch_interop, torchvision_resnet

COMMIT_MARKER = "commit_success.txt"  # orbax writes it into the step directory as the last act of a save
WHICH = ("teacher", "student")  # the networks of a TrainState that restore_params reads
# Config fields that shape the TrainState: listed first when a checkpoint does not fit (the others, a seed or a
# schedule length, cannot make a restore fail). Fields naming where the state comes from are never listed.
# gram.enabled / distill.enabled decide whether TrainState.gram_teacher / distill_teacher exist (their other fields,
# a weight or a schedule, do not shape the state; distill.teacher's shapes come, on a resume, from the workdir's
# distill_teacher.json, not from the path).
_STATE_FIELDS = (
  "config.method",
  "config.model.",
  "config.head.",
  "config.dino.",
  "config.vmf.",
  "config.loss.",
  "config.optim.",
  "config.masking.",
  "config.teacher.",
  "config.gram.enabled",
  "config.distill.enabled",
)
_SOURCE_FIELDS = ("config.resume", "config.init_from", "config.restart_from_step")


# -- helpers shared with io/checkpointing.py ----------------------------------------------------------------------
def first_line(text: str, limit: int = 300) -> str:
  """The first line of ``text``, cut at ``limit`` characters (orbax's messages run over many lines)."""
  line = text.strip().splitlines()[0] if text.strip() else text
  return line if len(line) <= limit else line[:limit] + "..."


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


def config_diff(stored: Mapping, config: Mapping, *, limit: int = 12) -> list[str]:
  """'config.X.Y: checkpoint A, this run B' for each field that differs between a checkpoint's stored config and
  this run's (both JSON dicts). The fields that shape the state (model, head, loss, optimizer ...) come first and
  alone when any differs; the ones naming where the state comes from (resume, init_from) are left out."""
  diffs = [(k, a, b) for k, a, b in _flat_diff(dict(stored), dict(config)) if not k.startswith(_SOURCE_FIELDS)]
  state = [d for d in diffs if d[0] == "config.method" or d[0].startswith(_STATE_FIELDS[1:])]
  lines = [f"{k}: checkpoint {_short(a)}, this run {_short(b)}" for k, a, b in (state or diffs)]
  return lines if len(lines) <= limit else lines[:limit] + [f"... ({len(lines) - limit} more)"]


def quiet_failed_restore() -> None:
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


class _MissingMetadataFilter(logging.Filter):
  """orbax's 'Metadata file does not exist: .../state/_CHECKPOINT_METADATA' warning: that file is written per step
  directory, never per item, so reading an item's tree metadata always logs it."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Metadata file does not exist")


# -- finding checkpoints --------------------------------------------------------------------------------------------
def committed_steps(directory: str | os.PathLike) -> list[int]:
  """Steps under ``directory`` (a ``checkpoints/`` directory) whose save completed: orbax's commit marker and the
  state item present. Ascending."""
  return sorted(
    int(p.name)
    for p in epath.Path(directory).iterdir()
    if p.name.isdigit() and (p / COMMIT_MARKER).exists() and (p / "state").exists()
  )


def find_checkpoint(path: str, field: str = "config.resume") -> epath.Path:
  """The committed step directory ``path`` designates: a workdir (its newest checkpoint), a ``checkpoints/``
  directory (its newest) or one ``checkpoints/<step>`` directory. ResumeError naming ``field`` otherwise."""
  root = epath.Path(path)
  if not root.exists():
    raise ResumeError(f"{field}: {path} does not exist")
  if root.is_file():
    raise ResumeError(
      f"{field}: {path} is a file; resuming needs a run's checkpoint (workdir, checkpoints/ or checkpoints/<step>: "
      "the optimizer state and the step), a weights file starts a new run with config.init_from"
    )
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


def stored_config(step_dir: str | os.PathLike, workdir: str | os.PathLike | None = None) -> dict:
  """The config stored with the checkpoint in ``step_dir`` (orbax JSON item ``config``), else
  ``workdir/config.json``; ExportError when neither is readable."""
  step_dir = epath.Path(step_dir)
  try:
    config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "config", args=ocp.args.JsonRestore())
  except Exception:  # pylint: disable=broad-except  (no or unreadable stored config: use the workdir's copy)
    config = None
  if config:
    return dict(config)
  path = epath.Path(workdir if workdir is not None else step_dir.parent.parent) / "config.json"
  if not path.exists():
    raise ExportError(f"checkpoint {step_dir} has no readable stored config and {path} does not exist")
  return json.loads(path.read_text())


# -- one network's parameters ---------------------------------------------------------------------------------------
def _stored_tree(state_dir: epath.Path) -> dict:
  """The nested dict of orbax's array metadata (shape, dtype) of a saved state item."""
  absl_logger = logging.getLogger("absl")
  quiet = _MissingMetadataFilter()
  absl_logger.addFilter(quiet)
  try:
    return ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  finally:
    absl_logger.removeFilter(quiet)


def _param_name(path: tuple) -> str:
  """A stored leaf's slash name; an nnx Variable is saved as a dict holding ``value``, which names nothing."""
  name = "/".join(str(getattr(k, "key", k)) for k in path)
  return name[: -len("/value")] if name.endswith("/value") else name


def restore_params(
  workdir: str, *, which: str = "teacher", step: int | None = None, with_head: bool = False
) -> tuple[dict[str, np.ndarray], int, dict]:
  """({name: array}, step, config dict) of the ``which`` network of a checkpoint of ``workdir``, on the host.

  The newest committed checkpoint unless ``step`` is given. Names are slash paths starting with ``backbone/``
  (and ``head/``, ``patch_head/`` with ``with_head``). Only those parameters (and the step) are read: no optimizer
  state, no data source; their names and shapes come from the checkpoint's own metadata. Raises ExportError naming
  the path when there is nothing to read.
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

  step_dir = directory / str(step)
  config = stored_config(step_dir, workdir)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  try:
    stored = _stored_tree(step_dir / "state")
    network = stored[which]
    subtree = dict(network) if with_head else {"backbone": network["backbone"]}
    target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu), {"step": stored["step"], which: subtree}
    )
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    # A partial restore: only `which` (and the step) are read.
    restored = ocp.PyTreeCheckpointer().restore(
      step_dir / "state", args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    )
  except Exception as e:  # pylint: disable=broad-except  (re-raised with the path and the likely cause)
    raise ExportError(
      f"could not read the {which} parameters of {step_dir} "
      f"({type(e).__name__}: {first_line(str(e) or type(e).__name__)})"
    ) from e
  saved_step = int(np.asarray(restored["step"]))
  if saved_step != step:
    raise ExportError(f"{step_dir} holds the state of step {saved_step}, not {step}")
  leaves = jax.tree_util.tree_flatten_with_path(restored[which])[0]
  arrays = {_param_name(p): np.asarray(a) for p, a in leaves}
  return arrays, step, config


# -- config.resume ----------------------------------------------------------------------------------------------------
def restore_external(path: str, target: Any, config: Mapping | None = None) -> tuple[Any, int, str]:
  """(state, step, step directory) of the checkpoint ``path`` designates (``find_checkpoint``), restored onto
  ``target``'s shapes and shardings. Read-only: nothing in that run's directory is moved, cleaned up or written.

  With ``config`` (this run's config as a JSON dict), a checkpoint that does not fit is reported by the config
  fields that differ (CheckpointMismatchError, ``config.resume: ...``)."""
  step_dir = find_checkpoint(path)
  try:
    with ocp.StandardCheckpointer() as reader:
      state = reader.restore(step_dir / "state", target)
  except Exception as e:  # pylint: disable=broad-except  (re-raised naming the path and the likely cause)
    quiet_failed_restore()  # the failed read's pending callbacks: noise, as in Checkpointer.restore_latest
    diff = []
    if config is not None:
      try:
        diff = config_diff(stored_config(step_dir), config)
      except ExportError:  # no stored config to compare: orbax's reason below
        pass
    if diff:
      raise CheckpointMismatchError(
        f"config.resume: {step_dir} was written with another model or state ({'; '.join(diff)}); resume with the "
        "checkpoint's settings, or start a new run from its weights with config.init_from"
      ) from None
    raise ResumeError(
      f"config.resume: {step_dir} does not fit this run's state (a different model, head, method or "
      f"optimizer?): {type(e).__name__}: {first_line(str(e) or type(e).__name__)}"
    ) from e
  return state, int(np.asarray(jax.device_get(state.step))), str(step_dir)


# -- config.init_from -------------------------------------------------------------------------------------------------
def load_init_arrays(path: str, which: str = "teacher") -> tuple[dict[str, np.ndarray], str]:
  """({name: array}, description) of the weights ``config.init_from`` names: any weights file ``load_backbone``
  reads (our export in either layout, .safetensors / .npz, or an official PyTorch state dict: .pth with PyTorch
  installed, or its .safetensors / .npz; ``torch_interop.named_arrays``), or a workdir / checkpoint directory (the
  ``which`` network of its newest checkpoint, backbone and heads). Names are slash paths such as
  ``backbone/blocks/0/attn/qkv/kernel`` and ``head/mlp/0/kernel``, in our layout."""
  root = epath.Path(path)
  if not root.exists():
    raise ResumeError(f"config.init_from: {path} does not exist")
  if root.is_file():
    try:
      arrays, layout = torch_interop.named_arrays(str(root), which=which)
    except (ExportError, InteropError) as e:
      try:  # a torchvision / DINO ResNet state dict (a ResNet run's --format=torch export, DINO's resnet50 files)
        resnet = torchvision_resnet.load_resnet_state_dict(str(root), which=which)
      except (ExportError, InteropError):
        raise ResumeError(f"config.init_from: {e}") from None
      return {f"backbone/{k}": v for k, v in resnet.params.items()}, f"torchvision ResNet weights file {path}"
    return arrays, f"{layout} weights file {path}"
  step_dir = find_checkpoint(path, "config.init_from")
  workdir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent
  try:
    arrays, step, _ = restore_params(str(workdir), which=which, step=int(step_dir.name), with_head=True)
  except ExportError as e:
    raise ResumeError(f"config.init_from: {e}") from None
  return arrays, f"{which} of {step_dir} (step {step})"


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
