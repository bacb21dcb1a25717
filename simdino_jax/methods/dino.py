"""DINO and DINOv2 (iBOT patch loss, KoLeo): prototype heads, the cross-entropy losses with a centred or
Sinkhorn-Knopp teacher, their centres (the loss state), the prototype-layer freezing and the ``config.dino`` checks.

Two of DINO's appendix components (Table 14) switch DINO's own loss: ``dino.loss="mse"`` (BYOL's regression on
l2-normalised outputs instead of the cross-entropy) and ``head.predictor`` (BYOL's predictor MLP on the student's head
output); both are for ``dino`` only and off by default (then the code path is the plain DINO one).

The prototype pieces (heads, teacher temperature, freezing, checks) are shared with the vMF methods (``vmf.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from simdino_jax import schedules
from simdino_jax.errors import require
from simdino_jax.losses import byol as bl
from simdino_jax.losses import dino as dl
from simdino_jax.methods.base import Method, validate_masking
from simdino_jax.methods.byol import validate_mlp_head
from simdino_jax.models.heads import MLP, DINOHead, WithPredictor
from simdino_jax.models.network import compute_dtype
from simdino_jax.tree import map_with_name

# The teacher output operations (losses.dino.teacher_targets): DINO's centring, DINOv2's / SwAV's Sinkhorn-Knopp and
# the Softmax(batch) of DINO's appendix (Table 15, rows 2 and 5).
CENTERINGS = ("centering", "sinkhorn_knopp", "softmax_batch")
LOSSES = ("ce", "mse")  # config.dino.loss: DINO's cross-entropy, or Table 14's "MSE" row


# ---- heads -------------------------------------------------------------------------------------------------
def dino_head(config, in_dim: int, rngs: nnx.Rngs, num_prototypes: int = 0, head_class=DINOHead) -> nnx.Module:
  """MLP -> l2-normalised ``head.out_dim`` bottleneck -> weight-normalised prototypes (``head.num_prototypes``
  unless ``num_prototypes``); ``head_class`` a DINOHead subclass (vmf.VMFHead)."""
  h = config.head
  return head_class(
    in_dim,
    hidden_dim=h.hidden_dim,
    bottleneck_dim=h.out_dim,
    num_layers=h.num_layers,
    num_prototypes=num_prototypes or h.num_prototypes,
    use_bn=h.get("use_bn_in_head", False),
    dtype=compute_dtype(config.model.dtype),
    rngs=rngs,
  )


def dino_student_head(config, in_dim: int, rngs: nnx.Rngs) -> nnx.Module:
  """``dino_head``, wrapped with BYOL's predictor MLP on its logits when ``head.predictor`` (K -> predictor_hidden_dim
  -> K, ``head.use_bn``, no output bias; the student's loss reads its "prediction", the teacher's targets its
  "logits"). The predictor draws its weights after the head's, so the head's initial weights do not change."""
  head = dino_head(config, in_dim, rngs)
  if not config.head.predictor:
    return head
  h = config.head
  predictor = MLP(
    h.num_prototypes,
    h.predictor_hidden_dim,
    h.num_prototypes,
    use_bn=h.use_bn,
    out_bias=False,
    dtype=compute_dtype(config.model.dtype),
    rngs=rngs,
  )
  return WithPredictor(head, predictor, key="logits")


def dino_patch_head(config, in_dim: int, rngs: nnx.Rngs) -> nnx.Module:
  """DINOv2's separate iBOT head: ``head.patch_num_prototypes`` prototypes (0: ``head.num_prototypes``)."""
  return dino_head(config, in_dim, rngs, config.head.patch_num_prototypes)


def patch_prototypes(config) -> int:
  """Prototypes of the head the patch tokens go through."""
  h = config.head
  return h.patch_num_prototypes if h.separate_patch_head and h.patch_num_prototypes else h.num_prototypes


# ---- optimiser extras --------------------------------------------------------------------------------------
def prototype_freezes(config, params, steps_per_epoch: int) -> tuple:
  """The prototype layers' (``last_layer/``) frozen leaves: g for good with ``head.norm_last_layer`` (unit
  prototypes), the whole layer for the first ``optim.freeze_last_layer_epochs`` epochs."""
  freezes = []
  if config.head.norm_last_layer:  # unit prototypes: g stays 1 for good
    freezes.append((map_with_name(lambda name, _: "last_layer/" in name and name.endswith("weight_g"), params), -1))
  freeze_steps = int(round(config.optim.freeze_last_layer_epochs * steps_per_epoch))
  if freeze_steps > 0:
    freezes.append((map_with_name(lambda name, _: "last_layer/" in name, params), freeze_steps))
  return tuple(freezes)


# ---- losses ------------------------------------------------------------------------------------------------
def teacher_temp_fn(config, steps_per_epoch: int):
  d = config.dino
  return schedules.teacher_temperature(
    d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs, steps_per_epoch, per=d.teacher_temp_per
  )


def koleo_groups(config) -> int:
  """Row groups KoLeo is computed over: ``dino.koleo_groups``, or 0 = one per device of this run (DINOv2's per-GPU
  KoLeo)."""
  return config.dino.koleo_groups or jax.device_count()


def koleo(feats: jax.Array, groups: int) -> jax.Array:
  """DINOv2: KoLeo of the student backbone's cls per global-crop chunk, summed over the chunks, each the mean over
  devices (row groups) of the per-device value; feats (B, Mg, D)."""
  return sum(dl.koleo_per_group(feats[:, i], groups) for i in range(feats.shape[1]))


def make_dino_loss(config, steps_per_epoch: int, *, with_patches: bool):
  """DINO (cls only) and DINOv2 (cls + iBOT masked patches + KoLeo), centering or Sinkhorn-Knopp teacher."""
  d = config.dino
  temp_fn = teacher_temp_fn(config, steps_per_epoch)
  groups = koleo_groups(config) if d.koleo_weight > 0 else 1

  # The student side: the head's logits, or the predictor's output on them (head.predictor, Table 14 "+ pred.").
  student_key = "prediction" if config.head.get("predictor", False) else "logits"
  mse = d.get("loss", "ce") == "mse"

  def loss(student, teacher, loss_state, step):
    t_temp = temp_fn(step)
    t_logits = teacher["cls"]["logits"]
    if mse:  # Table 14 "MSE": BYOL's regression to the centred teacher outputs (the temperatures cancel)
      value, metrics = bl.pairwise_regression_loss(student["cls"][student_key], t_logits - loss_state["center"])
    else:
      q = dl.teacher_targets(t_logits, mode=d.centering, temperature=t_temp, center=loss_state["center"])
      value, metrics = dl.dino_cross_entropy(
        student["cls"][student_key], q, student_temp=d.student_temp, exclude_same_view=True
      )
    new_state = dict(loss_state)
    if d.centering == "centering":
      new_state["center"] = dl.update_center(loss_state["center"], t_logits, d.center_momentum)
    if with_patches:
      mask = student["patch_mask"]
      tp = teacher["patch"]["logits"]
      qp = dl.teacher_targets(tp, mode=d.centering, temperature=t_temp, center=loss_state["patch_center"], mask=mask)
      ibot, ibot_metrics = dl.ibot_patch_loss(student["patch"]["logits"], qp, mask, student_temp=d.student_temp)
      metrics.update(ibot_metrics)
      value = value + d.ibot_weight * ibot
      if d.centering == "centering":
        new_state["patch_center"] = dl.update_center(loss_state["patch_center"], tp, d.center_momentum, mask=mask)
    if d.koleo_weight > 0:
      metrics["koleo"] = koleo(student["backbone_cls"], groups)
      value = value + d.koleo_weight * metrics["koleo"]
    metrics["teacher_temp"] = t_temp
    return value, metrics, new_state

  return loss


def dino_state(config, *, with_patches: bool) -> dict:
  """The teacher centres: (1, K) for the cls logits, (1, 1, K_patch) for the patch logits."""
  state = {"center": jnp.zeros((1, config.head.num_prototypes), jnp.float32)}
  if with_patches:
    state["patch_center"] = jnp.zeros((1, 1, patch_prototypes(config)), jnp.float32)
  return state


# ---- config checks -----------------------------------------------------------------------------------------
def validate_views(config) -> None:
  """The cross-entropy pairs each teacher view with the other student views only: two views at least."""
  d = config.data
  require(
    d.num_global + d.num_local > 1,
    "data.num_local",
    "the DINO-family cross-entropy pairs different views: needs at least two student views "
    f"(num_global={d.num_global}, num_local={d.num_local})",
  )


def validate_prototypes(config) -> None:
  """The prototype head and the teacher temperature / centering fields every prototype method reads."""
  require(config.head.num_prototypes > 0, "head.num_prototypes", "must be positive")
  require(
    config.dino.teacher_temp_per in ("epoch", "iteration"),
    "dino.teacher_temp_per",
    f"must be 'epoch' or 'iteration', got {config.dino.teacher_temp_per!r}",
  )
  require(
    config.dino.centering in CENTERINGS,
    "dino.centering",
    f"must be one of {', '.join(map(repr, CENTERINGS))}, got {config.dino.centering!r}",
  )
  bn = config.head.get("use_bn_in_head", False)  # every dino_head builder reads it: checked for all of them here
  require(isinstance(bn, bool), "head.use_bn_in_head", f"must be True or False, got {bn!r}")
  require(
    not bn or config.method == "dino",
    "head.use_bn_in_head",
    f"BatchNorm in DINO's head (main_dino.py --use_bn_in_head) is for method 'dino' only, not {config.method!r}",
  )


def validate(config, *, num_devices: int, masked: bool) -> None:
  """KoLeo's row groups, the views, ``config.masking`` when ``masked``, the prototype fields."""
  if config.dino.koleo_weight > 0:
    groups = config.dino.get("koleo_groups", 0) or num_devices
    require(
      isinstance(groups, int) and groups >= 1 and config.batch_size % groups == 0 and config.batch_size // groups >= 2,
      "dino.koleo_groups",
      f"{config.dino.get('koleo_groups')} must be 0 (one per device) or a positive divisor of batch_size="
      f"{config.batch_size} leaving at least 2 rows per group",
    )
  validate_views(config)
  if masked:
    validate_masking(config)
  validate_prototypes(config)
  validate_components(config, masked=masked)


def validate_components(config, *, masked: bool) -> None:
  """DINO's Table 14 switches (``dino.loss``, ``head.predictor``): valid values, and only for ``dino`` (cls loss)."""
  loss = config.dino.get("loss", "ce")
  require(loss in LOSSES, "dino.loss", f"must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
  if loss == "mse":
    require(not masked, "dino.loss", f"'mse' is DINO's Table 14 row, for method 'dino' only, not {config.method!r}")
    require(
      config.dino.centering == "centering",
      "dino.loss",
      f"'mse' regresses on the centred teacher outputs: needs dino.centering='centering', "
      f"got {config.dino.centering!r}",
    )
  predictor = config.head.get("predictor", False)
  require(isinstance(predictor, bool), "head.predictor", f"must be True or False, got {predictor!r}")
  if predictor:
    require(not masked, "head.predictor", f"the student predictor is for method 'dino' only, not {config.method!r}")
    validate_mlp_head(config)


# ---- the methods -------------------------------------------------------------------------------------------
def _method(name: str, *, masked: bool, progress_keys: tuple[str, ...]) -> Method:
  return Method(
    name,
    build_head=dino_student_head,
    make_loss=functools.partial(make_dino_loss, with_patches=masked),
    init_loss_state=functools.partial(dino_state, with_patches=masked),
    validate=functools.partial(validate, masked=masked),
    uses_masks=masked,
    build_patch_head=dino_patch_head if masked else None,
    prototypes=True,
    optimizer_freezes=prototype_freezes,
    progress_keys=progress_keys,
  )


DINO = _method("dino", masked=False, progress_keys=("ce", "koleo", "teacher_entropy", "prototypes_used"))
DINOV2 = _method("dinov2", masked=True, progress_keys=("ce", "ibot_ce", "koleo", "teacher_entropy", "prototypes_used"))

METHODS = (DINO, DINOV2)
