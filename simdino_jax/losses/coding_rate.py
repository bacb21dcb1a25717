"""Coding rate R_eps and the paper's gamma rules (SimDINO, Wu et al. 2025, eq. (5) and Remark C.3).

R_eps(Z) = 1/2 logdet(I_d + d / (eps^2 m) Z^T Z) for the m rows of Z (m, d).

Everything here runs in float32 with matmul precision HIGHEST whatever the compute dtype of the network:
the covariance of a few hundred unit vectors has eigenvalues spanning orders of magnitude, and TPU/GPU default
precision (bf16 passes) loses the small ones, which is where the official code saw NaNs (SimDINO #19/#20).

Mapping from the official code (RobinWu218/SimDINO, ``MCRLoss``), for N devices of B images each:
  * official ``eps`` is our ``eps**2`` (it scales by p/eps, we by d/eps^2), i.e. our eps = sqrt(eps_official);
  * official ``reduce_cov=1`` (covariance over the global batch) is our default ``groups=1``;
  * official ``reduce_cov=0`` (per-device covariance, but normalised by the GLOBAL batch N*B) is our
    ``groups=N`` with eps = sqrt(N * eps_official): dividing by N*B instead of B inflates eps^2 by N;
  * official ``coeff`` multiplies the alignment term: our ``gamma`` = gamma_official / coeff with
    gamma_official = 1/p + 1/(N*B), and the official total is ``coeff * (ours - 1)`` for unit-norm features.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _half_logdet_identity_plus(gram: jax.Array, scale: jax.Array | float) -> jax.Array:
  """1/2 logdet(I + scale * gram) for one symmetric PSD 2-D matrix, via Cholesky.

  Kept 2-D on purpose: batched Cholesky deadlocks on simulated multi-device CPU (docs/distributed.md#simulated-cpu-devices).
  """
  k = gram.shape[0]
  mat = jnp.eye(k, dtype=jnp.float32) + scale * gram
  chol = jnp.linalg.cholesky(mat)
  # logdet = 2 sum log diag(L); the 1/2 of R cancels the 2.
  return jnp.sum(jnp.log(jnp.diagonal(chol)))


def coding_rate(z: jax.Array, eps: float, *, groups: int = 1, form: str = "auto") -> jax.Array:
  """Coding rate of the rows of ``z``, averaged over ``groups`` equal consecutive row groups.

  Args:
    z: (n, d) features (any float dtype; cast to float32).
    eps: the paper's epsilon (quantisation precision); the scale is d / (eps^2 m).
    groups: split the n rows into this many consecutive groups of m = n / groups rows and average R over them
      (the official code's per-device covariance when groups = number of devices). 1 = one global covariance.
    form: "covariance" uses the d x d matrix Z^T Z (reduces over rows: under a batch-sharded mesh this is a
      cheap all-reduce), "gram" the m x m matrix Z Z^T (Sylvester's identity gives the same determinant),
      "auto" picks the smaller matrix.

  Returns:
    scalar float32 R_eps (mean over groups).
  """
  if z.ndim != 2:
    raise ValueError(f"coding_rate expects (n, d) features, got shape {z.shape}")
  n, d = z.shape
  if groups < 1 or n % groups:
    raise ValueError(f"coding_rate: groups={groups} must divide the number of rows n={n}")
  if form not in ("auto", "covariance", "gram"):
    raise ValueError(f"coding_rate: form must be 'auto', 'covariance' or 'gram', got {form!r}")
  m = n // groups
  use_gram = form == "gram" or (form == "auto" and m < d)
  z = z.astype(jnp.float32)
  scale = d / (eps**2 * m)
  rates = []
  for g in range(groups):  # static, small: one 2-D decomposition per group (see _half_logdet_identity_plus)
    zg = z[g * m : (g + 1) * m]
    if use_gram:
      gram = jnp.matmul(zg, zg.T, precision=_HIGHEST)  # (m, m): reduces over the feature axis
    else:
      gram = jnp.matmul(zg.T, zg, precision=_HIGHEST)  # (d, d): reduces over the rows (batch)
    rates.append(_half_logdet_identity_plus(gram, scale))
  return jnp.mean(jnp.stack(rates))


def gamma_simdino(eps: float, batch_size: int, dim: int, num_views: int) -> float:
  """Remark C.3: gamma = 2 eps sqrt(B / (d M min(d, B))), balancing alignment and coding-rate gradient norms.

  batch_size is the number of rows in each covariance (global batch, or the group size with ``groups``);
  num_views M is the total number of student views (global + local).
  """
  return 2.0 * eps * math.sqrt(batch_size / (dim * num_views * min(dim, batch_size)))


def gamma_simdinov2(
  eps: float, batch_size: int, dim: int, num_views: int, mask_ratio: float, num_patches: int
) -> float:
  """Remark C.3 for SimDINOv2: eps (1/sqrt(M) + sqrt((1 - alpha) / N_glo)) sqrt(B / (d min(d, B))).

  mask_ratio alpha is the fraction of a global view's patches that are masked, num_patches N_glo the number of
  patch tokens of a global view (196 for 224/16).
  """
  return (
    eps
    * (1.0 / math.sqrt(num_views) + math.sqrt((1.0 - mask_ratio) / num_patches))
    * math.sqrt(batch_size / (dim * min(dim, batch_size)))
  )
