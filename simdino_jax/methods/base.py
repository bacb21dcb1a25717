"""The method interface (``Method``) and the helpers more than one method family uses.

A ``Method`` is everything the shared trainer and step need to know about a method: its heads, its loss and loss
state, its optimiser extras (frozen leaves), the metrics its progress line shows and the checks of its own config
fields. The families (``simdino.py``, ``dino.py``, ``vmf.py``) declare their methods with it; ``__init__.py``
registers them. The helpers below (config checks, patch counts, mask ratios) are shared by the families and the
registry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx

from simdino_jax.errors import require
from simdino_jax.models.vit import parse_variant

# Shown on every progress line around the method's own loss terms: the loss first, the step's collapse monitors last.
PROGRESS_FIRST = ("loss",)
PROGRESS_LAST = ("feature_std", "effective_rank")


def _empty_state(config) -> dict:
  del config
  return {}


def _no_checks(config, *, num_devices: int) -> None:
  del config, num_devices


def _no_freezes(config, params, steps_per_epoch: int) -> tuple:
  del config, params, steps_per_epoch
  return ()


def _no_unit_norm(config, params) -> tuple:
  del config, params
  return ()


@dataclasses.dataclass(frozen=True)
class Method:
  """A self-supervised method, as the trainer and the step see it.

  name: ``config.method``.
  build_head: (config, backbone width, rngs) -> the head on the cls tokens (and on the patch tokens unless
    ``build_patch_head`` builds a separate one). Its outputs are what the loss reads; anything the loss needs from
    the head's parameters (e.g. the vMF prototype norms) is part of those outputs.
  make_loss: (config, steps_per_epoch) -> loss(student_out, teacher_out, loss_state, step) ->
    (loss, metrics, new_loss_state); the outputs are ``train.step.forward``'s (see ``methods/__init__.py``).
  init_loss_state: config -> the loss state's initial pytree (e.g. DINO's centre).
  validate: (config, *, num_devices) -> None; raises ConfigError naming the field for an invalid value of a field
    this method reads (config.validate runs the generic checks and this one).
  uses_masks: the batch carries block masks for the student's global crops and patch tokens enter the loss.
  build_patch_head: (config, backbone width, rngs) -> the separate patch head (``config.head.separate_patch_head``);
    required with ``uses_masks``.
  prototypes: the head ends in K prototypes (logits over K; ``config.head.num_prototypes``).
  optimizer_freezes: (config, abstract params, steps_per_epoch) -> ((mask tree, until_step), ...): leaves held
    fixed while step < until_step (< 0: for good), ``optim.make_optimizer``'s ``freezes``.
  optimizer_unit_norm: (config, abstract params) -> ((mask tree, axis), ...): leaves kept unit-norm along axis after
    every update (SwAV's prototypes), ``optim.make_optimizer``'s ``unit_norm``.
  momentum_teacher: False for a method without a momentum encoder (SwAV): the teacher is the current student at
    every step whatever ``config.teacher`` says (``train.setup.momentum_schedule``), BN statistics included, so the
    evaluators read it; the step runs no teacher forward and the loss gets ``teacher_out=None``.
  evaluated: the network the evaluators read ("teacher" or "student"; ``evaluate.py --which``'s default): the
    official evaluation's choice, the teacher for the DINO family, the query / online network for MoCo-v2 / BYOL.
  progress_keys: the loss's metrics the progress line shows, in order (those absent from a record are skipped);
    ``progress_line_keys`` adds the shared ones.
  view_calls: None (the DINO family, SwAV: one backbone call per resolution, the head on every crop at once, as
    DINO's MultiCropWrapper and SwAV's forward) or config -> (student views, teacher views): each global view then
    runs backbone + head in a call of its own, as MoCo's ``encoder_q(im_q)`` / ``encoder_k(im_k)`` and BYOL's
    ``apply_once_fn`` per view, so that BatchNorm normalises each view over its own batch; only the calls the
    official code makes (the views named, in view order) update the running statistics (``train.step.forward``).
  """

  name: str
  build_head: Callable[[Any, int, nnx.Rngs], nnx.Module]
  make_loss: Callable[[Any, int], Callable]
  init_loss_state: Callable[[Any], Any] = _empty_state
  validate: Callable[..., None] = _no_checks
  uses_masks: bool = False
  build_patch_head: Callable[[Any, int, nnx.Rngs], nnx.Module] | None = None
  prototypes: bool = False
  optimizer_freezes: Callable[[Any, Any, int], tuple] = _no_freezes
  optimizer_unit_norm: Callable[[Any, Any], tuple] = _no_unit_norm
  momentum_teacher: bool = True
  evaluated: str = "teacher"
  progress_keys: tuple[str, ...] = ()
  view_calls: Callable[[Any], tuple[tuple[int, ...], tuple[int, ...]]] | None = None

  def __post_init__(self):
    if self.uses_masks and self.build_patch_head is None:
      raise ValueError(f"method {self.name!r} uses masks but declares no build_patch_head")

  @property
  def progress_line_keys(self) -> tuple[str, ...]:
    """The progress line's metrics: the loss, the method's ``progress_keys``, the collapse monitors."""
    return PROGRESS_FIRST + tuple(self.progress_keys) + PROGRESS_LAST


# ---- config checks -----------------------------------------------------------------------------------------
def validate_masking(config) -> None:
  """The block-mask fields (``config.masking``) of the masked methods."""
  lo, hi = config.masking.ratio
  require(0 < lo <= hi < 1, "masking.ratio", f"need 0 < min <= max < 1, got {config.masking.ratio}")
  require(
    config.masking.min_num_patches >= 1,
    "masking.min_num_patches",
    f"must be >= 1, got {config.masking.min_num_patches}",
  )
  require(
    0 < config.masking.probability <= 1, "masking.probability", f"must be in (0, 1], got {config.masking.probability}"
  )


# ---- patches and masks -------------------------------------------------------------------------------------
def num_patches(config) -> int:
  """Patches N of a global crop."""
  return (config.data.global_size // parse_variant(config.model.variant)["patch_size"]) ** 2


def mean_mask_ratio(config) -> float:
  """Expected fraction alpha of a global view's patches that are masked (probability x mean ratio)."""
  lo, hi = config.masking.ratio
  return config.masking.probability * 0.5 * (lo + hi)
