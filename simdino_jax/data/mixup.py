"""timm's Mixup / CutMix in "batch" mode with label smoothing, as pure JAX functions (the fine-tuning recipe).

The BEiT / iBOT / DeiT fine-tuning recipe (iBOT ``evaluation/classification_layer_decay/run_class_finetuning.py``:
``--mixup 0.8 --cutmix 1.0 --mixup_prob 1.0 --mixup_switch_prob 0.5 --mixup_mode batch --smoothing 0.1``) calls
``timm.data.mixup.Mixup(x, target)`` on every training batch. In "batch" mode timm draws ONE set of parameters per
batch (``Mixup._params_per_batch``):

  mix with probability ``prob`` (``np.random.rand() < prob``; else lam = 1, the batch passes unchanged);
  if both alphas are > 0: CutMix with probability ``switch_prob`` (``np.random.rand() < switch_prob``), else mixup;
  lam ~ Beta(cutmix_alpha, cutmix_alpha) for CutMix, Beta(mixup_alpha, mixup_alpha) for mixup;
  mixup:  x <- lam x + (1 - lam) x.flip(0)   (example i mixes with example B - 1 - i);
  CutMix: the box ``rand_bbox``: side ``int(H sqrt(1 - lam))`` x ``int(W sqrt(1 - lam))`` centred at
          ``cy ~ randint(0, H)``, ``cx ~ randint(0, W)``, clipped to the image; the box's pixels come from
          x.flip(0); lam <- 1 - box area / (H W) (``correct_lam``, the fraction of the image actually kept);
  targets: ``mixup_target``: one-hot smoothed to ``smoothing / K`` off and ``1 - smoothing + smoothing / K`` on,
          then ``lam y + (1 - lam) y.flip(0)``.

Here the draws are made from an explicit JAX key (``sample_mixup`` -> ``MixupDraws``) and applied by a
deterministic function (``apply_mixup``), so the whole thing runs inside a jitted step and tests can replay the same
draws in timm (tests/test_mixup.py). Images are (B, H, W, C) (timm's are (B, C, H, W); the box is on H, W either
way). Differences from timm, all float rounding: the box side ``int(H sqrt(1 - lam))`` and the corrected lam are
computed in float32 here (float64 in timm), so a side can differ by one pixel when ``H sqrt(1 - lam)`` lies within
float32 rounding of an integer, and ``1 - lam`` is rounded once more (float32 instead of float64 then float32):
mixed pixels within ~1 ulp.

The flip is over the batch axis this function sees. timm runs per process on the local batch (each GPU's batch
mixes with itself, with its own lam); called on a globally sharded batch inside jit, the flip pairs example i with
example B - 1 - i of the global batch (XLA moves the data between devices), which is the same rule on a bigger
batch. Only the "batch" mode of the recipe is implemented ("pair" and "elem" draw per example) and ``cutmix_minmax``
is not (the recipe leaves it None).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from simdino_jax.errors import require


@dataclasses.dataclass(frozen=True)
class MixupConfig:
  """timm ``Mixup`` arguments; the defaults are the BEiT / iBOT / DeiT fine-tuning recipe's."""

  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  prob: float = 1.0  # --mixup_prob: probability that a batch is mixed at all
  switch_prob: float = 0.5  # --mixup_switch_prob: probability of CutMix instead of mixup when both are on
  label_smoothing: float = 0.1  # --smoothing
  correct_lam: bool = True  # lam from the clipped box's area (timm default)

  def validate(self, field: str = "mixup") -> None:
    """ConfigError naming ``config.<field>.<name>`` for a value timm would not accept."""
    require(self.mixup_alpha >= 0, f"{field}.mixup_alpha", f"must be >= 0, got {self.mixup_alpha}")
    require(self.cutmix_alpha >= 0, f"{field}.cutmix_alpha", f"must be >= 0, got {self.cutmix_alpha}")
    require(
      self.mixup_alpha > 0 or self.cutmix_alpha > 0,
      f"{field}.mixup_alpha",
      "one of mixup_alpha, cutmix_alpha must be > 0 (or turn mixing off)",
    )
    for name in ("prob", "switch_prob", "label_smoothing"):
      v = getattr(self, name)
      require(0.0 <= v <= 1.0, f"{field}.{name}", f"must be in [0, 1], got {v}")


class MixupDraws(NamedTuple):
  """One batch's random decisions (scalars). ``lam`` is the Beta draw before the CutMix box correction; ``cy``,
  ``cx`` the box centre (used only when ``use_cutmix``)."""

  mix: jax.Array  # bool: the batch is mixed (timm: np.random.rand() < prob)
  use_cutmix: jax.Array  # bool
  lam: jax.Array  # float32 in [0, 1]
  cy: jax.Array  # int32 in [0, H)
  cx: jax.Array  # int32 in [0, W)


_GAMMA_CANDIDATES = 16  # Marsaglia-Tsang proposals per gamma draw (acceptance >= 0.95 each for shape >= 1)
_TINY = float(jnp.finfo(jnp.float32).tiny)


def log_gamma(u: jax.Array, alpha) -> jax.Array:
  """log of Gamma(alpha_i, 1) draws, one per row of ``u`` (R, 2 x 16 + 1) uniforms in (0, 1), ``alpha`` (R,) > 0:
  Marsaglia & Tsang (2000) on shape alpha (alpha + 1 boosted by U^(1 / alpha) when alpha < 1, in log space).

  The 16 proposals of a row (normals by the inverse normal CDF of its first 16 uniforms, acceptance tests from the
  next 16) are evaluated at once and the first accepted one is used: the rejection loop's result unless all 16 are
  rejected (probability < 0.05^16 ~ 1e-21; proposal 0 is then used)."""
  n = _GAMMA_CANDIDATES
  alpha = jnp.asarray(alpha, jnp.float32)[:, None]
  shape = jnp.where(alpha < 1.0, alpha + 1.0, alpha)
  d = shape - 1.0 / 3.0
  c = 1.0 / jnp.sqrt(9.0 * d)
  x = jax.scipy.special.ndtri(u[:, :n])
  v = (1.0 + c * x) ** 3
  log_v = jnp.log(jnp.maximum(v, _TINY))
  accept = (v > 0) & (jnp.log(u[:, n : 2 * n]) < 0.5 * x * x + d - d * v + d * log_v)
  first = jnp.argmax(accept, axis=1)
  log_g = jnp.log(d[:, 0]) + jnp.take_along_axis(log_v, first[:, None], axis=1)[:, 0]
  return log_g + jnp.where(alpha[:, 0] < 1.0, jnp.log(u[:, 2 * n]) / alpha[:, 0], 0.0)


def sample_mixup(key: jax.Array, height: int, width: int, cfg: MixupConfig = MixupConfig()) -> MixupDraws:
  """Draws ``_params_per_batch``'s decisions and ``rand_bbox``'s centre for an (H, W) batch.

  All from ONE ``jax.random.uniform`` call, the Beta draws as X / (X + Y) of gamma draws (``log_gamma``): on these
  CPUs every separate random call costs ~0.3-1 s of compilation and ``jax.random.beta``'s while-loop gamma sampler
  4-8 s (measured under load), inside the fine-tuning step as much as in the tests."""
  u = jax.random.uniform(key, (4 + 4 * (2 * _GAMMA_CANDIDATES + 1),), minval=_TINY)
  mix = u[0] < cfg.prob
  both = cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0
  use_cutmix = u[1] < cfg.switch_prob if both else jnp.bool_(cfg.cutmix_alpha > 0)
  a_cut, a_mix = cfg.cutmix_alpha or 1.0, cfg.mixup_alpha or 1.0  # an unused alpha of 0 draws with 1 instead
  g = log_gamma(u[4:].reshape(4, -1), (a_cut, a_cut, a_mix, a_mix))
  lam_cut, lam_mix = jax.nn.sigmoid(g[0] - g[1]), jax.nn.sigmoid(g[2] - g[3])  # X / (X + Y)
  lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
  cy = jnp.minimum(jnp.floor(u[2] * height).astype(jnp.int32), height - 1)  # randint(0, H)
  cx = jnp.minimum(jnp.floor(u[3] * width).astype(jnp.int32), width - 1)
  return MixupDraws(mix, use_cutmix & mix, lam, cy, cx)


def cutmix_box(lam, cy, cx, height: int, width: int):
  """timm ``rand_bbox`` (margin 0): ``(yl, yh, xl, xh)``, a box of side ``int(H sqrt(1 - lam))`` x
  ``int(W sqrt(1 - lam))`` around (cy, cx), clipped to the image (half-open ranges)."""
  ratio = jnp.sqrt(jnp.maximum(1.0 - jnp.asarray(lam, jnp.float32), 0.0))
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  yl = jnp.clip(cy - cut_h // 2, 0, height)
  yh = jnp.clip(cy + (cut_h + 1) // 2, 0, height)
  xl = jnp.clip(cx - cut_w // 2, 0, width)
  xh = jnp.clip(cx + (cut_w + 1) // 2, 0, width)
  return yl, yh, xl, xh


def mixup_target(labels, num_classes: int, lam, smoothing: float = 0.1) -> jax.Array:
  """timm ``mixup_target``: smoothed one-hot targets mixed with the flipped batch's, (B, num_classes) float32."""
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  y = jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), on, off).astype(jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  return y * lam + y[::-1] * (1.0 - lam)


def _check_even(b: int) -> None:
  if b % 2:
    raise ValueError(f"mixup needs an even batch size (timm asserts it: example i mixes with B - 1 - i), got {b}.")


def apply_mixup(x, labels, draws: MixupDraws, num_classes: int, cfg: MixupConfig = MixupConfig()):
  """Mixes a (B, H, W, C) float batch and its (B,) int labels with ``draws``; returns ``(x, targets, lam)``:
  the mixed batch (x's dtype), (B, num_classes) float32 soft targets, and the lam the targets used (1 when the
  batch was not mixed, the box-corrected value for CutMix)."""
  b, h, w = x.shape[:3]
  _check_even(b)
  flipped = x[::-1]
  yl, yh, xl, xh = cutmix_box(draws.lam, draws.cy, draws.cx, h, w)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
  if cfg.correct_lam:
    lam_cut = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / float(h * w)
  else:
    lam_cut = draws.lam
  lam_mix = draws.lam.astype(jnp.float32)
  cut = jnp.where(box[None, :, :, None], flipped, x)
  blend = (x * lam_mix.astype(x.dtype) + flipped * (1.0 - lam_mix).astype(x.dtype)).astype(x.dtype)
  mixed = jnp.where(draws.use_cutmix, cut, blend)
  lam = jnp.where(draws.mix, jnp.where(draws.use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)
  out = jnp.where(draws.mix & (lam < 1.0), mixed, x)  # timm returns the batch untouched when lam == 1
  return out, mixup_target(labels, num_classes, lam, cfg.label_smoothing), lam


def mixup(key: jax.Array, x, labels, num_classes: int, cfg: MixupConfig = MixupConfig()):
  """One timm ``Mixup(mode="batch")`` call: ``(mixed x, soft targets (B, num_classes))``, jittable."""
  _check_even(x.shape[0])
  out, targets, _ = apply_mixup(x, labels, sample_mixup(key, x.shape[1], x.shape[2], cfg), num_classes, cfg)
  return out, targets
