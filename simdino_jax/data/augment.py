"""Host-side (numpy + PIL) DINO / SimDINO augmentations.

Every random op takes an explicit ``np.random.Generator``; each has a
deterministic counterpart taking the drawn parameters (``*_params`` samplers +
``apply_*`` functions), so that :mod:`simdino_jax.data.multicrop` can draw all
decisions first and tests can inspect them.

Conventions: images are ``(H, W, 3)`` arrays on the ``[0, 255]`` scale. Every op
accepts uint8 (or float on ``[0, 255]``) and returns **uint8**, mirroring the
official PIL pipeline in which each transform produces an 8-bit image. Inside
``color_jitter`` the four ops are computed in float32 and clamped to
``[0, 255]`` after each op (torchvision tensor semantics); the result is
rounded to uint8 once at the end. Only :func:`normalize` produces float32.

Semantics follow torchvision / DINO v1 (see REFERENCE.md section 6):

* ``RandomResizedCrop``: 10 tries of area ``U(scale) * H * W`` and log-uniform
  aspect ratio, ``w = round(sqrt(a * r))``, ``h = round(sqrt(a / r))``, accepted
  if ``0 < w <= W and 0 < h <= H`` with a uniform integer offset; otherwise a
  centre crop with the aspect ratio clamped to ``ratio``. The crop is resized
  to ``(size, size)`` with PIL bicubic.
* ``ColorJitter``: brightness/contrast/saturation factors ``U[max(0, 1-x), 1+x]``,
  hue ``U[-h, h]``; the four ops in a random permutation. Brightness scales,
  contrast blends with the mean of the greyscale image, saturation blends with
  the greyscale image, hue shifts H in HSV.
* Greyscale: ITU-R 601-2 luma with PIL's "L" integer weights, 3 channels.
* Gaussian blur: PIL ``ImageFilter.GaussianBlur(radius=U(sigma))``.
* Solarize: PIL semantics, pixels ``>= threshold`` become ``255 - x``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageFilter

IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)

# PIL's RGB -> "L" conversion: L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16.
_LUMA_INT = (19595, 38470, 7471)
_LUMA = np.array(_LUMA_INT, np.float32) / 65536.0  # ~ (0.299, 0.587, 0.114)


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


# ----------------------------------------------------------------------------
# Random resized crop


def rrc_params(height: int, width: int, rng: np.random.Generator,
               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
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


def apply_resized_crop(img, box: tuple[int, int, int, int], size: int) -> np.ndarray:
  """Crops ``box = (top, left, h, w)`` and resizes to ``(size, size)`` (bicubic).

  ``img`` may be an array or a ``PIL.Image`` (pass a PIL image to avoid
  re-converting when taking several crops of the same image).
  """
  top, left, h, w = box
  pil = _to_pil(img).crop((left, top, left + w, top + h))
  if pil.size != (size, size):
    pil = pil.resize((size, size), Image.BICUBIC)
  return np.asarray(pil)


def random_resized_crop(img, rng: np.random.Generator, size: int,
                        scale: tuple, ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """torchvision ``RandomResizedCrop(size, scale, ratio, BICUBIC)``; uint8 out."""
  if isinstance(img, Image.Image):
    width, height = img.size
  else:
    height, width = np.asarray(img).shape[:2]
  box = rrc_params(height, width, rng, scale, ratio)
  return apply_resized_crop(img, box, size)


def hflip(img) -> np.ndarray:
  return np.asarray(img)[:, ::-1]


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


def color_jitter_params(rng: np.random.Generator, brightness=0.4, contrast=0.4,
                        saturation=0.2, hue=0.1) -> JitterParams:
  """torchvision ``ColorJitter.get_params`` (permutation, then the 4 factors)."""
  order = tuple(int(i) for i in rng.permutation(4))
  b = rng.uniform(max(0.0, 1.0 - brightness), 1.0 + brightness)
  c = rng.uniform(max(0.0, 1.0 - contrast), 1.0 + contrast)
  s = rng.uniform(max(0.0, 1.0 - saturation), 1.0 + saturation)
  h = rng.uniform(-hue, hue)
  return JitterParams(order, float(b), float(c), float(s), float(h))


def _gray_f32(x: np.ndarray) -> np.ndarray:
  return x @ _LUMA


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


def _adjust_hue_f32(x: np.ndarray, hue: float) -> np.ndarray:
  """Shifts H in HSV by ``hue`` (fraction of a turn); float32 ``[0, 255]``.

  Equivalent to ``hsv_to_rgb(rgb_to_hsv(x) + (hue, 0, 0))`` but fused: V = max,
  V*S = max - min are unchanged, and each channel of the result is
  ``max - (max - min) * clip(min(k, 4 - k), 0, 1)`` with
  ``k = (n + 6 H) mod 6``, ``n = 5, 3, 1`` for R, G, B.
  """
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc = np.maximum(np.maximum(r, g), b)
  minc = np.minimum(np.minimum(r, g), b)
  delta = maxc - minc
  safe = np.where(delta > 0, delta, np.float32(1.0))
  h6 = np.where(maxc == r, (g - b) / safe,
                np.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
  h6 = h6.astype(np.float32) + np.float32(6.0 * hue)
  out = np.empty_like(x, dtype=np.float32)
  for c, n in enumerate((5.0, 3.0, 1.0)):
    k = np.mod(h6 + np.float32(n), np.float32(6.0))
    out[..., c] = maxc - delta * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
  return out


def apply_color_jitter(img, p: JitterParams) -> np.ndarray:
  """Applies drawn jitter parameters (float32 with clamping per op) -> uint8."""
  x = np.asarray(img, np.float32)
  for op in p.order:
    if op == 0:
      if p.brightness != 1.0:
        x = np.clip(x * p.brightness, 0.0, 255.0)
    elif op == 1:
      if p.contrast != 1.0:
        mean = float(_gray_f32(x).mean())
        x = np.clip(p.contrast * x + (1.0 - p.contrast) * mean, 0.0, 255.0)
    elif op == 2:
      if p.saturation != 1.0:
        gray = _gray_f32(x)[..., None]
        x = np.clip(p.saturation * x + (1.0 - p.saturation) * gray, 0.0, 255.0)
    else:
      if p.hue != 0.0:
        x = np.clip(_adjust_hue_f32(x, p.hue), 0.0, 255.0)
  return to_uint8(x)


def color_jitter(img, rng: np.random.Generator, brightness=0.4, contrast=0.4,
                 saturation=0.2, hue=0.1) -> np.ndarray:
  """torchvision ``ColorJitter`` (always applied; wrap in a coin flip)."""
  return apply_color_jitter(
      img, color_jitter_params(rng, brightness, contrast, saturation, hue))


def to_grayscale(img) -> np.ndarray:
  """ITU-R 601-2 luma (PIL "L" weights), replicated to 3 channels; uint8."""
  img = np.asarray(img)
  if img.dtype == np.uint8:
    x = img.astype(np.int32)
    lum = (x[..., 0] * _LUMA_INT[0] + x[..., 1] * _LUMA_INT[1]
           + x[..., 2] * _LUMA_INT[2] + 0x8000) >> 16
    lum = lum.astype(np.uint8)
  else:
    lum = to_uint8(np.asarray(img, np.float32) @ _LUMA)
  return np.repeat(lum[..., None], 3, axis=-1)


# ----------------------------------------------------------------------------
# Blur, solarize, normalise


def blur_radius(rng: np.random.Generator, sigma=(0.1, 2.0)) -> float:
  return float(rng.uniform(sigma[0], sigma[1]))


def apply_gaussian_blur(img, radius: float) -> np.ndarray:
  """PIL ``ImageFilter.GaussianBlur(radius)``; uint8 out."""
  return np.asarray(_to_pil(img).filter(ImageFilter.GaussianBlur(radius=radius)))


def gaussian_blur(img, rng: np.random.Generator, sigma=(0.1, 2.0)) -> np.ndarray:
  """DINO v1 ``GaussianBlur``: PIL blur with ``radius ~ U(sigma)`` (always applied)."""
  return apply_gaussian_blur(img, blur_radius(rng, sigma))


def solarize(img, threshold: int = 128) -> np.ndarray:
  """PIL ``ImageOps.solarize``: pixels ``>= threshold`` become ``255 - x``."""
  x = to_uint8(img)
  return np.where(x >= threshold, 255 - x, x).astype(np.uint8)


def normalize(img) -> np.ndarray:
  """``(x / 255 - mean) / std`` with ImageNet statistics; float32 ``(..., 3)``."""
  x = np.asarray(img, np.float32) * np.float32(1.0 / 255.0)
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def normalized_bounds() -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (min, max) of :func:`normalize` outputs."""
  return (0.0 - IMAGENET_MEAN) / IMAGENET_STD, (1.0 - IMAGENET_MEAN) / IMAGENET_STD
