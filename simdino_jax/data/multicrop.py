"""DINO / SimDINO multi-crop augmentation as a grain random map.

Per crop, in this order (docs/data.md#augmentation-recipe): random resized crop (bicubic)
-> horizontal flip (p ``flip_p``) -> colour jitter (p ``jitter_p``) -> greyscale
(p ``grayscale_p``) -> Gaussian blur (p ``blur_p[0]`` for global crop 1,
``blur_p[1]`` for global crop 2, ``blur_p[2]`` for every local crop) ->
solarize (p ``solarize_p``, global crop 2 only) -> ImageNet normalisation.
All draws are independent per crop. The decisions are drawn up front by
:meth:`MultiCrop.sample_params` and then applied, so they can be inspected.

Every op maps uint8 to uint8 (see :mod:`simdino_jax.data.augment`); the crops
are written into one uint8 stack per kind and normalised to float32 in one
vectorised pass per stack.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np
from PIL import Image

from simdino_jax.data import augment

# "host": every augmentation on the host; "device": the host only crops (uint8), the rest runs in the jitted step.
AUGMENT_MODES = ("host", "device")


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
  """Multi-crop recipe; defaults are DINO v1 / SimDINO (ImageNet)."""

  global_size: int = 224
  local_size: int = 96
  num_global: int = 2
  num_local: int = 10
  global_scale: tuple = (0.4, 1.0)
  local_scale: tuple = (0.05, 0.4)
  flip_p: float = 0.5
  jitter_p: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_p: float = 0.2
  blur_p: tuple = (1.0, 0.1, 0.5)  # global 1, global 2, each local crop
  blur_sigma: tuple = (0.1, 2.0)  # PIL GaussianBlur radius range
  solarize_p: float = 0.2  # global crop 2 only
  solarize_threshold: int = 128
  resize: str = "cv2"  # "pil" (the official op, exact) or "cv2" (faster)
  # "device": crops only (uint8 out); flip, photometric ops and normalisation
  # run in the train step (data/device_augment.py).
  augment_mode: str = "host"
  # > 0: also "gram_global", each global crop's box and flip resized to this size, no photometric op (DINOv3's
  # gram_teacher_crops_size with gram_teacher_no_distortions=True): the Gram teacher's input (train/gram.py).
  gram_size: int = 0

  def __post_init__(self):
    if self.num_global not in (1, 2):
      raise ValueError(f"num_global must be 1 or 2 (the recipe defines global crops 1 and 2), got {self.num_global}.")
    if self.num_local < 0:
      raise ValueError(f"num_local must be >= 0, got {self.num_local}.")
    if len(self.blur_p) != 3:
      raise ValueError(f"blur_p must be (global1, global2, local), got {self.blur_p}.")
    if self.augment_mode not in AUGMENT_MODES:
      raise ValueError(f"augment_mode must be one of {AUGMENT_MODES}, got {self.augment_mode!r}.")
    if self.gram_size < 0 or (self.gram_size and self.augment_mode == "device"):
      raise ValueError(f"gram_size must be >= 0 and needs augment_mode='host', got {self.gram_size}.")
    if self.resize not in augment.RESIZE_BACKENDS:
      raise ValueError(f"resize must be one of {augment.RESIZE_BACKENDS}, got {self.resize!r}.")


@dataclasses.dataclass(frozen=True)
class CropParams:
  """All random decisions for one crop."""

  kind: str  # "global" or "local"
  index: int  # index within its kind
  size: int  # output side length
  box: tuple[int, int, int, int]  # (top, left, h, w) in the source image
  flip: bool
  jitter: augment.JitterParams | None  # None = not applied
  grayscale: bool
  blur_radius: float | None  # None = not applied
  solarize: bool


class MultiCrop(grain.transforms.RandomMap):
  """grain ``RandomMap``: ``{"image", "label"}`` -> multi-crop views.

  Output: ``{"global": (num_global, Gs, Gs, 3) float32, "local": (num_local,
  Ls, Ls, 3) float32, "label": int32 scalar, "skipped": int32 scalar}``,
  normalised with ImageNet mean/std. ``"local"`` has shape ``(0, Ls, Ls, 3)``
  when ``num_local == 0``. With ``augment_mode="device"`` the crops are the
  resized uint8 crops (same boxes as host mode for the same rng), unflipped.
  With ``gram_size`` also ``"gram_global": (num_global, S, S, 3) float32``, the
  Gram teacher's crops (``MultiCropConfig.gram_size``); no extra random draw,
  so every other output is the same as without them.
  """

  def __init__(self, cfg: MultiCropConfig):
    self.cfg = cfg

  def _crop_params(self, rng, height, width, kind, index) -> CropParams:
    c = self.cfg
    is_global = kind == "global"
    size = c.global_size if is_global else c.local_size
    scale = c.global_scale if is_global else c.local_scale
    box = augment.rrc_params(height, width, rng, scale)
    flip = bool(rng.random() < c.flip_p)
    jitter = None
    if rng.random() < c.jitter_p:
      jitter = augment.color_jitter_params(rng, c.brightness, c.contrast, c.saturation, c.hue)
    gray = bool(rng.random() < c.grayscale_p)
    blur_p = c.blur_p[index] if is_global else c.blur_p[2]
    # DINO v1's GaussianBlur applies when U(0,1) <= p (so p = 1 always blurs).
    radius = augment.blur_radius(rng, c.blur_sigma) if rng.random() <= blur_p else None
    sol = bool(is_global and index == 1 and rng.random() < c.solarize_p)
    return CropParams(kind, index, size, box, flip, jitter, gray, radius, sol)

  def sample_params(self, rng: np.random.Generator, height: int, width: int) -> list[CropParams]:
    """Draws every crop's decisions: globals first, then locals."""
    out = [self._crop_params(rng, height, width, "global", i) for i in range(self.cfg.num_global)]
    out += [self._crop_params(rng, height, width, "local", i) for i in range(self.cfg.num_local)]
    return out

  def apply_crop(self, img, p: CropParams) -> np.ndarray:
    """Applies one crop's decisions to ``img`` (array or PIL); uint8 out."""
    x = augment.apply_resized_crop(img, p.box, p.size, self.cfg.resize)
    if p.flip:
      x = augment.hflip(x)
    if p.jitter is not None:
      x = augment.apply_color_jitter(x, p.jitter)
    if p.grayscale:
      x = augment.to_grayscale(x)
    if p.blur_radius is not None:
      x = augment.apply_gaussian_blur(x, p.blur_radius)
    if p.solarize:
      x = augment.solarize(x, self.cfg.solarize_threshold)
    return x

  def random_map(self, element, rng: np.random.Generator):
    image = np.asarray(element["image"])
    height, width = image.shape[:2]
    params = self.sample_params(rng, height, width)
    c = self.cfg
    # The PIL resize takes a PIL image (converted once for all crops).
    src = Image.fromarray(augment.to_uint8(image)) if c.resize == "pil" else augment.to_uint8(image)
    glob = np.empty((c.num_global, c.global_size, c.global_size, 3), np.uint8)
    loc = np.empty((c.num_local, c.local_size, c.local_size, 3), np.uint8)
    crops_only = c.augment_mode == "device"
    for p in params:
      (glob if p.kind == "global" else loc)[p.index] = (
        augment.apply_resized_crop(src, p.box, p.size, c.resize) if crops_only else self.apply_crop(src, p)
      )
    if not crops_only:
      glob, loc = augment.normalize(glob), augment.normalize(loc)
    # "skipped": undecodable images the source passed over for this example.
    out = {
      "global": glob,
      "local": loc,
      "label": np.asarray(element["label"], np.int32),
      "skipped": np.int32(element.get("skipped", 0)),
    }
    if c.gram_size:
      # DINOv3 crops once (RandomResizedCrop + flip) and resizes that crop to each size; here the same box is
      # resized from the source to each size directly (one resampling instead of two, the same content).
      gram = np.empty((c.num_global, c.gram_size, c.gram_size, 3), np.uint8)
      for p in params[: c.num_global]:
        x = augment.apply_resized_crop(src, p.box, c.gram_size, c.resize)
        gram[p.index] = augment.hflip(x) if p.flip else x
      out["gram_global"] = augment.normalize(gram)
    return out
