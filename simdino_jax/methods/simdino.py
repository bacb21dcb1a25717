"""SimDINO and SimDINOv2: projection heads (unit vectors), the coding-rate losses and gamma, the ``config.loss``
checks.

simdino: cls alignment - gamma R_eps (or a Table 5 regularizer in place of the coding rate);
simdinov2: cls + masked-patch alignment - gamma R_eps, the patch tokens of the block-masked global crops.
Neither has a loss state, frozen leaves or a prototype layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from simdino_jax.errors import require
from simdino_jax.losses import coding_rate as cr
from simdino_jax.losses import regularizers
from simdino_jax.losses.simdino import PATCH_WEIGHTINGS, simdino_loss, simdinov2_loss
from simdino_jax.methods.base import Method, mean_mask_ratio, num_patches, validate_masking
from simdino_jax.models.heads import ProjectionHead
from simdino_jax.models.network import compute_dtype

GAMMA_RULES = ("official", "paper", "fixed")
REGULARIZERS = ("coding_rate", "infonce", "uniformity", "barlow")


# ---- heads -------------------------------------------------------------------------------------------------
def projection_head(config, in_dim: int, rngs: nnx.Rngs) -> nnx.Module:
  """MLP -> l2-normalised ``head.out_dim`` features (also the SimDINOv2 patch head)."""
  h = config.head
  return ProjectionHead(
    in_dim,
    hidden_dim=h.hidden_dim,
    out_dim=h.out_dim,
    num_layers=h.num_layers,
    dtype=compute_dtype(config.model.dtype),
    rngs=rngs,
  )


# ---- gamma -------------------------------------------------------------------------------------------------
def simdino_gamma(config, *, masked: bool | None = None) -> float:
  """gamma from ``config.loss.gamma_rule``.

  official: the official code's 1/p + 1/(global batch) (its coeff = 1; N*B even with per-device covariances);
  paper: Remark C.3 (SimDINO: 2 eps sqrt(m / (d M min(d, m))); SimDINOv2 adds the masked-patch factor), m = rows
    per covariance;
  fixed: ``config.loss.gamma`` as given.
  ``masked``: whether the loss has SimDINOv2's masked-patch term; None: that of ``config.method``.
  """
  if masked is None:
    masked = config.method == SIMDINOV2.name
  loss_cfg = config.loss
  rows = config.batch_size // loss_cfg.groups
  if config.get("accumulation_mode", "micro") == "micro":  # each covariance then holds one micro-batch's rows
    rows //= config.get("accumulation_steps", 1)
  dim = config.head.out_dim
  views = config.data.num_global + config.data.num_local
  rule = loss_cfg.gamma_rule
  if rule == "official":
    return 1.0 / dim + 1.0 / config.batch_size
  if rule == "paper":
    if masked:
      return cr.gamma_simdinov2(loss_cfg.eps, rows, dim, views, mean_mask_ratio(config), num_patches(config))
    return cr.gamma_simdino(loss_cfg.eps, rows, dim, views)
  if rule == "fixed":
    return float(loss_cfg.gamma)
  raise ValueError(f"config.loss.gamma_rule must be one of {GAMMA_RULES}, got {rule!r}")


# ---- losses ------------------------------------------------------------------------------------------------
def _regularizer(name: str, student: jax.Array, teacher: jax.Array) -> jax.Array:
  """Table 5's replacements for the coding rate, averaged over the global views (student (B, M, d))."""
  mg = teacher.shape[1]
  if name == "uniformity":
    return jnp.mean(jnp.stack([regularizers.uniformity(student[:, i]) for i in range(mg)]))
  if name == "infonce":  # student global view i against the teacher's other global view
    return jnp.mean(jnp.stack([regularizers.infonce(student[:, i], teacher[:, (i + 1) % mg]) for i in range(mg)]))
  if name == "barlow":
    return regularizers.barlow_twins(student[:, 0], student[:, min(1, student.shape[1] - 1)])
  raise ValueError(f"config.loss.regularizer must be one of {REGULARIZERS}, got {name!r}")


def make_simdino_loss(config, steps_per_epoch: int):
  del steps_per_epoch
  loss_cfg = config.loss
  gamma = simdino_gamma(config, masked=False)
  common = dict(
    eps=loss_cfg.eps, exclude_same_view=loss_cfg.exclude_same_view, expansion=loss_cfg.expansion, groups=loss_cfg.groups
  )

  def loss(student, teacher, loss_state, step):
    del step
    if loss_cfg.regularizer == "coding_rate":
      value, metrics = simdino_loss(student["cls"], teacher["cls"], gamma=gamma, **common)
    else:
      _, metrics = simdino_loss(student["cls"], teacher["cls"], gamma=0.0, **common)
      metrics["regularizer"] = _regularizer(loss_cfg.regularizer, student["cls"], teacher["cls"])
      value = metrics["align"] + loss_cfg.reg_weight * metrics["regularizer"]
    metrics["gamma"] = jnp.asarray(gamma, jnp.float32)
    return value, metrics, loss_state

  return loss


def make_simdinov2_loss(config, steps_per_epoch: int):
  del steps_per_epoch
  loss_cfg = config.loss
  gamma = simdino_gamma(config, masked=True)
  patches = num_patches(config)  # the step gathers a static subset of each crop's positions

  def loss(student, teacher, loss_state, step):
    del step
    value, metrics = simdinov2_loss(
      student["cls"],
      teacher["cls"],
      student["patch"],
      teacher["patch"],
      student["patch_mask"],
      eps=loss_cfg.eps,
      gamma=gamma,
      weighting=loss_cfg.patch_weighting,
      exclude_same_view=loss_cfg.exclude_same_view,
      expansion=loss_cfg.expansion,
      groups=loss_cfg.groups,
      num_patches=patches,
    )
    metrics["gamma"] = jnp.asarray(gamma, jnp.float32)
    return value, metrics, loss_state

  return loss


# ---- config checks -----------------------------------------------------------------------------------------
def validate(config, *, num_devices: int, masked: bool, table5: bool) -> None:
  """``config.loss`` (and ``config.masking`` when ``masked``); ``table5``: the Table 5 regularizers are allowed."""
  del num_devices
  loss, d = config.loss, config.data
  require(loss.eps > 0, "loss.eps", f"must be positive, got {loss.eps}")
  require(loss.gamma_rule in GAMMA_RULES, "loss.gamma_rule", f"must be one of {GAMMA_RULES}, got {loss.gamma_rule!r}")
  require(
    loss.expansion in ("student", "mean"), "loss.expansion", f"must be 'student' or 'mean', got {loss.expansion!r}"
  )
  require(
    loss.groups >= 1 and config.batch_size % loss.groups == 0,
    "loss.groups",
    f"{loss.groups} must be >= 1 and divide batch_size={config.batch_size}",
  )
  require(
    not loss.exclude_same_view or d.num_global + d.num_local > 1,
    "loss.exclude_same_view",
    "needs at least two student views",
  )
  require(
    loss.regularizer in REGULARIZERS, "loss.regularizer", f"must be one of {REGULARIZERS}, got {loss.regularizer!r}"
  )
  require(
    loss.regularizer == "coding_rate" or table5,
    "loss.regularizer",
    "the Table 5 regularizers replace the coding rate of method 'simdino' only",
  )
  require(
    loss.patch_weighting in PATCH_WEIGHTINGS,
    "loss.patch_weighting",
    f"must be one of {PATCH_WEIGHTINGS}, got {loss.patch_weighting!r}",
  )
  if masked:
    validate_masking(config)


# ---- the methods -------------------------------------------------------------------------------------------
SIMDINO = Method(
  "simdino",
  build_head=projection_head,
  make_loss=make_simdino_loss,
  validate=functools.partial(validate, masked=False, table5=True),
  progress_keys=("align", "rate", "regularizer"),
)
SIMDINOV2 = Method(
  "simdinov2",
  build_head=projection_head,
  make_loss=make_simdinov2_loss,
  validate=functools.partial(validate, masked=True, table5=False),
  uses_masks=True,
  build_patch_head=projection_head,
  progress_keys=("align", "patch_align", "rate"),
)

METHODS = (SIMDINO, SIMDINOV2)
