"""Projection heads of the DINO family (docs/methods.md#heads).

`ProjectionHead` is the DINO/DINOv2 head up to the l2-normalised bottleneck (SimDINO uses it alone);
`WeightNormPrototypes` is DINO's weight-normalised last layer (DINO, DINOv2/iBOT, DINO-vMF logits).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from simdino_jax.models.vit import gelu_exact, trunc_normal_init, uniform_init

_L2_EPS = 1e-12


def l2_normalize(x: jax.Array, eps: float = _L2_EPS) -> jax.Array:
  """PyTorch `F.normalize`: x / max(||x||, eps) (eps bounds the norm, it is not added to it)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


class ProjectionHead(nnx.Module):
  """Linear(in->hidden) GELU [Linear(hidden->hidden) GELU]* Linear(hidden->out), then l2-normalise.

  `num_layers` counts the Linear layers (official `nlayers`, default 3); 1 means a single Linear(in->out).
  Parameters live under `mlp/<i>` (official `mlp.<2i>`, the GELUs taking the odd indices there)."""

  def __init__(
    self,
    in_dim: int,
    *,
    hidden_dim: int = 2048,
    out_dim: int = 256,
    num_layers: int = 3,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    self.mlp = nnx.List(
      [
        nnx.Linear(
          dims[i],
          dims[i + 1],
          kernel_init=trunc_normal_init(0.02),
          bias_init=nnx.initializers.zeros_init(),
          dtype=dtype,
          param_dtype=jnp.float32,
          rngs=rngs,
        )
        for i in range(num_layers)
      ]
    )
    self.in_dim = in_dim
    self.out_dim = out_dim

  def __call__(self, x: jax.Array) -> jax.Array:
    lead = x.shape[:-1]
    # 2-D (rows, features) matmuls are the fast layout on CPU.
    x = x.reshape(-1, x.shape[-1])
    for i, layer in enumerate(self.mlp):
      x = layer(x)
      if i < len(self.mlp) - 1:
        x = gelu_exact(x)
    # Normalise in float32 whatever the compute dtype: the losses work on these unit vectors.
    x = l2_normalize(x.astype(jnp.float32))
    return x.reshape(*lead, self.out_dim)


class WeightNormPrototypes(nnx.Module):
  """DINO's last layer: weight-normalised Linear without bias, w_k = g_k v_k / ||v_k||.

  `weight_v` (in_dim, K) keeps PyTorch's default Linear init U(+-1/sqrt(in_dim)) (the official trunc-normal
  re-init runs before this layer exists); `weight_g` (K,) starts at 1, so every prototype starts unit-norm.
  Whether g trains (DINO `norm_last_layer=False`, DINOv2) or stays frozen is the optimiser's business."""

  def __init__(self, in_dim: int, num_prototypes: int, *, rngs: nnx.Rngs):
    self.weight_v = nnx.Param(uniform_init(1.0 / math.sqrt(in_dim))(rngs.params(), (in_dim, num_prototypes)))
    self.weight_g = nnx.Param(jnp.ones((num_prototypes,), jnp.float32))
    self.in_dim = in_dim
    self.num_prototypes = num_prototypes

  def weights(self) -> jax.Array:
    """Effective (in_dim, K) float32 matrix; no eps in the norm, as torch's weight_norm."""
    v = self.weight_v[...].astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=0, keepdims=True))
    return v * (self.weight_g[...].astype(jnp.float32) / norm)

  def __call__(self, x: jax.Array) -> jax.Array:
    lead = x.shape[:-1]
    logits = x.reshape(-1, self.in_dim).astype(jnp.float32) @ self.weights()
    return logits.reshape(*lead, self.num_prototypes)


class DINOHead(nnx.Module):
  """DINO / DINOv2 / DINO-vMF head: projection MLP -> l2-normalised bottleneck z -> weight-normalised prototypes.

  Returns {"z": (..., bottleneck) unit vectors, "logits": (..., K) = z . w_k}; the prototype norms ||w_k|| = |g_k|
  are exposed by `prototype_norms()` for the vMF normaliser."""

  def __init__(
    self,
    in_dim: int,
    *,
    hidden_dim: int = 2048,
    bottleneck_dim: int = 256,
    num_layers: int = 3,
    num_prototypes: int = 65536,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.proj = ProjectionHead(
      in_dim, hidden_dim=hidden_dim, out_dim=bottleneck_dim, num_layers=num_layers, dtype=dtype, rngs=rngs
    )
    self.last_layer = WeightNormPrototypes(bottleneck_dim, num_prototypes, rngs=rngs)

  def prototype_norms(self) -> jax.Array:
    return jnp.abs(self.last_layer.weight_g[...].astype(jnp.float32))

  def __call__(self, x: jax.Array) -> dict:
    z = self.proj(x)
    return {"z": z, "logits": self.last_layer(z)}
