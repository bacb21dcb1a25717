"""timm's RandAugment (``rand-m9-mstd0.5-inc1``, the BEiT / iBOT / DeiT fine-tuning recipe) on host uint8 images.

The fine-tuning recipe (iBOT ``evaluation/classification_layer_decay/run_class_finetuning.py`` ``--aa``, BEiT's and
DeiT's ``--aa``) builds its RandAugment with timm's ``create_transform`` -> ``rand_augment_transform``
(timm/data/auto_augment.py, timm/data/transforms_factory.py). Per image it does:

  choose ``num_layers`` ops uniformly WITH replacement (``np.random.choice(ops, n)``);
  for each: skip it unless ``U[0, 1) <= prob`` (timm: ``random.random() > prob`` skips);
            magnitude ``m ~ N(magnitude, magnitude_std)`` (``U[0, magnitude]`` when ``mstd > 100``), clipped to
            ``[0, magnitude_max]`` (10 unless ``mmax``);
            the op's argument from ``m`` (``op_argument``; shear, translation, rotation and the "increasing"
            enhance factors are negated with probability 1/2);
            the PIL op, geometric ops with fill colour ``round(255 * mean)`` and the training interpolation.

Here the decisions are drawn first from an explicit ``np.random.Generator`` (``sample_ops``) into a tuple of
``RandAugmentOp`` records, and applied by a deterministic function (``apply_ops``), so tests can replay exactly the
same choices in timm (tests/test_randaugment.py; timm's own functions run with its ``random`` replaced by the
recorded draws) and a grain map can draw them from its per-example generator. The ops are the same PIL calls as
timm's, so for the same records the images are bitwise equal (measured on every op at magnitudes 0..10 and on whole
policies; PIL 13.0.0 on both sides), except where timm fails: posterize to 0 bits, which Pillow 13.0 refuses and older
Pillow computed as a black image (what this module returns). Older timm (0.4.x, BEiT's era) draws and maps the same
way for this recipe; its increasing-enhance mapping lacks the ``max(0.1, .)``, which changes nothing at magnitudes
<= 10.

Parameters that come from the rest of the recipe, not from the spec string (``create_transform``'s ``aa_params``):
``fill = round(255 * mean)`` ((128, 128, 128) for the Inception mean 0.5 the iBOT/BEiT recipe defaults to,
(124, 116, 104) for the ImageNet mean), and the interpolation ``--train_interpolation`` (bicubic) unless it is
``"random"`` (then bilinear or bicubic per op, drawn and recorded). ``translate_const`` only feeds the absolute
translations, which no RandAugment op list contains.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from simdino_jax.errors import require

# timm auto_augment.py _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS, in timm's order (the op index is a position
# in these tuples; timm's "Cutout" is left out there too: it is random erasing, random_erasing.py).
RAND_TRANSFORMS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "Posterize",
  "Solarize",
  "SolarizeAdd",
  "Color",
  "Contrast",
  "Brightness",
  "Sharpness",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "PosterizeIncreasing",
  "SolarizeIncreasing",
  "SolarizeAdd",
  "ColorIncreasing",
  "ContrastIncreasing",
  "BrightnessIncreasing",
  "SharpnessIncreasing",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)

LEVEL_DENOM = 10.0  # timm _LEVEL_DENOM: magnitude M maps to the fraction M / 10 of each op's range
# Ops whose argument is negated with probability 1/2 (timm's _randomly_negate inside their level function).
SIGNED_OPS = frozenset(
  {
    "Rotate",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
  }
)
_RESAMPLE = {
  "nearest": Image.Resampling.NEAREST,
  "bilinear": Image.Resampling.BILINEAR,
  "bicubic": Image.Resampling.BICUBIC,
}
_RANDOM_RESAMPLE = ("bilinear", "bicubic")  # timm _RANDOM_INTERPOLATION


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
  """One RandAugment policy. Defaults: ``rand-m9-mstd0.5-inc1`` with the iBOT/BEiT recipe's bicubic interpolation
  and Inception-mean fill (timm's own defaults without a spec string are m10, mstd 0, inc 0)."""

  magnitude: float = 9.0
  num_layers: int = 2
  prob: float = 0.5  # each chosen op is applied with this probability (timm "p", default 0.5)
  magnitude_std: float = 0.5  # 0: fixed magnitude; inf: U[0, magnitude]
  magnitude_max: float = LEVEL_DENOM
  increasing: bool = True
  translate_pct: float = 0.45  # timm hparams "translate_pct" default
  fill: tuple[int, int, int] = (128, 128, 128)
  interpolation: str = "bicubic"  # "nearest" | "bilinear" | "bicubic" | "random"

  @property
  def ops(self) -> tuple[str, ...]:
    return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


@dataclasses.dataclass(frozen=True)
class RandAugmentOp:
  """One layer's decisions: the op, whether it runs, its (clipped) magnitude, the sign draw and the resampling
  filter of geometric ops. ``negate`` is recorded for every op; only ``SIGNED_OPS`` use it."""

  name: str
  applied: bool
  magnitude: float
  negate: bool
  interpolation: str = "bicubic"


def parse_rand_augment(
  spec: str,
  mean=(0.5, 0.5, 0.5),
  interpolation: str = "bicubic",
  field: str = "auto_augment",
) -> RandAugmentConfig:
  """``RandAugmentConfig`` of a timm spec string (``rand-m9-mstd0.5-inc1``), as ``rand_augment_transform`` parses it
  (sections m, n, p, mstd, mmax, inc, in any order; ``mstd > 100`` means uniform magnitudes), with
  ``create_transform``'s fill ``round(255 * mean)`` and interpolation. timm silently skips sections it does not
  understand and accepts weighted op sets ("t..."); those are refused here (ConfigError naming ``config.<field>``)."""
  require(
    isinstance(spec, str) and spec.split("-")[0] == "rand",
    field,
    f"expected 'rand-...' (e.g. 'rand-m9-mstd0.5-inc1'), got {spec!r}",
  )
  require(
    interpolation in (*_RESAMPLE, "random"),
    field,
    f"interpolation must be one of {(*_RESAMPLE, 'random')}, got {interpolation!r}",
  )
  # timm's defaults for what the string leaves out (not this dataclass's, which are the recipe's).
  kw = dict(
    magnitude=LEVEL_DENOM, num_layers=2, prob=0.5, magnitude_std=0.0, magnitude_max=LEVEL_DENOM, increasing=False
  )
  for section in spec.split("-")[1:]:
    parts = re.split(r"(\d.*)", section)
    require(
      len(parts) >= 2 and parts[0] in ("m", "n", "p", "mstd", "mmax", "inc"),
      field,
      f"unknown RandAugment section {section!r} in {spec!r} (supported: m, n, p, mstd, mmax, inc)",
    )
    key, val = parts[:2]
    try:
      if key == "mstd":
        kw["magnitude_std"] = math.inf if float(val) > 100 else float(val)
      elif key == "mmax":
        kw["magnitude_max"] = float(int(val))
      elif key == "inc":
        kw["increasing"] = bool(int(val))
      elif key == "m":
        kw["magnitude"] = float(int(val))
      elif key == "n":
        kw["num_layers"] = int(val)
      else:
        kw["prob"] = float(val)
    except ValueError:
      require(False, field, f"bad number in RandAugment section {section!r} of {spec!r}")
  fill = tuple(min(255, round(255 * float(x))) for x in mean)
  require(len(fill) == 3, field, f"mean must have 3 channels, got {mean!r}")
  return RandAugmentConfig(**kw, fill=fill, interpolation=interpolation)


def sample_ops(rng: np.random.Generator, cfg: RandAugmentConfig = RandAugmentConfig()) -> tuple[RandAugmentOp, ...]:
  """Draws one image's ``cfg.num_layers`` op records (uniform choice with replacement, as timm's
  ``RandAugment.__call__`` without weights)."""
  names = cfg.ops
  out = []
  for idx in rng.integers(0, len(names), size=cfg.num_layers):
    applied = cfg.prob >= 1.0 or not rng.random() > cfg.prob
    if cfg.magnitude_std == math.inf:
      m = rng.uniform(0.0, cfg.magnitude)
    elif cfg.magnitude_std > 0:
      m = rng.normal(cfg.magnitude, cfg.magnitude_std)
    else:
      m = cfg.magnitude
    m = max(0.0, min(float(m), cfg.magnitude_max))
    negate = bool(rng.random() > 0.5)
    interp = str(_RANDOM_RESAMPLE[rng.integers(2)]) if cfg.interpolation == "random" else cfg.interpolation
    out.append(RandAugmentOp(names[int(idx)], bool(applied), m, negate, interp))
  return tuple(out)


def op_argument(name: str, magnitude: float, negate: bool = False, translate_pct: float = 0.45):
  """The argument timm's ``LEVEL_TO_ARG[name]`` gives the op at ``magnitude`` (None for argument-free ops):
  rotation degrees, shear factor, translation fraction of the size, enhance factor, posterize bits, solarize
  threshold or solarize-add increment."""
  f = magnitude / LEVEL_DENOM
  sign = -1.0 if negate else 1.0
  if name in ("AutoContrast", "Equalize", "Invert"):
    return None
  if name == "Rotate":
    return sign * f * 30.0
  if name in ("ShearX", "ShearY"):
    return sign * f * 0.3
  if name in ("TranslateXRel", "TranslateYRel"):
    return sign * f * translate_pct
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return f * 1.8 + 0.1
  if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
    return max(0.1, 1.0 + sign * f * 0.9)
  if name == "Posterize":
    return int(f * 4)
  if name == "PosterizeIncreasing":
    return 4 - int(f * 4)
  if name == "Solarize":
    return min(256, int(f * 256))
  if name == "SolarizeIncreasing":
    return 256 - min(256, int(f * 256))
  if name == "SolarizeAdd":
    return min(128, int(f * 110))
  raise ValueError(f"unknown RandAugment op {name!r}; known: {RAND_TRANSFORMS + RAND_INCREASING_TRANSFORMS}")


_ENHANCE = {
  "Color": ImageEnhance.Color,
  "Contrast": ImageEnhance.Contrast,
  "Brightness": ImageEnhance.Brightness,
  "Sharpness": ImageEnhance.Sharpness,
}


def apply_op(img: Image.Image, name: str, arg, fill=(128, 128, 128), interpolation: str = "bicubic") -> Image.Image:
  """One op on an RGB PIL image with its argument (``op_argument``), as timm's op functions do it."""
  resample = _RESAMPLE[interpolation]
  kind = name.removesuffix("Increasing")
  if kind == "AutoContrast":
    return ImageOps.autocontrast(img)
  if kind == "Equalize":
    return ImageOps.equalize(img)
  if kind == "Invert":
    return ImageOps.invert(img)
  if kind == "Rotate":
    return img.rotate(arg, resample=resample, fillcolor=fill)
  if kind in ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
    # PIL's AFFINE data maps output (x, y) to input (a x + b y + c, d x + e y + f).
    a = {
      "ShearX": (1, arg, 0, 0, 1, 0),
      "ShearY": (1, 0, 0, arg, 1, 0),
      "TranslateXRel": (1, 0, arg * img.size[0], 0, 1, 0),
      "TranslateYRel": (1, 0, 0, 0, 1, arg * img.size[1]),
    }[kind]
    return img.transform(img.size, Image.AFFINE, a, resample=resample, fillcolor=fill)
  if kind == "Posterize":
    if arg <= 0:
      # Keep 0 bits: black. Pillow without the 1..8 range check computed that (mask ~255); 13.0 refuses bits=0, so
      # timm raises there (PosterizeIncreasing at magnitude 10, Posterize below 2.5).
      return Image.new(img.mode, img.size)
    return img if arg >= 8 else ImageOps.posterize(img, arg)
  if kind == "Solarize":
    return ImageOps.solarize(img, arg)
  if kind == "SolarizeAdd":
    lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))
  if kind in _ENHANCE:
    return _ENHANCE[kind](img).enhance(arg)
  raise ValueError(f"unknown RandAugment op {name!r}")


def apply_ops(img, ops, cfg: RandAugmentConfig = RandAugmentConfig()) -> np.ndarray:
  """Applies recorded ops (``sample_ops``) in order to an (H, W, 3) uint8 image (or RGB PIL image); returns uint8
  (H, W, 3). Skipped ops (``applied=False``) leave the image unchanged."""
  pil = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, np.uint8))
  for op in ops:
    if op.applied:
      arg = op_argument(op.name, op.magnitude, op.negate, cfg.translate_pct)
      pil = apply_op(pil, op.name, arg, cfg.fill, op.interpolation)
  return np.asarray(pil)


def rand_augment(img, rng: np.random.Generator, cfg: RandAugmentConfig = RandAugmentConfig()) -> np.ndarray:
  """One RandAugment draw on an (H, W, 3) uint8 image: ``apply_ops(img, sample_ops(rng, cfg), cfg)``."""
  return apply_ops(img, sample_ops(rng, cfg), cfg)
