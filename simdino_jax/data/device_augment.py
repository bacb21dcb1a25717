"""On-device DINO / SimDINO photometric augmentation (``config.data.augment_mode = "device"``).

In device mode the host pipeline only decodes, draws the RandomResizedCrop boxes and resizes (as in host mode):
``batch["global"]`` / ``batch["local"]`` arrive as uint8 crops. Everything after the crop runs here, inside the
jitted train step, as jittable functions vmapped over the crops and the examples of the batch:

  horizontal flip (p ``flip_p``) -> colour jitter (p ``jitter_p``; brightness, contrast, saturation, hue in a
  random order) -> greyscale (p ``grayscale_p``) -> Gaussian blur (p ``blur_p`` = global 1 / global 2 / every
  local crop, radius ~ U(``blur_sigma``)) -> solarize (p ``solarize_p``, global crop 2 only) -> ImageNet
  normalisation.

The sampling rules are those of the host path (:mod:`simdino_jax.data.multicrop`, docs/data.md#augmentation-recipe): every
decision is drawn independently per crop with the same probabilities and factor ranges; only the random numbers
differ (JAX keys instead of the host's numpy generator). Randomness is explicit: one key per example, split from
the step's key, then one per crop.

The ops reproduce the host ops (numpy + PIL, :mod:`simdino_jax.data.augment`) on the same 8-bit image: the
values are float32 on the [0, 255] scale, rounded to integers wherever the host produces a uint8 image (after
each jitter op, the greyscale, the blur, the solarisation). Where the official PIL op is integer arithmetic it is
reproduced exactly: greyscale (PIL's "L" weights, also inside contrast and saturation), solarize, and the blur
(``ImageFilter.GaussianBlur`` is three passes of an extended box blur per axis, Gwosdek et al. 2011, in 24-bit
fixed point with rounding to 8 bits after every 1-D pass; same integer arithmetic here). The jitter ops follow the
host's formulas (PIL ``ImageEnhance`` blends rounded to nearest; hue by a float32 HSV round trip).

Dependency direction: data code only (no network, no update); the step calls :func:`make_batch_augment`'s
function on the batch before the forward passes.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from simdino_jax.data import augment

_MEAN = augment.IMAGENET_MEAN
_STD = augment.IMAGENET_STD
_LUMA_INT = (19595, 38470, 7471)  # PIL's RGB -> "L" weights (x 65536)
_BLUR_PASSES = 3  # PIL's GaussianBlur: three box-blur passes per axis


class CropDraws(NamedTuple):
  """The random decisions for one crop (a leading axis per crop / example when batched).

  ``order`` is the colour-jitter permutation of (brightness, contrast, saturation, hue) = (0, 1, 2, 3), as in
  torchvision's ``ColorJitter.get_params``; ``factors`` the four drawn factors in that (b, c, s, h) layout.
  """

  flip: jax.Array  # bool
  jitter: jax.Array  # bool
  order: jax.Array  # (4,) int32
  factors: jax.Array  # (4,) float32: brightness, contrast, saturation, hue
  grayscale: jax.Array  # bool
  blur: jax.Array  # bool
  sigma: jax.Array  # float32 PIL GaussianBlur radius
  solarize: jax.Array  # bool


# ----------------------------------------------------------------------------
# Sampling


_NUM_UNIFORMS = 14  # per crop: flip, jitter, 4 factors, grayscale, blur, sigma, solarize, 4 for the order


def draws_from_uniforms(u: jax.Array, cfg, *, blur_p, solarize_p) -> CropDraws:
  """One crop's decisions from 14 U[0, 1) numbers ``u`` (the host's rules, ``cfg`` a ``MultiCropConfig``).

  Coins are ``u < p`` (and always when p >= 1; the host's ``U <= p`` for the blur differs on a null set); factors
  ``lo + (hi - lo) u``; the jitter order is the argsort of four uniforms, a uniformly random permutation like
  torchvision's ``randperm(4)``. ``blur_p`` and ``solarize_p`` may be traced (one per crop position)."""
  coin = lambda v, p: jnp.logical_or(v < p, p >= 1.0)  # noqa: E731
  bounds = np.array(
    [
      [max(0.0, 1.0 - cfg.brightness), 1.0 + cfg.brightness],
      [max(0.0, 1.0 - cfg.contrast), 1.0 + cfg.contrast],
      [max(0.0, 1.0 - cfg.saturation), 1.0 + cfg.saturation],
      [-cfg.hue, cfg.hue],
    ],
    np.float32,
  )
  lo, hi = cfg.blur_sigma
  return CropDraws(
    flip=coin(u[0], cfg.flip_p),
    jitter=coin(u[1], cfg.jitter_p),
    order=jnp.argsort(u[10:14]).astype(jnp.int32),
    factors=bounds[:, 0] + (bounds[:, 1] - bounds[:, 0]) * u[2:6],
    grayscale=coin(u[6], cfg.grayscale_p),
    blur=coin(u[7], blur_p),
    sigma=lo + (hi - lo) * u[8],
    solarize=coin(u[9], solarize_p),
  )


def crop_probabilities(cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Per-crop (blur, solarize) probabilities: ``(global_blur, global_solarize, local_blur, local_solarize)``.

  Global crop 1 / 2 blur with ``blur_p[0]`` / ``blur_p[1]``, locals with ``blur_p[2]``; only global crop 2
  solarizes."""
  g_blur = np.array(cfg.blur_p[: cfg.num_global], np.float32)
  g_sol = np.array([0.0, cfg.solarize_p][: cfg.num_global], np.float32)
  l_blur = np.full((cfg.num_local,), cfg.blur_p[2], np.float32)
  return g_blur, g_sol, l_blur, np.zeros((cfg.num_local,), np.float32)


def sample_example(key: jax.Array, cfg) -> tuple[CropDraws, CropDraws]:
  """All crops of one example: (global draws with a leading (num_global,) axis, local draws (num_local,)).

  One uniform draw of shape (crops, 14) per example (cheap to compile, unlike per-crop key splits and
  ``jax.random.permutation``)."""
  g_blur, g_sol, l_blur, l_sol = crop_probabilities(cfg)
  u = jax.random.uniform(key, (cfg.num_global + cfg.num_local, _NUM_UNIFORMS))
  draw = jax.vmap(lambda v, b, s: draws_from_uniforms(v, cfg, blur_p=b, solarize_p=s))
  glob = draw(u[: cfg.num_global], g_blur, g_sol)
  loc = draw(u[cfg.num_global :], l_blur, l_sol) if cfg.num_local else _empty_draws()
  return glob, loc


def _empty_draws() -> CropDraws:
  b = jnp.zeros((0,), bool)
  return CropDraws(
    flip=b,
    jitter=b,
    order=jnp.zeros((0, 4), jnp.int32),
    factors=jnp.zeros((0, 4), jnp.float32),
    grayscale=b,
    blur=b,
    sigma=jnp.zeros((0,), jnp.float32),
    solarize=b,
  )


# ----------------------------------------------------------------------------
# Ops on one (H, W, 3) image, float32 on the [0, 255] scale


def hflip(x: jax.Array) -> jax.Array:
  return x[:, ::-1]


def luma(x: jax.Array) -> jax.Array:
  """PIL's RGB -> "L" (ITU-R 601-2, 16-bit fixed point) of an 8-bit-valued image: (H, W) float32 integers."""
  q = x.astype(jnp.int32)
  lum = (q[..., 0] * _LUMA_INT[0] + q[..., 1] * _LUMA_INT[1] + q[..., 2] * _LUMA_INT[2] + 0x8000) >> 16
  return lum.astype(jnp.float32)


def _to8(x: jax.Array) -> jax.Array:
  return jnp.round(jnp.clip(x, 0.0, 255.0))


# The jitter ops map an 8-bit image to an 8-bit image, as the host's (PIL ImageEnhance semantics, rounded to
# nearest like augment.adjust_*): each result is clamped and rounded before the next op.


def adjust_brightness(x: jax.Array, f: jax.Array) -> jax.Array:
  return _to8(x * f)


def adjust_contrast(x: jax.Array, f: jax.Array) -> jax.Array:
  """Blend with the grey level int(mean(luma) + 0.5) (PIL ``ImageEnhance.Contrast``)."""
  lum = luma(x).astype(jnp.int32)
  mean = jnp.floor(jnp.sum(lum).astype(jnp.float32) / lum.size + 0.5)  # integer sum: exact for any size
  return _to8(f * x + (1.0 - f) * mean)


def adjust_saturation(x: jax.Array, f: jax.Array) -> jax.Array:
  """Blend with the luma image (PIL ``ImageEnhance.Color``)."""
  return _to8(f * x + (1.0 - f) * luma(x)[..., None])


def adjust_hue(x: jax.Array, h: jax.Array) -> jax.Array:
  """Shifts the HSV hue by ``h`` turns (float32 HSV round trip, like the host), fused: V = max and
  V*S = max - min are kept, each channel is ``max - (max - min) * clip(min(k, 4 - k), 0, 1)`` with
  ``k = (n + 6 H) mod 6``, n = 5, 3, 1 for R, G, B."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc = jnp.maximum(jnp.maximum(r, g), b)
  minc = jnp.minimum(jnp.minimum(r, g), b)
  delta = maxc - minc
  safe = jnp.where(delta > 0, delta, 1.0)
  h6 = jnp.where(maxc == r, (g - b) / safe, jnp.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
  h6 = h6 + 6.0 * h
  chans = []
  for n in (5.0, 3.0, 1.0):
    k = jnp.mod(h6 + n, 6.0)
    chans.append(maxc - delta * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
  return _to8(jnp.stack(chans, axis=-1))


def color_jitter(x: jax.Array, order: jax.Array, factors: jax.Array) -> jax.Array:
  """The four jitter ops in ``order`` (indices into brightness, contrast, saturation, hue), torchvision's random
  order. Under vmap the branch becomes a select, so each of the four slots evaluates all four ops."""
  branches = (
    lambda y: adjust_brightness(y, factors[0]),
    lambda y: adjust_contrast(y, factors[1]),
    lambda y: adjust_saturation(y, factors[2]),
    lambda y: adjust_hue(y, factors[3]),
  )
  # A loop, not 4 unrolled slots: one copy of the ops in the compiled program (compile time).
  return jax.lax.fori_loop(0, 4, lambda i, y: jax.lax.switch(order[i], branches, y), x)


def grayscale(x: jax.Array) -> jax.Array:
  """PIL's ``convert("L")`` replicated to 3 channels (exact on 8-bit input)."""
  return jnp.repeat(luma(x)[..., None], 3, axis=-1)


def pil_box_radius(sigma):
  """PIL's ``_gaussian_blur_radius(sigma, 3)``: the (fractional) radius of each of the three box passes whose
  composition has variance ``sigma**2`` (Gwosdek et al. 2011, eqs. 7, 11, 14). Works on numpy or jax values."""
  xp = jnp if isinstance(sigma, jax.Array) else np
  s2 = sigma * sigma / _BLUR_PASSES
  big_l = xp.sqrt(12.0 * s2 + 1.0)
  l = xp.floor((big_l - 1.0) / 2.0)
  a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) * (l + 1)))
  return l + a


def max_box_radius(sigma_range) -> int:
  """The largest integer box radius drawn for sigma in ``sigma_range`` (the radius grows with sigma)."""
  return int(math.floor(float(pil_box_radius(np.float32(max(sigma_range))))))


def _box_pass(q: jax.Array, ww: jax.Array, fw: jax.Array, radius: jax.Array, rmax: int, axis: int) -> jax.Array:
  """One pass of PIL's extended box blur along ``axis`` on uint32 pixel values (``ImagingLineBoxBlur``):
  out = (ww * sum of the 2r+1 pixels around x + fw * (the two pixels at distance r+1) + 2^23) >> 24, pixels past
  the border clamped to the edge pixel. ``radius`` (the integer r) is traced, ``rmax`` bounds it statically."""
  pad = rmax + 1
  n = q.shape[axis]
  widths = [(0, 0)] * q.ndim
  widths[axis] = (pad, pad)
  qp = jnp.pad(q, widths, mode="edge")
  bulk = jnp.zeros(q.shape, jnp.uint32)
  for d in range(-pad, pad + 1):
    w = jnp.where(abs(d) <= radius, ww, jnp.where(abs(d) == radius + 1, fw, jnp.uint32(0)))
    bulk = bulk + w * jax.lax.slice_in_dim(qp, pad + d, pad + d + n, axis=axis)
  # A division, not ">> 24": XLA:CPU (jax 0.10.2) failed to compile the uint32 shift in this fusion ("Failed to
  # translate module to LLVM IR"); the division by a power of two is exact and compiles.
  return (bulk + jnp.uint32(1 << 23)) // jnp.uint32(1 << 24)


def gaussian_blur(x: jax.Array, sigma: jax.Array, rmax: int) -> jax.Array:
  """PIL ``ImageFilter.GaussianBlur(radius=sigma)`` on an 8-bit-valued (H, W, 3) image: three box passes along
  the width, then three along the height, each rounded to 8 bits, with PIL's fixed-point weights."""
  r = pil_box_radius(jnp.asarray(sigma, jnp.float32))
  radius = jnp.floor(r).astype(jnp.int32)
  ww = jnp.floor(jnp.float32(1 << 24) / (r * 2.0 + 1.0)).astype(jnp.uint32)
  fw = (jnp.uint32(1 << 24) - (2 * radius + 1).astype(jnp.uint32) * ww) // 2
  q = x.astype(jnp.uint32)
  for axis in (1, 0):  # loops, not unrolled passes: smaller programs, faster compiles
    q = jax.lax.fori_loop(0, _BLUR_PASSES, lambda _, y, axis=axis: _box_pass(y, ww, fw, radius, rmax, axis), q)
  return q.astype(jnp.float32)


def solarize(x: jax.Array, threshold: int = 128) -> jax.Array:
  return jnp.where(x >= threshold, 255.0 - x, x)


def normalize(x: jax.Array) -> jax.Array:
  """``(x / 255 - mean) / std`` in float32, as ``augment.normalize``."""
  return (x * np.float32(1.0 / 255.0) - _MEAN) / _STD


def apply_crop(x: jax.Array, d: CropDraws, cfg, rmax: int | None = None) -> jax.Array:
  """One crop (H, W, 3), uint8 or 8-bit-valued float, through the drawn ops -> normalised float32.

  Each op is computed and then selected (``where``): under vmap a branch per crop would become a select anyway."""
  if rmax is None:
    rmax = max_box_radius(cfg.blur_sigma)
  x = x.astype(jnp.float32)
  x = jnp.where(d.flip, hflip(x), x)
  x = jnp.where(d.jitter, color_jitter(x, d.order, d.factors), x)
  x = jnp.where(d.grayscale, grayscale(x), x)
  x = jnp.where(d.blur, gaussian_blur(x, d.sigma, rmax), x)
  x = jnp.where(d.solarize, solarize(x, cfg.solarize_threshold), x)
  return normalize(x)


# ----------------------------------------------------------------------------
# Batches


def example_keys(key: jax.Array, batch_size: int) -> jax.Array:
  """One key per example of the (global) batch, from the step's augmentation key."""
  return jax.random.split(key, batch_size)


def sample_batch(key: jax.Array, batch_size: int, cfg) -> tuple[CropDraws, CropDraws]:
  """Draws for a batch: (global (B, Mg, ...), local (B, Ml, ...))."""
  return jax.vmap(lambda k: sample_example(k, cfg))(example_keys(key, batch_size))


def augment_batch(key: jax.Array, glob: jax.Array, loc: jax.Array, cfg) -> tuple[jax.Array, jax.Array]:
  """uint8 crops ``glob`` (B, Mg, Hg, Wg, 3) and ``loc`` (B, Ml, Hl, Wl, 3) -> normalised float32 crops.

  The batch axis stays first (vmap over examples, then over crops), so a data-sharded batch is augmented where
  it lives, with no communication."""
  rmax = max_box_radius(cfg.blur_sigma)
  draws_g, draws_l = sample_batch(key, glob.shape[0], cfg)
  crops = jax.vmap(jax.vmap(lambda x, d: apply_crop(x, d, cfg, rmax)))
  out_g = crops(glob, draws_g)
  out_l = crops(loc, draws_l) if loc.shape[1] else loc.astype(jnp.float32)
  return out_g, out_l


def make_batch_augment(cfg) -> Callable[[jax.Array, dict], dict]:
  """``augment(key, batch) -> batch`` for the train step: replaces the uint8 ``"global"`` / ``"local"`` crops by
  their augmented, normalised float32 versions (other entries, e.g. ``"mask"``, pass through)."""

  def augment_fn(key: jax.Array, batch: dict) -> dict:
    glob, loc = augment_batch(key, batch["global"], batch["local"], cfg)
    return dict(batch, **{"global": glob, "local": loc})

  return augment_fn
