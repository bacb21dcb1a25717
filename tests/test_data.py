"""Tests for simdino_jax.data (sources, augmentations, multi-crop, pipelines)."""

import colorsys
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from simdino_jax.data import augment
from simdino_jax.data.multicrop import MultiCrop, MultiCropConfig
from simdino_jax.data.pipeline import eval_batches, eval_num_batches, eval_transform, train_dataset, train_iterator
from simdino_jax.data.sources import ArraySource, digits_split_indices, load_source

SMALL = MultiCropConfig(global_size=16, local_size=8, num_local=3)


def _tiny_source(n=20, size=16, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return ArraySource(images, np.arange(n, dtype=np.int32), name="tiny")


def _binomial_ok(count, n, p, z=5.0):
  sd = np.sqrt(n * p * (1 - p))
  return abs(count - n * p) <= z * sd + 1e-9


# ----------------------------------------------------------------------------
# Sources


def test_digits_split_sizes_disjoint_and_deterministic():
  tr, te = load_source("digits", "train"), load_source("digits", "test")
  assert len(tr) + len(te) == 1797
  assert len(tr) == 1438
  itr, ite = digits_split_indices("train"), digits_split_indices("test")
  assert not set(itr) & set(ite)
  assert sorted(np.concatenate([itr, ite])) == list(range(1797))
  np.testing.assert_array_equal(itr, digits_split_indices("train"))
  assert tr.images.dtype == np.uint8 and tr.images.shape[1:] == (32, 32, 3)
  assert tr.labels.dtype == np.int32 and set(tr.labels) == set(range(10))
  assert tr.num_classes == 10 and te.num_classes == 10
  assert tr.images.max() > 200  # scaled to 0..255, not 0..16
  ex = tr[3]
  assert ex["image"].shape == (32, 32, 3) and ex["label"].dtype == np.int32
  np.testing.assert_array_equal(ex["image"][..., 0], ex["image"][..., 2])
  np.testing.assert_array_equal(load_source("digits", "train").images, tr.images)
  with pytest.raises(ValueError, match="train"):
    load_source("digits", "validation")


def test_npz_round_trip_rgb_grey_float(tmp_path):
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
  grey = rng.integers(0, 256, (4, 6, 6), dtype=np.uint8)
  fl = rng.random((3, 5, 5, 1)).astype(np.float32)
  path = tmp_path / "d.npz"
  np.savez(
    path,
    train_images=rgb,
    train_labels=np.array([0, 3, 1, 2, 3]),
    test_images=grey,
    val_images=fl,
    val_labels=np.array([1, 1, 0]),
  )
  tr = load_source(f"npz:{path}", "train")
  np.testing.assert_array_equal(tr.images, rgb)
  np.testing.assert_array_equal(tr.labels, [0, 3, 1, 2, 3])
  assert tr.labels.dtype == np.int32 and tr.num_classes == 4
  te = load_source(f"npz:{path}", "test")
  assert te.images.shape == (4, 6, 6, 3)
  np.testing.assert_array_equal(te.images[..., 1], grey)
  np.testing.assert_array_equal(te.labels, -1)
  assert te.num_classes == 0
  va = load_source(f"npz:{path}", "val")
  np.testing.assert_array_equal(va.images[..., 2], np.rint(fl[..., 0] * 255).astype(np.uint8))
  assert va.images.dtype == np.uint8


def test_npz_errors_name_file_key_and_expectation(tmp_path):
  path = tmp_path / "d.npz"
  np.savez(
    path,
    train_images=np.zeros((2, 4, 4, 3), np.int64),
    other_images=np.zeros((2, 4, 4, 3), np.uint8),
    hot_images=np.full((2, 4, 4), 2.0),
  )
  with pytest.raises(ValueError) as e:
    load_source(f"npz:{path}", "test")
  msg = str(e.value)
  assert "test_images" in msg and "other_images" in msg and "train_images" in msg
  with pytest.raises(ValueError) as e:
    load_source(f"npz:{path}", "train")
  msg = str(e.value)
  assert str(path) in msg and "train_images" in msg and "int64" in msg
  assert "uint8" in msg
  with pytest.raises(ValueError, match="hot_images"):
    load_source(f"npz:{path}", "hot")  # float outside [0, 1]
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    load_source(f"npz:{tmp_path / 'nope.npz'}", "train")


def test_unknown_spec_lists_supported_forms():
  with pytest.raises(ValueError) as e:
    load_source("imagenet", "train")
  msg = str(e.value)
  for s in ("imagenet", '"digits"', "npz:PATH", "folder:", "tfds:"):
    assert s in msg


# ----------------------------------------------------------------------------
# Augmentations


def test_rrc_params_area_and_ratio_statistics():
  rng = np.random.default_rng(0)
  h, w, scale = 600, 800, (0.2, 0.6)
  boxes = np.array([augment.rrc_params(h, w, rng, scale) for _ in range(2000)])
  top, left, ch, cw = boxes.T
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + ch <= h) and np.all(left + cw <= w)
  frac = ch * cw / (h * w)
  assert frac.min() >= scale[0] * 0.98 and frac.max() <= scale[1] * 1.02
  assert abs(frac.mean() - 0.4) < 0.01
  r = cw / ch
  assert r.min() >= 0.74 and r.max() <= 1.35
  # log-uniform aspect: log-ratio mean ~ 0
  assert abs(np.log(r).mean()) < 0.02
  # Offsets cover the full range (uniform placement).
  assert top.min() == 0 or left.min() == 0


def test_rrc_fallback_is_centre_crop_with_clamped_ratio():
  rng = np.random.default_rng(0)
  # A 10x1000 strip cannot fit an area >= 0.9 at ratio <= 4/3: always fallback.
  for _ in range(5):
    assert augment.rrc_params(10, 1000, rng, (0.9, 1.0)) == (0, 493, 10, 13)
  out = augment.random_resized_crop(np.zeros((10, 1000, 3), np.uint8), rng, 12, (0.9, 1.0))
  assert out.shape == (12, 12, 3) and out.dtype == np.uint8


def test_resized_crop_matches_pil_crop_then_bicubic_resize():
  img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
  box = (3, 7, 20, 30)
  want = np.asarray(Image.fromarray(img).crop((7, 3, 37, 23)).resize((16, 16), Image.BICUBIC))
  np.testing.assert_array_equal(augment.apply_resized_crop(img, box, 16), want)


def test_color_jitter_factor_one_hue_zero_is_identity():
  img = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
  rng = np.random.default_rng(0)
  out = augment.color_jitter(img, rng, 0.0, 0.0, 0.0, 0.0)
  np.testing.assert_array_equal(out, img)
  assert out.dtype == np.uint8


def test_color_jitter_ops_and_parameter_ranges():
  rng = np.random.default_rng(0)
  ps = [augment.color_jitter_params(rng, 0.4, 0.4, 0.2, 0.1) for _ in range(500)]
  b = np.array([p.brightness for p in ps])
  s = np.array([p.saturation for p in ps])
  h = np.array([p.hue for p in ps])
  assert b.min() >= 0.6 and b.max() <= 1.4 and s.min() >= 0.8 and s.max() <= 1.2
  assert h.min() >= -0.1 and h.max() <= 0.1 and h.min() < -0.08
  assert len({p.order for p in ps}) == 24  # all permutations occur
  img = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  x = img.astype(np.float32)
  p = augment.JitterParams((0, 1, 2, 3), 1.3, 1.0, 1.0, 0.0)
  np.testing.assert_array_equal(augment.apply_color_jitter(img, p), np.clip(np.rint(x * 1.3), 0, 255))
  p = augment.JitterParams((1, 0, 2, 3), 1.0, 0.0, 1.0, 0.0)  # contrast 0 -> mean
  out = augment.apply_color_jitter(img, p)
  assert np.ptp(out) == 0
  p = augment.JitterParams((2, 0, 1, 3), 1.0, 1.0, 0.0, 0.0)  # saturation 0 -> grey
  out = augment.apply_color_jitter(img, p).astype(int)
  assert np.abs(out - augment.to_grayscale(img).astype(int)).max() <= 1


def test_hsv_conversion_and_hue_shift_match_colorsys():
  rgb = np.random.default_rng(2).random((50, 3)).astype(np.float32)
  rgb[0] = (0.5, 0.5, 0.5)  # achromatic
  hsv = augment.rgb_to_hsv(rgb)
  want = np.array([colorsys.rgb_to_hsv(*px) for px in rgb])
  np.testing.assert_allclose(hsv, want, atol=1e-5)
  np.testing.assert_allclose(augment.hsv_to_rgb(hsv), rgb, atol=1e-5)
  img = np.random.default_rng(3).integers(0, 256, (5, 5, 3), dtype=np.uint8)
  out = augment.apply_color_jitter(img, augment.JitterParams((3, 0, 1, 2), 1.0, 1.0, 1.0, 0.25))
  want = []
  for px in img.reshape(-1, 3) / 255.0:
    hh, ss, vv = colorsys.rgb_to_hsv(*px)
    want.append(colorsys.hsv_to_rgb((hh + 0.25) % 1.0, ss, vv))
  want = np.rint(np.array(want) * 255).reshape(img.shape)
  assert np.abs(out.astype(int) - want).max() <= 1


@pytest.mark.parametrize("hue", [-0.5, -0.25, -0.08, -1e-4, 0.08, 0.5, 0.999])
def test_hue_shift_either_sign_matches_colorsys(hue):
  # 24x24 pixels: large enough for OpenCV's vectorised HSV path (which does
  # not wrap negative hues by itself).
  img = np.random.default_rng(4).integers(0, 256, (24, 24, 3), dtype=np.uint8)
  img[0, :6] = [[255, 0, 0], [255, 0, 1], [0, 255, 0], [0, 0, 255], [255, 0, 255], [128, 128, 128]]
  want = np.array(
    [
      colorsys.hsv_to_rgb((h + hue) % 1.0, s, v)
      for h, s, v in (colorsys.rgb_to_hsv(*px) for px in img.reshape(-1, 3) / 255.0)
    ]
  )
  want = np.rint(want * 255).reshape(img.shape)
  out = augment.adjust_hue(img, hue)
  assert out.dtype == np.uint8
  assert np.abs(out.astype(int) - want).max() <= 1


def test_grayscale_equal_channels_and_pil_luma():
  img = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
  g = augment.to_grayscale(img)
  assert g.shape == img.shape and g.dtype == np.uint8
  np.testing.assert_array_equal(g[..., 0], g[..., 1])
  np.testing.assert_array_equal(g[..., 0], g[..., 2])
  np.testing.assert_array_equal(g[..., 0], np.asarray(Image.fromarray(img).convert("L")))
  # Over all 2^24 colours (subsampled 1:16): OpenCV's fixed-point luma differs
  # from PIL's "L" by at most 1, on a small fraction of colours.
  v = np.arange(0, 256, dtype=np.uint8)
  allc = np.stack(np.meshgrid(v, v, v[::16], indexing="ij"), -1).reshape(4096, -1, 3)
  diff = augment.luma(allc).astype(int) - np.asarray(Image.fromarray(allc).convert("L"))
  assert np.abs(diff).max() <= 1 and np.mean(diff != 0) < 0.005


def test_brightness_contrast_saturation_match_pil_image_enhance():
  from PIL import ImageEnhance

  img = np.random.default_rng(5).integers(0, 256, (20, 24, 3), dtype=np.uint8)
  pil = Image.fromarray(img)
  for f in (0.0, 0.6, 0.93, 1.0, 1.21, 1.4):
    # PIL truncates where we round: at most one level apart (two for contrast,
    # whose grey level may also round differently).
    for ours, theirs, tol in (
      (augment.adjust_brightness(img, f), ImageEnhance.Brightness(pil).enhance(f), 1),
      (augment.adjust_contrast(img, f), ImageEnhance.Contrast(pil).enhance(f), 2),
      (augment.adjust_saturation(img, f), ImageEnhance.Color(pil).enhance(f), 1),
    ):
      assert ours.dtype == np.uint8 and ours.shape == img.shape
      assert np.abs(ours.astype(int) - np.asarray(theirs)).max() <= tol, f


def test_solarize_inverts_at_and_above_threshold():
  x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  v = np.arange(256)
  for t in (128, 0, 77, 200, 256):
    out = augment.solarize(x, t)
    np.testing.assert_array_equal(out[..., 0].ravel(), np.where(v >= t, 255 - v, v))


def _pil_box_blur_reference(img, radius, passes=3):
  """PIL's GaussianBlur written from its description, in float64: ``passes``
  extended box filters of radius l + a (Gwosdek et al. 2011) along x, then
  along y, each pass on a replicate-padded line."""
  sigma2 = radius * radius / passes
  l = np.floor((np.sqrt(12 * sigma2 + 1) - 1) / 2)
  a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) ** 2))
  r = int(l)
  k = np.ones(2 * r + 3)
  k[0] = k[-1] = a
  k /= k.sum()  # = 1 / (2 (l + a) + 1) per inner tap

  def along(x, axis):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r + 1, r + 1)
    xp = np.pad(x, pad, mode="edge")
    n = x.shape[axis]
    return sum(w * np.take(xp, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))

  x = img.astype(np.float64)
  for axis in (1, 0):
    for _ in range(passes):
      x = along(x, axis)
  return x


def test_gaussian_blur_matches_pil_and_the_box_filter_reference():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
  out = augment.gaussian_blur(img, np.random.default_rng(0), sigma=(1.5, 2.0))
  assert out.shape == img.shape and out.dtype == np.uint8
  assert out.astype(float).var() < 0.5 * img.astype(float).var()
  for radius in (0.1, 0.5, 1.0, 1.37, 2.0, 3.5):
    ours = augment.apply_gaussian_blur(img, radius).astype(float)
    pil = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))
    ref = _pil_box_blur_reference(img, radius)
    # Same linear filter and borders: ours is the exact filter rounded once,
    # PIL rounds after each of its six 1-D passes.
    assert np.abs(ours - ref).max() <= 0.5 + 1e-3, radius
    assert np.abs(ours - pil).max() <= 3, radius
    # ... so ours is about as far from PIL as PIL is from the exact filter.
    assert np.abs(ours - pil).mean() < np.abs(pil - ref).mean() + 0.3, radius
  # The variance of the 3-pass kernel is radius^2 (the point of PIL's design).
  for radius in (0.5, 1.0, 2.0):
    k = augment.pil_box_kernel(radius).astype(np.float64)
    k3 = np.convolve(np.convolve(k, k), k)
    x = np.arange(k3.size) - k3.size // 2
    assert abs(k.sum() - 1) < 1e-6
    assert abs((k3 * x * x).sum() - radius**2) < 1e-3 * max(1, radius**2)


def test_normalize_imagenet_stats():
  x = np.array([[[0, 255, 128]]], np.uint8)
  out = augment.normalize(x)
  assert out.dtype == np.float32
  np.testing.assert_allclose(
    out[0, 0], [(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225], rtol=1e-5
  )
  # Stacks of crops, views and float input give the formula's values.
  rng = np.random.default_rng(0)
  stack = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
  want = (stack / 255.0 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)
  for x, w in ((stack, want), (stack[:, ::-1, 1:], want[:, ::-1, 1:]), (stack.astype(np.float64), want)):
    got = augment.normalize(x)
    assert got.dtype == np.float32 and got.shape == w.shape
    np.testing.assert_allclose(got, w, atol=2e-6)
  assert augment.normalize(np.zeros((0, 4, 4, 3), np.uint8)).shape == (0, 4, 4, 3)


# ----------------------------------------------------------------------------
# Multi-crop


@pytest.mark.parametrize("num_local", [3, 0])
def test_multicrop_shapes_dtypes_and_value_range(num_local):
  cfg = MultiCropConfig(global_size=16, local_size=8, num_local=num_local)
  src = load_source("digits", "train")
  out = MultiCrop(cfg).random_map(src[0], np.random.default_rng(0))
  assert out["global"].shape == (2, 16, 16, 3) and out["global"].dtype == np.float32
  assert out["local"].shape == (num_local, 8, 8, 3) and out["local"].dtype == np.float32
  assert out["label"].dtype == np.int32 and out["label"].shape == ()
  assert out["label"] == src[0]["label"]
  lo, hi = augment.normalized_bounds()
  for v in (out["global"], out["local"]):
    assert np.all(v >= lo - 1e-5) and np.all(v <= hi + 1e-5)
  assert np.isfinite(out["global"]).all()


def test_multicrop_random_map_is_a_function_of_the_rng():
  mc = MultiCrop(SMALL)
  ex = _tiny_source()[1]
  a = mc.random_map(ex, np.random.default_rng(5))
  b = mc.random_map(ex, np.random.default_rng(5))
  c = mc.random_map(ex, np.random.default_rng(6))
  np.testing.assert_array_equal(a["global"], b["global"])
  np.testing.assert_array_equal(a["local"], b["local"])
  assert not np.array_equal(a["global"], c["global"])
  assert not np.array_equal(a["global"][0], a["global"][1])  # independent crops


def test_multicrop_per_op_application_rates():
  cfg = MultiCropConfig(num_local=4)
  mc = MultiCrop(cfg)
  rng = np.random.default_rng(0)
  n = 1500
  draws = [mc.sample_params(rng, 64, 64) for _ in range(n)]
  g1 = [d[0] for d in draws]
  g2 = [d[1] for d in draws]
  loc = [p for d in draws for p in d[2:]]
  allc = [p for d in draws for p in d]
  assert all(p.kind == "local" and p.size == 96 for p in loc)
  assert all(p.size == 224 for p in g1 + g2)
  cnt = lambda ps, f: sum(bool(f(p)) for p in ps)
  assert _binomial_ok(cnt(allc, lambda p: p.flip), len(allc), 0.5)
  assert _binomial_ok(cnt(allc, lambda p: p.jitter is not None), len(allc), 0.8)
  assert _binomial_ok(cnt(allc, lambda p: p.grayscale), len(allc), 0.2)
  assert cnt(g1, lambda p: p.blur_radius is not None) == n  # p = 1.0
  assert _binomial_ok(cnt(g2, lambda p: p.blur_radius is not None), n, 0.1)
  assert _binomial_ok(cnt(loc, lambda p: p.blur_radius is not None), len(loc), 0.5)
  assert _binomial_ok(cnt(g2, lambda p: p.solarize), n, 0.2)
  assert cnt(g1 + loc, lambda p: p.solarize) == 0
  radii = [p.blur_radius for p in g1]
  assert min(radii) >= 0.1 and max(radii) <= 2.0
  # Crop scales: global area fraction in (0.4, 1), local in (0.05, 0.4).
  fr = lambda p: p.box[2] * p.box[3] / 64**2
  assert min(map(fr, g1)) >= 0.4 * 0.9 and max(map(fr, loc)) <= 0.4 * 1.1


def test_multicrop_config_validation():
  with pytest.raises(ValueError):
    MultiCropConfig(num_global=3)
  with pytest.raises(ValueError):
    MultiCropConfig(num_local=-1)
  with pytest.raises(ValueError, match="resize"):
    MultiCropConfig(resize="nearest")
  from simdino_jax import config as config_lib

  c = config_lib.base_config()
  assert c.data.augment.resize == MultiCropConfig().resize == "cv2"
  c.data.augment.resize = "nearest"
  with pytest.raises(
    config_lib.ConfigError, match=r"config\.data\.augment\.resize: must be one of 'pil', 'cv2', got 'nearest'"
  ):
    config_lib.validate(c, num_devices=1)


def _natural_image(size=96, seed=0):
  """Smooth colour field + sharp-edged rectangles + a little noise (uint8)."""
  rng = np.random.default_rng(seed)
  low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
  x = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), np.float64)
  for _ in range(6):
    t, l = rng.integers(0, size - 8, 2)
    h, w = rng.integers(4, size // 2, 2)
    x[t : t + h, l : l + w] = rng.integers(0, 256, 3)
  x += rng.normal(0, 4, x.shape)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def test_cv2_resize_close_to_pil_and_antialiased_when_shrinking():
  img = _natural_image(96)
  for box, size in (((10, 5, 60, 70), 96), ((0, 0, 96, 96), 64), ((20, 30, 50, 40), 32)):
    pil = augment.apply_resized_crop(img, box, size, "pil").astype(float)
    fast = augment.apply_resized_crop(img, box, size, "cv2").astype(float)
    assert fast.shape == pil.shape == (size, size, 3)
    assert np.abs(fast - pil).mean() < 2.5, box
  # Shrinking by 1.6 moves a cosine of 0.45 cycles/px above the new Nyquist
  # rate: an antialiased resize (PIL's, ours) attenuates it, a plain cubic one
  # aliases it into a strong low-frequency pattern. 0.2 cycles/px stays.
  import cv2

  def amplitude(freq, resize):
    row = np.rint(127.5 + 127.5 * np.cos(2 * np.pi * freq * np.arange(160)))
    img = np.repeat(np.repeat(row.astype(np.uint8)[None, :, None], 160, 0), 3, 2)
    if resize == "plain cubic":
      out = cv2.resize(img, (100, 100), interpolation=cv2.INTER_CUBIC)
    else:
      out = augment.apply_resized_crop(img, (0, 0, 160, 160), 100, resize)
    return out[..., 0].astype(float).std(axis=1).mean()

  assert amplitude(0.45, "cv2") < 0.5 * amplitude(0.45, "plain cubic")
  assert amplitude(0.45, "pil") < 0.5 * amplitude(0.45, "plain cubic")
  assert amplitude(0.2, "cv2") > 0.8 * amplitude(0.2, "pil")


_BENCHMARK = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "data_throughput.py"


def _benchmark_module():
  spec = importlib.util.spec_from_file_location("data_throughput", _BENCHMARK)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _official_reference():
  return _benchmark_module().OfficialPILRecipe


@pytest.mark.parametrize("resize, mean_tol, p99_tol", [("pil", 1.5, 8), ("cv2", 2.0, 10)])
def test_multicrop_matches_pil_reimplementation_of_official_recipe(resize, mean_tol, p99_tol):
  # The PIL re-implementation of DataAugmentationDINO draws the same random
  # decisions from the same generator, so the crops can be compared pixel by
  # pixel; what differs is only how each op is computed (rounding, hue
  # quantisation in PIL's HSV, and with "cv2" the resize kernel).
  cfg = MultiCropConfig(global_size=64, local_size=32, num_local=4, resize=resize)
  ours, ref = MultiCrop(cfg), _official_reference()(cfg)
  std = augment.IMAGENET_STD * 255
  diffs = {"global": [], "local": []}
  for i in range(10):
    img = _natural_image(96, seed=i)
    a = ours.random_map({"image": img, "label": 0}, np.random.default_rng(i))
    b = ref(img, np.random.default_rng(i))
    for k in diffs:
      assert b[k].shape == (a[k].shape[0], 3) + a[k].shape[1:3]
      d = np.abs(a[k] - b[k].transpose(0, 2, 3, 1)) * std  # in uint8 levels
      assert d.reshape(len(d), -1).mean(axis=1).max() < 4  # every crop
      diffs[k].append(d.ravel())
  for k, d in diffs.items():
    d = np.concatenate(d)
    assert d.mean() < mean_tol and np.percentile(d, 99) <= p99_tol, (k, d.mean(), np.percentile(d, 99))


# ----------------------------------------------------------------------------
# Training pipeline


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_train_iterator_shapes_and_seed_determinism():
  src = _tiny_source()
  mk = lambda seed: train_iterator(src, SMALL, batch_size=4, seed=seed)
  a, b, c = _take(mk(0), 3), _take(mk(0), 3), _take(mk(1), 3)
  assert a[0]["global"].shape == (4, 2, 16, 16, 3)
  assert a[0]["local"].shape == (4, 3, 8, 8, 3)
  assert a[0]["label"].shape == (4,) and a[0]["label"].dtype == np.int32
  assert a[0]["global"].dtype == np.float32
  _assert_batches_equal(a, b)
  assert "mask" not in a[0]  # mask_patch_size = 0 (default): no masks
  assert not np.array_equal(a[0]["global"], c[0]["global"])
  assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, c))


def test_train_iterator_same_output_with_worker_processes():
  src = _tiny_source(n=12, size=8)
  cfg = MultiCropConfig(global_size=8, local_size=4, num_local=1)
  # With DINOv2 masks (patch 2 -> a 4x4 grid), drawn per batch after batching.
  kw = dict(batch_size=3, seed=7, mask_patch_size=2)
  a = _take(train_iterator(src, cfg, **kw), 4)
  it = train_iterator(src, cfg, num_workers=2, **kw)
  try:
    b = [{k: np.array(v) for k, v in x.items()} for x in _take(it, 4)]
  finally:
    it.close()
  assert a[0]["mask"].shape == (3, 2, 16)
  _assert_batches_equal(a, b)
  # A process's rows of a larger global batch (the row map and its masks are picklable for the workers).
  part = dict(kw, shard_index=1, shard_count=2, rows=[5, 1, 2])
  a = _take(train_iterator(src, cfg, **part), 2)
  it = train_iterator(src, cfg, num_workers=1, **part)
  try:
    b = [{k: np.array(v) for k, v in x.items()} for x in _take(it, 2)]
  finally:
    it.close()
  _assert_batches_equal(a, b)


def test_each_epoch_is_a_permutation_in_a_new_order():
  n, bs = 20, 5
  ds = train_dataset(_tiny_source(n), SMALL, batch_size=bs, seed=3)
  per_epoch = n // bs
  labels = [ds[i]["label"] for i in range(3 * per_epoch)]
  epochs = [np.concatenate(labels[e * per_epoch : (e + 1) * per_epoch]) for e in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(n))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], np.arange(n))


def test_one_shard_stream_is_the_plain_grain_pipeline():
  # The single-process stream (docs/results.md was trained on it) built by hand from the grain pieces: shuffle,
  # repeat, first-epoch skips, crops keyed on the stream index, batch, masks keyed on the batch index. The row map
  # is the identity for one shard, so this pins the stream the other process counts reproduce.
  import grain

  from simdino_jax.data import pipeline
  from simdino_jax.data.masking import BatchMasks

  src, cfg, seed, bs = _tiny_source(12, size=8), MultiCropConfig(global_size=8, local_size=4, num_local=1), 5, 4
  ref = (
    grain.MapDataset.source(src)
    .shuffle(seed=pipeline._derive_seed(seed, 0))
    .repeat()
    .map_with_index(pipeline._FirstEpochSkips(len(src)))
    .random_map(MultiCrop(cfg), seed=pipeline._derive_seed(seed, 1))
    .batch(bs, drop_remainder=True)
    .random_map(BatchMasks(2), seed=pipeline._derive_seed(seed, 2, 0))
  )
  np.testing.assert_array_equal(pipeline.batch_rows(bs), np.arange(bs))
  got = _take(train_iterator(src, cfg, batch_size=bs, seed=seed, mask_patch_size=2, start_step=2), 4)
  _assert_batches_equal([ref[i] for i in range(2, 6)], got)


@pytest.mark.parametrize("mask_patch_size", [0, 2])
def test_shards_split_each_global_batch_in_one_process_order(mask_patch_size):
  # Process k of n gets positions [k b, (k + 1) b) of the one-process global batch: same examples, crops and masks,
  # so the processes' batches laid out in shard order are the one-process batch row for row (and a resumed run's).
  n, bs, cfg = 20, 3, MultiCropConfig(global_size=8, local_size=4, num_local=1)
  src = _tiny_source(n, size=8)
  kw = dict(seed=3, mask_patch_size=mask_patch_size)
  full = train_dataset(src, cfg, batch_size=2 * bs, **kw)
  for start in (0, 5):
    shards = [
      train_dataset(src, cfg, batch_size=bs, shard_index=k, shard_count=2, start_step=start, **kw) for k in (0, 1)
    ]
    for i in range(4):
      whole = full[start + i]
      for key in whole:
        np.testing.assert_array_equal(np.concatenate([shards[0][i][key], shards[1][i][key]]), whole[key])
  # Explicit rows (the trainer's: where this process's devices sit in the global array), in any order.
  rows = np.array([4, 0, 3])
  part = train_dataset(src, cfg, batch_size=bs, shard_index=1, shard_count=2, rows=rows, **kw)
  for i in range(3):
    for key in full[i]:
      np.testing.assert_array_equal(part[i][key], full[i][key][rows])
  with pytest.raises(ValueError, match="rows"):
    train_dataset(src, cfg, batch_size=bs, seed=0, shard_count=2, rows=[0, 0, 1])
  with pytest.raises(ValueError, match="rows"):
    train_dataset(src, cfg, batch_size=bs, seed=0, shard_count=2, rows=[0, 1, 6])


@pytest.mark.parametrize("mask_patch_size", [0, 4])
def test_start_step_skips_to_the_same_batch(mask_patch_size):
  src = _tiny_source()
  kw = dict(batch_size=4, seed=0, mask_patch_size=mask_patch_size)
  a = _take(train_iterator(src, SMALL, **kw), 6)
  b = _take(train_iterator(src, SMALL, start_step=4, **kw), 2)
  assert ("mask" in b[0]) == bool(mask_patch_size)
  _assert_batches_equal(a[4:], b)


# ----------------------------------------------------------------------------
# Eval pipeline


@pytest.mark.parametrize("shard_count", [1, 2])
def test_eval_batches_cover_every_example_once_with_padding(shard_count):
  n, bs = 23, 5
  src = _tiny_source(n, size=8)
  seen, counts = [], []
  for k in range(shard_count):
    batches = list(eval_batches(src, image_size=8, batch_size=bs, shard_index=k, shard_count=shard_count))
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (bs, 8, 8, 3) and b["image"].dtype == np.float32
      assert b["label"].shape == (bs,) and b["valid"].dtype == np.bool_
      np.testing.assert_array_equal(b["label"] >= 0, b["valid"])
      assert np.all(b["image"][~b["valid"]] == 0)
      seen.extend(b["label"][b["valid"]])
  assert sorted(seen) == list(range(n))
  assert counts == [eval_num_batches(n, bs, shard_count)] * shard_count
  # Images are unaugmented: same size -> exactly normalize(image).
  b0 = next(iter(eval_batches(src, image_size=8, batch_size=bs)))
  np.testing.assert_array_equal(b0["image"][0], augment.normalize(src[0]["image"]))


@pytest.mark.parametrize("n,bs,shard_count", [(23, 5, 1), (23, 5, 2), (23, 4, 3), (7, 4, 4), (24, 3, 4), (1, 2, 3)])
def test_eval_batches_gathered_in_shard_order_are_in_dataset_order(n, bs, shard_count):
  # What a tiled all-gather over the processes returns, batch by batch: shard 0's batch, shard 1's, ... Its valid
  # slots must be the examples 0..n-1 in order (the pod's features then equal one process's, issue 26 item 7).
  src = _tiny_source(n, size=4)
  shards = [
    list(eval_batches(src, image_size=4, batch_size=bs, shard_index=k, shard_count=shard_count))
    for k in range(shard_count)
  ]
  assert [len(s) for s in shards] == [eval_num_batches(n, bs, shard_count)] * shard_count  # collectives line up
  labels, index, valid = (
    np.concatenate([s[b][key] for b in range(len(shards[0])) for s in shards]) for key in ("label", "index", "valid")
  )
  np.testing.assert_array_equal(labels[valid], np.arange(n))  # the labels are the example indices
  np.testing.assert_array_equal(index[valid], np.arange(n))
  assert np.all(index[~valid] == -1) and np.all(labels[~valid] == -1)
  assert len(valid) - n < bs * shard_count  # padding only in the last global batch


def test_eval_transform_resize_and_centre_crop():
  img = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
  out = eval_transform(img, 32)  # shorter side 48 -> 37, crop 32
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  pil = Image.fromarray(img).resize((49, 37), Image.BICUBIC)
  want = augment.normalize(np.asarray(pil.crop((8, 2, 40, 34))))
  np.testing.assert_array_equal(out, want)
  small = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  assert eval_transform(small, 16).shape == (16, 16, 3)  # tiny -> upsample


# ----------------------------------------------------------------------------
# benchmarks/data_throughput.py


def test_data_throughput_benchmark_prints_one_json_line(capsys, tmp_path):
  bench = _benchmark_module()
  rng = np.random.default_rng(0)
  np.savez(
    tmp_path / "d.npz",
    train_images=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
    test_images=rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
  )
  common = [
    "--source",
    f"npz:{tmp_path / 'd.npz'}",
    "--recipe",
    "cifar32",
    "--workers",
    "0",
    "--num_images",
    "16",
    "--batch_size",
    "8",
    "--warmup_batches",
    "1",
    "--no-tcmalloc",
  ]
  bench.main(common + ["--reference", "--reference_images", "8"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1
  rec = json.loads(lines[0])
  # The allocator is reported as it is: .ci/run preloads tcmalloc for the whole suite, --no-tcmalloc only stops the
  # benchmark from re-executing itself with it.
  preloaded = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "default"
  assert (rec["recipe"], rec["mode"], rec["resize"], rec["allocator"]) == ("cifar32", "host", "cv2", preloaded)
  assert rec["runs"][0]["workers"] == 0 and rec["runs"][0]["images"] == 16
  assert rec["images_per_sec_per_process"] == rec["runs"][0]["images_per_sec_per_process"] > 0
  assert rec["reference"]["name"] == "PIL re-implementation of the official recipe"
  assert rec["ratio_vs_reference"] == rec["reference"]["ratio"] > 0
  # Device mode: the host only crops and resizes (uint8), as data.augment_mode="device" does; the
  # PIL reference then takes the same crops.
  cfg = bench.recipe_config("dino224", "device", "pil")
  assert (cfg.augment_mode, cfg.global_size, cfg.local_size, cfg.num_local, cfg.resize) == (
    "device",
    224,
    96,
    10,
    "pil",
  )
  img = _natural_image(96)
  cfg = bench.recipe_config("cifar32", "device", "pil")
  ours = MultiCrop(cfg).random_map({"image": img, "label": 0}, np.random.default_rng(3))
  ref = bench.OfficialPILRecipe(cfg)(img, np.random.default_rng(3))
  for k in ("global", "local"):
    assert ours[k].dtype == ref[k].dtype == np.uint8
    np.testing.assert_array_equal(ours[k], ref[k])
  bench.main(common + ["--mode", "device", "--reference", "--reference_images", "4"])
  rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert rec["mode"] == "device" and rec["ratio_vs_reference"] > 0
  with pytest.raises(SystemExit):
    bench.main(["--workers", "two"])
  assert "--workers" in capsys.readouterr().err
  out = subprocess.run([sys.executable, str(_BENCHMARK), "--help"], capture_output=True, text=True, timeout=60)
  assert out.returncode == 0 and "--reference" in out.stdout and "images/s" in out.stdout
