"""SimDINOv2 loss against the paper's eq. (42) and the official code (NumPy loops); Table 5 regularizers vs NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from simdino_jax.losses import regularizers
from simdino_jax.losses.simdino import simdinov2_loss


def unit(rng, *shape):
  x = rng.standard_normal(shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_rate(z, eps):
  m, d = z.shape
  return 0.5 * np.linalg.slogdet(np.eye(d) + d / (eps**2 * m) * z.T @ z)[1]


def setup(seed=0, b=4, m=4, mg=2, n=6, d=8):
  rng = np.random.default_rng(seed)
  sc, tc = unit(rng, b, m, d), unit(rng, b, mg, d)
  sp, tp = unit(rng, b, mg, n, d), unit(rng, b, mg, n, d)
  mask = rng.random((b, mg, n)) < 0.4
  mask[0, 0] = False  # one crop without any masked token
  mask[1, 1, :] = False
  mask[1, 1, 2] = True
  return sc, tc, sp, tp, mask


def np_eq42(sc, tc, sp, tp, mask, eps, gamma):
  """The paper's eq. (42), transcribed from the paper and Algorithm 2 (not from our code):

    L = 1/2 [ 1/(2 B M Mg) sum_b sum_{i<Mg} sum_{j<M} ||z_t,bi - z_s,bj||^2
            + 1/(2 B Mg N) sum_b sum_{i<Mg} sum_{n<N} ||z_t,bin - z_s,bin||^2 1[patch n of crop (b, i) is masked] ]
        - gamma/Mg sum_i R_eps(Z_s,i),

  Algorithm 2: patch_sq_dists = mean(sum((Zsg - Ztg)**2, dim=3) * m, dim=2), i.e. each crop's masked squared
  distances divided by N (ALL of its patch tokens), then the mean over all B * Mg crops, masked or not."""
  b, m, _ = sc.shape
  mg, n = tc.shape[1], tp.shape[2]
  cls = sum(np.sum((tc[x, i] - sc[x, j]) ** 2) for x in range(b) for i in range(mg) for j in range(m)) / (
    2 * b * m * mg
  )
  patch = sum(
    np.sum((tp[x, i, t] - sp[x, i, t]) ** 2) * mask[x, i, t] for x in range(b) for i in range(mg) for t in range(n)
  ) / (2 * b * mg * n)
  rate = np.mean([np_rate(sc[:, i], eps) for i in range(mg)])
  return 0.5 * (cls + patch) - gamma * rate


def test_simdinov2_paper_weighting_is_eq42():
  sc, tc, sp, tp, mask = setup()
  got, metrics = simdinov2_loss(
    *(jnp.asarray(a) for a in (sc, tc, sp, tp, mask)), eps=0.5, gamma=0.2, weighting="paper"
  )
  # float32 against float64 loops over <= 100 terms: 1e-5 relative is float32 reassociation, not slack.
  np.testing.assert_allclose(got, np_eq42(sc, tc, sp, tp, mask, 0.5, 0.2), rtol=1e-5, atol=1e-6)
  assert set(metrics) >= {"align", "patch_align", "rate"}


def test_simdinov2_paper_weighting_on_a_gathered_subset_divides_by_all_patches():
  # The step gathers a static subset U of each crop's positions (every masked one); eq. (42) still divides by N.
  sc, tc, sp, tp, mask = setup(4, n=10)
  want = np_eq42(sc, tc, sp, tp, mask, 0.5, 0.3)
  order = np.argsort(~mask, axis=-1, kind="stable")[..., :6]  # masked positions first; no crop has more than 6
  assert mask.sum(-1).max() <= 6
  take = lambda a: np.take_along_axis(a, order[..., None], axis=2)  # noqa: E731
  got, _ = simdinov2_loss(
    *(jnp.asarray(a) for a in (sc, tc, take(sp), take(tp), np.take_along_axis(mask, order, axis=-1))),
    eps=0.5,
    gamma=0.3,
    weighting="paper",
    num_patches=10,
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_simdinov2_masked_mean_weighting_averages_over_masked_crops():
  sc, tc, sp, tp, mask = setup(2)
  b, mg = tc.shape[:2]
  cls = np.mean([0.5 * np.sum((tc[x, i] - sc[x, j]) ** 2) for x in range(b) for i in range(mg) for j in range(4)])
  per_crop = [
    np.mean([0.5 * np.sum((tp[x, i, t] - sp[x, i, t]) ** 2) for t in np.nonzero(mask[x, i])[0]])
    for x in range(b)
    for i in range(mg)
    if mask[x, i].any()
  ]
  want = 0.5 * (cls + np.mean(per_crop)) - 0.2 * np.mean([np_rate(sc[:, i], 0.5) for i in range(mg)])
  got, _ = simdinov2_loss(
    *(jnp.asarray(a) for a in (sc, tc, sp, tp, mask)), eps=0.5, gamma=0.2, weighting="masked_mean"
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_simdinov2_official_weighting_equals_official_code():
  # Official: -comp - gamma R + ibot, ibot = -(1/(2B)) sum_masked w_t cos(t, s) (2B = all global crops).
  sc, tc, sp, tp, mask = setup(1)
  b, m, _ = sc.shape
  eps_off, gamma = 0.05, 1 / 8 + 1 / 4
  sim = np.array([[np.mean(np.sum(tc[:, i] * sc[:, j], -1)) for j in range(m)] for i in range(2)])
  sim[0, 0] = sim[1, 1] = 0
  comp = sim.sum() / (2 * m - 2)
  e = sc[:, :2]
  r = np.mean([0.5 * np.linalg.slogdet(np.eye(8) + 8 / (b * eps_off) * e[:, i].T @ e[:, i])[1] for i in range(2)])
  ibot = 0.0
  for x in range(b):
    for i in range(2):
      idx = np.nonzero(mask[x, i])[0]
      for t in idx:
        ibot -= np.sum(tp[x, i, t] * sp[x, i, t]) / len(idx) / (2 * b)
  official = -comp - gamma * r + ibot
  ours, _ = simdinov2_loss(
    *(jnp.asarray(a) for a in (sc, tc, sp, tp, mask)),
    eps=math.sqrt(eps_off),
    gamma=gamma,
    weighting="official",
    exclude_same_view=True,
  )
  masked_crops = int(np.sum(mask.any(-1)))
  # 1 - cos = 1/2 ||t - s||^2 for unit vectors: ours = official + 1 + (masked crops)/(2B).
  np.testing.assert_allclose(float(ours), official + 1 + masked_crops / (2 * b), rtol=1e-5, atol=1e-5)


def test_uniformity_matches_numpy():
  z = unit(np.random.default_rng(2), 10, 5)
  pairs = [np.exp(-2 * np.sum((z[i] - z[j]) ** 2)) for i in range(10) for j in range(10) if i != j]
  np.testing.assert_allclose(regularizers.uniformity(jnp.asarray(z)), np.log(np.mean(pairs)), rtol=1e-5)


def test_infonce_matches_numpy_and_stops_teacher_gradient():
  rng = np.random.default_rng(3)
  s, t = unit(rng, 7, 4), unit(rng, 7, 4)
  logits = s @ t.T / 0.1
  want = -np.mean([logits[i, i] - np.log(np.sum(np.exp(logits[i]))) for i in range(7)])
  np.testing.assert_allclose(regularizers.infonce(jnp.asarray(s), jnp.asarray(t)), want, rtol=1e-5)
  g = jax.grad(lambda y: regularizers.infonce(jnp.asarray(s), y))(jnp.asarray(t))
  assert float(jnp.abs(g).max()) == 0.0


def test_barlow_twins_matches_numpy():
  rng = np.random.default_rng(4)
  a, b = rng.standard_normal((16, 3)), rng.standard_normal((16, 3))
  za = (a - a.mean(0)) / (a.std(0) + 1e-6)
  zb = (b - b.mean(0)) / (b.std(0) + 1e-6)
  c = za.T @ zb / 16
  want = np.sum((1 - np.diag(c)) ** 2) + 5e-3 * (np.sum(c**2) - np.sum(np.diag(c) ** 2))
  np.testing.assert_allclose(regularizers.barlow_twins(jnp.asarray(a), jnp.asarray(b)), want, rtol=1e-4)
