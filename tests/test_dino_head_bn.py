"""``head.use_bn_in_head``: DINO's head with BatchNorm (main_dino.py ``--use_bn_in_head``, appendix C's "BN in the
head" ablation), checked against a float64 NumPy transcription of facebookresearch/dino vision_transformer.py:

    layers = [nn.Linear(in_dim, hidden_dim)]
    if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers.append(nn.GELU())
    for _ in range(nlayers - 2):
        layers.append(nn.Linear(hidden_dim, hidden_dim))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    ...
    x = self.mlp(x); x = nn.functional.normalize(x, dim=-1, p=2); x = self.last_layer(x)

with torch's BatchNorm1d in training mode (batch mean and biased variance, eps 1e-5; running statistics with momentum
0.1 and the unbiased variance), over every row the head sees at once (the MultiCropWrapper concatenates the crops).
Without the switch the head holds no statistics (its state is the params-only state it always was)."""

import math

import jax
import numpy as np
import pytest
from conftest import make_tiny_config
from flax import nnx

from simdino_jax import config as config_lib
from simdino_jax.errors import ConfigError
from simdino_jax.models.heads import DINOHead


def np_dino_head(x, weights, biases, gammas, betas, v, g):
  """The official DINOHead forward (training mode) in float64; returns (z, logits, batch stats per BN)."""
  x = np.asarray(x, np.float64)
  stats = []
  for i, (w, b) in enumerate(zip(weights, biases)):
    x = x @ w + b
    if i < len(weights) - 1:
      mean, var = x.mean(0), x.var(0)
      stats.append((mean, x.var(0, ddof=1)))
      x = (x - mean) / np.sqrt(var + 1e-5) * gammas[i] + betas[i]
      x = 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))  # nn.GELU(): exact erf
  z = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  w_eff = v * (g / np.linalg.norm(v, axis=0, keepdims=True))  # weight_norm, dim=0 of torch's (K, in) weight
  return z, z @ w_eff, stats


def test_head_with_bn_matches_the_official_forward_and_statistics():
  # Shapes only (an eager init compiles op by op), the values drawn here: BN affine parameters non-trivial.
  def make():
    return DINOHead(12, hidden_dim=16, bottleneck_dim=8, num_layers=3, num_prototypes=10, use_bn=True, rngs=nnx.Rngs(0))

  graphdef, shapes = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(0)
  state = jax.tree_util.tree_map_with_path(lambda path, s: _draw(rng, jax.tree_util.keystr(path), s), shapes)
  head = nnx.merge(graphdef, state)
  x = rng.normal(size=(6, 3, 12)).astype(np.float32)  # (batch, crops, dim): BN over all 18 rows
  params = lambda m: np.asarray(m[...], np.float64)  # noqa: E731
  z, logits, stats = np_dino_head(
    x.reshape(-1, 12),
    [params(layer.kernel) for layer in head.proj.mlp],
    [params(layer.bias) for layer in head.proj.mlp],
    [params(bn.scale) for bn in head.proj.bn],
    [params(bn.bias) for bn in head.proj.bn],
    params(head.last_layer.weight_v),
    params(head.last_layer.weight_g),
  )
  out, state = jax.jit(lambda s, x: _apply(graphdef, s, x))(state, x)
  np.testing.assert_allclose(np.asarray(out["z"]).reshape(-1, 8), z, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(out["logits"]).reshape(-1, 10), logits, rtol=2e-5, atol=2e-6)
  updated = nnx.merge(graphdef, state)
  for bn, (mean, unbiased) in zip(updated.proj.bn, stats):  # from running mean 0, var 1
    np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 + 0.1 * unbiased, rtol=1e-4, atol=1e-6)
    assert int(bn.num_batches_tracked[...]) == 1


def _draw(rng, path, s):
  if "num_batches_tracked" in path or "mean" in path:
    return np.zeros(s.shape, s.dtype)
  if "var" in path:
    return np.ones(s.shape, s.dtype)
  if "scale" in path or "weight_g" in path:
    return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
  return (0.3 * rng.normal(size=s.shape)).astype(s.dtype)


def _apply(graphdef, state, x):
  head = nnx.merge(graphdef, state, copy=True)
  out = head(x)
  return out, nnx.state(head)


def test_default_head_has_no_statistics():
  head = nnx.eval_shape(
    lambda: DINOHead(12, hidden_dim=16, bottleneck_dim=8, num_layers=3, num_prototypes=10, rngs=nnx.Rngs(0))
  )
  assert not hasattr(head.proj, "bn")
  assert len(jax.tree_util.tree_leaves(nnx.state(head, nnx.BatchStat))) == 0


@pytest.mark.parametrize("method", ["dinov2", "dino_vmf", "ibot_vmf"])
def test_use_bn_in_head_is_for_dino_only(method):
  config = make_tiny_config()
  config.method, config.head.use_bn_in_head = "dino", True
  config_lib.validate(config, num_devices=1)
  config.method = method
  with pytest.raises(ConfigError) as e:
    config_lib.validate(config, num_devices=1)
  assert str(e.value).startswith("config.head.use_bn_in_head:") and "\n" not in str(e.value), str(e.value)
