"""simdino_jax.data.randaugment against timm's RandAugment (timm/data/auto_augment.py).

Without torch: the op lists and every op's magnitude -> argument mapping against a transcription of timm's
``_RAND_TRANSFORMS`` / ``_RAND_INCREASING_TRANSFORMS`` / ``LEVEL_TO_ARG``, the spec parsing and the sampling
statistics. With SIMDINO_TORCH_PYTHON (a Python with timm): timm's own RandAugment replays our recorded draws
(tests/timm_augment_driver.py) and the images must be bitwise equal, for every op at fixed magnitudes and for whole
``rand-m9-mstd0.5-inc1`` policies.
"""

import math
import os

import numpy as np
import pytest
from timm_augment_driver import run as run_timm

from simdino_jax.data import randaugment as ra
from simdino_jax.errors import ConfigError

# ---- timm 1.0 auto_augment.py, transcribed (op lists and LEVEL_TO_ARG, _LEVEL_DENOM = 10) -------------------------
TIMM_RAND = [
  "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
  "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
]  # fmt: skip
TIMM_RAND_INC = [
  "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
  "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
  "TranslateXRel", "TranslateYRel",
]  # fmt: skip


def timm_level_to_arg(name, level, negate):
  neg = (lambda v: -v) if negate else (lambda v: v)  # _randomly_negate
  if name in ("AutoContrast", "Equalize", "Invert"):
    return None
  if name == "Rotate":
    return neg((level / 10.0) * 30.0)
  if name in ("ShearX", "ShearY"):
    return neg((level / 10.0) * 0.3)
  if name in ("TranslateXRel", "TranslateYRel"):
    return neg((level / 10.0) * 0.45)
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return (level / 10.0) * 1.8 + 0.1
  if name.endswith("Increasing") and not name.startswith(("Posterize", "Solarize")):
    return max(0.1, 1.0 + neg((level / 10.0) * 0.9))
  if name == "Posterize":
    return int((level / 10.0) * 4)
  if name == "PosterizeIncreasing":
    return 4 - int((level / 10.0) * 4)
  if name == "Solarize":
    return min(256, int((level / 10.0) * 256))
  if name == "SolarizeIncreasing":
    return 256 - min(256, int((level / 10.0) * 256))
  if name == "SolarizeAdd":
    return min(128, int((level / 10.0) * 110))
  raise AssertionError(name)


ALL_OPS = sorted(set(TIMM_RAND + TIMM_RAND_INC))


def test_op_lists_and_every_magnitude_mapping_match_timm_transcription():
  assert list(ra.RAND_TRANSFORMS) == TIMM_RAND and list(ra.RAND_INCREASING_TRANSFORMS) == TIMM_RAND_INC
  assert ra.RandAugmentConfig().ops == tuple(TIMM_RAND_INC)
  for name in ALL_OPS:
    for level in np.linspace(0.0, 10.0, 41):
      for negate in (False, True):
        want, got = timm_level_to_arg(name, float(level), negate), ra.op_argument(name, float(level), negate)
        assert got == want and type(got) is type(want), (name, level, negate, got, want)
  with pytest.raises(ValueError, match="Cutout"):
    ra.op_argument("Cutout", 5.0)


def test_recipe_spec_parses_as_timm_with_create_transform_fill():
  cfg = ra.parse_rand_augment("rand-m9-mstd0.5-inc1")
  assert cfg == ra.RandAugmentConfig()  # the recipe is the default
  assert (cfg.magnitude, cfg.num_layers, cfg.prob, cfg.magnitude_std, cfg.increasing) == (9, 2, 0.5, 0.5, True)
  assert cfg.fill == (128, 128, 128) and cfg.magnitude_max == 10
  other = ra.parse_rand_augment("rand-n3-m7-p0.8-mstd101-mmax12", mean=(0.485, 0.456, 0.406), interpolation="random")
  assert (other.num_layers, other.magnitude, other.prob, other.magnitude_max) == (3, 7, 0.8, 12)
  assert other.magnitude_std == math.inf and not other.increasing and other.ops == tuple(TIMM_RAND)
  assert other.fill == (124, 116, 104) and other.interpolation == "random"
  for bad in ("rand-m9-tweights", "augmix-m5", "rand-q3", "rand-mfoo"):
    with pytest.raises(ConfigError, match=r"^config\.finetune\.auto_augment: "):
      ra.parse_rand_augment(bad, field="finetune.auto_augment")


def test_sampling_follows_timm_rules():
  rng = np.random.default_rng(0)
  ops = [op for _ in range(4000) for op in ra.sample_ops(rng)]
  names = np.array([ra.RAND_INCREASING_TRANSFORMS.index(op.name) for op in ops])
  counts = np.bincount(names, minlength=15)
  n = len(ops)
  assert np.all(np.abs(counts - n / 15) < 5 * math.sqrt(n / 15))  # uniform op choice
  applied = np.mean([op.applied for op in ops])
  assert abs(applied - 0.5) < 5 * math.sqrt(0.25 / n)
  m = np.array([op.magnitude for op in ops])
  assert m.max() == 10.0 and m.min() > 6  # N(9, 0.5) clipped to [0, 10]
  z = (np.minimum(m, 10.0) - 9.0) / 0.5
  assert abs(np.mean(m == 10.0) - 0.5 * math.erfc(2 / math.sqrt(2))) < 0.01  # P(N(9, .5) > 10) = 2.3%
  assert abs(np.median(z)) < 0.05
  assert abs(np.mean([op.negate for op in ops]) - 0.5) < 5 * math.sqrt(0.25 / n)
  assert {op.interpolation for op in ops} == {"bicubic"}
  rand = ra.sample_ops(np.random.default_rng(1), ra.RandAugmentConfig(interpolation="random", num_layers=200))
  assert {op.interpolation for op in rand} == {"bilinear", "bicubic"}


def test_skipped_ops_leave_the_image_and_same_generator_same_result():
  img = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
  skipped = [ra.RandAugmentOp(name, False, 9.0, True) for name in TIMM_RAND_INC]
  np.testing.assert_array_equal(ra.apply_ops(img, skipped), img)
  a = ra.rand_augment(img, np.random.default_rng(5))
  np.testing.assert_array_equal(a, ra.rand_augment(img, np.random.default_rng(5)))
  assert a.dtype == np.uint8 and a.shape == img.shape
  # Posterize to 0 bits (PosterizeIncreasing at the clipped magnitude 10): older Pillow's mask ~255, a black image.
  black = ra.apply_ops(img, [ra.RandAugmentOp("PosterizeIncreasing", True, 10.0, False)])
  np.testing.assert_array_equal(black, np.zeros_like(img))
  inverted = ra.apply_ops(img, [ra.RandAugmentOp("Invert", True, 0.0, False)])
  np.testing.assert_array_equal(inverted, 255 - img)


# ---- timm itself (skipped without SIMDINO_TORCH_PYTHON) -----------------------------------------------------------
def _images(n, h=20, w=24):
  rng = np.random.default_rng(3)
  yy, xx = np.mgrid[:h, :w]
  smooth = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], -1)
  noise = rng.integers(-40, 41, (n, h, w, 3))
  return np.clip(smooth[None] + noise, 0, 255).astype(np.uint8)


def test_every_op_and_whole_policies_equal_timm():
  python = os.environ.get("SIMDINO_TORCH_PYTHON")
  if not python:
    pytest.skip("needs SIMDINO_TORCH_PYTHON (a Python with timm) to run timm's RandAugment")
  jobs, expected = [], []
  imgs = _images(64)
  arrays = {f"img{i}": im for i, im in enumerate(imgs)}

  def zero_bits(op):  # posterize to 0 bits: Pillow 13 raises inside timm (black: tested above)
    return op.applied and op.name.startswith("Posterize") and ra.op_argument(op.name, op.magnitude) == 0

  def add(spec, ops, image, mean=(0.5, 0.5, 0.5), interpolation="bicubic"):
    if any(map(zero_bits, ops)):
      return
    cfg = ra.parse_rand_augment(spec, mean=mean, interpolation=interpolation)
    records = [[o.name, o.applied, o.magnitude, o.negate, o.interpolation] for o in ops]
    jobs.append(
      dict(
        kind="randaugment",
        spec=spec,
        mean=list(mean),
        interpolation=interpolation,
        img_size=224,
        image=f"img{image}",
        ops=records,
      )
    )
    expected.append((cfg, ra.apply_ops(imgs[image], ops, cfg)))

  # Every op (increasing and plain sets) at fixed magnitudes and both signs, one layer, always applied.
  for name in ALL_OPS:
    spec = "rand-m9-n1-mstd0.5" + ("-inc1" if name in TIMM_RAND_INC and name not in TIMM_RAND else "")
    for j, m in enumerate((0.0, 2.5, 5.0, 7.3, 9.0, 10.0)):
      for negate in (False, True) if name in ra.SIGNED_OPS else (False,):
        add(spec, [ra.RandAugmentOp(name, True, m, negate, "bicubic")], image=(j + 7 * negate) % len(imgs))
  n_single = len(jobs)
  # Whole recipe policies drawn by our sampler, with both fills and with random interpolation.
  rng = np.random.default_rng(11)
  for i in range(48):
    mean = (0.5, 0.5, 0.5) if i % 2 else (0.485, 0.456, 0.406)
    interp = ("bicubic", "random", "bilinear")[i % 3]
    cfg = ra.parse_rand_augment("rand-m9-mstd0.5-inc1", mean=mean, interpolation=interp)
    ops = ra.sample_ops(rng, cfg)
    while any(map(zero_bits, ops)):
      ops = ra.sample_ops(rng, cfg)
    add("rand-m9-mstd0.5-inc1", ops, image=i % len(imgs), mean=mean, interpolation=interp)
  out, infos = run_timm(python, jobs, arrays)
  changed = 0
  for i, (cfg, ours) in enumerate(expected):
    theirs = out[f"{i}/image"]
    assert theirs.dtype == np.uint8 and theirs.shape == ours.shape
    np.testing.assert_array_equal(ours, theirs, err_msg=str(jobs[i]))
    changed += not np.array_equal(ours, imgs[int(jobs[i]["image"][3:])])
    info = infos[i]
    assert tuple(info["names"]) == cfg.ops and info["num_layers"] == cfg.num_layers and info["prob"] == cfg.prob
    assert (info["magnitude"], info["magnitude_std"]) == (cfg.magnitude, cfg.magnitude_std)
    assert tuple(info["fill"]) == cfg.fill
  assert n_single > 150 and len(expected) - n_single == 48
  assert changed > 0.8 * len(expected)  # the comparison is not between untouched images
