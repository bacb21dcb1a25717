"""Gram anchoring in training (DINOv3): the Gram teacher the step carries in ``TrainState.gram_teacher``, its loss term
and its refreshes, for any method whose student has patch tokens (``config.gram``,
docs/methods.md#gram-anchoring-in-training).

What DINOv3 does (facebookresearch/dinov3 ``dinov3/train/ssl_meta_arch.py`` ``get_gram_teacher_output`` /
``compute_losses`` and ``dinov3/train/train.py``'s "[GRAM]" block), and what is done here:

  - student side: ``student_global["patch_pre_head"]``, the backbone's NORMED patch tokens (``x_norm_patchtokens``)
    of the global crops from the student's own forward, i.e. with the masked patches replaced by the mask token
    (the student backbone is called with ``masks``); here the same array, ``forward``'s global-crop "patch" output;
  - Gram teacher side: a separate frozen backbone (``gram_teacher.backbone(images, is_training=True)``, its
    ``x_norm_patchtokens``) on the global crops, unmasked, without drop path; here the backbone parameters in
    ``state.gram_teacher`` on the same global crops as the student, or, with ``gram.crop_size``, on the Gram
    teacher's own crops (below);
  - loss: ``gram_loss_weight(iteration) * GramLoss(student, teacher)`` added to the total (``losses/gram.py``), its
    value logged as ``gram_loss`` (and the weight as ``gram_weight``); the token selection ``tokens_used`` (all /
    masked / unmasked patches, the latter two at batch level as DINOv3 asserts);
  - Gram teacher: the EMA teacher's backbone copied in at ``start_step`` (DINOv3's ``it_load_ema_teacher``: before
    that iteration; 0: the initial teacher, which is the initial student), or, with ``gram.teacher``, loaded weights
    (below), and after the update of every iteration
    ``losses.gram.refresh_after`` names (``it_first_update``, ``update_frequency``, ``max_updates``), inside the
    jitted step with ``jnp.where`` (applied as the next iteration starts: ``GramAnchor.current``): no host round
    trip, and a resumed run refreshes exactly as an uninterrupted one
    (the snapshot is part of the checkpointed state). Before ``start_step`` the term's weight is 0 (DINOv3 refuses
    to run without an initialised Gram teacher).

A Gram teacher from a checkpoint (``gram.teacher``; DINOv3's ``gram.ckpt``, loaded in ``SSLMetaArch.init_weights``
by ``init_fsdp_model_from_checkpoint`` into the Gram teacher, the ``dino_head`` / ``ibot_head`` / loss centres
skipped): ``fill`` puts the backbone of that source (a workdir or checkpoint directory of ours: its EMA teacher; an
export of ours; official weights: ``restore.load_init_arrays``, what ``config.init_from`` reads, on the same io
functions as ``train/distill.py``; the heads are never needed) into ``state.gram_teacher`` at a fresh start. The
source must be the student's architecture (DINOv3 builds its Gram teacher with the student's ``build_model_from_cfg``):
the same parameter names and shapes, and the same ``config.model`` where the source stores a config. What DINOv3 then
does, transcribed:
  - the term is on from iteration 0 (``gram_teacher_initialized`` is set by the load), whatever ``start_step``;
  - ``it_load_ema_teacher`` still loads the EMA teacher before that iteration when it is >= 0 (``train.py`` does not
    look at ``gram.ckpt``): here ``start_step`` > 0; ``start_step`` 0 means never (DINOv3's -1: its 0 would replace
    the checkpoint before the first iteration);
  - ``rep_update`` refreshes it from the EMA teacher exactly as it refreshes an EMA snapshot (``train.py``'s "[GRAM]
    Update gram teacher" block reads neither ``gram.ckpt`` nor how the teacher was initialised): the loaded teacher
    lasts until the first refresh (``first_refresh`` / ``refresh_every``; ``refresh_every`` 0 keeps it to the end,
    DINOv3's ``rep_update: false``).
A resumed run restores the Gram teacher with the state (never reloads the source, which may be gone by then).

The high-resolution Gram teacher (``gram.crop_size``; DINOv3's ``crops.gram_teacher_crops_size``, 512 for its
ViT-7B's 256 px global crops): the data pipeline adds ``"gram_global"``, each global crop's box and flip at that size
without photometric distortion (``data/multicrop.py``; DINOv3's ``gram_teacher_no_distortions: true``, the ViT-7B
setting; its shared-distortion variant is not built), the Gram teacher runs on them, and its patch features
(B*Mg, n*n, D) are resized to the student's n_s x n_s grid as ``get_gram_teacher_output`` does,
``F.interpolate(size=(n_s, n_s), mode="bicubic", align_corners=False, antialias=gram.resize_antialias)`` on the
(D, n, n) maps (``resize_patches``: torch's bicubic kernels as (n_s, n) matrices, ``models.vit``'s
``pos_embed_interpolation_matrix``, applied separably in float32 HIGHEST; bicubic is DINOv3's default and its
ViT-7B's ``global_teacher_resize_method``, the only mode built).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from simdino_jax import config as config_lib
from simdino_jax import schedules
from simdino_jax.errors import ConfigError, ExportError, InteropError, ResumeError
from simdino_jax.io import restore, torch_interop
from simdino_jax.losses import gram as gram_lib
from simdino_jax.models.network import backbone_kwargs
from simdino_jax.models.vit import pos_embed_interpolation_matrix
from simdino_jax.tree import map_with_name, named_leaves

FIELD = "config.gram.teacher"
# backbone_kwargs that change neither what a trained backbone computes nor its parameters' names and shapes.
_NOT_ARCHITECTURE = ("drop_path_rate", "drop_path_uniform", "remat", "dtype", "token_init", "layerscale_init")


@dataclasses.dataclass(frozen=True)
class GramAnchor:
  """The Gram term of one config (``make``); ``groups`` (the batch-level Gram's row groups: the data-parallel
  devices, as DINOv3's per-GPU batch) is set on the mesh by ``train.setup.make_step``."""

  backbone_graphdef: nnx.GraphDef
  weight_fn: Callable
  start_step: int
  first_refresh: int
  refresh_every: int
  max_refreshes: int
  normalize: bool
  img_level: bool
  negatives: str
  tokens_used: str
  groups: int = 1
  preloaded: bool = False  # config.gram.teacher: the Gram teacher at step 0 is loaded weights (``fill``)
  crop_size: int = 0  # config.gram.crop_size: the Gram teacher reads the batch's "gram_global" crops; 0: "global"
  grid: int = 0  # with crop_size: the student's patch grid side its features are resized to
  resize_antialias: bool = False  # config.gram.resize_antialias (global_teacher_resize_antialias)

  def init(self, variables: nnx.State) -> nnx.State:
    """The Gram teacher at initialisation: the backbone part of the (teacher) network's state."""
    return jax.tree_util.tree_map(jnp.copy, variables["backbone"])

  def teacher_patches(self, params: nnx.State, glob: jax.Array) -> jax.Array:
    """The Gram teacher's normed patch tokens (B*Mg, N, D) of the global crops (B, Mg, H, W, 3) (or of its own
    larger crops, then resized to the student's grid: ``resize_patches``), unmasked, no drop path; no gradient."""
    net = nnx.merge(self.backbone_graphdef, params, copy=True)
    flat = glob.reshape((glob.shape[0] * glob.shape[1],) + glob.shape[2:])  # image-major, batch axis outermost
    patches = net(flat, key=None)["patch"]
    side = math.isqrt(patches.shape[1])
    if self.grid and side != self.grid:
      patches = resize_patches(patches, self.grid, antialias=self.resize_antialias)
    return jax.lax.stop_gradient(patches)

  def term(
    self, student: jax.Array, teacher: jax.Array, masks: jax.Array | None, step: jax.Array
  ) -> tuple[jax.Array, dict]:
    """(weight(step) x GramLoss, {"gram_loss", "gram_weight"}) of the student's patch tokens (B*Mg, N, D) against
    the Gram teacher's; ``masks`` (B, Mg, N) the student's block masks (for ``tokens_used``)."""
    mask = None
    if self.tokens_used != "all":
      mask = masks.reshape(student.shape[:2])
      mask = mask if self.tokens_used == "masked" else jnp.logical_not(mask)
    loss = gram_lib.gram_loss(
      student,
      teacher,
      normalize=self.normalize,
      img_level=self.img_level,
      negatives=self.negatives,
      groups=self.groups,
      mask=mask,
    )
    start = 0 if self.preloaded else self.start_step  # a loaded Gram teacher is initialised from iteration 0
    weight = jnp.where(step >= start, self.weight_fn(step), 0.0).astype(jnp.float32)
    return weight * loss, {"gram_loss": loss, "gram_weight": weight}

  def due(self, step: jax.Array) -> jax.Array:
    """Whether the Gram teacher takes the EMA teacher's backbone after the update of iteration ``step``."""
    due = jnp.asarray(step + 1 == self.start_step)  # loaded before iteration start_step (never for start 0)
    if self.refresh_every > 0:
      due = due | gram_lib.refresh_after(
        step, first=self.first_refresh, every=self.refresh_every, max_updates=self.max_refreshes
      )
    return due

  def current(self, step: jax.Array, teacher: nnx.State, gram_teacher: Any) -> Any:
    """The Gram teacher iteration ``step`` uses (and stores): the EMA teacher's backbone as iteration ``step - 1``
    left it (``teacher``, the state's) when a refresh was ``due`` after ``step - 1``, else ``gram_teacher``.

    Taken at the start of the next iteration from the stored teacher rather than at the end of the refreshing one:
    the same snapshot, but a bitwise copy of the stored arrays (at the end, XLA CPU fused a recomputation of the EMA
    into the copy, one ulp off the stored teacher, optimization barriers being removed before fusion)."""
    due = (step >= 1) & self.due(step - 1)
    if self.start_step == 0 and not self.preloaded:  # the initial teacher: init's copy (bitwise the same at step 0)
      due = due | (step == 0)
    return jax.tree_util.tree_map(lambda new, old: jnp.where(due, new, old), teacher["backbone"], gram_teacher)


def resize_patches(patches: jax.Array, size: int, *, antialias: bool = False) -> jax.Array:
  """(B, n*n, D) patch features of an n x n grid -> (B, size*size, D): torch's
  ``F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=antialias)`` on the (B, D, n,
  n) maps DINOv3 makes of them, as one (size, n) matrix per axis (the same on both: a square grid). Float32, HIGHEST:
  each output is a weighted sum over one row / column of the grid."""
  b, tokens, d = patches.shape
  n = math.isqrt(tokens)
  if n * n != tokens:
    raise ValueError(f"resize_patches: {tokens} tokens are not a square grid")
  m = jnp.asarray(pos_embed_interpolation_matrix(n, size, 0.0, bool(antialias)))  # F.interpolate(size=...)
  grid = patches.astype(jnp.float32).reshape(b, n, n, d)
  grid = jnp.einsum("ia,zabd->zibd", m, grid, precision=jax.lax.Precision.HIGHEST)
  grid = jnp.einsum("jb,zibd->zijd", m, grid, precision=jax.lax.Precision.HIGHEST)
  return grid.reshape(b, size * size, d)


def crop_size(config) -> int:
  """The Gram teacher's crop size (``gram.crop_size``) when Gram anchoring is on, else 0 (no extra crops)."""
  g = config.get("gram")
  return int(g.get("crop_size", 0)) if g is not None and g.enabled else 0


def weight_schedule(config, total_steps: int) -> schedules.Schedule:
  """``gram.weight`` throughout, or DINOv3's ``loss_weight_schedule`` (linear_warmup_cosine_decay) from the 5-tuple
  ``gram.weight_schedule`` = (start, peak, end, warmup steps, cosine steps), ``end`` after it."""
  g = config.gram
  if not g.weight_schedule:
    return schedules.constant(float(g.weight))
  start, peak, end, warmup, cosine = g.weight_schedule
  total = max(int(total_steps), int(warmup) + int(cosine))  # the constant tail past the run's end changes nothing
  return schedules.linear_warmup_cosine_constant(float(start), float(peak), float(end), int(warmup), total, int(cosine))


def make(config, backbone_graphdef: nnx.GraphDef, total_steps: int) -> GramAnchor | None:
  """The config's ``GramAnchor``, or None when ``gram.enabled`` is False (the step and state are then unchanged)."""
  g = config.gram
  if not g.enabled:
    return None
  return GramAnchor(
    backbone_graphdef=backbone_graphdef,
    weight_fn=weight_schedule(config, total_steps),
    start_step=int(g.start_step),
    first_refresh=int(g.first_refresh),
    refresh_every=int(g.refresh_every),
    max_refreshes=int(g.max_refreshes),
    normalize=bool(g.normalize),
    img_level=bool(g.img_level),
    negatives=str(g.negatives),
    tokens_used=str(g.tokens_used),
    preloaded=bool(g.get("teacher", "")),
    crop_size=crop_size(config),
    grid=config.data.global_size // backbone_kwargs(config.model)["patch_size"] if crop_size(config) else 0,
    resize_antialias=bool(g.get("resize_antialias", False)),
  )


# ---- config.gram.teacher: the first Gram teacher from a checkpoint (DINOv3's gram.ckpt) ---------------------------
def _stored_model(path: str) -> dict | None:
  """The ``model`` block stored with the source (a checkpoint's config, an export's metadata), else None (official
  weights carry none)."""
  try:
    if epath.Path(path).is_dir():
      stored = restore.stored_config(restore.find_checkpoint(path, FIELD))
    else:
      metadata = torch_interop.read_state_dict(path)[1]
      stored = json.loads(metadata["config"]) if metadata.get("config") else None
  except (ExportError, InteropError, ResumeError, ValueError):
    return None
  return None if stored is None else config_lib.from_dict(stored).model


def _architecture(model) -> dict:
  kw = backbone_kwargs(model)
  return {k: v for k, v in kw.items() if k not in _NOT_ARCHITECTURE}


def load_backbone(config, like: dict[str, Any]) -> tuple[dict[str, np.ndarray], str]:
  """({name: array}, description) of the backbone ``config.gram.teacher`` names, for the names of ``like`` (the
  Gram teacher's {name: leaf}, names without ``backbone/``); ConfigError in one line naming config.gram.teacher when
  it cannot be read or is not the student's architecture (another name, shape or stored ``config.model``)."""
  path = str(config.gram.teacher)
  try:
    arrays, where = restore.load_init_arrays(path, which="teacher")
  except ResumeError as e:
    raise ConfigError(f"{FIELD}: {str(e).removeprefix('config.init_from: ')}") from None
  backbone = {k.removeprefix("backbone/"): v for k, v in arrays.items() if k.startswith("backbone/")}
  missing, extra = sorted(set(like) - set(backbone)), sorted(set(backbone) - set(like))
  if missing or extra:
    what = [
      f"{len(names)} {kind} (e.g. {names[0]})" for kind, names in (("missing", missing), ("extra", extra)) if names
    ]
    raise ConfigError(
      f"{FIELD}: {where} is not the student's backbone (arrays {', '.join(what)}): the Gram teacher has the "
      "student's architecture (config.model)"
    )
  for name, leaf in like.items():
    if tuple(np.shape(backbone[name])) != tuple(np.shape(leaf)):
      raise ConfigError(
        f"{FIELD}: backbone/{name} is {tuple(np.shape(backbone[name]))} in {where}, {tuple(np.shape(leaf))} in the "
        "student's backbone: the Gram teacher has the student's architecture (config.model)"
      )
  stored = _stored_model(path)
  if stored is not None:
    mine, theirs = _architecture(config.model), _architecture(stored)
    for k in mine:
      if mine[k] != theirs.get(k):
        raise ConfigError(
          f"{FIELD}: {where} is a ViT with {k}={theirs.get(k)!r}, the student's config.model gives {mine[k]!r}: the "
          "Gram teacher has the student's architecture"
        )
  return {name: np.asarray(backbone[name]) for name in like}, where


def fill(setup, state, shardings, log: Callable[[str], None] = print):
  """``state`` with config.gram.teacher's backbone in ``gram_teacher``, placed on ``shardings.gram_teacher``;
  ``state`` as it is without one. Called on a fresh start only (after config.init_from, which it overrides): a
  resumed run restores the Gram teacher with the rest of the state."""
  if setup.gram is None or not setup.gram.preloaded:
    return state
  arrays, where = load_backbone(setup.config, named_leaves(state.gram_teacher))
  flat_shardings = named_leaves(shardings.gram_teacher)

  def place(name, leaf):
    value = arrays[name].astype(leaf.dtype)
    return jax.make_array_from_callback(value.shape, flat_shardings[name], lambda index: value[index])

  g = setup.gram
  log(
    f"Gram teacher at step 0: the backbone from {where} ({FIELD}); "
    + (f"replaced by the EMA teacher's before step {g.start_step}" if g.start_step else "no EMA load")
    + (
      f", refreshed from the EMA teacher after steps s with s + 1 >= {g.first_refresh}, every {g.refresh_every}"
      + (f", at most {g.max_refreshes} times" if g.max_refreshes else "")
      if g.refresh_every
      else ", never refreshed"
    )
  )
  return state.replace(gram_teacher=map_with_name(place, state.gram_teacher))
