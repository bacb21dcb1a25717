"""Method registry: a method is a head to build, a loss over student/teacher outputs, and a loss state.

The trainer and the step are shared by every method; adding one means a ``losses/`` file, an entry here and
configs. The loss receives the step's forward outputs (see ``step.forward``):
  student: {"cls": head(cls) (B, M, ...), "backbone_cls": (B, Mg, D), ["patch": (B, Mg, U, ...), "patch_mask":
           (B, Mg, U)], ["prototype_norms": (K,)]} for the Mg global views (first) and the local views;
  teacher: the same for the Mg global views (unmasked), already stop-gradient;
and returns (loss, metrics, new_loss_state). DINO-family heads output {"z", "logits"}, SimDINO heads unit vectors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from simdino_jax import schedules
from simdino_jax.losses import coding_rate as cr
from simdino_jax.losses import dino as dl
from simdino_jax.losses import regularizers, vmf
from simdino_jax.losses.simdino import simdino_loss, simdinov2_loss
from simdino_jax.models.heads import DINOHead, ProjectionHead
from simdino_jax.models.network import Network, build_backbone, compute_dtype

GAMMA_RULES = ("official", "paper", "fixed")
REGULARIZERS = ("coding_rate", "infonce", "uniformity", "barlow")


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  build_head: Callable[[Any, int, nnx.Rngs], nnx.Module]  # (config, backbone width, rngs) -> head
  make_loss: Callable[[Any, int], Callable]  # (config, steps_per_epoch) -> loss(student, teacher, loss_state, step)
  init_loss_state: Callable[[Any], Any] = lambda config: {}
  uses_masks: bool = False  # the batch carries block masks; patch tokens enter the loss
  prototypes: bool = False  # DINO-family prototype head (last layer freezing, norm_last_layer)


# ---- heads ----------------------------------------------------------------------------------------------
def _projection_head(config, in_dim: int, rngs: nnx.Rngs) -> nnx.Module:
  h = config.head
  return ProjectionHead(in_dim, hidden_dim=h.hidden_dim, out_dim=h.out_dim, num_layers=h.num_layers,
                        dtype=compute_dtype(config.model.dtype), rngs=rngs)


def _dino_head(config, in_dim: int, rngs: nnx.Rngs, num_prototypes: int = 0) -> nnx.Module:
  h = config.head
  return DINOHead(in_dim, hidden_dim=h.hidden_dim, bottleneck_dim=h.out_dim, num_layers=h.num_layers,
                  num_prototypes=num_prototypes or h.num_prototypes, dtype=compute_dtype(config.model.dtype),
                  rngs=rngs)


def patch_head_needed(config) -> bool:
  return get_method(config.method).uses_masks and config.head.separate_patch_head


def build_patch_head(config, in_dim: int, rngs: nnx.Rngs) -> nnx.Module:
  method = get_method(config.method)
  if method.prototypes:
    return _dino_head(config, in_dim, rngs, config.head.patch_num_prototypes)
  return _projection_head(config, in_dim, rngs)


# ---- SimDINO / SimDINOv2 ----------------------------------------------------------------------------------
def mean_mask_ratio(config) -> float:
  """Expected fraction alpha of a global view's patches that are masked (probability x mean ratio)."""
  lo, hi = config.masking.ratio
  return config.masking.probability * 0.5 * (lo + hi)


def num_patches(config) -> int:
  from simdino_jax.models.vit import parse_variant  # local: only the patch size is needed
  return (config.data.global_size // parse_variant(config.model.variant)["patch_size"]) ** 2


def simdino_gamma(config) -> float:
  """gamma from ``config.loss.gamma_rule``.

  official: the official code's 1/p + 1/(global batch) (its coeff = 1; N*B even with per-device covariances);
  paper: Remark C.3 (SimDINO: 2 eps sqrt(m / (d M min(d, m))); SimDINOv2 adds the masked-patch factor), m = rows
    per covariance;
  fixed: ``config.loss.gamma`` as given.
  """
  loss_cfg = config.loss
  rows = config.batch_size // loss_cfg.groups
  dim = config.head.out_dim
  views = config.data.num_global + config.data.num_local
  rule = loss_cfg.gamma_rule
  if rule == "official":
    return 1.0 / dim + 1.0 / config.batch_size
  if rule == "paper":
    if get_method(config.method).uses_masks:
      return cr.gamma_simdinov2(loss_cfg.eps, rows, dim, views, mean_mask_ratio(config), num_patches(config))
    return cr.gamma_simdino(loss_cfg.eps, rows, dim, views)
  if rule == "fixed":
    return float(loss_cfg.gamma)
  raise ValueError(f"config.loss.gamma_rule must be one of {GAMMA_RULES}, got {rule!r}")


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


def _make_simdino_loss(config, steps_per_epoch: int):
  del steps_per_epoch
  loss_cfg = config.loss
  gamma = simdino_gamma(config)
  common = dict(eps=loss_cfg.eps, exclude_same_view=loss_cfg.exclude_same_view, expansion=loss_cfg.expansion,
                groups=loss_cfg.groups)

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


def _make_simdinov2_loss(config, steps_per_epoch: int):
  del steps_per_epoch
  loss_cfg = config.loss
  gamma = simdino_gamma(config)
  patches = num_patches(config)  # the step gathers a static subset of each crop's positions

  def loss(student, teacher, loss_state, step):
    del step
    value, metrics = simdinov2_loss(student["cls"], teacher["cls"], student["patch"], teacher["patch"],
                                    student["patch_mask"], eps=loss_cfg.eps, gamma=gamma,
                                    weighting=loss_cfg.patch_weighting, exclude_same_view=loss_cfg.exclude_same_view,
                                    expansion=loss_cfg.expansion, groups=loss_cfg.groups, num_patches=patches)
    metrics["gamma"] = jnp.asarray(gamma, jnp.float32)
    return value, metrics, loss_state

  return loss


# ---- DINO family ------------------------------------------------------------------------------------------
def _teacher_temp_fn(config, steps_per_epoch: int):
  d = config.dino
  return schedules.teacher_temperature(d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs,
                                       steps_per_epoch, per=d.teacher_temp_per)


def koleo_groups(config) -> int:
  """Row groups KoLeo is computed over: ``dino.koleo_groups``, or 0 = one per device of this run (DINOv2's per-GPU
  KoLeo)."""
  return config.dino.koleo_groups or jax.device_count()


def _koleo(feats: jax.Array, groups: int) -> jax.Array:
  """DINOv2: KoLeo of the student backbone's cls per global-crop chunk, summed over the chunks, each the mean over
  devices (row groups) of the per-device value; feats (B, Mg, D)."""
  return sum(dl.koleo_per_group(feats[:, i], groups) for i in range(feats.shape[1]))


def _make_dino_loss(config, steps_per_epoch: int):
  """DINO (cls only) and DINOv2 (cls + iBOT masked patches + KoLeo), centering or Sinkhorn-Knopp teacher."""
  d = config.dino
  temp_fn = _teacher_temp_fn(config, steps_per_epoch)
  with_patches = get_method(config.method).uses_masks
  groups = koleo_groups(config) if d.koleo_weight > 0 else 1

  def loss(student, teacher, loss_state, step):
    t_temp = temp_fn(step)
    t_logits = teacher["cls"]["logits"]
    q = dl.teacher_targets(t_logits, mode=d.centering, temperature=t_temp, center=loss_state["center"])
    value, metrics = dl.dino_cross_entropy(student["cls"]["logits"], q, student_temp=d.student_temp,
                                           exclude_same_view=True)
    new_state = dict(loss_state)
    if d.centering == "centering":
      new_state["center"] = dl.update_center(loss_state["center"], t_logits, d.center_momentum)
    if with_patches:
      mask = student["patch_mask"]
      tp = teacher["patch"]["logits"]
      qp = dl.teacher_targets(tp, mode=d.centering, temperature=t_temp, center=loss_state["patch_center"],
                              mask=mask)
      ibot, ibot_metrics = dl.ibot_patch_loss(student["patch"]["logits"], qp, mask, student_temp=d.student_temp)
      metrics.update(ibot_metrics)
      value = value + d.ibot_weight * ibot
      if d.centering == "centering":
        new_state["patch_center"] = dl.update_center(loss_state["patch_center"], tp, d.center_momentum, mask=mask)
    if d.koleo_weight > 0:
      metrics["koleo"] = _koleo(student["backbone_cls"], groups)
      value = value + d.koleo_weight * metrics["koleo"]
    metrics["teacher_temp"] = t_temp
    return value, metrics, new_state

  return loss


def _vmf_logits(out: dict, norms_key: str, temperature, dim: int, terms: int) -> jax.Array:
  """<w_k, z>/tau + log C_p(||w_k||/tau) from head outputs (logits = <w_k, z>) and the prototype norms."""
  log_c = vmf.log_vmf_normalizer(out[norms_key] / temperature, dim, terms=terms, relative=True)
  return out["logits"].astype(jnp.float32) / temperature + log_c


def _make_vmf_loss(config, steps_per_epoch: int):
  """DINO-vMF / iBOT-vMF: vMF-normalised logits for student and teacher, probability-space centering (eq. (9))."""
  d = config.dino
  temp_fn = _teacher_temp_fn(config, steps_per_epoch)
  dim, terms = config.head.out_dim, config.vmf.terms
  with_patches = get_method(config.method).uses_masks
  patch_norms = "patch_prototype_norms" if config.head.separate_patch_head else "prototype_norms"

  def branch(student_out, teacher_out, center, t_temp, norms_key, mask=None):
    s = _vmf_logits(student_out, norms_key, d.student_temp, dim, terms)
    t = _vmf_logits(teacher_out, norms_key, t_temp, dim, terms)
    q = vmf.vmf_teacher_targets(t, center)
    new_center = vmf.probability_centering_update(center, teacher_out["logits"], temperature=t_temp,
                                                  momentum=d.center_momentum, mask=mask)
    return s, q, new_center

  def loss(student, teacher, loss_state, step):
    t_temp = temp_fn(step)
    s_cls = dict(student["cls"], prototype_norms=student["prototype_norms"])
    t_cls = dict(teacher["cls"], prototype_norms=teacher["prototype_norms"])
    s, q, center = branch(s_cls, t_cls, loss_state["center"], t_temp, "prototype_norms")
    value, metrics = dl.dino_cross_entropy(s, q, student_temp=1.0, exclude_same_view=True)
    new_state = dict(loss_state, center=center)
    if with_patches:
      mask = student["patch_mask"]
      s_p = dict(student["patch"], **{patch_norms: student[patch_norms]})
      t_p = dict(teacher["patch"], **{patch_norms: teacher[patch_norms]})
      sp, qp, patch_center = branch(s_p, t_p, loss_state["patch_center"], t_temp, patch_norms, mask=mask)
      ibot, ibot_metrics = dl.ibot_patch_loss(sp, qp, mask, student_temp=1.0)
      metrics.update(ibot_metrics)
      value = value + d.ibot_weight * ibot
      new_state["patch_center"] = patch_center
    metrics["teacher_temp"] = t_temp
    metrics["kappa_mean"] = jnp.mean(student["prototype_norms"]) / d.student_temp
    return value, metrics, new_state

  return loss


def _dino_state(config) -> dict:
  k = config.head.num_prototypes
  kp = config.head.patch_num_prototypes if config.head.separate_patch_head and config.head.patch_num_prototypes else k
  state = {"center": jnp.zeros((1, k), jnp.float32)}
  if get_method(config.method).uses_masks:
    state["patch_center"] = jnp.zeros((1, 1, kp), jnp.float32)
  return state


def _vmf_state(config) -> dict:
  k = config.head.num_prototypes
  kp = config.head.patch_num_prototypes if config.head.separate_patch_head and config.head.patch_num_prototypes else k
  state = {"center": vmf.init_probability_center(k)}
  if get_method(config.method).uses_masks:
    state["patch_center"] = vmf.init_probability_center(kp)[None]
  return state


METHODS: dict[str, Method] = {
    "simdino": Method("simdino", build_head=_projection_head, make_loss=_make_simdino_loss),
    "simdinov2": Method("simdinov2", build_head=_projection_head, make_loss=_make_simdinov2_loss, uses_masks=True),
    "dino": Method("dino", build_head=_dino_head, make_loss=_make_dino_loss, init_loss_state=_dino_state,
                   prototypes=True),
    "dinov2": Method("dinov2", build_head=_dino_head, make_loss=_make_dino_loss, init_loss_state=_dino_state,
                     uses_masks=True, prototypes=True),
    "dino_vmf": Method("dino_vmf", build_head=_dino_head, make_loss=_make_vmf_loss, init_loss_state=_vmf_state,
                       prototypes=True),
    "ibot_vmf": Method("ibot_vmf", build_head=_dino_head, make_loss=_make_vmf_loss, init_loss_state=_vmf_state,
                       uses_masks=True, prototypes=True),
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"config.method={name!r} is not a known method; choose one of {sorted(METHODS)}")
  return METHODS[name]


def mask_positions(config) -> int:
  """Static number of patch positions gathered per global crop for masked methods (0 otherwise): the most a
  block mask can cover, floor(N * max ratio)."""
  if not get_method(config.method).uses_masks:
    return 0
  return max(1, int(math.floor(num_patches(config) * config.masking.ratio[1])))


def build_network(config, seed: int | None = None) -> Network:
  """The network of ``config``: backbone, the method's head and (masked methods with a separate patch head) the
  patch head, initialised from ``seed`` (default ``config.seed``)."""
  rngs = nnx.Rngs(params=config.seed if seed is None else seed)
  backbone = build_backbone(config.model, rngs=rngs)
  head = get_method(config.method).build_head(config, backbone.embed_dim, rngs)
  patch_head = build_patch_head(config, backbone.embed_dim, rngs) if patch_head_needed(config) else None
  return Network(backbone, head, patch_head)
