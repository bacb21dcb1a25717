"""SimDINO loss (Wu et al. 2025, eq. (22)): multi-view alignment minus gamma times the coding rate.

    L = 1/(2 B M Mg) sum_b sum_{i<Mg} sum_{j<M} ||t_bi - s_bj||^2  -  gamma/Mg sum_i R_eps(Z_s[:, i])

The appendix prints "+ gamma R" by mistake; eq. (8) and Algorithm 1 subtract (the coding rate is maximised).
Teacher features are targets: no gradient flows into them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from simdino_jax.losses.coding_rate import coding_rate

_HIGHEST = jax.lax.Precision.HIGHEST
_EXPANSIONS = ("student", "mean")


def _alignment(student: jax.Array, teacher: jax.Array, exclude_same_view: bool) -> jax.Array:
  """Mean over (image, teacher view i, student view j) pairs of 1/2 ||t_i - s_j||^2.

  Reduces over the batch and both view axes. With exclude_same_view the Mg pairs j == i are left out and the
  mean is over Mg (M - 1) pairs per image, as in the official code (divisor 2V - 2 for Mg = 2).
  """
  b, m, _ = student.shape
  mg = teacher.shape[1]
  # ||t - s||^2 = |t|^2 + |s|^2 - 2 <t, s>; (B, Mg, M) cross terms in one matmul.
  cross = jnp.einsum("bid,bjd->bij", teacher, student, precision=_HIGHEST)
  sq_t = jnp.sum(teacher * teacher, axis=-1)[:, :, None]
  sq_s = jnp.sum(student * student, axis=-1)[:, None, :]
  dist = 0.5 * (sq_t + sq_s - 2.0 * cross)
  if exclude_same_view:
    keep = 1.0 - jnp.eye(mg, m, dtype=dist.dtype)  # teacher view i is student view i for i < Mg
    return jnp.sum(dist * keep) / (b * mg * (m - 1))
  return jnp.mean(dist)


def simdino_loss(
  student: jax.Array,
  teacher: jax.Array,
  *,
  eps: float,
  gamma: float,
  exclude_same_view: bool = False,
  expansion: str = "student",
  groups: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SimDINO objective on head outputs.

  Args:
    student: (B, M, d) l2-normalised student features, the Mg global views first then the local views.
    teacher: (B, Mg, d) l2-normalised teacher features of the global views (treated as constants).
    eps: coding-rate precision (paper convention; official eps = eps**2).
    gamma: weight of the coding rate.
    exclude_same_view: drop the pairs where student view j is teacher view i (official code).
    expansion: "student" takes R of the student global features (paper); "mean" takes R of
      (student_global + teacher_global) / 2 (official ``expa_type=1``; the student gets half the gradient).
    groups: per-group covariances for R (see ``coding_rate``); 1 = one covariance over the whole batch.

  Returns:
    (loss, metrics) with metrics "align" (the alignment term) and "rate" (mean R over global views).
  """
  if student.ndim != 3 or teacher.ndim != 3:
    raise ValueError(
      f"simdino_loss expects student (B, M, d) and teacher (B, Mg, d), got {student.shape} and {teacher.shape}"
    )
  b, m, d = student.shape
  mg = teacher.shape[1]
  if teacher.shape[0] != b or teacher.shape[2] != d or mg > m:
    raise ValueError(
      f"simdino_loss: teacher {teacher.shape} does not match student {student.shape} "
      "(need the same batch and dim, and at most as many teacher views as student views)"
    )
  if expansion not in _EXPANSIONS:
    raise ValueError(f"simdino_loss: expansion must be one of {_EXPANSIONS}, got {expansion!r}")
  student = student.astype(jnp.float32)
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))

  align = _alignment(student, teacher, exclude_same_view)

  expand = student[:, :mg]
  if expansion == "mean":
    expand = 0.5 * (expand + teacher)
  # One 2-D decomposition per global view (never a batched one: see coding_rate).
  rate = jnp.mean(jnp.stack([coding_rate(expand[:, i], eps, groups=groups) for i in range(mg)]))

  loss = align - gamma * rate
  return loss, {"align": align, "rate": rate}


PATCH_WEIGHTINGS = ("paper", "official", "masked_mean")


def masked_patch_alignment(
  student_patch: jax.Array,
  teacher_patch: jax.Array,
  mask: jax.Array,
  *,
  weighting: str = "paper",
  num_patches: int | None = None,
) -> jax.Array:
  """Masked-patch alignment 1/2 ||t - s||^2 between the student's masked patches and the unmasked teacher's.

  student_patch, teacher_patch: (B, Mg, U, d); mask: (B, Mg, U) bool, True where the student's patch was masked.
  U is all N patch positions of a crop, or a static subset holding every masked one (then pass ``num_patches=N``).
  Reduces over tokens, views and the batch:
    weighting="paper":       eq. (42) / Algorithm 2: each crop's masked distances summed and divided by N (ALL its
                             patch tokens), averaged over all B * Mg crops, masked or not:
                             1/(2 B Mg N) sum_b sum_i sum_n ||t_bin - s_bin||^2 [patch n of crop (b, i) masked];
    weighting="official":    the official code (``masks_weight`` = 1 / the crop's masked count, summed over crops and
                             divided by B * Mg, so unmasked crops count in the denominator);
    weighting="masked_mean": each crop's masked tokens averaged, then averaged over the crops that have any (neither
                             the paper nor the code: the per-token weight does not depend on how many crops are
                             masked).
  """
  if weighting not in PATCH_WEIGHTINGS:
    raise ValueError(f"weighting must be one of {PATCH_WEIGHTINGS}, got {weighting!r}")
  s = student_patch.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_patch.astype(jnp.float32))
  dist = 0.5 * jnp.sum(jnp.square(t - s), axis=-1)  # (B, Mg, U)
  m = mask.astype(jnp.float32)
  masked = jnp.sum(dist * m, axis=-1)  # (B, Mg): each crop's masked distances
  if weighting == "paper":
    n = mask.shape[-1] if num_patches is None else num_patches
    return jnp.sum(masked) / (masked.size * n)
  count = jnp.sum(m, axis=-1)  # masked tokens per crop
  per_crop = masked / jnp.maximum(count, 1.0)
  if weighting == "official":
    return jnp.sum(per_crop) / per_crop.size
  has = (count > 0).astype(jnp.float32)
  return jnp.sum(per_crop * has) / jnp.maximum(jnp.sum(has), 1.0)


def simdinov2_loss(
  student_cls: jax.Array,
  teacher_cls: jax.Array,
  student_patch: jax.Array,
  teacher_patch: jax.Array,
  mask: jax.Array,
  *,
  eps: float,
  gamma: float,
  weighting: str = "paper",
  exclude_same_view: bool = False,
  expansion: str = "student",
  groups: int = 1,
  num_patches: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SimDINOv2 (paper eq. (42)): 1/2 (cls alignment + masked-patch alignment) - gamma R_eps(student global cls).

  student_cls (B, M, d) with the Mg (masked) global views first; teacher_cls (B, Mg, d) from unmasked crops;
  student_patch / teacher_patch (B, Mg, N, d) head outputs of the global crops' patch tokens (N may be a static
  subset of the positions holding every masked one, e.g. the gathered masked ones: then ``num_patches`` is the
  crop's real patch count); mask (B, Mg, N) bool.

  weighting="paper" is eq. (42): 1/2 (cls term + masked-patch term) - gamma R, the masked-patch term divided by the
  crop's patch count N and averaged over all B * Mg crops (see ``masked_patch_alignment``);
  weighting="official" is the official code's cls + patch (no 1/2), the patch term 1/masked count per crop, summed
  over crops / (B * Mg); weighting="masked_mean" is 1/2 (cls + patch) with the patch term averaged over masked
  crops (an earlier reading of eq. (42), kept for comparison).
  metrics: "align" (cls), "patch_align", "rate".
  """
  _, metrics = simdino_loss(
    student_cls,
    teacher_cls,
    eps=eps,
    gamma=0.0,
    exclude_same_view=exclude_same_view,
    expansion=expansion,
    groups=groups,
  )
  patch = masked_patch_alignment(student_patch, teacher_patch, mask, weighting=weighting, num_patches=num_patches)
  scale = 1.0 if weighting == "official" else 0.5
  loss = scale * (metrics["align"] + patch) - gamma * metrics["rate"]
  return loss, dict(metrics, patch_align=patch)
