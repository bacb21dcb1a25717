"""simdino_jax.data.random_erasing against timm's RandomErasing (timm/data/random_erasing.py, the fine-tuning
recipe's ``--reprob 0.25 --remode pixel --recount 1``).

Without torch: ``apply_erasing`` against a NumPy transcription of timm's ``_erase`` given the same draws, and
``sample_erasing``'s statistics. With SIMDINO_TORCH_PYTHON (torch + timm): timm's own ``RandomErasing`` replays our
draws (tests/timm_augment_driver.py).
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from timm_augment_driver import run as run_timm

from simdino_jax.data import random_erasing as re_
from simdino_jax.errors import ConfigError

H, W, C = 12, 10, 3
CONFIGS = {
  "recipe": re_.ErasingConfig(),
  "rand3": re_.ErasingConfig(probability=0.9, mode="rand", max_count=3),
  "const2": re_.ErasingConfig(probability=0.9, mode="const", min_count=2, max_count=2, min_area=0.3, max_area=0.9),
}


# ---- timm 1.0 random_erasing.py RandomErasing._erase, transcribed (images (H, W, C) instead of (C, H, W)) ---------
def timm_erase(img, d, cfg):
  img = np.array(img, np.float32)
  if not d.erase:  # random.random() > probability
    return img
  img_h, img_w = img.shape[:2]
  lo, hi = cfg.count_range
  count = lo if lo == hi else int(d.count)  # random.randint(min_count, max_count)
  for k in range(count):
    for a in range(10):
      target_area = float(d.area[k, a]) * (img_h * img_w) / count  # random.uniform(min_area, max_area) * area / count
      aspect_ratio = math.exp(float(d.log_aspect[k, a]))
      h = int(round(math.sqrt(target_area * aspect_ratio)))
      w = int(round(math.sqrt(target_area / aspect_ratio)))
      if w < img_w and h < img_h:
        top = int(float(d.top_u[k]) * (img_h - h + 1))  # random.randint(0, img_h - h), from our uniform
        left = int(float(d.left_u[k]) * (img_w - w + 1))
        img[top : top + h, left : left + w] = d.noise[k, top : top + h, left : left + w]
        break
  return img


N = 512  # draws per config, shared by the tests (one compilation each)


@functools.cache
def _sample(name):
  cfg = CONFIGS[name]
  f = jax.jit(jax.vmap(lambda k: re_.sample_erasing(k, (H, W, C), cfg)))
  return jax.device_get(f(jax.random.split(jax.random.key(len(name)), N)))


_boxes = jax.jit(jax.vmap(re_.erasing_boxes, in_axes=(0, None, None)), static_argnums=(1, 2))


def _one(d, i):
  return re_.ErasingDraws(*(v[i] for v in d))


_apply = jax.jit(jax.vmap(re_.apply_erasing))


def _images(n):
  return np.random.default_rng(0).normal(size=(n, H, W, C)).astype(np.float32) + 5.0  # far from the N(0, 1) fill


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_apply_matches_numpy_transcription_of_timm_erase(name):
  d, x = _sample(name), _images(N)
  got = np.asarray(_apply(jnp.asarray(x), d))
  erased = 0
  for i in range(N):
    want = timm_erase(x[i], _one(d, i), CONFIGS[name])
    np.testing.assert_array_equal(got[i], want, err_msg=f"{name} {i}")
    erased += not np.array_equal(want, x[i])
  assert erased > 0 and (erased < N or name != "recipe")


def test_sampling_follows_timm_rules():
  n = N
  d = _sample("recipe")
  erase = d.erase
  assert abs(erase.mean() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
  assert (d.count == 1).all()
  assert d.area.min() >= 0.02 and d.area.max() <= 1 / 3 and abs(d.area.mean() - (0.02 + 1 / 3) / 2) < 0.01
  assert d.log_aspect.min() >= math.log(0.3) and d.log_aspect.max() <= math.log(1 / 0.3)
  assert abs(d.log_aspect.mean()) < 0.04  # uniform on [log .3, -log .3]: sd 0.70 / sqrt(5120) = 0.01
  valid, top, left, bh, bw = jax.device_get(_boxes(d, H, W))
  assert (valid == erase[:, None]).mean() > 0.99  # a 12 x 10 image fits a box within 10 attempts nearly always
  assert (top >= 0).all() and (top + bh <= H).all() and (left >= 0).all() and (left + bw <= W).all()
  assert ((bh[valid] < H) & (bw[valid] < W)).all()
  counts = _sample("rand3").count
  assert set(np.unique(counts)) == {1, 2, 3}


def test_random_erasing_batch_in_jit_fills_with_noise_and_config_errors():
  x = jnp.asarray(_images(8))
  f = jax.jit(lambda k, x: re_.random_erasing(k, x, re_.ErasingConfig(probability=1.0)))
  a = np.asarray(f(jax.random.key(1), x))
  np.testing.assert_array_equal(a, np.asarray(f(jax.random.key(1), x)))
  changed = a != np.asarray(x)
  assert changed.any(axis=(1, 2, 3)).all()  # probability 1: every image erased
  assert abs(a[changed].mean()) < 0.3 and abs(a[changed].std() - 1) < 0.3  # N(0, 1) per pixel, not the image's 5
  with pytest.raises(ConfigError, match=r"^config\.finetune\.reprob\.mode: "):
    re_.ErasingConfig(mode="pixels").validate("finetune.reprob")
  with pytest.raises(ConfigError, match=r"max_count"):
    re_.ErasingConfig(min_count=2, max_count=1).validate()
  re_.ErasingConfig().validate()


# ---- timm itself (skipped without SIMDINO_TORCH_PYTHON) -----------------------------------------------------------
def test_timm_random_erasing_replaying_our_draws_gives_our_images():
  python = os.environ.get("SIMDINO_TORCH_PYTHON")
  if not python:
    pytest.skip("needs SIMDINO_TORCH_PYTHON (a Python with torch and timm) to run timm's RandomErasing")
  jobs, arrays, expected = [], {}, []
  n = 24  # of each config's N draws
  x = _images(N)
  for name, cfg in CONFIGS.items():
    d = _sample(name)
    got = np.asarray(_apply(jnp.asarray(x), d))
    _, top, left, _, _ = jax.device_get(_boxes(d, H, W))
    lo, hi = cfg.count_range
    for i in range(n):
      arrays[f"x{i}"], arrays[f"{name}/noise{i}"] = x[i], d.noise[i]
      draws = dict(
        erase=bool(d.erase[i]),
        count=int(d.count[i]),
        area=d.area[i].tolist(),
        log_aspect=d.log_aspect[i].tolist(),
        top=top[i].tolist(),
        left=left[i].tolist(),
      )
      job = dict(kind="erasing", x=f"x{i}", noise=f"{name}/noise{i}", draws=draws, probability=cfg.probability)
      extra = dict(min_area=cfg.min_area, max_area=cfg.max_area, min_aspect=cfg.min_aspect)
      jobs.append(dict(job, mode=cfg.mode, min_count=lo, max_count=hi, **extra))
      expected.append(got[i])
  out, _ = run_timm(python, jobs, arrays)
  for i, want in enumerate(expected):
    np.testing.assert_array_equal(want, out[f"{i}/x"], err_msg=str(jobs[i]))
  assert sum(not np.array_equal(e, arrays[j["x"]]) for e, j in zip(expected, jobs)) > len(jobs) // 3
