"""Coding rate, gamma rules and the SimDINO loss against NumPy float64 implementations written from the formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simdino_jax.losses.coding_rate import coding_rate, gamma_simdino, gamma_simdinov2
from simdino_jax.losses.simdino import simdino_loss


def unit_rows(rng, *shape):
  x = rng.standard_normal(shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---- NumPy references (float64, written from the paper / official code, not from our implementation) ----
def np_rate(z, eps):
  m, d = z.shape
  return 0.5 * np.linalg.slogdet(np.eye(d) + d / (eps**2 * m) * z.T @ z)[1]


def np_rate_grad(z, eps):
  """d/dZ 1/2 logdet(I + a Z^T Z) = a Z (I + a Z^T Z)^-1."""
  m, d = z.shape
  a = d / (eps**2 * m)
  return a * z @ np.linalg.inv(np.eye(d) + a * z.T @ z)


def np_eq22(s, t, eps, gamma):
  """Paper eq. (22): 1/(2BMMg) sum_b sum_i sum_j ||t_bi - s_bj||^2 - gamma/Mg sum_i R(Z_s[:, i])."""
  b, m, _ = s.shape
  mg = t.shape[1]
  align = sum(np.sum((t[bb, i] - s[bb, j]) ** 2) for bb in range(b) for i in range(mg) for j in range(m))
  align /= 2 * b * m * mg
  rate = np.mean([np_rate(s[:, i], eps) for i in range(mg)])
  return align - gamma * rate, align, rate


def np_official_mcr(s, t, eps_official, coeff, n_devices=1):
  """Official SimDINO v1 MCRLoss (docs/methods.md#official-simdino-loss), expa_type=1, per device, averaged over devices (DDP).

  s: (B_global, V, p), t: (B_global, 2, p); device n holds rows [n*B, (n+1)*B).
  """
  bg, v, p = s.shape
  b = bg // n_devices
  losses = []
  for n in range(n_devices):
    S = np.transpose(s[n * b : (n + 1) * b], (1, 0, 2))  # (V, B, p) crop-major as in the official code
    T = np.transpose(t[n * b : (n + 1) * b], (1, 0, 2))
    cos = lambda x, y: np.sum(x * y, -1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    sim = np.array([[np.mean(cos(T[i], S[j])) for j in range(v)] for i in range(2)])
    sim[0, 0] = sim[1, 1] = 0.0
    comp = sim.sum() / (2 * v - 2)
    E = (S[:2] + T) / 2
    alpha = p / (b * n_devices * eps_official)
    r_code = np.mean([0.5 * np.linalg.slogdet(np.eye(p) + alpha * E[i].T @ E[i])[1] for i in range(2)])
    gamma_code = 1.0 / p + 1.0 / (n_devices * b)
    losses.append(-coeff * comp - gamma_code * r_code)
  return float(np.mean(losses))


# ---- coding rate ----
@pytest.mark.parametrize("n,d", [(64, 16), (16, 64)])  # both the covariance (n >= d) and Gram (n < d) forms
def test_coding_rate_matches_numpy_value_and_gradient(n, d):
  rng = np.random.default_rng(0)
  z = rng.standard_normal((n, d)) * 0.3
  eps = 0.5
  got = coding_rate(jnp.asarray(z, jnp.float32), eps)
  np.testing.assert_allclose(got, np_rate(z, eps), rtol=1e-5)
  grad = jax.grad(lambda x: coding_rate(x, eps))(jnp.asarray(z, jnp.float32))
  np.testing.assert_allclose(grad, np_rate_grad(z, eps), rtol=1e-4, atol=1e-6)


def test_coding_rate_forms_agree():
  z = jnp.asarray(np.random.default_rng(1).standard_normal((24, 40)), jnp.float32)
  cov = coding_rate(z, 0.3, form="covariance")
  gram = coding_rate(z, 0.3, form="gram")
  np.testing.assert_allclose(cov, gram, rtol=1e-5)


def test_coding_rate_groups_average_per_group_rates():
  rng = np.random.default_rng(2)
  z = unit_rows(rng, 48, 8)
  got = coding_rate(jnp.asarray(z, jnp.float32), 0.4, groups=3)
  want = np.mean([np_rate(z[g * 16 : (g + 1) * 16], 0.4) for g in range(3)])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  grad = jax.grad(lambda x: coding_rate(x, 0.4, groups=3))(jnp.asarray(z, jnp.float32))
  want_grad = np.concatenate([np_rate_grad(z[g * 16 : (g + 1) * 16], 0.4) for g in range(3)]) / 3
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_coding_rate_sanity_value_from_official_code():
  # All rows one unit vector: official R = 1/2 log(1 + p / eps_official) = 4.2706 for p=256, eps_official=0.05.
  z = jnp.tile(jnp.eye(256)[:1], (64, 1))
  np.testing.assert_allclose(coding_rate(z, math.sqrt(0.05)), 4.2706, atol=1e-4)


def test_coding_rate_is_float32_for_bfloat16_input():
  z = jnp.asarray(unit_rows(np.random.default_rng(3), 32, 16), jnp.bfloat16)
  r = coding_rate(z, 0.5)
  assert r.dtype == jnp.float32
  np.testing.assert_allclose(r, np_rate(np.asarray(z, np.float64), 0.5), rtol=1e-5)


def test_coding_rate_rejects_bad_groups():
  with pytest.raises(ValueError, match="groups=5"):
    coding_rate(jnp.ones((12, 4)), 0.5, groups=5)


# ---- gamma rules ----
def test_gamma_simdino_balances_the_gradient_bounds():
  # Remark C.3: gamma * ||grad R||_bound = ||grad align||_bound, with bounds 1/(2 eps) sqrt(d min(d,B)/B)
  # (Lemma C.6) and 1/sqrt(M) (Thm C.1).
  for eps, b, d, m in [(0.5, 64, 256, 12), (0.2236, 512, 256, 12), (1.0, 8, 32, 2)]:
    rate_bound = 1 / (2 * eps) * math.sqrt(d * min(d, b) / b)
    assert gamma_simdino(eps, b, d, m) * rate_bound == pytest.approx(1 / math.sqrt(m), rel=1e-12)


def test_gamma_simdinov2_formula():
  eps, b, d, m, alpha, n = 0.2236, 1024, 256, 12, 0.3, 196
  want = eps * (1 / math.sqrt(m) + math.sqrt((1 - alpha) / n)) * math.sqrt(b / (d * min(d, b)))
  assert gamma_simdinov2(eps, b, d, m, alpha, n) == pytest.approx(want, rel=1e-12)
  rate_bound = 1 / (2 * eps) * math.sqrt(d * min(d, b) / b)
  assert gamma_simdinov2(eps, b, d, m, alpha, n) * rate_bound == pytest.approx(
    0.5 * (1 / math.sqrt(m) + math.sqrt((1 - alpha) / n)), rel=1e-12
  )


# ---- SimDINO loss ----
def test_simdino_loss_matches_paper_eq22_value_and_gradient():
  rng = np.random.default_rng(4)
  b, m, mg, d = 6, 5, 2, 8
  s, t = unit_rows(rng, b, m, d), unit_rows(rng, b, mg, d)
  eps, gamma = 0.5, 0.3
  loss, metrics = simdino_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), eps=eps, gamma=gamma)
  want, want_align, want_rate = np_eq22(s, t, eps, gamma)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["align"], want_align, rtol=1e-5)
  np.testing.assert_allclose(metrics["rate"], want_rate, rtol=1e-5)

  grad = jax.grad(lambda x: simdino_loss(x, jnp.asarray(t, jnp.float32), eps=eps, gamma=gamma)[0])(
    jnp.asarray(s, jnp.float32)
  )
  want_grad = (s - t.sum(axis=1, keepdims=True) / mg) / (b * m)  # d/ds_bj: 1/(BMMg) sum_i (s_bj - t_bi)
  for i in range(mg):
    want_grad[:, i] -= gamma / mg * np_rate_grad(s[:, i], eps)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_simdino_loss_teacher_gets_no_gradient():
  rng = np.random.default_rng(5)
  s, t = jnp.asarray(unit_rows(rng, 4, 3, 8)), jnp.asarray(unit_rows(rng, 4, 2, 8))
  g = jax.grad(lambda y: simdino_loss(s, y, eps=0.5, gamma=0.1, expansion="mean")[0])(t)
  assert float(jnp.abs(g).max()) == 0.0


@pytest.mark.parametrize("n_devices", [1, 2])
def test_simdino_loss_equals_official_code_plus_one(n_devices):
  # For unit-norm features: official = ours(exclude_same_view, expansion="mean",
  # eps = sqrt(N * eps_official), gamma = 1/p + 1/(N B), groups=N) - 1   (coeff = 1).
  rng = np.random.default_rng(6)
  bg, v, p, eps_off = 16, 6, 32, 0.05
  s, t = unit_rows(rng, bg, v, p), unit_rows(rng, bg, 2, p)
  official = np_official_mcr(s, t, eps_off, coeff=1.0, n_devices=n_devices)
  ours, _ = simdino_loss(
    jnp.asarray(s, jnp.float32),
    jnp.asarray(t, jnp.float32),
    eps=math.sqrt(n_devices * eps_off),
    gamma=1 / p + 1 / bg,
    exclude_same_view=True,
    expansion="mean",
    groups=n_devices,
  )
  np.testing.assert_allclose(float(ours) - 1.0, official, rtol=1e-5, atol=1e-5)


def test_simdino_loss_exclude_same_view_drops_diagonal_pairs():
  rng = np.random.default_rng(7)
  s, t = unit_rows(rng, 5, 4, 6), unit_rows(rng, 5, 2, 6)
  _, metrics = simdino_loss(jnp.asarray(s), jnp.asarray(t), eps=0.5, gamma=0.0, exclude_same_view=True)
  pairs = [(i, j) for i in range(2) for j in range(4) if i != j]
  want = np.mean([0.5 * np.sum((t[:, i] - s[:, j]) ** 2, -1).mean() for i, j in pairs])
  np.testing.assert_allclose(metrics["align"], want, rtol=1e-5)


def test_simdino_loss_rejects_bad_shapes_and_options():
  s, t = jnp.ones((4, 3, 8)), jnp.ones((4, 2, 8))
  with pytest.raises(ValueError, match="expansion"):
    simdino_loss(s, t, eps=0.5, gamma=0.1, expansion="both")
  with pytest.raises(ValueError, match="does not match"):
    simdino_loss(s, jnp.ones((4, 2, 7)), eps=0.5, gamma=0.1)
