"""Tests for simdino_jax.models.heads."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from simdino_jax.models.heads import ProjectionHead, WeightNormPrototypes, l2_normalize


def flat(module):
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_projection_head_shapes_unit_norm_and_any_leading_dims():
  head = ProjectionHead(32, hidden_dim=64, out_dim=16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 3, 32))
  y = head(x)
  assert y.shape == (2, 3, 16) and y.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), 1.0, rtol=1e-5)
  # (6, 32) vs (2, 3, 32) inputs: differently shaped matmuls may block their 32/64-term sums differently.
  np.testing.assert_allclose(head(x.reshape(6, 32)).reshape(2, 3, 16), y, rtol=1e-5, atol=1e-6)
  assert head(x[0, 0]).shape == (16,)


def test_projection_head_parameter_names_and_init():
  head = ProjectionHead(32, hidden_dim=64, out_dim=16, rngs=nnx.Rngs(0))
  p = flat(head)
  assert {k: v.shape for k, v in p.items()} == {
    "mlp/0/kernel": (32, 64),
    "mlp/0/bias": (64,),
    "mlp/1/kernel": (64, 64),
    "mlp/1/bias": (64,),
    "mlp/2/kernel": (64, 16),
    "mlp/2/bias": (16,),
  }
  assert all(np.all(p[f"mlp/{i}/bias"] == 0) for i in range(3))
  assert abs(p["mlp/1/kernel"].std() - 0.02) < 0.002


@pytest.mark.parametrize("num_layers, expected", [(1, [(32, 16)]), (2, [(32, 64), (64, 16)])])
def test_projection_head_num_layers(num_layers, expected):
  head = ProjectionHead(32, hidden_dim=64, out_dim=16, num_layers=num_layers, rngs=nnx.Rngs(0))
  assert [flat(head)[f"mlp/{i}/kernel"].shape for i in range(num_layers)] == expected
  assert head(jnp.ones((2, 32))).shape == (2, 16)


def test_projection_head_is_linear_exact_gelu_stack_then_l2():
  head = ProjectionHead(32, hidden_dim=64, out_dim=16, rngs=nnx.Rngs(1))
  p = flat(head)
  x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32) * 30
  h = x
  for i in range(3):
    h = h @ p[f"mlp/{i}/kernel"] + p[f"mlp/{i}/bias"]
    if i < 2:
      h = np.asarray(jax.nn.gelu(h, approximate=False))
  ref = h / np.linalg.norm(h, axis=-1, keepdims=True)
  np.testing.assert_allclose(head(jnp.asarray(x)), ref, rtol=1e-4, atol=1e-5)


def test_projection_head_bfloat16_compute_returns_float32_unit_vectors():
  head = ProjectionHead(32, hidden_dim=64, out_dim=16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  y = head(jnp.ones((4, 32), jnp.bfloat16))
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), 1.0, rtol=1e-5)


def test_l2_normalize_zero_vector_gives_zero_not_nan():
  np.testing.assert_array_equal(l2_normalize(jnp.zeros((2, 4))), 0.0)


def test_prototypes_init_and_unit_norm_effective_weights():
  proto = WeightNormPrototypes(16, 48, rngs=nnx.Rngs(0))
  p = flat(proto)
  assert p["weight_v"].shape == (16, 48) and p["weight_g"].shape == (48,)
  bound = 1 / math.sqrt(16)
  assert np.abs(p["weight_v"]).max() <= bound and np.abs(p["weight_v"]).max() > 0.9 * bound
  assert np.all(p["weight_g"] == 1)
  w = proto.weights()
  assert w.shape == (16, 48)
  np.testing.assert_allclose(jnp.linalg.norm(w, axis=0), 1.0, rtol=1e-5)


def test_prototype_logits_equal_x_at_weights_and_follow_g():
  proto = WeightNormPrototypes(16, 48, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 16))
  logits = proto(x)
  assert logits.shape == (2, 3, 48) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, x @ proto.weights(), rtol=1e-5, atol=1e-6)
  # Direction comes from v only (scale-invariant), length from g.
  proto.weight_v[...] = proto.weight_v[...] * 3.0
  g = jnp.arange(1.0, 49.0)
  proto.weight_g[...] = g
  np.testing.assert_allclose(jnp.linalg.norm(proto.weights(), axis=0), g, rtol=1e-5)
  np.testing.assert_allclose(proto(x), logits * g, rtol=1e-4, atol=1e-5)
