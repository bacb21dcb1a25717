"""Collapse-prevention terms the paper's Table 5 swaps in for the coding rate (all minimised).

Each takes l2-normalised features of the student's global views and returns a scalar float32:
  uniformity(z):          Wang & Isola (2020): log mean_{i != j} exp(-t ||z_i - z_j||^2), t = 2. Reduces over pairs
                          of batch rows.
  infonce(s, t):          contrastive cross-entropy: row b of s must pick row b of t among all rows of t (the other
                          images are negatives), temperature tau. Reduces over the batch.
  barlow_twins(a, b):     Zbontar et al. (2021): batch-standardise both views, C = a^T b / n;
                          sum_k (1 - C_kk)^2 + lambda sum_{k != l} C_kl^2. Reduces over the batch (C) and features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def uniformity(z: jax.Array, t: float = 2.0) -> jax.Array:
  z = z.astype(jnp.float32)
  n = z.shape[0]
  sq = jnp.sum(z * z, axis=-1)
  d2 = sq[:, None] + sq[None, :] - 2.0 * jnp.matmul(z, z.T, precision=_HIGHEST)
  logits = -t * jnp.maximum(d2, 0.0)
  logits = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, logits)  # pairs i != j only
  return jax.nn.logsumexp(logits) - jnp.log(n * (n - 1.0))


def infonce(s: jax.Array, t: jax.Array, temperature: float = 0.1) -> jax.Array:
  s = s.astype(jnp.float32)
  t = jax.lax.stop_gradient(t.astype(jnp.float32))
  logits = jnp.matmul(s, t.T, precision=_HIGHEST) / temperature  # (n, n): row b's positive is column b
  return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))


def barlow_twins(a: jax.Array, b: jax.Array, lambd: float = 5e-3) -> jax.Array:
  def standardise(x):
    x = x.astype(jnp.float32)
    return (x - x.mean(0)) / (x.std(0) + 1e-6)

  n = a.shape[0]
  c = jnp.matmul(standardise(a).T, standardise(b), precision=_HIGHEST) / n
  on_diag = jnp.sum(jnp.square(1.0 - jnp.diagonal(c)))
  off_diag = jnp.sum(jnp.square(c)) - jnp.sum(jnp.square(jnp.diagonal(c)))
  return on_diag + lambd * off_diag
