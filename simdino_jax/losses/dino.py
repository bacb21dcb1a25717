"""DINO / iBOT / DINOv2 losses: multi-crop cross-entropy with centring, iBOT patch loss, Sinkhorn-Knopp, KoLeo.

Pure functions on arrays (REFERENCE sections 2, 3.2-3.5). Layout is batch-major: (B, views, ...) with the Mg global
views first. Everything runs in float32 whatever the network's compute dtype, softmaxes through
``jax.nn.log_softmax``/``softmax`` (max-subtracted), and every contraction uses precision HIGHEST: with K = 65536
prototypes and teacher temperatures of 0.04 the targets are nearly one-hot, and bf16-pass matmuls on TPU/GPU lose
exactly the small probabilities the cross-entropy weights.

Teacher quantities are targets: every function stops the gradient into teacher logits, targets and centres.
Reductions over the batch (means, centre updates, Sinkhorn-Knopp sums) run over the whole global batch, so under a
batch-sharded ``jit`` they are the all-reduces of the official code; KoLeo is the exception (see ``koleo_loss``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
_TARGET_MODES = ("centering", "sinkhorn_knopp", "softmax_batch")


def _safe(x: jax.Array) -> jax.Array:
  """x where x > 0, else 1: divisions of all-zero rows/columns leave them zero instead of NaN."""
  return jnp.where(x > 0, x, 1.0)


def _entropy(q: jax.Array) -> jax.Array:
  """-sum_k q log q over the last axis, with 0 log 0 = 0."""
  return -jnp.sum(jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0), axis=-1)


def _pair_mask(mg: int, m: int, exclude_same_view: bool) -> jax.Array:
  """(Mg, M) float weights of the (teacher view i, student view j) pairs; teacher view i is student view i."""
  if exclude_same_view:
    return 1.0 - jnp.eye(mg, m, dtype=jnp.float32)
  return jnp.ones((mg, m), jnp.float32)


def dino_cross_entropy(
  student_logits: jax.Array, teacher_probs: jax.Array, *, student_temp: float = 0.1, exclude_same_view: bool = True
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Multi-crop cross-entropy between given teacher targets and the student, averaged over view pairs.

  L = 1/P sum_{(i, j) pairs} mean_b [ -sum_k q_{b,i,k} log softmax(s_{b,j} / student_temp)_k ],

  with P = Mg (M - 1) pairs when ``exclude_same_view`` (DINO v1's 2V - 2 for Mg = 2; DINOv2's dino_global +
  dino_local is the same average) and Mg M otherwise. Reduces over the batch, both view axes and K.

  Args:
    student_logits: (B, M, K) student scores, the Mg global views first. Divided by ``student_temp`` here (pass
      1.0 for logits that are already scaled, e.g. DINO-vMF logits).
    teacher_probs: (B, Mg, K) teacher targets (rows sum to 1; e.g. from ``teacher_targets``). No gradient.
    student_temp: tau_s.
    exclude_same_view: skip the pairs where student view j is teacher view i.

  Returns:
    (loss, metrics): "ce" (= loss), "kl" (pair-averaged KL(q_i || p_j) = ce - the pair-weighted teacher entropy),
    "teacher_entropy" (mean over images and teacher views of H(q)), "prototypes_used" (number of distinct argmax
    of q over the batch and teacher views, float32).
  """
  if student_logits.ndim != 3 or teacher_probs.ndim != 3:
    raise ValueError(
      f"dino loss expects student (B, M, K) and teacher (B, Mg, K), got {student_logits.shape} and "
      f"{teacher_probs.shape}"
    )
  b, m, k = student_logits.shape
  mg = teacher_probs.shape[1]
  if teacher_probs.shape[0] != b or teacher_probs.shape[2] != k or mg > m:
    raise ValueError(f"dino loss: teacher {teacher_probs.shape} does not match student {student_logits.shape}")
  keep = _pair_mask(mg, m, exclude_same_view)
  num_pairs = int(mg * (m - 1) if exclude_same_view else mg * m)
  if num_pairs == 0:
    raise ValueError("dino loss: no (teacher, student) view pair left (need M > 1 with exclude_same_view)")

  q = jax.lax.stop_gradient(teacher_probs.astype(jnp.float32))
  logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
  # (B, Mg, M): -sum_k q_bik log p_bjk, one contraction over K.
  ce = -jnp.einsum("bik,bjk->bij", q, logp, precision=_HIGHEST)
  loss = jnp.sum(ce * keep) / (b * num_pairs)

  ent = _entropy(q)  # (B, Mg)
  ent_pairs = jnp.sum(ent * jnp.sum(keep, axis=1)) / (b * num_pairs)
  top = jnp.argmax(q, axis=-1).reshape(-1)
  used = jnp.zeros((k,), jnp.bool_).at[top].set(True)
  metrics = {
    "ce": loss,
    "kl": loss - ent_pairs,
    "teacher_entropy": jnp.mean(ent),
    "prototypes_used": jnp.sum(used).astype(jnp.float32),
  }
  return loss, metrics


def dino_loss(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  center: jax.Array,
  *,
  student_temp: float = 0.1,
  teacher_temp: float | jax.Array,
  exclude_same_view: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DINO v1 loss (REFERENCE 2.1): centred, sharpened teacher targets against the student over view pairs.

  q = softmax((t - center) / teacher_temp) (stop-gradient), p = softmax(s / student_temp);
  L = 1/P sum_{i, j != i} mean_b [-sum_k q_bi log p_bj] (P = 2V - 2 for Mg = 2 and exclude_same_view).

  Args:
    student_logits: (B, M, K) raw student head outputs, the Mg global views first.
    teacher_logits: (B, Mg, K) raw teacher head outputs of the global views (no gradient).
    center: (1, K) centre (``update_center`` after the loss, so step t uses batches up to t - 1). No gradient.
    student_temp, teacher_temp: tau_s (0.1) and tau_t (scheduled 0.04 -> 0.07 by the caller).
    exclude_same_view: skip same-view pairs (DINO v1).

  Returns:
    (loss, metrics) as ``dino_cross_entropy``.
  """
  q = teacher_targets(teacher_logits, mode="centering", temperature=teacher_temp, center=center)
  return dino_cross_entropy(student_logits, q, student_temp=student_temp, exclude_same_view=exclude_same_view)


def update_center(
  center: jax.Array, teacher_logits: jax.Array, momentum: float | jax.Array = 0.9, *, mask: jax.Array | None = None
) -> jax.Array:
  """EMA centre: center * m + (1 - m) * mean of the raw teacher logits over every axis but the last.

  Args:
    center: (1, K) (DINO CLS) or (1, 1, K) (iBOT patches); any shape with K last elements.
    teacher_logits: (B, Mg, K) or (B, Mg, N, K) raw teacher logits; the mean reduces over the batch, views (and
      tokens): under a batch-sharded jit this is the official all-reduced sum / (2 B N_devices).
    momentum: m (0.9).
    mask: optional (B, Mg, N) bool; only masked tokens enter the mean (DINOv2 patch centre). With no masked token
      the centre is left unchanged.

  Returns:
    the new centre with ``center``'s shape, float32, stop-gradient.
  """
  k = teacher_logits.shape[-1]
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)).reshape(-1, k)
  center = jax.lax.stop_gradient(center.astype(jnp.float32))
  if mask is None:
    mean = jnp.mean(t, axis=0)
    has_rows = jnp.bool_(True)
  else:
    w = jax.lax.stop_gradient(mask).reshape(-1).astype(jnp.float32)
    count = jnp.sum(w)
    mean = jnp.matmul(w, t, precision=_HIGHEST) / _safe(count)
    has_rows = count > 0
  new = center * momentum + (1.0 - momentum) * mean.reshape(center.shape)
  return jnp.where(has_rows, new, center)


def sinkhorn_knopp(
  logits: jax.Array, temperature: float | jax.Array, num_iters: int = 3, *, mask: jax.Array | None = None
) -> jax.Array:
  """DINOv2's Sinkhorn-Knopp teacher (REFERENCE 3.3): balanced soft assignments of the n rows to K prototypes.

  Q = exp(logits / T) (K x n in the official layout, here kept as (n, K)); Q /= sum(Q); then ``num_iters`` times:
  Q /= per-prototype sums (over the rows); Q /= K; Q /= per-row sums (over K); Q /= n. Finally Q *= n, so every
  row sums to 1 and, as the iterations converge, every prototype gets total mass n / K.

  Reduces over the n rows (the global batch: all-reduce under a batch-sharded jit) and over K. float32.
  For stability we subtract the per-prototype max over the rows before exp: the first per-prototype
  normalisation cancels any per-prototype factor exactly, so this equals the official (un-shifted) result and is
  at least as safe as subtracting the global max (no prototype column can underflow to all zeros).

  Args:
    logits: (n, K) teacher logits (any leading shape is flattened to rows and restored).
    temperature: T (teacher temperature).
    num_iters: number of iterations (3).
    mask: optional bool array of logits.shape[:-1]; rows with mask False are left out (their output row is 0)
      and n counts the selected rows only (DINOv2's masked-patch use, n = number of masked tokens).

  Returns:
    targets of logits' shape, float32, stop-gradient.
  """
  shape = logits.shape
  k = shape[-1]
  x = jax.lax.stop_gradient(logits.astype(jnp.float32)).reshape(-1, k) / temperature
  if mask is None:
    valid = jnp.ones((x.shape[0], 1), jnp.bool_)
  else:
    valid = jax.lax.stop_gradient(mask).reshape(-1, 1).astype(jnp.bool_)
  n_rows = jnp.sum(valid.astype(jnp.float32))
  col_max = jnp.max(jnp.where(valid, x, -jnp.inf), axis=0, keepdims=True)
  col_max = jnp.where(jnp.isfinite(col_max), col_max, 0.0)
  q = jnp.where(valid, jnp.exp(jnp.where(valid, x - col_max, 0.0)), 0.0)
  q = q / _safe(jnp.sum(q))
  for _ in range(num_iters):
    q = q / _safe(jnp.sum(q, axis=0, keepdims=True))  # per prototype, over the rows
    q = q / k
    q = q / _safe(jnp.sum(q, axis=1, keepdims=True))  # per row, over K
    q = q / _safe(n_rows)
  q = q * n_rows
  return jax.lax.stop_gradient(q.reshape(shape))


def softmax_over_batch(
  logits: jax.Array, temperature: float | jax.Array, *, mask: jax.Array | None = None
) -> jax.Array:
  """DINO appendix's "Softmax(batch)" teacher output operation (Tables 14-15, next to centering and Sinkhorn-Knopp).

  What the appendix says: its paragraph "Details on the Softmax(batch) variant" gives it as code, and the first
  author explains (facebookresearch/dino issue #49) that in the Softmax(batch) and Sinkhorn-Knopp rows no softmax
  over the channel dimension is appended, "since the normalization in the channel dimension is done by others means
  (SK or simple normalization)". We read it as: a softmax over the batch axis (each prototype's column of
  exp(t / T) normalised over the samples), then the simple per-sample normalisation over K so every row is a
  distribution. That is one Sinkhorn-Knopp iteration (``sinkhorn_knopp(..., num_iters=1)``: its global, /K and /n
  factors cancel); it is written here on its own so the two can be checked against each other.

  Reduces over the n rows (all leading axes flattened, the global batch under a batch-sharded jit, as
  ``sinkhorn_knopp`` here; call it per view to normalise each view's batch separately) and over K. float32,
  max-shifted per prototype (cancelled by the batch softmax). mask: optional bool of logits.shape[:-1]; rows with
  False are left out and get 0. Returns targets of logits' shape, stop-gradient.
  """
  shape = logits.shape
  k = shape[-1]
  x = jax.lax.stop_gradient(logits.astype(jnp.float32)).reshape(-1, k) / temperature
  valid = jnp.ones((x.shape[0], 1), jnp.bool_) if mask is None else jax.lax.stop_gradient(mask).reshape(-1, 1)
  x = jnp.where(valid, x, -jnp.inf)
  p = jnp.where(valid, jax.nn.softmax(x, axis=0), 0.0)  # over the batch, per prototype
  p = p / _safe(jnp.sum(p, axis=1, keepdims=True))  # per sample, over K
  return jax.lax.stop_gradient(p.reshape(shape))


def teacher_targets(
  teacher_logits: jax.Array,
  *,
  mode: str,
  temperature: float | jax.Array,
  center: jax.Array | None = None,
  num_iters: int = 3,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Teacher probabilities from raw teacher logits (..., K), so a method can switch the centring scheme.

  mode "centering": softmax((t - center) / temperature) over K, per row (``center`` broadcasts, e.g. (1, K)).
  mode "sinkhorn_knopp": ``sinkhorn_knopp`` over all leading axes flattened into rows (the whole global batch;
  ``mask`` selects the rows, e.g. masked patch tokens); ``center`` is ignored.
  mode "softmax_batch": ``softmax_over_batch`` (DINO appendix), rows as for "sinkhorn_knopp".
  Returns float32 targets of the logits' shape, stop-gradient.
  """
  if mode == "centering":
    if center is None:
      raise ValueError("teacher_targets: mode 'centering' needs a center")
    t = teacher_logits.astype(jnp.float32) - center.astype(jnp.float32)
    return jax.lax.stop_gradient(jax.nn.softmax(t / temperature, axis=-1))
  if mode == "sinkhorn_knopp":
    return sinkhorn_knopp(teacher_logits, temperature, num_iters, mask=mask)
  if mode == "softmax_batch":
    return softmax_over_batch(teacher_logits, temperature, mask=mask)
  raise ValueError(f"teacher_targets: mode must be one of {_TARGET_MODES}, got {mode!r}")


def ibot_patch_loss(
  student_patch_logits: jax.Array, teacher_patch_targets: jax.Array, mask: jax.Array, *, student_temp: float = 0.1
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DINOv2 iBOT masked-patch loss (REFERENCE 3.2), dense over all N tokens with the mask as weights.

  L = -1/(B Mg) sum_{b, i} sum_{masked t} w_bit sum_k q_bitk log softmax(s_bit / student_temp)_k,
  w_bit = 1 / (number of masked tokens of image (b, i)). Every image counts in the denominator B Mg, also those
  with no masked token (they contribute 0), as in DINOv2. Reduces over batch, views, tokens and K.

  Args:
    student_patch_logits: (B, Mg, N, K) student head outputs on the (masked) global views' patch tokens.
    teacher_patch_targets: (B, Mg, N, K) teacher probabilities (centred or Sinkhorn-Knopp'd). No gradient.
    mask: (B, Mg, N) bool, True where the student's token was masked.
    student_temp: tau_s.

  Returns:
    (loss, metrics) with "ibot_ce" (= loss) and "masked_fraction" (mean of the mask).
  """
  if student_patch_logits.ndim != 4 or student_patch_logits.shape != teacher_patch_targets.shape:
    raise ValueError(
      f"ibot_patch_loss expects student and teacher (B, Mg, N, K) of one shape, got "
      f"{student_patch_logits.shape} and {teacher_patch_targets.shape}"
    )
  if mask.shape != student_patch_logits.shape[:3]:
    raise ValueError(f"ibot_patch_loss: mask {mask.shape} does not match tokens {student_patch_logits.shape[:3]}")
  b, mg = mask.shape[:2]
  q = jax.lax.stop_gradient(teacher_patch_targets.astype(jnp.float32))
  logp = jax.nn.log_softmax(student_patch_logits.astype(jnp.float32) / student_temp, axis=-1)
  ce = -jnp.sum(q * logp, axis=-1)  # (B, Mg, N), reduces over K
  m = mask.astype(jnp.float32)
  weights = m / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)
  # Where-select instead of multiply: unmasked tokens never feed inf * 0 into the sum.
  loss = jnp.sum(jnp.where(mask, weights * ce, 0.0)) / (b * mg)
  return loss, {"ibot_ce": loss, "masked_fraction": jnp.mean(m)}


def koleo_loss(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """DINOv2 KoLeo regulariser (REFERENCE 3.4) on the rows of ``x`` (n, d), a scalar.

  x <- x / max(||x||, eps); nn(i) = argmax_{j != i} <x_i, x_j> (diagonal set to -1); d_i = ||x_i - x_nn(i) + eps||
  (torch PairwiseDistance adds eps to the difference); loss = -mean_i log(d_i + eps). Reduces over the n rows.

  DINOv2 applies it per device and per global-crop chunk (0.1 * (KoLeo(chunk 1) + KoLeo(chunk 2))): the caller
  picks the rows. Duplicate rows (or n = 1, where a row is its own neighbour) give d_i = eps sqrt(d), so the loss
  is large but finite (-log(eps (sqrt(d) + 1)) ~ 18 - log(sqrt(d) + 1) per row) with gradients of order 1/eps:
  this is the inf/NaN of dinov2 #143/#314 under fp16; avoid duplicate images in a chunk.
  """
  if x.ndim != 2:
    raise ValueError(f"koleo_loss expects (n, d), got {x.shape}")
  n = x.shape[0]
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  x = x / jnp.maximum(norm, eps)
  dots = jnp.matmul(x, x.T, precision=_HIGHEST)  # (n, n), reduces over d
  dots = jnp.where(jnp.eye(n, dtype=jnp.bool_), -1.0, dots)
  nn = jax.lax.stop_gradient(jnp.argmax(dots, axis=1))
  diff = x - x[nn] + eps
  dist = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
  return -jnp.mean(jnp.log(dist + eps))


def koleo_per_group(x: jax.Array, groups: int, eps: float = 1e-8) -> jax.Array:
  """Mean over ``groups`` consecutive equal row groups of ``koleo_loss`` (x (n, d), n divisible by groups).

  DINOv2 computes KoLeo on each GPU's own rows and DDP averages the gradients over the GPUs, so the objective is the
  mean over devices of the per-device KoLeo: with the batch axis sharded over devices, group g is device g's rows.
  Each row's neighbour is searched within its group only. Reduces over rows, then groups."""
  n = x.shape[0]
  if groups < 1 or n % groups:
    raise ValueError(f"koleo_per_group: {n} rows do not split into {groups} equal groups")
  x = x.reshape(groups, n // groups, x.shape[-1])  # batch-major: stays on its device
  return jnp.mean(jax.vmap(lambda rows: koleo_loss(rows, eps))(x))
