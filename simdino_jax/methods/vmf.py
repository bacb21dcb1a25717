"""DINO-vMF and iBOT-vMF: the vMF head (a DINO head whose outputs carry its prototype norms), the vMF-normalised
cross-entropy with probability-space centering (its centres: the loss state) and the ``config.vmf`` checks.

The prototype freezing, the teacher temperature and the shared prototype checks are DINO's (``dino.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from simdino_jax.errors import require
from simdino_jax.losses import dino as dl
from simdino_jax.losses import vmf as vmf_losses
from simdino_jax.methods import dino
from simdino_jax.methods.base import Method, validate_masking
from simdino_jax.models.heads import DINOHead


# ---- heads -------------------------------------------------------------------------------------------------
class VMFHead(DINOHead):
  """DINOHead whose outputs also carry "prototype_norms" (K,) = ||w_k||, which the vMF normaliser reads (the same
  parameters and the same "z" / "logits")."""

  def __call__(self, x: jax.Array) -> dict:
    return dict(super().__call__(x), prototype_norms=self.prototype_norms())


def vmf_head(config, in_dim: int, rngs: nnx.Rngs) -> nnx.Module:
  return dino.dino_head(config, in_dim, rngs, head_class=VMFHead)


def vmf_patch_head(config, in_dim: int, rngs: nnx.Rngs) -> nnx.Module:
  """iBOT-vMF's separate patch head: ``head.patch_num_prototypes`` prototypes (0: ``head.num_prototypes``)."""
  return dino.dino_head(config, in_dim, rngs, config.head.patch_num_prototypes, head_class=VMFHead)


# ---- losses ------------------------------------------------------------------------------------------------
def _vmf_logits(out: dict, temperature, dim: int, terms: int) -> jax.Array:
  """<w_k, z>/tau + log C_p(||w_k||/tau) from a vMF head's outputs (logits = <w_k, z>, prototype_norms)."""
  log_c = vmf_losses.log_vmf_normalizer(out["prototype_norms"] / temperature, dim, terms=terms, relative=True)
  return out["logits"].astype(jnp.float32) / temperature + log_c


def make_vmf_loss(config, steps_per_epoch: int, *, with_patches: bool):
  """DINO-vMF / iBOT-vMF: vMF-normalised logits for student and teacher, probability-space centering (eq. (9))."""
  d = config.dino
  temp_fn = dino.teacher_temp_fn(config, steps_per_epoch)
  dim, terms = config.head.out_dim, config.vmf.terms
  shared_head = not config.head.separate_patch_head

  def branch(student_out, teacher_out, center, t_temp, mask=None):
    s = _vmf_logits(student_out, d.student_temp, dim, terms)
    t = _vmf_logits(teacher_out, t_temp, dim, terms)
    q = vmf_losses.vmf_teacher_targets(t, center)
    new_center = vmf_losses.probability_centering_update(
      center, teacher_out["logits"], temperature=t_temp, momentum=d.center_momentum, mask=mask
    )
    return s, q, new_center

  def loss(student, teacher, loss_state, step):
    t_temp = temp_fn(step)
    s, q, center = branch(student["cls"], teacher["cls"], loss_state["center"], t_temp)
    value, metrics = dl.dino_cross_entropy(s, q, student_temp=1.0, exclude_same_view=True)
    new_state = dict(loss_state, center=center)
    if with_patches:
      mask = student["patch_mask"]
      s_patch, t_patch = student["patch"], teacher["patch"]
      if shared_head:  # the same norms as the cls outputs': use those, one norms node for both branches (as ever)
        s_patch = dict(s_patch, prototype_norms=student["cls"]["prototype_norms"])
        t_patch = dict(t_patch, prototype_norms=teacher["cls"]["prototype_norms"])
      sp, qp, patch_center = branch(s_patch, t_patch, loss_state["patch_center"], t_temp, mask=mask)
      ibot, ibot_metrics = dl.ibot_patch_loss(sp, qp, mask, student_temp=1.0)
      metrics.update(ibot_metrics)
      value = value + d.ibot_weight * ibot
      new_state["patch_center"] = patch_center
    metrics["teacher_temp"] = t_temp
    metrics["kappa_mean"] = jnp.mean(student["cls"]["prototype_norms"]) / d.student_temp
    return value, metrics, new_state

  return loss


def vmf_state(config, *, with_patches: bool) -> dict:
  """The probability-space centres: (1, K) for the cls logits, (1, 1, K_patch) for the patch logits."""
  state = {"center": vmf_losses.init_probability_center(config.head.num_prototypes)}
  if with_patches:
    state["patch_center"] = vmf_losses.init_probability_center(dino.patch_prototypes(config))[None]
  return state


# ---- config checks -----------------------------------------------------------------------------------------
def validate(config, *, num_devices: int, masked: bool) -> None:
  """The views, ``config.masking`` when ``masked``, the prototype fields, unnormalised prototypes, ``vmf.terms``."""
  del num_devices
  dino.validate_views(config)
  if masked:
    validate_masking(config)
  dino.validate_prototypes(config)
  require(
    config.dino.centering == "centering", "dino.centering", "the vMF methods use probability-space centering only"
  )
  require(
    not config.head.norm_last_layer,
    "head.norm_last_layer",
    "DINO-vMF / iBOT-vMF need unnormalised prototypes: set head.norm_last_layer=False",
  )
  require(1 <= config.vmf.terms <= 5, "vmf.terms", f"must be in 1..5, got {config.vmf.terms}")


# ---- the methods -------------------------------------------------------------------------------------------
def _method(name: str, *, masked: bool, progress_keys: tuple[str, ...]) -> Method:
  return Method(
    name,
    build_head=vmf_head,
    make_loss=functools.partial(make_vmf_loss, with_patches=masked),
    init_loss_state=functools.partial(vmf_state, with_patches=masked),
    validate=functools.partial(validate, masked=masked),
    uses_masks=masked,
    build_patch_head=vmf_patch_head if masked else None,
    prototypes=True,
    optimizer_freezes=dino.prototype_freezes,
    progress_keys=progress_keys,
  )


DINO_VMF = _method("dino_vmf", masked=False, progress_keys=("ce", "teacher_entropy", "prototypes_used"))
IBOT_VMF = _method("ibot_vmf", masked=True, progress_keys=("ce", "ibot_ce", "teacher_entropy", "prototypes_used"))

METHODS = (DINO_VMF, IBOT_VMF)
