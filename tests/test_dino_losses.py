"""DINO / iBOT / DINOv2 losses against NumPy float64 loops written from REFERENCE sections 2 and 3."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simdino_jax.losses.dino import (
  dino_cross_entropy,
  dino_loss,
  ibot_patch_loss,
  koleo_loss,
  sinkhorn_knopp,
  teacher_targets,
  update_center,
)


def f32(x):
  return jnp.asarray(x, jnp.float32)


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
  z = x - x.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ---- DINO v1 ----
def np_dino(s, t, c, ts, tt, exclude):
  """DINO v1 (crop-major loop as in the official code): mean over (iq, v != iq) of mean_b CE."""
  b, m, _ = s.shape
  mg = t.shape[1]
  total, n_terms = 0.0, 0
  for iq in range(mg):
    q = np_softmax((t[:, iq] - c) / tt)
    for v in range(m):
      if exclude and v == iq:
        continue
      total += np.mean(np.sum(-q * np_log_softmax(s[:, v] / ts), axis=-1))
      n_terms += 1
  return total / n_terms


@pytest.mark.parametrize("exclude", [True, False])
def test_dino_loss_matches_numpy(exclude):
  rng = np.random.default_rng(0)
  b, m, mg, k = 3, 5, 2, 7
  s = rng.standard_normal((b, m, k)) * 2
  t = rng.standard_normal((b, mg, k)) * 2
  c = rng.standard_normal((1, k)) * 0.3
  loss_fn = jax.jit(
    lambda s_, t_, c_: dino_loss(s_, t_, c_, student_temp=0.1, teacher_temp=0.04, exclude_same_view=exclude)
  )
  loss, metrics = loss_fn(f32(s), f32(t), f32(c))
  ref = np_dino(s, t, c, 0.1, 0.04, exclude)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  assert float(metrics["ce"]) == float(loss)
  q = np_softmax((t - c) / 0.04)
  ent = -np.sum(q * np.log(q), axis=-1)
  np.testing.assert_allclose(float(metrics["teacher_entropy"]), ent.mean(), rtol=1e-4, atol=1e-6)
  # KL: every teacher view meets the same number of student views, so kl = ce - mean entropy.
  np.testing.assert_allclose(float(metrics["kl"]), ref - ent.mean(), rtol=1e-4, atol=1e-5)
  assert float(metrics["prototypes_used"]) == len(set(np.argmax(q, axis=-1).ravel().tolist()))
  assert metrics["prototypes_used"].dtype == jnp.float32


def test_dino_divisor_is_2v_minus_2():
  """With identical uniform logits every CE is log K, so any pair average is log K; with one informative pair the
  divisor shows: only pair (teacher 0, student 1) differs."""
  b, m, k = 2, 4, 5
  s = np.zeros((b, m, k))
  t = np.zeros((b, 2, k))
  loss, _ = dino_loss(f32(s), f32(t), f32(np.zeros((1, k))), teacher_temp=0.04)
  np.testing.assert_allclose(float(loss), math.log(k), rtol=1e-6)
  s[:, 1, 0] = 10.0  # student view 1 puts its mass on prototype 0: changes pairs (0, 1) only (pair (1, 1) skipped)
  loss, _ = dino_loss(f32(s), f32(t), f32(np.zeros((1, k))), teacher_temp=0.04)
  ce01 = -np.mean(np_log_softmax(s[0, 1] / 0.1))
  np.testing.assert_allclose(float(loss), ((2 * m - 2 - 1) * math.log(k) + ce01) / (2 * m - 2), rtol=1e-5)


def test_dino_teacher_and_center_get_no_gradient():
  rng = np.random.default_rng(1)
  s, t, c = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 2, 6)), rng.standard_normal((1, 6))
  grads = jax.grad(lambda s_, t_, c_: dino_loss(s_, t_, c_, teacher_temp=0.05)[0], argnums=(0, 1, 2))(
    f32(s), f32(t), f32(c)
  )
  assert float(jnp.max(jnp.abs(grads[1]))) == 0.0 and float(jnp.max(jnp.abs(grads[2]))) == 0.0
  # Student gradient: d/ds_bjk = 1/(B P tau_s) sum_{i != j} (p_bjk - q_bik).
  q = np_softmax((t - c) / 0.05)
  p = np_softmax(s / 0.1)
  ref = np.zeros_like(s)
  for j in range(4):
    for i in range(2):
      if i != j:
        ref[:, j] += (p[:, j] - q[:, i]) / (2 * 6 * 0.1)
  np.testing.assert_allclose(np.asarray(grads[0]), ref, rtol=1e-4, atol=1e-6)


def test_dino_cross_entropy_with_given_targets_and_errors():
  rng = np.random.default_rng(2)
  s = rng.standard_normal((2, 3, 4))
  q = np_softmax(rng.standard_normal((2, 2, 4)))
  loss, _ = dino_cross_entropy(f32(s), f32(q), student_temp=1.0)
  ref = np.mean([np.mean(np.sum(-q[:, i] * np_log_softmax(s[:, j]), -1)) for i in range(2) for j in range(3) if i != j])
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  with pytest.raises(ValueError):
    dino_cross_entropy(f32(s[:, :1]), f32(q[:, :1]))  # no pair left
  with pytest.raises(ValueError):
    dino_cross_entropy(f32(s), f32(q[..., :3]))


def test_update_center():
  rng = np.random.default_rng(3)
  t = rng.standard_normal((4, 2, 5))
  c = rng.standard_normal((1, 5))
  new = jax.jit(update_center)(f32(c), f32(t), 0.9)
  np.testing.assert_allclose(np.asarray(new), 0.9 * c + 0.1 * t.reshape(-1, 5).mean(0), rtol=1e-6, atol=1e-7)
  assert new.shape == (1, 5)
  # Patch centre (1, 1, K) over masked tokens only.
  tok = rng.standard_normal((4, 2, 3, 5))
  mask = rng.random((4, 2, 3)) < 0.4
  c3 = c[:, None]
  new3 = update_center(f32(c3), f32(tok), 0.8, mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(new3), 0.8 * c3 + 0.2 * tok[mask].mean(0), rtol=1e-5, atol=1e-6)
  same = update_center(f32(c3), f32(tok), 0.8, mask=jnp.zeros((4, 2, 3), bool))
  np.testing.assert_allclose(np.asarray(same), c3, rtol=1e-7)
  g = jax.grad(lambda t_: jnp.sum(update_center(f32(c), t_)))(f32(t))
  assert float(jnp.max(jnp.abs(g))) == 0.0


# ---- Sinkhorn-Knopp ----
def np_sinkhorn(logits, temp, iters):
  """REFERENCE 3.3 in the official K x B layout, float64, no max subtraction."""
  q = np.exp(logits / temp).T  # K x B
  b, k = q.shape[1], q.shape[0]
  q /= q.sum()
  for _ in range(iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  q *= b
  return q.T


def test_sinkhorn_matches_numpy():
  rng = np.random.default_rng(4)
  logits = rng.standard_normal((12, 6)) * 3  # / 0.07: exp up to ~e^150, fine in float64, not in float32
  got = jax.jit(sinkhorn_knopp, static_argnums=2)(f32(logits), 0.07, 3)
  ref = np_sinkhorn(logits, 0.07, 3)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got).sum(1), 1.0, rtol=1e-5)
  assert bool(jnp.all(jnp.isfinite(got)))


def test_sinkhorn_balances_prototypes():
  rng = np.random.default_rng(5)
  n, k = 16, 4
  logits = rng.standard_normal((n, k))
  q = np.asarray(sinkhorn_knopp(f32(logits), 0.5, num_iters=100))
  np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(q.sum(0), n / k, rtol=1e-3)


def test_sinkhorn_mask_equals_subset_and_teacher_targets():
  rng = np.random.default_rng(6)
  logits = rng.standard_normal((2, 3, 5, 8))
  mask = rng.random((2, 3, 5)) < 0.5
  got = np.asarray(teacher_targets(f32(logits), mode="sinkhorn_knopp", temperature=0.1, mask=jnp.asarray(mask)))
  np.testing.assert_allclose(got[mask], np_sinkhorn(logits[mask], 0.1, 3), rtol=2e-4, atol=1e-6)
  assert np.all(got[~mask] == 0.0)
  # Without a mask: all leading axes flattened into rows.
  full = np.asarray(teacher_targets(f32(logits), mode="sinkhorn_knopp", temperature=0.1))
  np.testing.assert_allclose(full.reshape(-1, 8), np_sinkhorn(logits.reshape(-1, 8), 0.1, 3), rtol=2e-4, atol=1e-6)
  cen = np.asarray(teacher_targets(f32(logits), mode="centering", temperature=0.1, center=f32(np.ones((1, 8)))))
  np.testing.assert_allclose(cen, np_softmax((logits - 1.0) / 0.1), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError):
    teacher_targets(f32(logits), mode="centering", temperature=0.1)
  with pytest.raises(ValueError):
    teacher_targets(f32(logits), mode="nope", temperature=0.1)


# ---- KoLeo ----
def np_koleo(x, eps=1e-8):
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
  n = len(x)
  total = 0.0
  for i in range(n):
    best, nn = -np.inf, i
    for j in range(n):
      if j != i and x[i] @ x[j] > best:
        best, nn = x[i] @ x[j], j
    d = np.linalg.norm(x[i] - x[nn] + eps)
    total += np.log(d + eps)
  return -total / n


def test_koleo_matches_numpy():
  rng = np.random.default_rng(7)
  x = rng.standard_normal((10, 6)) * 3
  np.testing.assert_allclose(float(jax.jit(koleo_loss)(f32(x))), np_koleo(x), rtol=1e-5)
  g = jax.grad(koleo_loss)(f32(x))
  assert bool(jnp.all(jnp.isfinite(g)))


def test_koleo_duplicates_are_large_but_finite():
  """Duplicate rows: d = ||eps * 1|| = eps sqrt(d), loss = -log(eps (sqrt(d) + 1)) ~ 17.3 for d = 4 (dinov2 #143)."""
  x = np.array([[1.0, 2.0, 0.0, 0.0]] * 3)
  val = float(koleo_loss(f32(x)))
  np.testing.assert_allclose(val, -math.log(1e-8 * (2.0 + 1.0)), rtol=1e-3)
  one = float(koleo_loss(f32(x[:1])))  # a single row is its own neighbour
  np.testing.assert_allclose(one, val, rtol=1e-3)


# ---- iBOT patch loss ----
def np_ibot(s, q, mask, ts):
  """DINOv2: gather masked tokens, weight each by 1/(#masked in its image), sum, divide by the number of images."""
  b, mg, n, _ = s.shape
  flat_s, flat_q, flat_m = s.reshape(b * mg, n, -1), q.reshape(b * mg, n, -1), mask.reshape(b * mg, n)
  masks_weight = np.concatenate([np.full(m.sum(), 1.0 / m.sum()) for m in flat_m if m.sum()])
  tokens_s, tokens_q = flat_s[flat_m], flat_q[flat_m]
  ce = np.sum(-tokens_q * np_log_softmax(tokens_s / ts), axis=-1)
  return np.sum(ce * masks_weight) / (b * mg)


def test_ibot_patch_loss_matches_numpy():
  rng = np.random.default_rng(8)
  b, mg, n, k = 3, 2, 6, 5
  s = rng.standard_normal((b, mg, n, k)) * 2
  q = np_softmax(rng.standard_normal((b, mg, n, k)) * 3)
  mask = rng.random((b, mg, n)) < 0.5
  mask[0, 1] = False  # an image without masked token still counts in the denominator
  mask[1, 0] = True
  loss, metrics = jax.jit(ibot_patch_loss)(f32(s), f32(q), jnp.asarray(mask))
  np.testing.assert_allclose(float(loss), np_ibot(s, q, mask, 0.1), rtol=1e-5)
  assert float(metrics["ibot_ce"]) == float(loss)
  np.testing.assert_allclose(float(metrics["masked_fraction"]), mask.mean(), rtol=1e-6)
  # Unmasked student tokens and the targets get no gradient; huge logits on unmasked tokens change nothing.
  gs, gq = jax.grad(lambda s_, q_: ibot_patch_loss(s_, q_, jnp.asarray(mask))[0], argnums=(0, 1))(f32(s), f32(q))
  assert float(jnp.max(jnp.abs(gq))) == 0.0
  assert float(jnp.max(jnp.abs(np.asarray(gs)[~mask]))) == 0.0
  s2 = s.copy()
  s2[~mask] = 1e30
  # Eager vs the jitted call above: a sum over ~20 masked tokens' CEs, reassociated (n eps ~ 1e-6): 1e-5.
  np.testing.assert_allclose(float(ibot_patch_loss(f32(s2), f32(q), jnp.asarray(mask))[0]), float(loss), rtol=1e-5)
  with pytest.raises(ValueError):
    ibot_patch_loss(f32(s), f32(q), jnp.asarray(mask[..., :3]))
