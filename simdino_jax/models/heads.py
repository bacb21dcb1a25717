"""Projection heads of the DINO family (docs/methods.md#heads).

`ProjectionHead` is the DINO/DINOv2 head up to the l2-normalised bottleneck (SimDINO uses it alone);
`WeightNormPrototypes` is DINO's weight-normalised last layer (DINO, DINOv2/iBOT, DINO-vMF logits).
`MLP` is the one-hidden-layer perceptron of the classic systems: BYOL's projector / predictor (`BYOLHead`, and the
student predictor `WithPredictor` of DINO's Table 14 "+ pred." row) and MoCo-v2's ``--mlp`` head (`MoCoHead`).
`SwAVHead` is SwAV's projection head (an `MLP` with torch's init) and its unit-norm prototypes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from simdino_jax.models.resnet import BatchNorm
from simdino_jax.models.vit import gelu_exact, trunc_normal_init, uniform_init

_L2_EPS = 1e-12


def l2_normalize(x: jax.Array, eps: float = _L2_EPS) -> jax.Array:
  """PyTorch `F.normalize`: x / max(||x||, eps) (eps bounds the norm, it is not added to it)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


class ProjectionHead(nnx.Module):
  """Linear(in->hidden) [BN] GELU [Linear(hidden->hidden) [BN] GELU]* Linear(hidden->out), then l2-normalise.

  `num_layers` counts the Linear layers (official `nlayers`, default 3); 1 means a single Linear(in->out).
  Parameters live under `mlp/<i>` (official `mlp.<2i>`, the GELUs taking the odd indices there). `use_bn`: DINO's
  ``DINOHead(use_bn=True)`` (main_dino.py ``--use_bn_in_head``): a BatchNorm1d after each hidden Linear, under
  `bn/<i>` (models/resnet.py's BatchNorm: torch numerics, statistics over all rows = every crop the head sees at once,
  as DINO's SyncBN over the MultiCropWrapper's concatenated crops). Without it the module holds no `bn` attribute,
  so the default head's parameters, graph and numbers are unchanged."""

  def __init__(
    self,
    in_dim: int,
    *,
    hidden_dim: int = 2048,
    out_dim: int = 256,
    num_layers: int = 3,
    use_bn: bool = False,
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
    if use_bn:  # official nlayers == 1 is a bare Linear: no BN
      self.bn = nnx.List([BatchNorm(hidden_dim, dtype=dtype) for _ in range(num_layers - 1)])
    self.in_dim = in_dim
    self.out_dim = out_dim

  def __call__(self, x: jax.Array) -> jax.Array:
    lead = x.shape[:-1]
    # 2-D (rows, features) matmuls are the fast layout on CPU.
    x = x.reshape(-1, x.shape[-1])
    bn = getattr(self, "bn", None)
    for i, layer in enumerate(self.mlp):
      x = layer(x)
      if i < len(self.mlp) - 1:
        if bn is not None:
          x = bn[i](x)
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
    use_bn: bool = False,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.proj = ProjectionHead(
      in_dim,
      hidden_dim=hidden_dim,
      out_dim=bottleneck_dim,
      num_layers=num_layers,
      use_bn=use_bn,
      dtype=dtype,
      rngs=rngs,
    )
    self.last_layer = WeightNormPrototypes(bottleneck_dim, num_prototypes, rngs=rngs)

  def prototype_norms(self) -> jax.Array:
    return jnp.abs(self.last_layer.weight_g[...].astype(jnp.float32))

  def __call__(self, x: jax.Array) -> dict:
    z = self.proj(x)
    return {"z": z, "logits": self.last_layer(z)}


# ---- the classic systems' MLP heads (MoCo-v2, BYOL; DINO's student predictor) ----------------------------------------
MLP_INITS = ("haiku", "torch")


def _linear_inits(init: str, fan_in: int) -> tuple:
  """(kernel, bias) initialisers of a Linear: haiku's ``hk.Linear`` default (BYOL: truncated normal, stddev
  1/sqrt(fan_in), cut at 2 stddev, zero bias) or torch's ``nn.Linear`` default (MoCo: U(+-1/sqrt(fan_in)) for both)."""
  std = 1.0 / math.sqrt(fan_in)
  if init == "haiku":
    return trunc_normal_init(std, -2.0 * std, 2.0 * std), nnx.initializers.zeros_init()
  if init == "torch":
    return uniform_init(std), uniform_init(std)
  raise ValueError(f"MLP init must be one of {MLP_INITS}, got {init!r}")


class MLP(nnx.Module):
  """Linear(in->hidden) [BatchNorm] ReLU Linear(hidden->out) on (rows, features).

  BYOL's ``networks.MLP`` is ``use_bn=True, out_bias=False, init="haiku"`` (hk.Linear with bias -> hk.BatchNorm ->
  relu -> hk.Linear without bias); MoCo-v2's ``--mlp`` head (builder.py: ``nn.Sequential(nn.Linear(dim_mlp,
  dim_mlp), nn.ReLU(), fc)``) is ``use_bn=False, out_bias=True, init="torch"``. The BatchNorm is models/resnet.py's
  (torch numerics; batch statistics over all rows, so over the whole sharded batch: SyncBN, as BYOL's
  ``cross_replica_axis``), its running statistics ``nnx.BatchStat``s; computed in float32, output float32."""

  def __init__(
    self,
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    *,
    use_bn: bool,
    out_bias: bool,
    init: str = "haiku",
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    k1, b1 = _linear_inits(init, in_dim)
    k2, b2 = _linear_inits(init, hidden_dim)
    common = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.fc1 = nnx.Linear(in_dim, hidden_dim, kernel_init=k1, bias_init=b1, **common)
    self.bn = BatchNorm(hidden_dim) if use_bn else None
    self.fc2 = nnx.Linear(hidden_dim, out_dim, use_bias=out_bias, kernel_init=k2, bias_init=b2, **common)
    self.out_dim = out_dim

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.fc1(x)
    if self.bn is not None:
      h = self.bn(h)
    return self.fc2(jax.nn.relu(h)).astype(jnp.float32)


def per_view(mlp: nnx.Module, x: jax.Array) -> jax.Array:
  """``mlp`` on (B, M, D) one view at a time, so that BatchNorm statistics are each view's, as BYOL's
  ``apply_once_fn`` per view (view-major batches are never built: the batch axis stays first)."""
  if x.ndim == 2:
    return mlp(x)
  lead = x.shape[:-1]
  x = x.reshape(lead[0], -1, x.shape[-1])
  out = jnp.stack([mlp(x[:, v]) for v in range(x.shape[1])], axis=1)
  return out.reshape(*lead, out.shape[-1])


class BYOLHead(nnx.Module):
  """BYOL's projector and predictor: {"z": projector(x), "p": predictor(z)}, both ``MLP(use_bn, out_bias=False,
  init="haiku")``, hidden 4096 and output 256 in the recipe. The teacher (target) computes "p" too and the loss
  ignores it, as the official target network's forward does (byol_experiment.py runs the same ``_forward``)."""

  def __init__(
    self, in_dim: int, *, hidden_dim: int, out_dim: int, predictor_hidden_dim: int, use_bn: bool, dtype, rngs: nnx.Rngs
  ):
    self.projector = MLP(in_dim, hidden_dim, out_dim, use_bn=use_bn, out_bias=False, dtype=dtype, rngs=rngs)
    self.predictor = MLP(out_dim, predictor_hidden_dim, out_dim, use_bn=use_bn, out_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> dict:
    z = per_view(self.projector, x)
    return {"z": z, "p": per_view(self.predictor, z)}


class MoCoHead(nnx.Module):
  """MoCo-v2's ``--mlp`` head on the backbone feature: Linear(D, D) ReLU Linear(D, dim), torch's default init,
  raw (un-normalised) outputs (the InfoNCE normalises queries and keys)."""

  def __init__(self, in_dim: int, *, out_dim: int, dtype, rngs: nnx.Rngs):
    self.mlp = MLP(in_dim, in_dim, out_dim, use_bn=False, out_bias=True, init="torch", dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return per_view(self.mlp, x)


class WithPredictor(nnx.Module):
  """A head whose output ``key`` also goes through a student predictor (DINO's Table 14 "+ pred." row: BYOL's
  predictor MLP on the head output): returns the head's outputs plus "prediction" = predictor(outputs[key]). The
  teacher computes it too (the step runs one head for both) and the loss reads it only on the student side."""

  def __init__(self, head: nnx.Module, predictor: nnx.Module, key: str = "logits"):
    self.head = head
    self.predictor = predictor
    self.key = key

  def __call__(self, x: jax.Array) -> dict:
    out = dict(self.head(x))
    out["prediction"] = per_view(self.predictor, out[self.key])
    return out


class SwAVHead(nnx.Module):
  """SwAV's projection head and prototypes (facebookresearch/swav ``src/resnet50.py``, ``hidden_mlp`` > 0):
  Linear(in->hidden) -> BatchNorm1d -> ReLU -> Linear(hidden->out) (``MLP`` with torch's init), l2-normalise, then
  the scores against K prototypes (``nn.Linear(out, K, bias=False)``); ``hidden_dim=0`` is the official
  ``hidden_mlp=0``, one Linear.

  Returns {"z": (..., out) unit vectors (the official ``embedding``), "logits": (..., K) = z . w_k (``output``),
  "prototypes": (K, out) the prototype weights in torch's layout (the queue is scored against them)}. All crops go
  through the head as one batch, as the official ``forward_head`` on the concatenated crops (one BN statistic).

  Init as the official: the Linear layers keep torch's default U(+-1/sqrt(fan_in)) for weights and biases (its init
  loop only touches convolutions and norms), BN gamma 1 / beta 0. The prototypes are drawn likewise and stored
  unit-norm: the official loop renormalises them at the start of every iteration, the first included, so its
  network always computes with unit prototypes (``methods/swav.py`` keeps them so through the optimiser).
  ``use_bn``: models/resnet.py's BatchNorm (torch numerics; batch statistics over the global batch = SyncBN)."""

  def __init__(
    self,
    in_dim: int,
    *,
    hidden_dim: int = 2048,
    out_dim: int = 128,
    num_prototypes: int = 3000,
    use_bn: bool = True,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if hidden_dim > 0:
      self.projection = MLP(
        in_dim, hidden_dim, out_dim, use_bn=use_bn, out_bias=True, init="torch", dtype=dtype, rngs=rngs
      )
    else:
      kernel, bias = _linear_inits("torch", in_dim)
      self.projection = nnx.Linear(
        in_dim, out_dim, kernel_init=kernel, bias_init=bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
      )
    w = uniform_init(1.0 / math.sqrt(out_dim))(rngs.params(), (num_prototypes, out_dim))
    self.prototypes = nnx.Param(l2_normalize(w))  # (K, out): torch's weight layout, rows unit-norm
    self.out_dim = out_dim
    self.num_prototypes = num_prototypes

  def __call__(self, x: jax.Array) -> dict:
    lead = x.shape[:-1]
    z = l2_normalize(self.projection(x.reshape(-1, x.shape[-1])).astype(jnp.float32))
    w = self.prototypes[...].astype(jnp.float32)
    logits = jnp.matmul(z, w.T, precision=jax.lax.Precision.HIGHEST)
    return {
      "z": z.reshape(*lead, self.out_dim),
      "logits": logits.reshape(*lead, self.num_prototypes),
      "prototypes": w,
    }
