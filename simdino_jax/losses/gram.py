"""Gram anchoring (DINOv3): the MSE between the Gram matrices of the student's patch features and a Gram teacher's,
and the Gram teacher's refresh schedule.

Follows facebookresearch/dinov3 ``dinov3/loss/gram_loss.py`` (``GramLoss.forward``) and the refresh rule of
``dinov3/train/train.py`` (the "[GRAM] Update gram teacher" block), as pure functions:

  loss = mean_{i,j} (S_ij - T_ij)^2,  S = F_s F_s^T,  T = F_t F_t^T,   F = l2-normalised patch features (``normalize``)

over the N x N patch pairs of each image (``img_level``, DINOv3's ViT-7B setting) or over all pairs of the batch's
B*N patches (``img_level=False``: DINOv3's default, "at the local batch level", i.e. each GPU's own rows: here
``groups`` consecutive row groups, one per device, whose equal-size MSEs average to the mean over all groups' pairs).

Negative similarities (``negatives``):
  "keep"              nothing removed (DINOv3's ``remove_neg=False, remove_only_teacher_neg=False``);
  "remove"            both matrices clipped at 0 (``remove_neg=True``);
  "teacher"           ``remove_only_teacher_neg=True`` as the official code EXECUTES it: the teacher's negatives are
                      zeroed first and the student's are then zeroed where ``(student_sim < 0) & (target_sim < 0)``,
                      a condition the already-zeroed teacher never meets, so only the teacher is clipped;
  "teacher_intended"  what that branch's comment and condition mean: the teacher's negatives zeroed, and the student's
                      zeroed where both were negative (so a student pair is not pushed up to 0 where the teacher
                      was negative too).

Tokens: ``mask`` (B, N) bool selects the patches that enter (DINOv3's ``tokens_used`` "masked" / "unmasked" with
``img_level=False``: ``student_patches[masks]``): a pair counts when both its patches are selected, and the mean runs
over the selected pairs only, which is the official flatten-then-Gram of the selected rows.

Everything in float32 with precision HIGHEST (Gram entries are cosines whose differences are the loss). The Gram teacher
is a target: no gradient reaches it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
NEGATIVES = ("keep", "remove", "teacher", "teacher_intended")
TOKENS_USED = ("all", "masked", "unmasked")  # DINOv3's gram.tokens_used: the patches that enter (``mask``)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch F.normalize(x, dim=-1): x / max(||x||, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _gram(x: jax.Array) -> jax.Array:
  return jnp.einsum("...nd,...md->...nm", x, x, precision=_HIGHEST)


def gram_loss(
  student: jax.Array,
  teacher: jax.Array,
  *,
  normalize: bool = True,
  img_level: bool = True,
  negatives: str = "keep",
  groups: int = 1,
  mask: jax.Array | None = None,
) -> jax.Array:
  """DINOv3's Gram loss of student patch features against the Gram teacher's.

  Args:
    student: (B, N, D) student patch features (DINOv3: the backbone's normed patch tokens of the global crops,
      ``patch_pre_head``, masked crops included).
    teacher: (B, N, D) the Gram teacher's patch features on the same crops (resized to the student's grid when it saw
      larger crops). No gradient.
    normalize: l2-normalise the features first (``gram.normalized``).
    img_level: one N x N Gram per image (True) or one (B/G * N)^2 Gram per row group (False).
    negatives: one of ``NEGATIVES`` (module docstring).
    groups: G, the row groups of the batch-level Gram (one per device, as DINOv3's per-GPU batch); ignored at image
      level. Must divide B.
    mask: optional (B, N) bool, the patches that enter (batch level only, as in DINOv3).

  Returns: the scalar loss, a mean over the pairs (per image or per group, then over images/groups: equal sizes).
  """
  if negatives not in NEGATIVES:
    raise ValueError(f"gram negatives must be one of {NEGATIVES}, got {negatives!r}")
  if img_level and mask is not None:
    raise ValueError("gram: a token mask needs img_level=False (DINOv3 asserts the same)")
  s = student.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher).astype(jnp.float32)
  if normalize:
    s, t = _l2_normalize(s), _l2_normalize(t)
  b, n, d = s.shape
  weights = None
  if not img_level:
    if b % groups:
      raise ValueError(f"gram: batch {b} does not split into {groups} row groups")
    s = s.reshape(groups, (b // groups) * n, d)
    t = t.reshape(groups, (b // groups) * n, d)
    if mask is not None:
      m = mask.reshape(groups, (b // groups) * n).astype(jnp.float32)
      weights = m[:, :, None] * m[:, None, :]
  gs, gt = _gram(s), _gram(t)
  if negatives == "remove":
    gs, gt = jnp.maximum(gs, 0.0), jnp.maximum(gt, 0.0)
  elif negatives == "teacher":
    gt = jnp.maximum(gt, 0.0)
  elif negatives == "teacher_intended":
    gs = jnp.where((gs < 0) & (gt < 0), 0.0, gs)
    gt = jnp.maximum(gt, 0.0)
  sq = jnp.square(gs - gt)
  if weights is None:
    return jnp.mean(sq)
  return jnp.sum(sq * weights) / jnp.maximum(jnp.sum(weights), 1.0)


# ---- the Gram teacher's refreshes --------------------------------------------------------------------------------
def refreshes_before(step, *, first: int, every: int, max_updates: int = 0):
  """Refreshes of the Gram teacher done before iteration ``step`` (0-based): DINOv3 refreshes after iteration ``it``
  when ``it + 1 >= it_first_update`` and ``(it + 1) % update_frequency == 0``, at most ``max_updates`` times
  (0: unlimited), so the count is the multiples of ``every`` in [max(first, 1), step], capped.

  DINOv3 recomputes this count on resume as ceil((start_iter + 1 - it_first_update) / update_frequency), which
  agrees only when it_first_update is a multiple of update_frequency (e.g. first 1005000, every 10000, resumed at
  1009000: it counts 1 refresh where none happened). Here the Gram teacher is part of the checkpointed state and the
  count is a function of the step, so a resumed run refreshes exactly when an uninterrupted one does.
  """
  step = jnp.asarray(step, jnp.int32)
  lo = max(first, 1)
  count = jnp.maximum(step // every - (lo - 1) // every, 0)
  return jnp.minimum(count, max_updates) if max_updates > 0 else count


def refresh_after(step, *, first: int, every: int, max_updates: int = 0):
  """Whether the Gram teacher is refreshed from the EMA teacher after the update of iteration ``step`` (bool array)."""
  step = jnp.asarray(step, jnp.int32)
  due = (step + 1 >= first) & ((step + 1) % every == 0)
  if max_updates > 0:
    due = due & (refreshes_before(step, first=first, every=every, max_updates=max_updates) < max_updates)
  return due
