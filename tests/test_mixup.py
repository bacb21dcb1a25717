"""simdino_jax.data.mixup against timm's Mixup (timm/data/mixup.py, mode "batch", the fine-tuning recipe).

Without torch: ``apply_mixup`` against a NumPy transcription of timm's ``_params_per_batch`` / ``_mix_batch`` /
``rand_bbox`` / ``cutmix_bbox_and_lam`` / ``mixup_target`` given the same draws, and ``sample_mixup``'s statistics.
With SIMDINO_TORCH_PYTHON (a Python with torch and timm): timm's own ``Mixup`` replays our draws
(tests/timm_augment_driver.py).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from timm_augment_driver import run as run_timm

from simdino_jax.data import mixup as mx
from simdino_jax.errors import ConfigError

K = 7  # classes


# ---- timm 1.0 mixup.py, transcribed in NumPy (images (B, H, W, C) instead of (B, C, H, W)) -------------------------
def timm_mix_batch(x, labels, draws, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, smoothing=0.1):
  x = np.array(x, np.float32)
  mix, use_cutmix, lam_draw, cy, cx = (np.asarray(v).item() for v in draws)
  lam, cutmix = 1.0, False  # _params_per_batch
  if mix:
    cutmix = bool(use_cutmix) if mixup_alpha > 0 and cutmix_alpha > 0 else cutmix_alpha > 0
    lam = float(lam_draw)
  if lam != 1.0:  # _mix_batch
    if cutmix:
      h, w = x.shape[1:3]
      ratio = np.sqrt(1 - lam)  # rand_bbox, margin 0
      cut_h, cut_w = int(h * ratio), int(w * ratio)
      yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + (cut_h + 1) // 2, 0, h)
      xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + (cut_w + 1) // 2, 0, w)
      lam = 1.0 - (yh - yl) * (xh - xl) / float(h * w)  # cutmix_bbox_and_lam, correct_lam
      x[:, yl:yh, xl:xh] = x[::-1].copy()[:, yl:yh, xl:xh]  # x.flip(0) is a copy in torch
    else:
      x = x * np.float32(lam) + x[::-1] * np.float32(1.0 - lam)
  off = smoothing / num_classes  # mixup_target
  on = 1.0 - smoothing + off
  y1 = np.full((len(labels), num_classes), off, np.float32)
  y1[np.arange(len(labels)), labels] = on
  return x, y1 * np.float32(lam) + y1[::-1] * np.float32(1.0 - lam), lam


def _batch(b=6, h=9, w=11, c=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(b, h, w, c)).astype(np.float32), rng.integers(0, K, b).astype(np.int32)


def _draws(mix, cut, lam, cy, cx):
  return mx.MixupDraws(jnp.bool_(mix), jnp.bool_(cut), jnp.float32(lam), jnp.int32(cy), jnp.int32(cx))


@functools.cache
def _sampled(n=4000, h=9, w=11):
  """``n`` draws of the recipe's sampler (one compilation shared by the tests), as NumPy."""
  return jax.device_get(_sample(jax.random.split(jax.random.key(0), n), h, w, mx.MixupConfig()))


def _cases(h=9, w=11, n=40):
  """Draws from our sampler plus the edges: no mix, lam 0 / 1, boxes at the corners and clipped."""
  d = _sampled()
  cases = [_draws(*(v[i] for v in d)) for i in range(n)]
  edges = [(False, True, 0.3, 2, 2), (True, True, 0.0, 4, 5), (True, True, 1.0, 4, 5), (True, False, 0.0, 0, 0)]
  edges += [
    (True, False, 1.0, 0, 0),
    (True, True, 0.37, 0, 0),
    (True, True, 0.2, h - 1, w - 1),
    (True, True, 0.9, 8, 0),
  ]
  return cases + [_draws(*e) for e in edges]


_apply = jax.jit(mx.apply_mixup, static_argnums=(3,))
_sample = jax.jit(jax.vmap(mx.sample_mixup, in_axes=(0, None, None, None)), static_argnums=(1, 2, 3))


def test_apply_matches_numpy_transcription_of_timm_for_mixup_cutmix_and_edges():
  x, labels = _batch()
  kinds = set()
  for d in _cases():
    got_x, got_t, got_lam = _apply(jnp.asarray(x), jnp.asarray(labels), d, K)
    want_x, want_t, want_lam = timm_mix_batch(x, labels, d, K)
    kinds.add((bool(d.mix), bool(d.mix & d.use_cutmix)))
    np.testing.assert_allclose(np.asarray(got_x), want_x, rtol=1e-6, atol=1e-6, err_msg=str(d))
    np.testing.assert_allclose(np.asarray(got_t), want_t, rtol=1e-6, atol=1e-7, err_msg=str(d))
    assert abs(float(got_lam) - want_lam) < 1e-6
    np.testing.assert_allclose(np.asarray(got_t).sum(1), 1.0, rtol=1e-6)
  assert kinds == {(True, True), (True, False), (False, False)}


def test_cutmix_box_pixels_come_from_the_flipped_batch_and_lam_is_the_kept_area():
  x, labels = _batch()
  out, targets, lam = _apply(jnp.asarray(x), jnp.asarray(labels), _draws(True, True, 0.75, 1, 6), K)
  # sides int(9 * .5) = 4 and int(11 * .5) = 5 around (1, 6): rows [0, 3), cols [4, 9) -> 15 of 99 pixels
  box = np.zeros((9, 11), bool)
  box[0:3, 4:9] = True
  np.testing.assert_array_equal(np.asarray(out)[:, box], x[::-1][:, box])
  np.testing.assert_array_equal(np.asarray(out)[:, ~box], x[:, ~box])
  assert float(lam) == pytest.approx(1 - 15 / 99)
  on, off = 1 - 0.1 + 0.1 / K, 0.1 / K
  other = on if labels[-1] == labels[0] else off
  assert np.asarray(targets)[0, labels[0]] == pytest.approx(float(lam) * on + (1 - float(lam)) * other)


def test_sampling_follows_timm_params_per_batch_distributions():
  d = _sampled()
  n = len(d.lam)
  cut, lam = d.use_cutmix, d.lam
  assert d.mix.all()  # prob 1.0
  assert abs(cut.mean() - 0.5) < 4 * np.sqrt(0.25 / n)  # switch_prob 0.5
  # Beta(1, 1) for CutMix, Beta(0.8, 0.8) for mixup; the wrong one is rejected (mixup's lam against Beta(1, 1))
  assert stats.kstest(lam[cut], stats.beta(1.0, 1.0).cdf).pvalue > 1e-3
  assert stats.kstest(lam[~cut], stats.beta(0.8, 0.8).cdf).pvalue > 1e-3
  assert stats.kstest(lam[~cut], stats.beta(1.0, 1.0).cdf).pvalue < 1e-3
  for v, size in ((d.cy, 9), (d.cx, 11)):  # randint(0, H), randint(0, W)
    assert stats.chisquare(np.bincount(v, minlength=size)).pvalue > 1e-3 and v.max() == size - 1
  only_cut = jax.device_get(_sample(jax.random.split(jax.random.key(2), 50), 9, 11, mx.MixupConfig(mixup_alpha=0.0)))
  assert only_cut.use_cutmix.all()


def test_gamma_draws_follow_gamma_distribution_for_small_and_large_shapes():
  u = jax.random.uniform(jax.random.key(4), (3000, 4, 33), minval=mx._TINY)
  alphas = (0.2, 0.8, 1.0, 4.0)
  g = np.exp(np.asarray(jax.jit(jax.vmap(lambda r: mx.log_gamma(r, alphas)))(u)))
  for i, a in enumerate(alphas):
    assert stats.kstest(g[:, i], stats.gamma(a).cdf).pvalue > 1e-3, a


def test_mixup_runs_in_jit_with_a_key_and_refuses_odd_batches_and_bad_configs():
  x, labels = _batch()
  f = jax.jit(mx.mixup, static_argnums=(3,))
  a, ta = f(jax.random.key(7), x, labels, K)
  b, tb = f(jax.random.key(7), x, labels, K)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert a.shape == x.shape and a.dtype == jnp.float32 and ta.shape == (6, K)
  assert not np.array_equal(np.asarray(a), x)  # prob 1: the batch is mixed
  with pytest.raises(ValueError, match="even batch size"):
    mx.mixup(jax.random.key(0), x[:5], labels[:5], K)
  with pytest.raises(ConfigError, match=r"^config\.finetune\.mixup\.switch_prob: "):
    mx.MixupConfig(switch_prob=1.5).validate("finetune.mixup")
  with pytest.raises(ConfigError, match=r"^config\.mixup\.mixup_alpha: one of"):
    mx.MixupConfig(mixup_alpha=0.0, cutmix_alpha=0.0).validate()
  mx.MixupConfig().validate()


# ---- timm itself (skipped without SIMDINO_TORCH_PYTHON) -----------------------------------------------------------
def test_timm_mixup_replaying_our_draws_gives_our_batch_and_targets():
  python = os.environ.get("SIMDINO_TORCH_PYTHON")
  if not python:
    pytest.skip("needs SIMDINO_TORCH_PYTHON (a Python with torch and timm) to run timm's Mixup")
  x, labels = _batch()
  jobs, expected = [], []
  for d in _cases():
    draws = dict(mix=bool(d.mix), use_cutmix=bool(d.use_cutmix), lam=float(d.lam), cy=int(d.cy), cx=int(d.cx))
    cfg = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, smoothing=0.1, num_classes=K)
    jobs.append(dict(kind="mixup", x="x", labels="labels", draws=draws, **cfg))
    expected.append(_apply(jnp.asarray(x), jnp.asarray(labels), d, K)[:2])
  out, _ = run_timm(python, jobs, {"x": x, "labels": labels.astype(np.int64)})
  worst = 0.0
  for i, (ex, et) in enumerate(expected):
    worst = max(worst, float(np.abs(np.asarray(ex) - out[f"{i}/x"]).max()))
    np.testing.assert_allclose(np.asarray(ex), out[f"{i}/x"], rtol=1e-6, atol=1e-6, err_msg=str(jobs[i]))
    np.testing.assert_allclose(np.asarray(et), out[f"{i}/target"], rtol=1e-6, atol=1e-7, err_msg=str(jobs[i]))
  assert worst < 1e-6
