"""timm's RandomErasing (``--reprob 0.25 --remode pixel --recount 1``, the fine-tuning recipe) as pure JAX functions.

timm's ``create_transform`` appends ``RandomErasing(re_prob, mode=re_mode, max_count=re_count)`` after
``Normalize``, so it erases rectangles of the NORMALISED image (timm/data/random_erasing.py ``_erase``):

  skip the image unless ``U[0, 1) <= probability`` (timm: ``random.random() > probability`` skips);
  count = min_count, or ``randint(min_count, max_count)`` when they differ;
  for each of ``count`` boxes, up to 10 attempts:
      target_area = U(min_area, max_area) * H W / count;  aspect = exp(U(log min_aspect, log max_aspect));
      h = int(round(sqrt(target_area aspect))),  w = int(round(sqrt(target_area / aspect)));
      the first attempt with ``w < W and h < H`` is used: top ~ randint(0, H - h), left ~ randint(0, W - w)
      (inclusive), and the box is filled with N(0, 1) per pixel and channel ("pixel"), one N(0, 1) colour per
      channel ("rand") or 0 ("const"); later boxes overwrite earlier ones.

Here all the draws of one image are made at once from an explicit JAX key (``sample_erasing`` ->
``ErasingDraws``: all 10 attempts of every box, the first valid one is used, as timm's loop would), and applied by a
deterministic function (``apply_erasing``), vmapped over the batch by ``random_erasing``; tests replay the same
draws in timm (tests/test_random_erasing.py). Images are (H, W, C) here, (C, H, W) in timm. The box sides are
computed in float32 (float64 in timm): a side can differ by one pixel when ``sqrt(target_area aspect)`` lies within
float32 rounding of a half-integer. Python's ``round`` and ``jnp.round`` both round halves to even. timm's
``num_splits`` (a clean, unerased part of the batch for AugMix splits) is not implemented (the recipe's is 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from simdino_jax.errors import require

_ATTEMPTS = 10  # timm's per-box attempts
MODES = ("pixel", "rand", "const")


@dataclasses.dataclass(frozen=True)
class ErasingConfig:
  """timm ``RandomErasing`` arguments; the defaults are the fine-tuning recipe's (``--reprob 0.25 --remode pixel
  --recount 1``) and timm's own area / aspect defaults."""

  probability: float = 0.25
  mode: str = "pixel"
  min_area: float = 0.02
  max_area: float = 1 / 3
  min_aspect: float = 0.3
  max_aspect: float | None = None  # None: 1 / min_aspect
  min_count: int = 1
  max_count: int | None = None  # None: min_count

  @property
  def count_range(self) -> tuple[int, int]:
    return self.min_count, self.max_count or self.min_count

  @property
  def log_aspect(self) -> tuple[float, float]:
    return math.log(self.min_aspect), math.log(self.max_aspect or 1 / self.min_aspect)

  def validate(self, field: str = "random_erasing") -> None:
    """ConfigError naming ``config.<field>.<name>`` for a value timm would not accept."""
    require(0.0 <= self.probability <= 1.0, f"{field}.probability", f"must be in [0, 1], got {self.probability}")
    require(self.mode in MODES, f"{field}.mode", f"must be one of {MODES}, got {self.mode!r}")
    require(0 < self.min_area <= self.max_area, f"{field}.min_area", "need 0 < min_area <= max_area")
    require(self.min_aspect > 0, f"{field}.min_aspect", f"must be > 0, got {self.min_aspect}")
    lo, hi = self.count_range
    require(1 <= lo <= hi, f"{field}.max_count", f"need 1 <= min_count <= max_count, got {lo}, {hi}")


class ErasingDraws(NamedTuple):
  """One image's random decisions. Per box k < max_count and attempt a < 10: ``area[k, a]`` the fraction
  U(min_area, max_area), ``log_aspect[k, a]``; ``top_u[k]``, ``left_u[k]`` uniforms in [0, 1) that become the
  offsets ``floor(u (H - h + 1))`` of the accepted attempt; ``noise[k]`` the box's fill over the whole image
  (only the box's pixels are used)."""

  erase: jax.Array  # bool
  count: jax.Array  # int32 in [min_count, max_count]
  area: jax.Array  # (max_count, 10) float32
  log_aspect: jax.Array  # (max_count, 10) float32
  top_u: jax.Array  # (max_count,) float32
  left_u: jax.Array  # (max_count,) float32
  noise: jax.Array  # (max_count, H, W, C) float32 (zeros for "const"; one colour broadcast for "rand")


def sample_erasing(key: jax.Array, shape, cfg: ErasingConfig = ErasingConfig()) -> ErasingDraws:
  """Draws one (H, W, C) image's erasing decisions: every uniform from one ``jax.random.uniform`` call and the fill
  from one ``jax.random.normal`` call (each separate random call costs compilation time on CPU)."""
  h, w, c = shape
  lo, hi = cfg.count_range
  la, lb = cfg.log_aspect
  k_u, k_noise = jax.random.split(key)
  n = hi * _ATTEMPTS
  u = jax.random.uniform(k_u, (2 + 2 * n + 2 * hi,))
  noise_shape = {"pixel": (hi, h, w, c), "rand": (hi, 1, 1, c)}.get(cfg.mode)
  noise = jax.random.normal(k_noise, noise_shape) if noise_shape else jnp.zeros((hi, 1, 1, c))
  return ErasingDraws(
    erase=u[0] <= cfg.probability,
    count=jnp.minimum(lo + jnp.floor(u[1] * (hi - lo + 1)).astype(jnp.int32), hi),  # randint(lo, hi), inclusive
    area=(cfg.min_area + (cfg.max_area - cfg.min_area) * u[2 : 2 + n]).reshape(hi, _ATTEMPTS),
    log_aspect=(la + (lb - la) * u[2 + n : 2 + 2 * n]).reshape(hi, _ATTEMPTS),
    top_u=u[2 + 2 * n : 2 + 2 * n + hi],
    left_u=u[2 + 2 * n + hi :],
    noise=jnp.broadcast_to(noise, (hi, h, w, c)),
  )


def erasing_boxes(draws: ErasingDraws, height: int, width: int):
  """``(valid, top, left, h, w)``, each (max_count,): the box each of the ``max_count`` slots erases (``valid``
  False for slots past ``count``, for a skipped image, and when none of the 10 attempts fits)."""
  n = draws.area.shape[0]
  target = draws.area * (height * width) / draws.count.astype(jnp.float32)
  ratio = jnp.exp(draws.log_aspect)
  hs = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
  ws = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
  fits = (ws < width) & (hs < height)
  first = jnp.argmax(fits, axis=1)  # the first attempt that fits (timm's loop breaks there)
  pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]  # noqa: E731
  bh, bw = pick(hs), pick(ws)
  valid = draws.erase & (jnp.arange(n) < draws.count) & jnp.any(fits, axis=1)
  top = jnp.floor(draws.top_u * (height - bh + 1).astype(jnp.float32)).astype(jnp.int32)
  left = jnp.floor(draws.left_u * (width - bw + 1).astype(jnp.float32)).astype(jnp.int32)
  return valid, jnp.minimum(top, height - bh), jnp.minimum(left, width - bw), bh, bw


def apply_erasing(x, draws: ErasingDraws) -> jax.Array:
  """Erases one (H, W, C) normalised float image with ``draws``: box k's pixels become ``noise[k]``'s, boxes in
  order (a later box overwrites an earlier one)."""
  height, width = x.shape[:2]
  valid, top, left, bh, bw = erasing_boxes(draws, height, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  for k in range(draws.area.shape[0]):
    inside = valid[k] & (rows >= top[k]) & (rows < top[k] + bh[k]) & (cols >= left[k]) & (cols < left[k] + bw[k])
    x = jnp.where(inside[..., None], draws.noise[k].astype(x.dtype), x)
  return x


def random_erasing(key: jax.Array, x, cfg: ErasingConfig = ErasingConfig()) -> jax.Array:
  """timm ``RandomErasing`` on a (B, H, W, C) normalised batch, each image with its own key; jittable."""
  keys = jax.random.split(key, x.shape[0])
  return jax.vmap(lambda k, im: apply_erasing(im, sample_erasing(k, im.shape, cfg)))(keys, x)
