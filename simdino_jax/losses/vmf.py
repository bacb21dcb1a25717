"""DINO-vMF (Govindarajan et al., ICLR 2023): vMF normaliser, vMF logits and probability-space centring.

A prototype w_k of the weight-normalised last layer is read as a von Mises-Fisher component with mean direction
mu_k = w_k / ||w_k|| and concentration kappa_k = ||w_k|| / tau. The vMF log-likelihood of a unit vector y is
<w_k, y> / tau + log C_p(kappa_k), so the DINO logits get the per-prototype bias log C_p(kappa_k), which pulls
down prototypes with a large norm (DINO's equal-precision assumption is the case where every ||w_k|| is equal).

    C_p(kappa) = kappa^nu / ((2 pi)^(p/2) I_nu(kappa)),    nu = p/2 - 1.

The exact Bessel function under/overflows in float32 (and in float64 for p >= 384 at small kappa), so log I_nu
comes from the uniform asymptotic expansion for large order (DLMF 10.41.3), with z = kappa/nu:

    I_nu(nu z) ~ e^(nu eta) / ((2 pi nu)^(1/2) (1 + z^2)^(1/4)) * sum_k U_k(t) / nu^k,
    eta = sqrt(1 + z^2) + log(z / (1 + sqrt(1 + z^2))),  t = 1 / sqrt(1 + z^2).

With s = sqrt(nu^2 + kappa^2) this is exactly (no approximation in the rewriting)

    log I_nu(kappa) ~ s + nu log(kappa / (nu + s)) - 1/2 log(2 pi s) + log(1 + sum_{k>=1} v_k(t^2) / s^k),

where v_k(t^2) = U_k(t) / t^k (a polynomial in t^2) because t / nu = 1 / s. The nu log(kappa) cancels against the
kappa^nu of C_p, so nothing diverges as kappa -> 0:

    log C_p(kappa) ~ -s + nu log(nu + s) + 1/2 log s - (p-1)/2 log(2 pi) - log(1 + sum_k v_k(t^2) / s^k).

``terms=1`` keeps only U_0 = 1 (the DINO-vMF paper's approximation, REFERENCE section 4); ``terms=n`` adds
U_1..U_{n-1} (up to U_4, i.e. terms <= 5). The expansion is uniform in z, so the error is O(nu^-terms) for every
kappa >= 0 (small kappa is the Stirling series of Gamma(nu + 1), large kappa the Hankel expansion).

Small p: O(nu^-terms) is no good for nu ~ 1 (p = 4: error ~1e-2 whatever ``terms``, and a kappa-derivative off by
~100% at small kappa). When nu < ``min_order`` (default 16, so only p < 34 is affected; the DINO-vMF head has
p = 256) we evaluate the expansion at the order mu = nu + n >= min_order and come down with the exact three-term
recurrence of the Bessel ratios rho_m = I_{m+1}(kappa) / (kappa I_m(kappa)), rho_{m-1} = 1 / (2m + kappa^2 rho_m):

    log C_p(kappa) = log C_{p+2n}(kappa) + n log(2 pi) + sum_{j<n} log rho_{nu+j}(kappa),

with the top ratio rho_mu from the expansion at orders mu and mu + 1. The recurrence is a continued fraction
(stable in this direction, finite at kappa = 0), so p = 4 gets the accuracy of p = 34 (measured max error over
kappa in [1e-3, 1e5] in float64: 5e-3, 1e-4, 4e-6, 3e-7, 1e-8 for terms 1..5).

Float32: the value for p = 4096 is ~1e4, so its last bit is ~1e-3 while the kappa-dependence at small kappa is
~kappa^2 / (4 nu). We therefore evaluate the constant log C_p(0) (of the same approximation) in float64 in
Python and the kappa-dependent part A(kappa) = log C_p(kappa) - log C_p(0) in float32 from
delta = s - nu = kappa^2 / (s + nu) with log1p (no cancellation). ``vmf_logits`` adds A only: a constant shift of
all K logits changes no softmax, and leaving out a number of size 1e4 keeps the logits' float32 resolution.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST

# v_k(x) = U_k(t) / t^k as polynomials in x = t^2, DLMF 10.41.10 (coefficients in increasing powers of x) / denom.
_V_POLYS = (
  ((3.0, -5.0), 24.0),
  ((81.0, -462.0, 385.0), 1152.0),
  ((30375.0, -369603.0, 765765.0, -425425.0), 414720.0),
  ((4465125.0, -94121676.0, 349922430.0, -446185740.0, 185910725.0), 39813120.0),
)
MAX_TERMS = len(_V_POLYS) + 1
_CENTER_EMAS = ("log", "prob")


def _poly(coeffs, x):
  """Horner evaluation of sum_i coeffs[i] x^i (works on Python floats and on arrays)."""
  out = coeffs[-1]
  for c in reversed(coeffs[:-1]):
    out = out * x + c
  return out


def _correction(x, inv_s, terms: int):
  """sum_{k=1}^{terms-1} v_k(x) inv_s^k (Horner in inv_s). 0 for terms == 1."""
  if terms == 1:
    return 0.0 * inv_s
  out = 0.0
  for k in range(terms - 1, 0, -1):
    coeffs, denom = _V_POLYS[k - 1]
    out = (out + _poly(coeffs, x) / denom) * inv_s
  return out


def _check(dim: int, terms: int, min_order: float) -> float:
  if int(dim) != dim or dim < 3:
    raise ValueError(f"log_vmf_normalizer: dim must be an integer >= 3 (nu = dim/2 - 1 > 0), got {dim}")
  if int(terms) != terms or not 1 <= terms <= MAX_TERMS:
    raise ValueError(f"log_vmf_normalizer: terms must be an integer in [1, {MAX_TERMS}], got {terms}")
  if min_order < 0:
    raise ValueError(f"log_vmf_normalizer: min_order must be >= 0, got {min_order}")
  return dim / 2.0 - 1.0


def _order_shift(nu: float, min_order: float) -> int:
  """Number n of unit steps that lift the order nu to at least min_order (0 when nu >= min_order)."""
  return max(0, math.ceil(min_order - nu))


def _const_expansion(nu: float, terms: int) -> float:
  """log C_p(0) of the plain expansion at order nu (p = 2 nu + 2), float64."""
  corr0 = _correction(1.0, 1.0 / nu, terms)
  return -nu + nu * math.log(2.0 * nu) + 0.5 * math.log(nu) - (nu + 0.5) * math.log(2.0 * math.pi) - math.log1p(corr0)


def _rel_expansion(kappa: jax.Array, nu: float, terms: int) -> jax.Array:
  """log C_p(kappa) - log C_p(0) of the plain expansion at order nu, in kappa's dtype."""
  s = jnp.hypot(jnp.asarray(nu, kappa.dtype), kappa)
  delta = kappa * kappa / (s + nu)  # s - nu without cancellation
  # (-s + nu log(nu + s) + 1/2 log s) - (same at kappa = 0):
  rel = -delta + nu * jnp.log1p(delta / (2.0 * nu)) + 0.5 * jnp.log1p(delta / nu)
  if terms > 1:
    inv_s = 1.0 / s
    x = (nu * inv_s) ** 2  # t^2
    corr = _correction(x, inv_s, terms)
    corr0 = _correction(1.0, 1.0 / nu, terms)
    rel = rel - (jnp.log1p(corr) - math.log1p(corr0))
  return rel


def _log_rho_expansion(kappa: jax.Array, mu: float, terms: int) -> jax.Array:
  """log rho_mu = log(I_{mu+1}(kappa) / (kappa I_mu(kappa))) from the expansion at orders mu and mu + 1.

  Equals log C(order mu) - log C(order mu + 1) - log(2 pi); written with s0 = sqrt(mu^2 + k^2),
  s1 = sqrt((mu+1)^2 + k^2) so that no two large numbers are subtracted (float32 safe up to kappa ~ 1e5).
  """
  s0 = jnp.hypot(jnp.asarray(mu, kappa.dtype), kappa)
  s1 = jnp.hypot(jnp.asarray(mu + 1.0, kappa.dtype), kappa)
  ds = (2.0 * mu + 1.0) / (s0 + s1)  # s1 - s0
  out = (
    ds
    - mu * jnp.log1p((1.0 + ds) / (mu + s0))
    - jnp.log(mu + 1.0 + s1)
    - 0.25 * jnp.log1p((2.0 * mu + 1.0) / (s0 * s0))
  )
  if terms > 1:
    inv0, inv1 = 1.0 / s0, 1.0 / s1
    out = (
      out
      - jnp.log1p(_correction((mu * inv0) ** 2, inv0, terms))
      + jnp.log1p(_correction(((mu + 1.0) * inv1) ** 2, inv1, terms))
    )
  return out


def log_vmf_normalizer_constant(dim: int, *, terms: int = 1, min_order: float = 16.0) -> float:
  """log C_p(0) under the same approximation as ``log_vmf_normalizer``, in float64 (a Python float).

  Plain expansion: -nu + nu log(2 nu) + 1/2 log(nu) - (p-1)/2 log(2 pi) - log(1 + sum_k v_k(1) / nu^k). The exact
  value is log Gamma(nu + 1) + nu log 2 - p/2 log(2 pi); the two agree to O(nu^-terms) (Stirling series).
  """
  nu = _check(dim, terms, min_order)
  n = _order_shift(nu, min_order)
  # Order shift (see log_vmf_normalizer): at kappa = 0 the recurrence gives rho_{nu+j} = 1 / (2 (nu + j + 1)).
  return (
    _const_expansion(nu + n, terms) + n * math.log(2.0 * math.pi) - sum(math.log(2.0 * (nu + j + 1)) for j in range(n))
  )


def log_vmf_normalizer(
  kappa: jax.Array, dim: int, *, terms: int = 1, relative: bool = False, min_order: float = 16.0
) -> jax.Array:
  """log C_p(kappa) of the p = ``dim`` dimensional von Mises-Fisher density, elementwise.

  Args:
    kappa: concentrations >= 0, any shape. Computed in float32 (float64 only for float64 input, i.e. under
      ``jax.enable_x64``, which the tests use to check the expansion itself).
    dim: the sphere's ambient dimension p (static int >= 3).
    terms: number of terms of the uniform asymptotic expansion of I_nu (1 = the DINO-vMF paper; up to 5).
    relative: return log C_p(kappa) - log C_p(0) (the same approximation at kappa = 0) instead of the full value:
      the kappa-dependent part only, exactly 0 at kappa = 0, with float32 resolution relative to its own size.
    min_order: lift the expansion's order to at least this and come down with the exact Bessel-ratio recurrence
      (module docstring). Default 16: no effect for p >= 34, where ``terms=1`` is exactly the paper's formula;
      p = 4 goes from ~1e-2 to the accuracy of p = 34. ``min_order=0`` is the literal expansion at order nu.

  Returns:
    float32 array of kappa's shape (float64 for float64 input). Full value =
    ``log_vmf_normalizer_constant(dim, terms=terms, min_order=min_order)`` + the relative one. Jittable and
    differentiable (d/dkappa log C_p = -I_{p/2}(kappa) / I_nu(kappa) up to the approximation error).
  """
  nu = _check(dim, terms, min_order)
  n = _order_shift(nu, min_order)
  kappa = jnp.asarray(kappa)
  dtype = jnp.float64 if kappa.dtype == jnp.float64 else jnp.float32
  kappa = kappa.astype(dtype)
  mu = nu + n
  rel = _rel_expansion(kappa, mu, terms)
  if n:
    rho = jnp.exp(_log_rho_expansion(kappa, mu, terms))  # top ratio from the expansion at orders mu, mu + 1
    # -(log rho_{nu+m-1}(kappa) - log rho_{nu+m-1}(0)) for m = n..1, summed apart from rel (which can be ~ -kappa)
    # so that float32 rounds these n small terms against their own size. Unrolled: n < min_order is small.
    log_sum = jnp.zeros_like(rel)
    for m in range(n, 0, -1):  # order nu + m -> nu + m - 1
      two_m = 2.0 * (nu + m)
      a = kappa * (kappa * rho)  # kappa * R_m with R_m = I_{m+1}/I_m <= 1: no overflow of kappa^2
      log_sum = log_sum + jnp.log1p(a / two_m)
      rho = 1.0 / (two_m + a)
    rel = rel - log_sum
  if relative:
    return rel
  return rel + jnp.asarray(log_vmf_normalizer_constant(dim, terms=terms, min_order=min_order), dtype)


def vmf_logit_parts(
  y: jax.Array, prototypes: jax.Array, *, temperature: float | jax.Array, terms: int = 1
) -> tuple[jax.Array, jax.Array]:
  """The two parts of the vMF logits: (<w_k, y> / tau with shape (..., K), log C_p(||w_k|| / tau) with shape (K,)).

  The second part is the relative normaliser (``log_vmf_normalizer(..., relative=True)``): it differs from the full
  log C_p by a constant common to all K prototypes. Gradients flow through ||w_k|| (no stop-gradient).
  """
  if prototypes.ndim != 2 or y.shape[-1] != prototypes.shape[0]:
    raise ValueError(f"vmf_logits expects y (..., p) and prototypes (p, K), got {y.shape} and {prototypes.shape}")
  p = prototypes.shape[0]
  w = prototypes.astype(jnp.float32)
  y = y.astype(jnp.float32)
  dots = jnp.matmul(y, w, precision=_HIGHEST) / temperature  # reduces over the feature axis p
  norms = jnp.sqrt(jnp.sum(w * w, axis=0))  # (K,), reduces over p
  log_c = log_vmf_normalizer(norms / temperature, p, terms=terms, relative=True)
  return dots, log_c


def vmf_logits(
  y: jax.Array, prototypes: jax.Array, *, temperature: float | jax.Array, terms: int = 1, include_constant: bool = False
) -> jax.Array:
  """DINO-vMF logits l_k(y) = <w_k, y> / tau + log C_p(||w_k|| / tau) (REFERENCE section 4, paper eqs. (6)-(7)).

  Args:
    y: (..., p) l2-normalised bottleneck vectors.
    prototypes: (p, K) effective (unnormalised) weights of the weight-normalised last layer, w_k = g_k v_k/||v_k||.
    temperature: tau of the branch (tau_s for the student, tau_t for the teacher): it scales both the dot product
      and kappa. The result is already divided by tau, so feed it to the cross-entropy with temperature 1.
    terms: expansion terms for log C_p (see ``log_vmf_normalizer``).
    include_constant: add log C_p(0) (~ -1e4 for p = 4096) as well. Off by default: it shifts every logit by the
      same amount (no softmax changes) and would cost float32 resolution.

  Returns:
    (..., K) float32 logits.
  """
  dots, log_c = vmf_logit_parts(y, prototypes, temperature=temperature, terms=terms)
  logits = dots + log_c
  if include_constant:
    logits = logits + jnp.float32(log_vmf_normalizer_constant(prototypes.shape[0], terms=terms))
  return logits


def init_probability_center(num_prototypes: int) -> jax.Array:
  """Initial probability-space centre (1, K): log(1/K), i.e. uniform mixture proportions.

  For ``ema="log"`` any constant start is equivalent (the EMA is linear and a constant shift of the centre changes
  no softmax); for ``ema="prob"`` it matters, and uniform is the natural prior.
  """
  return jnp.full((1, num_prototypes), -math.log(num_prototypes), jnp.float32)


def probability_centering_update(
  center: jax.Array,
  teacher_logits: jax.Array,
  *,
  temperature: float | jax.Array,
  momentum: float | jax.Array = 0.9,
  mask: jax.Array | None = None,
  ema: str = "log",
) -> jax.Array:
  """Probability-space centre update, DINO-vMF eq. (9): c <- m c + (1 - m) log(mean_b softmax(t_b / tau_t)).

  Args:
    center: (1, K) (or any shape broadcasting to (K,)) log-space centre.
    teacher_logits: (..., K) teacher scores WITHOUT the vMF normaliser: the raw <w_t,k, y_t,b> with
      ``temperature=tau_t``, or the first output of ``vmf_logit_parts`` (already divided by tau_t) with
      ``temperature=1.0``. All leading axes (batch, views, tokens) are averaged; under a batch-sharded jit this
      mean is the all-reduce.
    temperature: the divisor applied before the softmax (see teacher_logits).
    momentum: m.
    mask: optional bool/float array of teacher_logits.shape[:-1]; only rows with mask true enter the mean (iBOT
      patch centre over masked tokens). With no selected row the centre is left unchanged.
    ema: "log" (default, eq. (9) as printed: EMA of the log of the batch mean) or "prob" (the centre is the log of
      an EMA of batch-mean probabilities: c <- log(m e^c + (1 - m) mean_b p_b)).

  Returns:
    the new centre, same shape as ``center``, float32, no gradient.

  Variant choices (REFERENCE section 4 marks both as UNVERIFIED):
    * which logits: eq. (9) is printed with softmax(w^T y / tau_t), i.e. WITHOUT log C_p. We follow that on
      purpose: log mean_b softmax(l_b)_k of the vMF logits l = r + log C_p(kappa) equals log C_p(kappa_k) plus a
      k-dependent term, so subtracting it from the teacher's vMF logits would remove (up to the per-sample
      normalisers) exactly the log C_p correction that DINO-vMF adds, the same objection the paper raises
      against DINO's logit-space centring.
    * EMA order: default is the printed order (EMA of log). ``ema="prob"`` is the alternative; both keep the centre
      as a log-space vector so ``vmf_teacher_targets`` is the same for both.
  Computed in log space (logsumexp of log_softmax), so a prototype whose probability underflows in float32 still
  gets a finite centre.
  """
  if ema not in _CENTER_EMAS:
    raise ValueError(f"probability_centering_update: ema must be one of {_CENTER_EMAS}, got {ema!r}")
  k = teacher_logits.shape[-1]
  logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)).reshape(-1, k)
  logp = jax.nn.log_softmax(logits / temperature, axis=-1)  # (n, K), finite
  if mask is None:
    count = jnp.float32(logits.shape[0])
    weights = None
  else:
    weights = jax.lax.stop_gradient(mask).reshape(-1, 1).astype(jnp.float32)
    count = jnp.sum(weights)
    weights = jnp.broadcast_to(weights, logp.shape)
  # log mean_b p_bk, reduced over all rows (batch, views, tokens).
  log_mean = jax.nn.logsumexp(logp, axis=0, b=weights) - jnp.log(jnp.maximum(count, 1.0))
  center = jax.lax.stop_gradient(center.astype(jnp.float32))
  log_mean = log_mean.reshape((1,) * (center.ndim - 1) + (k,)) if center.ndim else log_mean
  if ema == "log":
    new = momentum * center + (1.0 - momentum) * log_mean
  else:
    new = jnp.logaddexp(jnp.log(momentum) + center, jnp.log1p(-momentum) + log_mean)
  return jnp.where(count > 0, new, center)


def vmf_teacher_targets(teacher_vmf_logits: jax.Array, center: jax.Array) -> jax.Array:
  """Teacher targets softmax(l_t - c) over the last (K) axis, with l_t the teacher's vMF logits (already / tau_t).

  Args:
    teacher_vmf_logits: (..., K) output of ``vmf_logits`` with the teacher temperature.
    center: log-space centre broadcasting against (..., K) (from ``probability_centering_update``).

  Returns:
    (..., K) float32 probabilities, stop-gradient. Equivalent to exp(-c_k) exp(<w_k, y>/tau_t + log C_p(kappa_k))
    normalised over k.
  """
  logits = teacher_vmf_logits.astype(jnp.float32) - center.astype(jnp.float32)
  return jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))
