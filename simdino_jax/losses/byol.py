"""BYOL's regression loss and the shapes of its projector / predictor MLP (DINO appendix, Tables 14-15: "MSE").

Transcribed from deepmind-research ``byol/byol_experiment.py`` (``loss_fn``), ``byol/utils/helpers.py``
(``regression_loss``, ``l2_normalize``) and ``byol/utils/networks.py`` (``MLP``). The official code is JAX/haiku; the
loss here is the same arithmetic on plain arrays.

Reductions: per-row squared distance over the features, summed over the two symmetric view pairs, then a mean over
the batch passed in. The official ``jnp.mean`` is over each device's rows under ``pmap`` and the gradients are
``pmean``'d over devices (``_update_fn``), i.e. the gradient of the global mean; under a batch-sharded ``jax.jit`` the
mean here is global directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, epsilon: float = 1e-12) -> jax.Array:
  """helpers.py ``l2_normalize``: x * rsqrt(max(sum x^2, epsilon)); note epsilon bounds the SQUARED norm (torch's
  ``F.normalize`` bounds the norm), which only matters for rows of norm below 1e-6."""
  x = x.astype(jnp.float32)
  square_sum = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(square_sum, epsilon))


def regression_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """helpers.py ``regression_loss``: ||x/|x| - y/|y|||^2 per row (= 2 - 2 cos(x, y)), reduced over the last axis."""
  return jnp.sum(jnp.square(l2_normalize(x) - l2_normalize(y)), axis=-1)


def byol_loss(
  prediction_view1: jax.Array,
  prediction_view2: jax.Array,
  projection_view1: jax.Array,
  projection_view2: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """BYOL's symmetric representation loss, as ``loss_fn`` computes it:

      repr_loss = helpers.regression_loss(online['prediction_view1'], stop_gradient(target['projection_view2']))
      repr_loss = repr_loss + helpers.regression_loss(online['prediction_view2'],
                                                      stop_gradient(target['projection_view1']))
      repr_loss = jnp.mean(repr_loss)

  So the loss is mean_b [(2 - 2 cos(p1_b, z'2_b)) + (2 - 2 cos(p2_b, z'1_b))], in [0, 8]: the two view terms are
  summed, not averaged. Reduces over features and the batch.

  Args:
    prediction_view1, prediction_view2: (B, D) online predictor outputs of the two views (gradient flows).
    projection_view1, projection_view2: (B, D) target projector outputs of the two views (stop-gradient here).

  Returns:
    (loss, metrics): "byol" (= loss) and "cosine" (mean cosine similarity of the two predicted pairs).
  """
  shapes = {prediction_view1.shape, prediction_view2.shape, projection_view1.shape, projection_view2.shape}
  if len(shapes) != 1 or prediction_view1.ndim != 2:
    raise ValueError(f"byol_loss expects four (B, D) arrays of one shape, got {sorted(shapes)}")
  z1 = jax.lax.stop_gradient(projection_view1)
  z2 = jax.lax.stop_gradient(projection_view2)
  per_row = regression_loss(prediction_view1, z2) + regression_loss(prediction_view2, z1)
  loss = jnp.mean(per_row)
  return loss, {"byol": loss, "cosine": 1.0 - loss / 4.0}


def mlp_param_shapes(input_size: int, hidden_size: int = 4096, output_size: int = 256) -> dict[str, tuple[int, ...]]:
  """Parameter shapes of BYOL's projector / predictor ``networks.MLP``, a reference for the head to come.

  networks.py: ``hk.Linear(hidden_size, with_bias=True) -> hk.BatchNorm(create_scale=True, create_offset=True,
  decay_rate=0.9, eps=1e-5, cross_replica_axis='i') -> relu -> hk.Linear(output_size, with_bias=False)``; the
  recipe (configs/byol.py) uses hidden 4096 and output 256 for both, the predictor's input being the projector's
  256-d output. BatchNorm statistics are synchronised over the devices (``cross_replica_axis``) and also kept as
  running means (not parameters, not listed). Haiku's names are kept in the keys, and its shapes: hk.BatchNorm
  creates scale and offset of shape ``[1 if i in axis else inputs.shape[i] ...]``, (1, hidden) on (B, hidden) rows.
  """
  return {
    "linear/w": (input_size, hidden_size),
    "linear/b": (hidden_size,),
    "batch_norm/scale": (1, hidden_size),
    "batch_norm/offset": (1, hidden_size),
    "linear_1/w": (hidden_size, output_size),
  }


def pairwise_regression_loss(
  student: jax.Array, teacher: jax.Array, *, exclude_same_view: bool = True
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """BYOL's ``regression_loss`` over DINO's multi-crop view pairs (DINO Table 14 "MSE" row): the squared distance
  of the l2-normalised student output of view j to the l2-normalised teacher output of view i,

      L = 1/P sum_{(i, j) pairs} mean_b ||s_bj/|s_bj| - t_bi/|t_bi|||^2,

  with the pairs of ``losses.dino.dino_cross_entropy`` (P = Mg (M - 1) without the same-view pairs, Mg M with).
  For two views this is half of ``byol_loss`` (BYOL sums its two view terms, DINO averages its pairs). Reduces over
  the features, both view axes and the batch.

  Args:
    student: (B, M, D) student outputs, the Mg global views first (gradient flows).
    teacher: (B, Mg, D) teacher outputs (stop-gradient here).
    exclude_same_view: skip the pairs where student view j is teacher view i.

  Returns:
    (loss, metrics): "mse" (= loss) and "cosine" (the pair-averaged cosine, 1 - loss / 2).
  """
  if student.ndim != 3 or teacher.ndim != 3 or teacher.shape[0] != student.shape[0]:
    raise ValueError(f"pairwise_regression_loss expects (B, M, D) and (B, Mg, D), got {student.shape}, {teacher.shape}")
  b, m, d = student.shape
  mg = teacher.shape[1]
  if teacher.shape[2] != d or mg > m:
    raise ValueError(f"pairwise_regression_loss: teacher {teacher.shape} does not match student {student.shape}")
  keep = jnp.ones((mg, m), jnp.float32)
  if exclude_same_view:
    keep = keep.at[jnp.arange(mg), jnp.arange(mg)].set(0.0)
  num_pairs = mg * (m - 1) if exclude_same_view else mg * m
  if num_pairs == 0:
    raise ValueError("pairwise_regression_loss: no (teacher, student) view pair left")
  s = l2_normalize(student)
  t = l2_normalize(jax.lax.stop_gradient(teacher))
  # ||s - t||^2 = |s|^2 + |t|^2 - 2 s.t for every (i, j) without materialising (B, Mg, M, D) differences.
  dot = jnp.einsum("bid,bjd->bij", t, s, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.sum(jnp.square(t), -1)[:, :, None] + jnp.sum(jnp.square(s), -1)[:, None, :] - 2.0 * dot
  loss = jnp.sum(sq * keep) / (b * num_pairs)
  return loss, {"mse": loss, "cosine": 1.0 - loss / 2.0}
