"""``config.distill``: the frozen teacher of a distillation run: its network config, its weights, its place in the state.

What the official recipes do (the reference for this file):
  DINOv2 (Oquab et al. 2023, "Distillation"): "we use a larger model as a frozen teacher, keep a spare EMA of the
  student that we use as our final model, remove the masking and stochastic depth, and apply the iBOT loss on the
  two global crops".
  DINOv3 ``train/ssl_meta_arch.py`` (``_setup_distillation``, ``get_student_output``): the teacher is built from its
  own config file and loaded from ``distillation.checkpoint_path`` (its loss centres skipped); ``model_ema`` stays
  the student's EMA; it asserts equal DINO and iBOT prototype counts and an equal patch size; the student's global
  crops go in unmasked (``masks=None`` when distilling) while the iBOT head still reads the masked positions.

Here the student keeps its method's own loss (``train/step.py``): its targets (``teacher_out``) come from the frozen
teacher's network on ``TrainState.distill_teacher`` instead of the EMA, and ``state.teacher`` stays the EMA of the
student (what the evaluators, export and init_from read). The teacher is any network of ours whose head outputs
what the student's head outputs:
  ``teacher_config(config)``  the student's config with the source's ``model`` and ``head`` blocks (the method, data
                              and masks stay the student's), checked against the student in one line each;
  ``load_arrays(config, like)``  the teacher's {name: array} from a workdir of ours (its EMA teacher, backbone and
                              heads), an export of ours with ``--with_head`` or an official checkpoint (teacher
                              backbone and head: DINO's ``head.*`` or DINOv2's ``dino_head.*`` / ``ibot_head.*``);
  ``fill(setup, state, shardings, log)``  a fresh state with the teacher's weights in ``distill_teacher``.

The frozen teacher is CHECKPOINTED with the state (``distill_teacher`` is a TrainState leaf, sharded by the same
``config.sharding.rules`` as the EMA teacher) and its network config recorded in ``DIR/distill_teacher.json`` at the
fresh start: a resumed run needs nothing but its own workdir, so the source may be moved, retrained or deleted
without changing the run, at the cost of the teacher's size in every checkpoint (reloading it at each resume would
make an exact resume depend on a file outside the workdir).
"""

from __future__ import annotations

import json
import os
import re
import runpy
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from simdino_jax import config as config_lib
from simdino_jax import methods
from simdino_jax.errors import ConfigError, ExportError, InteropError, ResumeError
from simdino_jax.io import restore, torch_interop
from simdino_jax.models.network import backbone_kwargs
from simdino_jax.models.vit import parse_variant
from simdino_jax.tree import map_with_name, named_leaves

FIELD = "config.distill.teacher"
RECORD = "distill_teacher.json"  # in the workdir: the frozen teacher's network config, as read at the fresh start
# Wrappers an official checkpoint puts before its keys (DDP, torch.compile) and the network it holds.
_WRAPPERS = ("module.", "_orig_mod.", "teacher.")


# ---- the teacher's config -------------------------------------------------------------------------------------
def _recipe(path: str) -> dict:
  """The config a ``distill.teacher_config`` file names: a configs/*.py recipe (its get_config()) or a JSON config."""
  if not os.path.isfile(path):
    raise ConfigError(f"config.distill.teacher_config: {path} does not exist")
  if path.endswith(".py"):
    return runpy.run_path(path)["get_config"]().to_dict()
  try:
    return json.loads(epath.Path(path).read_text())
  except ValueError as e:
    raise ConfigError(
      f"config.distill.teacher_config: {path} is neither a .py recipe nor a JSON config ({e})"
    ) from None


def _stored(path: str) -> dict | None:
  """The config stored with the source: a checkpoint's (or its workdir's config.json), an export's metadata."""
  root = epath.Path(path)
  if not root.exists():
    raise ConfigError(f"{FIELD}: {path} does not exist")
  if root.is_dir():
    try:
      return restore.stored_config(restore.find_checkpoint(path, FIELD))
    except ExportError:
      return None
  try:
    metadata = torch_interop.read_state_dict(path)[1]
  except InteropError as e:
    raise ConfigError(f"{FIELD}: {e}") from None
  return json.loads(metadata["config"]) if metadata.get("config") else None


def recorded(workdir: str | None) -> dict | None:
  """The teacher's config a run recorded at its fresh start (``RECORD``), when ``workdir`` holds a committed
  checkpoint to resume: a resumed run then needs nothing from the source (module docstring); else None."""
  if not workdir:
    return None
  root = epath.Path(workdir)
  has_checkpoint = (root / "checkpoints").is_dir() and restore.committed_steps(root / "checkpoints")
  return json.loads((root / RECORD).read_text()) if has_checkpoint and (root / RECORD).exists() else None


def record(setup, workdir: str) -> None:
  """Writes the frozen teacher's config into ``workdir`` (process 0, at a fresh start); nothing without distill."""
  if setup.distill_config is not None:
    (epath.Path(workdir) / RECORD).write_text(setup.distill_config.to_json_best_effort(indent=2))


def teacher_config(config: ml_collections.ConfigDict, source: dict | None = None) -> ml_collections.ConfigDict:
  """The frozen teacher's network config: ``config`` with the model and head blocks of ``source`` (a config dict;
  default: the one config.distill names) (compute dtype and remat the student's, no drop path: the teacher runs
  deterministically). ConfigError in one line when the teacher cannot give the student its targets: another head
  output, another patch size for a masked method, no config."""
  d = config.distill
  if source is None:
    source = _recipe(d.teacher_config) if d.teacher_config else _stored(d.teacher)
  if source is None:
    raise ConfigError(
      f"config.distill.teacher_config: {d.teacher} carries no config (official weights?): name the teacher's "
      "recipe, e.g. --config.distill.teacher_config=configs/simdino_vitb16_in1k.py"
    )
  stored = config_lib.from_dict(source)
  tcfg = ml_collections.ConfigDict(config.to_dict())
  tcfg.model, tcfg.head = stored.model, stored.head
  tcfg.model.update(dtype=config.model.dtype, remat=config.model.remat, drop_path_rate=0.0)
  if tcfg.model.get("arch", "vit") != "vit":
    raise ConfigError(f"{FIELD}: its model.arch is {tcfg.model.arch!r}; the frozen teacher must be a ViT")
  method = methods.get_method(config.method)
  fields = ["num_prototypes"] if method.prototypes else ["out_dim"]
  if methods.patch_head_needed(config) and method.prototypes:
    fields.append("patch_num_prototypes")
  for f in fields:
    mine, theirs = config.head[f], tcfg.head[f]
    if f == "patch_num_prototypes":  # 0: the same as num_prototypes
      mine, theirs = mine or config.head.num_prototypes, theirs or tcfg.head.num_prototypes
    if mine != theirs:
      raise ConfigError(
        f"config.head.{f}: {mine} differs from the frozen teacher's {theirs} ({FIELD}={d.teacher}); the student's "
        f"head must output what the teacher's does (--config.head.{f}={theirs})"
      )
  patch, tpatch = (parse_variant(c.model.variant)["patch_size"] for c in (config, tcfg))
  if method.uses_masks and patch != tpatch:
    raise ConfigError(
      f"config.model.variant: patch size {patch} differs from the frozen teacher's {tpatch} ({FIELD}={d.teacher}); "
      f"method {config.method!r} aligns patch tokens, which needs the same patch grid (DINOv3 asserts it too)"
    )
  return tcfg


# ---- the teacher's weights ------------------------------------------------------------------------------------
def _official(path: str, like: dict) -> dict[str, np.ndarray]:
  """An official checkpoint's teacher (backbone + head) in our names: DINO's MultiCropWrapper (``head.*``) or
  DINOv2's SSLMetaArch (``dino_head.*``, ``ibot_head.*``), wrappers stripped, DINOv2's block chunks undone; a DINO
  v1 backbone's absent mask token is zeros (as torch_interop.load_state_dict)."""
  like = {name: np.zeros(np.shape(leaf), np.float32) for name, leaf in like.items()}
  obj = torch_interop.read_state_dict(path)[0]
  for key in ("teacher", "model", "state_dict"):
    if isinstance(obj.get(key), dict):
      obj = obj[key]
  state = {}
  for k, v in obj.items():
    while k.startswith(_WRAPPERS):
      k = k.split(".", 1)[1]
    state[re.sub(r"^backbone\.blocks\.\d+\.(\d+)\.", r"backbone.blocks.\1.", k)] = v
  head = "dino_head" if any(k.startswith("dino_head.") for k in state) else "head"
  return torch_interop.network_from_torch(state, like, head=head, patch_head="ibot_head")


def load_arrays(config: ml_collections.ConfigDict, like: dict[str, Any]) -> tuple[dict[str, np.ndarray], str]:
  """({name: array}, description) of the frozen teacher's parameters, one for each name of ``like`` (the teacher
  network's {name: abstract leaf}) with its shape; ConfigError naming config.distill.teacher otherwise."""
  path = config.distill.teacher
  try:
    if epath.Path(path).is_dir():
      step_dir = restore.find_checkpoint(path, FIELD)
      workdir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent
      arrays, step, _ = restore.restore_params(str(workdir), which="teacher", step=int(step_dir.name), with_head=True)
      where = f"the EMA teacher of {step_dir} (step {step})"
    else:
      arrays, layout = torch_interop.named_arrays(path)
      if layout != "flax":  # official names: the backbone and its head(s) mapped to ours
        arrays = _official(path, like)
      where = f"{layout} weights file {path}"
  except (ExportError, InteropError, ResumeError) as e:
    raise ConfigError(f"{FIELD}: {str(e).removeprefix(FIELD + ': ')}") from None
  for name, leaf in like.items():
    if name not in arrays:
      raise ConfigError(
        f"{FIELD}: {where} has no {name} (a teacher trained with another head? an export needs --with_head)"
      )
    if tuple(np.shape(arrays[name])) != tuple(np.shape(leaf)):
      raise ConfigError(
        f"{FIELD}: {name} is {tuple(np.shape(arrays[name]))} in {where}, {tuple(np.shape(leaf))} in the network "
        "its config describes"
      )
  return {name: np.asarray(arrays[name]) for name in like}, where


def fill(setup, state, shardings, log: Callable[[str], None] = print):
  """``state`` with the frozen teacher's weights in ``distill_teacher``, placed on ``shardings.distill_teacher``;
  ``state`` as it is when ``setup`` does not distil. Called on a fresh start only: a resumed run restores them."""
  if setup.distill_graphdef is None:
    return state
  arrays, where = load_arrays(setup.config, named_leaves(state.distill_teacher))

  def place(name, leaf, sharding):
    value = arrays[name].astype(leaf.dtype)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  flat_shardings = named_leaves(shardings.distill_teacher)
  teacher = map_with_name(lambda name, leaf: place(name, leaf, flat_shardings[name]), state.distill_teacher)
  kw = backbone_kwargs(setup.distill_config.model)
  log(
    f"distilling from {where} (config.distill): frozen ViT width {kw['embed_dim']} depth {kw['depth']} patch "
    f"{kw['patch_size']}, {sum(int(np.size(a)) for a in arrays.values()):,} parameters; state.teacher is the "
    "student's EMA"
  )
  return state.replace(distill_teacher=teacher)
