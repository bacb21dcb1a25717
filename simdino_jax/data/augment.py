"""Host-side (numpy + OpenCV + PIL) DINO / SimDINO augmentations.

Every random op has a sampler that draws its parameters from an explicit
``np.random.Generator`` (``rrc_params``, ``color_jitter_params``,
``blur_radius``; the coin flips live in :mod:`simdino_jax.data.multicrop`) and
a deterministic function applying them (``apply_resized_crop``, ``hflip``,
``adjust_brightness`` / ``_contrast`` / ``_saturation`` / ``_hue``,
``apply_color_jitter``, ``to_grayscale``, ``apply_gaussian_blur``,
``solarize``, ``normalize``), so that the multi-crop map can draw all decisions
first, tests can inspect them and an on-device implementation can share the
sampling rule.

Conventions: images are ``(H, W, 3)`` arrays on the ``[0, 255]`` scale. Every op
accepts uint8 (or float on ``[0, 255]``) and returns **uint8**, as in the
official pipeline, where every transform maps an 8-bit PIL image to an 8-bit
PIL image. Only :func:`normalize` produces float32.

Semantics follow the official DINO recipe, i.e. torchvision's transforms on PIL
images (docs/data.md#augmentation-recipe); where we compute an op differently for speed,
the difference is stated and bounded by a test (tests/test_data.py):

* ``RandomResizedCrop``: 10 tries of area ``U(scale) * H * W`` and log-uniform
  aspect ratio, ``w = round(sqrt(a * r))``, ``h = round(sqrt(a / r))``, accepted
  if ``0 < w <= W and 0 < h <= H`` with a uniform integer offset; otherwise a
  centre crop with the aspect ratio clamped to ``ratio``. The crop is resized
  to ``(size, size)`` with PIL's bicubic filter (``resize="pil"``: exactly the
  official op; PIL widens the kernel when downscaling, i.e. antialiases) or
  with OpenCV (``resize="cv2"``, 2-5x faster): ``INTER_CUBIC`` when neither
  side shrinks (the same cubic convolution with a = -0.75 instead of PIL's
  -0.5), ``INTER_AREA`` (pixel-area averaging, also antialiased) when one does.
* ``ColorJitter``: brightness/contrast/saturation factors ``U[max(0, 1-x), 1+x]``,
  hue ``U[-h, h]``; the four ops in a random permutation, each producing uint8
  as PIL's ``ImageEnhance`` does (we round to nearest where PIL truncates).
  Brightness scales; contrast blends with the rounded mean of the greyscale
  image; saturation blends with the greyscale image; hue shifts H of an HSV
  round trip, done in float32 (torchvision on PIL quantises H to 1/256 turn).
* Greyscale: ITU-R 601-2 luma, 3 channels (OpenCV's fixed-point weights; 0.13%
  of all RGB colours differ from PIL's "L" conversion, by 1).
* Gaussian blur: PIL's ``ImageFilter.GaussianBlur(radius=sigma)``, which is
  three passes of an "extended" box filter per axis (Gwosdek et al. 2011) with
  replicated borders; we run the same three box kernels with OpenCV in float32
  (same linear filter and borders, one rounding instead of PIL's six: within 3
  levels of PIL).
* Solarize: PIL semantics, pixels ``>= threshold`` become ``255 - x``.
* Normalise: ``(x / 255 - mean) / std`` with the ImageNet statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import cv2
import numpy as np
from PIL import Image

# One core per grain worker: OpenCV's own thread pool would oversubscribe the
# cores the workers (and XLA) already use.
cv2.setNumThreads(1)

IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)

# ITU-R 601-2 luma weights in 16-bit fixed point (PIL's RGB -> "L" conversion).
_LUMA_INT = (19595, 38470, 7471)

RESIZE_BACKENDS = ("pil", "cv2")

_RAMP = np.arange(256, dtype=np.float32)


def _to_pil(img) -> Image.Image:
  if isinstance(img, Image.Image):
    return img
  return Image.fromarray(to_uint8(img))


def to_uint8(img) -> np.ndarray:
  """Rounds and clamps a ``[0, 255]`` array to uint8 (uint8 passes through)."""
  img = np.asarray(img)
  if img.dtype == np.uint8:
    return img
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _u8(img) -> np.ndarray:
  # OpenCV wants a uint8 array with unit channel stride (views from slicing
  # rows/columns are fine); PIL images are converted.
  x = to_uint8(img)
  return x if x.strides[-1] == 1 else np.ascontiguousarray(x)


def _lut(x: np.ndarray, table: np.ndarray) -> np.ndarray:
  """Applies a float table over ``[0, 255]`` (rounded, clamped) per pixel."""
  return cv2.LUT(x, np.clip(np.rint(table), 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------
# Random resized crop


def rrc_params(
  height: int, width: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
  """torchvision's ``RandomResizedCrop`` box sampler.

  Returns:
    ``(top, left, h, w)`` of the crop in the source image.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: centre crop with the aspect ratio clamped to `ratio`.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def apply_resized_crop(img, box: tuple[int, int, int, int], size: int, resize: str = "pil") -> np.ndarray:
  """Crops ``box = (top, left, h, w)`` and resizes to ``(size, size)`` (bicubic).

  ``resize="pil"`` is PIL's bicubic resize of the crop, exactly as the official
  ``RandomResizedCrop(..., BICUBIC)`` on a PIL image; ``"cv2"`` is OpenCV's
  ``INTER_CUBIC`` when upscaling and ``INTER_AREA`` when downscaling (see the
  module doc). ``img`` may be an array or a ``PIL.Image`` (pass a PIL image to
  the PIL path to avoid re-converting when taking several crops of the same
  image).
  """
  top, left, h, w = box
  if resize == "pil":
    pil = _to_pil(img).crop((left, top, left + w, top + h))
    if pil.size != (size, size):
      pil = pil.resize((size, size), Image.BICUBIC)
    return np.asarray(pil)
  if resize != "cv2":
    raise ValueError(f"resize must be one of {RESIZE_BACKENDS}, got {resize!r}.")
  crop = _u8(img)[top : top + h, left : left + w]
  if (h, w) == (size, size):
    return np.ascontiguousarray(crop)
  # PIL antialiases when shrinking (its kernel widens with the scale); plain
  # INTER_CUBIC would alias there, INTER_AREA averages the covered area.
  interp = cv2.INTER_CUBIC if max(h, w) <= size else cv2.INTER_AREA
  return cv2.resize(crop, (size, size), interpolation=interp)


def random_resized_crop(
  img, rng: np.random.Generator, size: int, scale: tuple, ratio=(3 / 4, 4 / 3), resize: str = "pil"
) -> np.ndarray:
  """torchvision ``RandomResizedCrop(size, scale, ratio, BICUBIC)``; uint8 out."""
  if isinstance(img, Image.Image):
    width, height = img.size
  else:
    height, width = np.asarray(img).shape[:2]
  box = rrc_params(height, width, rng, scale, ratio)
  return apply_resized_crop(img, box, size, resize)


def hflip(img) -> np.ndarray:
  """Horizontal flip (a contiguous uint8 copy)."""
  return cv2.flip(_u8(img), 1)


# ----------------------------------------------------------------------------
# Colour


@dataclasses.dataclass(frozen=True)
class JitterParams:
  """Drawn colour-jitter parameters; ``order`` indexes (b, c, s, h)."""

  order: tuple[int, ...]
  brightness: float
  contrast: float
  saturation: float
  hue: float


def color_jitter_params(
  rng: np.random.Generator, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1
) -> JitterParams:
  """torchvision ``ColorJitter.get_params`` (permutation, then the 4 factors)."""
  order = tuple(int(i) for i in rng.permutation(4))
  b = rng.uniform(max(0.0, 1.0 - brightness), 1.0 + brightness)
  c = rng.uniform(max(0.0, 1.0 - contrast), 1.0 + contrast)
  s = rng.uniform(max(0.0, 1.0 - saturation), 1.0 + saturation)
  h = rng.uniform(-hue, hue)
  return JitterParams(order, float(b), float(c), float(s), float(h))


def luma(img) -> np.ndarray:
  """ITU-R 601-2 luma ``(H, W)`` uint8 (OpenCV's RGB -> grey)."""
  return cv2.cvtColor(_u8(img), cv2.COLOR_RGB2GRAY)


def rgb_to_hsv(x: np.ndarray) -> np.ndarray:
  """RGB in [0, 1] -> HSV in [0, 1] (float32, vectorised)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc = np.maximum(np.maximum(r, g), b)
  minc = np.minimum(np.minimum(r, g), b)
  delta = maxc - minc
  s = delta / np.where(maxc > 0, maxc, 1.0)
  safe = np.where(delta > 0, delta, 1.0)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  h = np.where(maxc == r, bc - gc, np.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  return np.stack([h, s, maxc], axis=-1).astype(np.float32)


def hsv_to_rgb(x: np.ndarray) -> np.ndarray:
  """HSV in [0, 1] -> RGB in [0, 1] (float32, vectorised)."""
  h, s, v = x[..., 0], x[..., 1], x[..., 2]
  h6 = (h % 1.0) * 6.0
  i = np.floor(h6)
  f = h6 - i
  i = i.astype(np.int32) % 6
  p = v * (1.0 - s)
  q = v * (1.0 - s * f)
  t = v * (1.0 - s * (1.0 - f))
  r = np.choose(i, [v, q, p, p, t, v])
  g = np.choose(i, [t, v, v, q, p, p])
  b = np.choose(i, [p, p, t, v, v, q])
  return np.stack([r, g, b], axis=-1).astype(np.float32)


def adjust_brightness(img, factor: float) -> np.ndarray:
  """``x * factor`` (PIL ``ImageEnhance.Brightness``); uint8 out."""
  x = _u8(img)
  if factor == 1.0:
    return x
  if factor < 0:
    raise ValueError(f"brightness factor must be >= 0, got {factor}.")
  return cv2.convertScaleAbs(x, alpha=float(factor))  # round, clamp to 255


def adjust_contrast(img, factor: float) -> np.ndarray:
  """Blend with the grey level ``int(mean(luma) + 0.5)`` (PIL ``ImageEnhance.Contrast``).

  The mean luma is taken as the luma of the channel means (PIL averages the
  rounded luma image; the two differ by far less than one level).
  """
  x = _u8(img)
  if factor == 1.0:
    return x
  r, g, b, _ = cv2.mean(x)
  mean = int((r * _LUMA_INT[0] + g * _LUMA_INT[1] + b * _LUMA_INT[2]) / 65536.0 + 0.5)
  # factor * x + (1 - factor) * mean, rounded and clamped to [0, 255].
  return cv2.addWeighted(x, float(factor), x, 0.0, (1.0 - float(factor)) * mean)


def adjust_saturation(img, factor: float) -> np.ndarray:
  """Blend with the luma image (PIL ``ImageEnhance.Color``); uint8 out."""
  x = _u8(img)
  if factor == 1.0:
    return x
  grey = cv2.cvtColor(luma(x), cv2.COLOR_GRAY2RGB)
  return cv2.addWeighted(x, float(factor), grey, 1.0 - float(factor), 0.0)


def adjust_hue(img, hue: float) -> np.ndarray:
  """Shifts H of an HSV round trip by ``hue`` turns (in float32); uint8 out."""
  x = _u8(img)
  if hue == 0.0:
    return x
  hsv = cv2.cvtColor(x.astype(np.float32), cv2.COLOR_RGB2HSV)  # H in degrees
  # A shift in [0, 360): OpenCV's vectorised HSV2RGB wraps H in [360, 720) but
  # not negative H.
  hsv[..., 0] += np.float32((360.0 * hue) % 360.0)
  return cv2.convertScaleAbs(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))  # round, clamp


_JITTER_OPS = (
  lambda x, p: adjust_brightness(x, p.brightness),
  lambda x, p: adjust_contrast(x, p.contrast),
  lambda x, p: adjust_saturation(x, p.saturation),
  lambda x, p: adjust_hue(x, p.hue),
)


def apply_color_jitter(img, p: JitterParams) -> np.ndarray:
  """Applies drawn jitter parameters, the four ops in ``p.order``; uint8 out."""
  x = _u8(img)
  for op in p.order:
    x = _JITTER_OPS[op](x, p)
  return x


def color_jitter(img, rng: np.random.Generator, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1) -> np.ndarray:
  """torchvision ``ColorJitter`` (always applied; wrap in a coin flip)."""
  return apply_color_jitter(img, color_jitter_params(rng, brightness, contrast, saturation, hue))


def to_grayscale(img) -> np.ndarray:
  """ITU-R 601-2 luma replicated to 3 channels (``RandomGrayscale``); uint8."""
  return cv2.cvtColor(luma(img), cv2.COLOR_GRAY2RGB)


# ----------------------------------------------------------------------------
# Blur, solarize, normalise


def blur_radius(rng: np.random.Generator, sigma=(0.1, 2.0)) -> float:
  return float(rng.uniform(sigma[0], sigma[1]))


def pil_box_kernel(radius: float, passes: int = 3) -> np.ndarray:
  """The 1-D box kernel of one pass of PIL's ``GaussianBlur(radius)``.

  PIL approximates a Gaussian of standard deviation ``radius`` by ``passes``
  box filters of a real-valued radius ``l + a`` (Gwosdek et al., "Theoretical
  foundations of Gaussian convolution by extended box filtering", 2011, eqs. 7,
  11, 14, in float32): ``2l + 1`` taps of weight ``ww`` and one tap of weight
  ``fw`` at each end, in 24-bit fixed point (Pillow ``BoxBlur.c``).
  """
  f32 = np.float32
  sigma2 = f32(radius) * f32(radius) / f32(passes)
  big_l = f32(math.sqrt(12.0 * sigma2 + 1.0))
  l = f32(math.floor((big_l - 1.0) / 2.0))
  a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2)
  a = f32(a / (6 * (sigma2 - (l + 1) * (l + 1))))
  box_radius = f32(l + a)
  r = int(box_radius)
  ww = int((1 << 24) / float(box_radius * 2 + 1))
  fw = ((1 << 24) - (2 * r + 1) * ww) // 2
  k = np.full(2 * r + 3, ww, np.float64)
  k[0] = k[-1] = fw
  return (k / (1 << 24)).astype(np.float32)


def apply_gaussian_blur(img, radius: float) -> np.ndarray:
  """PIL ``ImageFilter.GaussianBlur(radius)``: 3 extended box passes per axis.

  The same kernels and replicated borders as PIL, computed by OpenCV in
  float32 and rounded once (PIL rounds to uint8 after each of its six 1-D
  passes): within 3 levels of PIL, and within rounding of the exact filter.
  """
  x = _u8(img)
  k = pil_box_kernel(radius)
  # float32 passes: OpenCV's uint8 -> uint8 filter quantises the kernel to
  # 1/256 steps, which would drop the outer taps of small radii.
  y = cv2.sepFilter2D(x, cv2.CV_32F, k, k, borderType=cv2.BORDER_REPLICATE)
  for _ in range(2):
    y = cv2.sepFilter2D(y, -1, k, k, borderType=cv2.BORDER_REPLICATE)
  return cv2.convertScaleAbs(y)  # round, clamp


def gaussian_blur(img, rng: np.random.Generator, sigma=(0.1, 2.0)) -> np.ndarray:
  """DINO v1 ``GaussianBlur``: PIL blur with ``radius ~ U(sigma)`` (always applied)."""
  return apply_gaussian_blur(img, blur_radius(rng, sigma))


def solarize(img, threshold: int = 128) -> np.ndarray:
  """PIL ``ImageOps.solarize``: pixels ``>= threshold`` become ``255 - x``."""
  x = _u8(img)
  if threshold == 128:  # then min(x, 255 - x) is exactly that, in two vector passes
    return cv2.min(x, cv2.bitwise_not(x))
  return _lut(x, np.where(_RAMP >= threshold, 255.0 - _RAMP, _RAMP))


def _normalize_f32(x) -> np.ndarray:
  x = np.asarray(x, np.float32) * np.float32(1.0 / 255.0)
  return (x - IMAGENET_MEAN) / IMAGENET_STD


_NORM_SCALE = (1.0 / (255.0 * IMAGENET_STD.astype(np.float64))).astype(np.float32)
_NORM_SHIFT = (IMAGENET_MEAN.astype(np.float64) / IMAGENET_STD).astype(np.float32)


def normalize(img) -> np.ndarray:
  """``(x / 255 - mean) / std`` with ImageNet statistics; float32 ``(..., 3)``.

  Any leading shape (e.g. a stack of crops). Computed as ``x * (1 / (255 std))
  - mean / std`` in two passes over rows of ``W * 3`` values (the per-channel
  constants tiled along the row, so numpy's inner loops are long); within
  1e-6 of the formula.
  """
  x = np.asarray(img)
  if x.ndim < 2 or x.shape[-1] != 3 or x.size == 0:
    return _normalize_f32(x)
  scale, shift = _norm_rows(x.shape[-2])
  out = x.astype(np.float32).reshape(-1, scale.size)
  out *= scale
  out -= shift
  return out.reshape(x.shape)


@functools.lru_cache(maxsize=16)
def _norm_rows(width: int) -> tuple[np.ndarray, np.ndarray]:
  return np.tile(_NORM_SCALE, width), np.tile(_NORM_SHIFT, width)


def normalized_bounds() -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (min, max) of :func:`normalize` outputs."""
  return (0.0 - IMAGENET_MEAN) / IMAGENET_STD, (1.0 - IMAGENET_MEAN) / IMAGENET_STD
