"""DINO-vMF: log C_p against SciPy's exact Bessel values, vMF logits and probability centring against NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import gammaln, ive, logsumexp

from simdino_jax.losses.vmf import (
  log_vmf_normalizer,
  log_vmf_normalizer_constant,
  probability_centering_update,
  vmf_logit_parts,
  vmf_logits,
  vmf_teacher_targets,
)

KAPPAS = np.logspace(-3, 5, 33)
DIMS = (4, 16, 64, 256, 1024)


# ---- float64 references, independent of the expansion ----
def exact_log_c(kappa, p):
  """log C_p = nu log k - p/2 log 2pi - log I_nu(k) with log I_nu = log ive + k; NaN where SciPy under/overflows."""
  nu = p / 2 - 1
  with np.errstate(all="ignore"):
    v = ive(nu, kappa)
    out = nu * np.log(kappa) - p / 2 * np.log(2 * np.pi) - (np.log(v) + kappa)
  return np.where(np.isfinite(out) & (v > 1e-300), out, np.nan)


def series_log_c(kappa, p, terms=400):
  """Same from the convergent power series I_nu(k) = sum_m (k/2)^(2m+nu) / (m! Gamma(m+nu+1)), in log space."""
  nu = p / 2 - 1
  m = np.arange(terms)
  log_terms = m * np.log(kappa[:, None] ** 2 / 4) - gammaln(m + 1) - gammaln(nu + 1 + m)
  log_i_over_knu = -nu * np.log(2) + logsumexp(log_terms, axis=1)  # log(I_nu(k) / k^nu)
  return -p / 2 * np.log(2 * np.pi) - log_i_over_knu


def exact_dlog_c(kappa, p):
  """d/dk log C_p(k) = -I_{p/2}(k) / I_nu(k); NaN where SciPy under/overflows."""
  nu = p / 2 - 1
  with np.errstate(all="ignore"):
    a, b = ive(p / 2, kappa), ive(nu, kappa)
    out = -a / b
  return np.where(np.isfinite(out) & (a > 1e-300) & (b > 1e-300), out, np.nan)


def reference_log_c(kappa, p):
  """Exact value: SciPy where finite, else the power series where it is cheap and accurate (small kappa)."""
  ref = exact_log_c(kappa, p)
  small = kappa**2 / 4 < 20 * p
  return np.where(np.isnan(ref) & small, series_log_c(kappa, p), ref)


def ours(kappa, p, **kw):
  return np.asarray(log_vmf_normalizer(jnp.asarray(kappa), p, **kw), np.float64)


# Max |error| over KAPPAS of the expansion itself (float64), measured and rounded up ~3x, for terms = 1..5.
EXPANSION_BOUNDS = {
  4: (1.5e-2, 4e-4, 1.2e-5, 1e-6, 5e-8),
  16: (1.5e-2, 4e-4, 1.2e-5, 1e-6, 5e-8),
  64: (8e-3, 1e-4, 2e-6, 6e-8, 3e-9),
  256: (2e-3, 6e-6, 3e-8, 3e-10, 1e-10),
  1024: (5e-4, 4e-7, 1e-9, 1e-10, 1e-10),
}


def test_series_reference_agrees_with_scipy():
  for p in (4, 64, 256):
    a, b = exact_log_c(KAPPAS, p), series_log_c(KAPPAS, p)
    both = ~np.isnan(a) & (KAPPAS**2 / 4 < 20 * p)
    assert both.sum() >= 10
    np.testing.assert_allclose(b[both], a[both], rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("p", DIMS)
def test_expansion_error_tightens_with_terms_float64(p):
  ref = reference_log_c(KAPPAS, p)
  ok = ~np.isnan(ref)
  assert ok.sum() >= 20
  errors = []
  with jax.enable_x64(True):
    for terms in range(1, 6):
      val = ours(KAPPAS, p, terms=terms)
      errors.append(np.max(np.abs(val - ref)[ok]))
  for terms, (err, bound) in enumerate(zip(errors, EXPANSION_BOUNDS[p]), start=1):
    assert err <= bound, (p, terms, err, bound)
  # Strictly better with each term until the float64 reference's own noise (~1e-10 at |log C| ~ 1e5).
  for a, b in zip(errors, errors[1:]):
    assert b < a or b < 1e-9, errors


def test_paper_error_levels_terms1():
  """REFERENCE section 4: |error| <= 2.7e-3 (p = 64) and <= 6.6e-4 (p = 256) over kappa in [0.5, 5000]."""
  kappa = np.logspace(np.log10(0.5), np.log10(5000), 25)
  with jax.enable_x64(True):
    for p, bound in ((64, 2.75e-3), (256, 6.7e-4)):
      ref = reference_log_c(kappa, p)
      ok = ~np.isnan(ref)
      assert np.max(np.abs(ours(kappa, p, terms=1) - ref)[ok]) <= bound


@pytest.mark.parametrize("p", DIMS)
@pytest.mark.parametrize("terms", (1, 3, 5))
def test_float32_value_matches_exact(p, terms):
  ref = reference_log_c(KAPPAS, p)
  ok = ~np.isnan(ref)
  val = ours(KAPPAS.astype(np.float32), p, terms=terms)
  assert val.dtype == np.float64 and np.all(np.isfinite(val))
  # expansion error + float32 rounding of kappa, of the constant and of each kappa-dependent term (~3 ulps of
  # |log C| ~ 1.8e4 seen at p = 16): ~8 float32 ulps leaves room for libm / FMA differences between CPUs.
  scale = np.abs(ref) + abs(log_vmf_normalizer_constant(p, terms=terms))
  tol = EXPANSION_BOUNDS[p][terms - 1] + 1e-6 * scale
  err = np.abs(val - ref)
  assert np.all(err[ok] <= tol[ok]), (p, terms, np.max(err[ok] - tol[ok]))


@pytest.mark.parametrize("p", DIMS)
def test_derivative_matches_bessel_ratio(p):
  """jax.grad (float32) against -I_{p/2}(k) / I_nu(k): relative error shrinking with terms."""
  ref = exact_dlog_c(KAPPAS, p)
  ok = ~np.isnan(ref)
  assert ok.sum() >= 10
  rel_bounds = (2e-3, 2e-4, 2e-5, 3e-6, 2e-6)  # terms 1..5; the last ones are float32-limited
  for terms, bound in zip(range(1, 6), rel_bounds):
    # Elementwise function: the gradient of the sum is the derivative at each kappa (eager: no compile).
    grad = jax.grad(lambda k, t=terms: jnp.sum(log_vmf_normalizer(k, p, terms=t)))
    g = np.asarray(grad(jnp.asarray(KAPPAS, jnp.float32)), np.float64)
    assert np.all(np.isfinite(g))
    rel = np.abs(g - ref)[ok] / np.abs(ref)[ok]
    assert np.max(rel) <= bound, (p, terms, np.max(rel))


def test_small_kappa_derivative_is_accurate():
  """Near kappa = 0, d/dk log C_p = -k / (2 (nu + 1)) + O(k^3): checked where SciPy still underflows for p = 1024."""
  k = np.array([1e-3, 1e-2, 1e-1], np.float32)
  for p in (4, 256, 1024, 4096):
    nu = p / 2 - 1
    g = np.asarray(jax.grad(lambda x: jnp.sum(log_vmf_normalizer(x, p, terms=3)))(jnp.asarray(k)))
    np.testing.assert_allclose(g, -k / (2 * (nu + 1)), rtol=1e-3)


def test_finite_in_float32_over_full_range():
  kappa = jnp.asarray(np.concatenate([[0.0], np.logspace(-3, 5, 49)]), jnp.float32)
  for p in (3, 4, 5, 16, 255, 256, 1024, 4096):
    for terms in (1, 2, 5):
      f = lambda k, p=p, t=terms: log_vmf_normalizer(k, p, terms=t)
      val, grad = f(kappa), jax.grad(lambda k: jnp.sum(f(k)))(kappa)
      assert val.dtype == jnp.float32
      assert bool(jnp.all(jnp.isfinite(val))) and bool(jnp.all(jnp.isfinite(grad))), (p, terms)
      # log C_p is decreasing in kappa (its derivative is -I_{p/2}/I_nu < 0).
      assert bool(jnp.all(grad[1:] < 0)), (p, terms)
  # Jitted (one compile) and batched with an arbitrary shape.
  f = jax.jit(jax.value_and_grad(lambda k: jnp.sum(log_vmf_normalizer(k, 4096, terms=3))))
  val, grad = f(kappa.reshape(5, 10))
  assert grad.shape == (5, 10) and bool(jnp.isfinite(val)) and bool(jnp.all(jnp.isfinite(grad)))


def test_reference_values_p256():
  """REFERENCE section 4 (no-constant form, p = 256, terms = 1): 578.661592, 578.468393, 560.377974 at 1, 10, 100."""
  val = np.asarray(log_vmf_normalizer(jnp.asarray([1.0, 10.0, 100.0]), 256, terms=1, relative=True), np.float64)
  ref = np.array([578.661592, 578.468393, 560.377974])
  np.testing.assert_allclose(val - val[0], ref - ref[0], atol=2e-5)
  full = np.asarray(log_vmf_normalizer(jnp.asarray([1.0, 10.0, 100.0]), 256, terms=1), np.float64)
  np.testing.assert_allclose(full - full[0], ref - ref[0], atol=3e-4)  # full value ~344: float32 ulp 3e-5


def test_relative_and_constant_are_consistent():
  kappa = jnp.asarray([0.0, 0.5, 30.0, 2000.0])
  for p, terms, min_order in ((256, 1, 16.0), (256, 4, 16.0), (4, 2, 16.0), (4, 2, 0.0), (7, 3, 20.0)):
    with jax.enable_x64(True):
      rel = ours(np.asarray(kappa, np.float64), p, terms=terms, min_order=min_order, relative=True)
      full = ours(np.asarray(kappa, np.float64), p, terms=terms, min_order=min_order)
    assert rel[0] == 0.0
    # full and rel (two programs) reach ~2e3 at kappa = 2000 and cancel: ~10 float64 ulps of them (2.3e-13 each).
    np.testing.assert_allclose(
      full - rel, log_vmf_normalizer_constant(p, terms=terms, min_order=min_order), rtol=1e-13, atol=2e-12
    )
    # log C_p(0) exactly: log Gamma(nu + 1) + nu log 2 - p/2 log(2 pi)
  nu = 127.0
  exact0 = math.lgamma(nu + 1) + nu * math.log(2) - 128 * math.log(2 * math.pi)
  assert abs(log_vmf_normalizer_constant(256, terms=4) - exact0) < 1e-9


def test_min_order_zero_is_the_literal_expansion():
  """terms=1 and no order shift is the paper's -s + nu log(nu + s) + 1/2 log s - (p-1)/2 log 2pi at every p."""
  with jax.enable_x64(True):
    for p in (4, 16, 256):
      nu = p / 2 - 1
      s = np.hypot(nu, KAPPAS)
      paper = -s + nu * np.log(nu + s) + 0.5 * np.log(s) - (p - 1) / 2 * np.log(2 * np.pi)
      np.testing.assert_allclose(ours(KAPPAS, p, terms=1, min_order=0.0), paper, rtol=1e-12, atol=1e-9)
  # For p >= 34 the default (min_order=16) changes nothing.
  np.testing.assert_array_equal(
    ours(KAPPAS.astype(np.float32), 256, terms=2), ours(KAPPAS.astype(np.float32), 256, terms=2, min_order=0.0)
  )


def test_bad_arguments():
  with pytest.raises(ValueError):
    log_vmf_normalizer(1.0, 2)
  with pytest.raises(ValueError):
    log_vmf_normalizer(1.0, 16, terms=0)
  with pytest.raises(ValueError):
    log_vmf_normalizer(1.0, 16, terms=7)


# ---- vMF logits ----
def _prototypes(rng, p, k):
  w = rng.standard_normal((p, k))
  w /= np.linalg.norm(w, axis=0, keepdims=True)
  return w * rng.uniform(0.2, 3.0, size=(1, k))  # ||w_k|| = g_k


def test_vmf_logits_match_numpy():
  rng = np.random.default_rng(0)
  p, k, tau = 16, 8, 0.1
  y = rng.standard_normal((3, 2, p))
  y /= np.linalg.norm(y, axis=-1, keepdims=True)
  w = _prototypes(rng, p, k)
  kappa = np.linalg.norm(w, axis=0) / tau
  ref = y @ w / tau + exact_log_c(kappa, p)  # exact log C_p, including constants
  got = np.asarray(
    jax.jit(lambda a, b: vmf_logits(a, b, temperature=tau, terms=5, include_constant=True))(
      jnp.asarray(y, jnp.float32), jnp.asarray(w, jnp.float32)
    )
  )
  np.testing.assert_allclose(got, ref, atol=2e-4)
  # Default: without the constant, i.e. shifted by the same amount for every prototype.
  rel = np.asarray(vmf_logits(jnp.asarray(y, jnp.float32), jnp.asarray(w, jnp.float32), temperature=tau, terms=5))
  shift = got - rel
  np.testing.assert_allclose(shift, shift.flat[0], atol=2e-4)
  assert abs(shift.flat[0] - log_vmf_normalizer_constant(p, terms=5)) < 2e-4
  dots, log_c = vmf_logit_parts(jnp.asarray(y, jnp.float32), jnp.asarray(w, jnp.float32), temperature=tau)
  assert dots.shape == (3, 2, k) and log_c.shape == (k,)
  np.testing.assert_allclose(np.asarray(dots), y @ w / tau, atol=1e-5)


def test_vmf_logits_gradient_through_prototype_norms():
  """d/dW sum_k log C_p(||w_k||/tau) = sum_k log C_p'(kappa_k) w_k / (||w_k|| tau), with SciPy's Bessel ratio."""
  rng = np.random.default_rng(1)
  p, k, tau = 16, 5, 0.2
  w = _prototypes(rng, p, k)
  y = np.zeros((1, p))  # dot products vanish: only the normaliser is left
  f = lambda w_: jnp.sum(vmf_logits(jnp.asarray(y, jnp.float32), w_, temperature=tau, terms=4))
  g = np.asarray(jax.grad(f)(jnp.asarray(w, jnp.float32)))
  norms = np.linalg.norm(w, axis=0)
  ref = exact_dlog_c(norms / tau, p) * w / (norms * tau)
  np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)


# ---- probability-space centring ----
def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_probability_centering_update_matches_numpy():
  rng = np.random.default_rng(2)
  b, mg, k, tau, m = 4, 2, 6, 0.07, 0.9
  t = rng.standard_normal((b, mg, k))
  c = rng.standard_normal((1, k))
  mean_p = np_softmax(t / tau).reshape(-1, k).mean(0)
  upd = jax.jit(lambda c_, t_: probability_centering_update(c_, t_, temperature=tau, momentum=m))
  got = np.asarray(upd(jnp.asarray(c, jnp.float32), jnp.asarray(t, jnp.float32)))
  np.testing.assert_allclose(got, m * c + (1 - m) * np.log(mean_p)[None], rtol=1e-5, atol=1e-5)
  got_prob = np.asarray(
    probability_centering_update(
      jnp.asarray(c, jnp.float32), jnp.asarray(t, jnp.float32), temperature=tau, momentum=m, ema="prob"
    )
  )
  np.testing.assert_allclose(got_prob, np.log(m * np.exp(c) + (1 - m) * mean_p[None]), rtol=1e-5, atol=1e-5)
  # Masked rows only (iBOT patch centre, shape (1, 1, K)); no row selected leaves the centre unchanged.
  tok = rng.standard_normal((b, mg, 3, k))
  mask = rng.random((b, mg, 3)) < 0.5
  c3 = c[:, None]
  got_m = np.asarray(
    probability_centering_update(
      jnp.asarray(c3, jnp.float32), jnp.asarray(tok, jnp.float32), temperature=tau, momentum=m, mask=jnp.asarray(mask)
    )
  )
  mean_pm = np_softmax(tok / tau)[mask].mean(0)
  np.testing.assert_allclose(got_m, m * c3 + (1 - m) * np.log(mean_pm), rtol=1e-5, atol=1e-5)
  same = probability_centering_update(
    jnp.asarray(c3, jnp.float32), jnp.asarray(tok, jnp.float32), temperature=tau, mask=jnp.zeros((b, mg, 3), bool)
  )
  np.testing.assert_allclose(np.asarray(same), c3, rtol=1e-6)


def test_probability_centering_is_finite_when_a_probability_underflows():
  t = jnp.asarray([[10.0, 0.0, -10.0]] * 4)  # / 0.04: the last prototype gets e^-500 in float32 -> 0
  new = probability_centering_update(jnp.zeros((1, 3)), t, temperature=0.04)
  assert bool(jnp.all(jnp.isfinite(new)))
  np.testing.assert_allclose(float(new[0, 2]), 0.1 * (-500.0 - math.log1p(math.exp(-250))), rtol=1e-5)
  q = vmf_teacher_targets(t, new)
  assert bool(jnp.all(jnp.isfinite(q)))


def test_vmf_teacher_targets():
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((3, 2, 5)) * 5
  c = rng.standard_normal((1, 5))
  q = vmf_teacher_targets(jnp.asarray(logits, jnp.float32), jnp.asarray(c, jnp.float32))
  np.testing.assert_allclose(np.asarray(q), np_softmax(logits - c), rtol=1e-5, atol=1e-7)
  # No gradient into the teacher or the centre.
  g = jax.grad(lambda l, c_: jnp.sum(vmf_teacher_targets(l, c_) * jnp.arange(5.0)), argnums=(0, 1))(
    jnp.asarray(logits, jnp.float32), jnp.asarray(c, jnp.float32)
  )
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in g)
