"""Tests for simdino_jax.data.masking (DINOv2 block masks and collate)."""

import numpy as np
import pytest

from simdino_jax.data.masking import BatchMasks, MaskingGenerator, batch_masks, mask_targets
from simdino_jax.data.multicrop import MultiCropConfig
from simdino_jax.data.pipeline import train_dataset, train_iterator
from simdino_jax.data.sources import ArraySource

SMALL = MultiCropConfig(global_size=16, local_size=8, num_local=1)


def _tiny_source(n=20, size=16, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return ArraySource(images, np.arange(n, dtype=np.int32), name="tiny")


def _bbox(mask):
  rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
  return rows[0], cols[0], np.ptp(rows) + 1, np.ptp(cols) + 1


# ----------------------------------------------------------------------------
# MaskingGenerator


def test_generator_defaults_and_shapes():
  g = MaskingGenerator(14, 14)
  assert g.max_num_patches == 98 and g.min_num_patches == 4
  np.testing.assert_allclose(np.exp(g.log_aspect), (0.3, 1 / 0.3))
  m = g(40, np.random.default_rng(0))
  assert m.shape == (14, 14) and m.dtype == np.bool_
  assert not g(0, np.random.default_rng(0)).any()
  assert MaskingGenerator(6, 10, max_num_patches=7).max_num_patches == 7
  with pytest.raises(ValueError):
    MaskingGenerator(0, 4)


def test_generator_counts_never_exceed_target_and_usually_reach_it():
  g = MaskingGenerator(14, 14)
  rng = np.random.default_rng(0)
  ratios, low = [], []
  for t in range(1, 110, 2):
    for _ in range(20):
      c = int(g(t, rng).sum())
      assert c <= t
      ratios.append(c / t)
      low.append(c < min(4, t))
  ratios = np.array(ratios)
  assert ratios.mean() > 0.97
  assert np.mean(ratios < 0.8) < 0.03
  assert np.mean(low) < 0.02  # >= min(4, target) nearly always


def test_single_block_size_aspect_and_grid_limits():
  g = MaskingGenerator(14, 14)
  rng = np.random.default_rng(1)
  aspects, areas = [], []
  for _ in range(2000):
    m = np.zeros((14, 14), bool)
    n = g._add_block(m, 98, rng)  # pylint: disable=protected-access
    top, left, h, w = _bbox(m)
    assert n == m.sum() == h * w  # one filled rectangle
    assert h < 14 and w < 14 and 3 <= n <= 98  # 3: rounding of area >= 4
    aspects.append(h / w)
    areas.append(n)
  aspects = np.array(aspects)
  # Rounding to whole cells widens (0.3, 1/0.3) a little, e.g. 1x5 blocks.
  assert aspects.min() >= 0.2 and aspects.max() <= 5.0
  assert np.mean((aspects < 0.3) | (aspects > 1 / 0.3)) < 0.05
  assert abs(np.log(aspects).mean()) < 0.05  # log-uniform, symmetric
  assert 40 < np.mean(areas) < 60  # area ~ U(4, 98)
  # A thin grid only admits height-1 blocks (h < grid_h).
  thin = MaskingGenerator(2, 14)
  for _ in range(200):
    m = np.zeros((2, 14), bool)
    if thin._add_block(m, 7, rng):  # pylint: disable=protected-access
      assert _bbox(m)[2] == 1
  # min_aspect = 1 -> square blocks only.
  square = MaskingGenerator(14, 14, min_aspect=1.0)
  for _ in range(200):
    m = np.zeros((14, 14), bool)
    square._add_block(m, 98, rng)  # pylint: disable=protected-access
    _, _, h, w = _bbox(m)
    assert h == w


def test_block_budget_limits_new_cells_per_round():
  g = MaskingGenerator(14, 14, max_num_patches=10)
  rng = np.random.default_rng(2)
  for _ in range(200):
    m = np.zeros((14, 14), bool)
    assert g._add_block(m, 10, rng) <= 10  # pylint: disable=protected-access
  # Many blocks are needed for a large target when each adds <= 10.
  m = g(90, rng)
  assert 80 <= m.sum() <= 90


def test_generator_is_a_function_of_the_rng():
  g = MaskingGenerator(14, 14)
  a = [g(t, np.random.default_rng(5)) for t in (10, 50, 90)]
  b = [g(t, np.random.default_rng(5)) for t in (10, 50, 90)]
  c = g(50, np.random.default_rng(6))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[1], c)


# ----------------------------------------------------------------------------
# batch_masks (collate)


def test_mask_targets_one_per_bin():
  rng = np.random.default_rng(0)
  n_tok = 196
  for num_crops, p in ((128, 0.5), (7, 0.5), (10, 1.0), (8, 0.0)):
    t = mask_targets(rng, num_crops, n_tok, mask_probability=p)
    k = int(num_crops * p)
    assert t.shape == (num_crops,)
    assert np.all(t[k:] == 0)
    edges = np.linspace(0.1, 0.5, k + 1)
    lo = np.floor(n_tok * edges[:-1]).astype(int)
    hi = np.floor(n_tok * edges[1:]).astype(int)
    assert np.all((t[:k] >= lo) & (t[:k] <= hi))
  with pytest.raises(ValueError):
    mask_targets(rng, 4, 16, ratio_min_max=(0.5, 0.1))
  with pytest.raises(ValueError):
    mask_targets(rng, 4, 16, mask_probability=1.5)


@pytest.mark.parametrize("num_crops", [128, 9])
def test_batch_masks_per_batch_statistics(num_crops):
  rng = np.random.default_rng(0)
  n_tok = 14 * 14
  k = int(num_crops * 0.5)
  edges = np.linspace(0.1, 0.5, k + 1)
  lows = []
  for _ in range(5):
    masks, targets = batch_masks(rng, num_crops, 14, 14, return_targets=True)
    assert masks.shape == (num_crops, n_tok) and masks.dtype == np.bool_
    counts = masks.sum(1)
    assert np.sum(targets > 0) == k  # exactly int(num_crops * p) masked
    assert np.sum(counts > 0) == k
    np.testing.assert_array_equal(counts[targets == 0], 0)
    assert np.all(counts <= targets)
    lows.append(np.mean(counts[targets > 0] < np.minimum(4, targets[targets > 0])))
    # The sorted targets fall one per bin.
    srt = np.sort(targets[targets > 0])
    assert np.all(srt >= np.floor(n_tok * edges[:-1]))
    assert np.all(srt <= np.floor(n_tok * edges[1:]))
    # Mean masked fraction of the masked crops ~ mid-range (0.3) by stratification.
    assert 0.24 < counts[targets > 0].mean() / n_tok < 0.32
  assert np.mean(lows) < 0.02


def test_batch_masks_are_shuffled_and_deterministic():
  a = batch_masks(np.random.default_rng(3), 64, 14, 14)
  b = batch_masks(np.random.default_rng(3), 64, 14, 14)
  np.testing.assert_array_equal(a, b)
  positions = set()
  for s in range(10):
    m = batch_masks(np.random.default_rng(s), 64, 14, 14)
    positions.add(tuple(np.flatnonzero(m.any(1))))
  assert len(positions) == 10  # which crops are masked varies
  assert not batch_masks(np.random.default_rng(0), 6, 4, 4, mask_probability=0.0).any()
  assert batch_masks(np.random.default_rng(0), 6, 4, 4, mask_probability=1.0).any(1).all()
  with pytest.raises(ValueError, match="grid"):
    batch_masks(np.random.default_rng(0), 4, 4, 4, generator=MaskingGenerator(5, 5))


def test_batch_masks_transform_adds_mask_and_keeps_input():
  b, mg = 3, 2
  batch = {"global": np.zeros((b, mg, 32, 32, 3), np.float32), "label": np.arange(b, dtype=np.int32)}
  out = BatchMasks(8).random_map(batch, np.random.default_rng(0))
  assert "mask" not in batch and out["global"] is batch["global"]
  assert out["mask"].shape == (b, mg, 16) and out["mask"].dtype == np.bool_
  assert np.sum(out["mask"].reshape(b * mg, -1).any(1)) == 3  # int(6 * 0.5)
  out2 = BatchMasks(8).random_map(batch, np.random.default_rng(0))
  np.testing.assert_array_equal(out["mask"], out2["mask"])
  with pytest.raises(ValueError, match="patch size"):
    BatchMasks(64).random_map(batch, np.random.default_rng(0))
  with pytest.raises(ValueError):
    BatchMasks(8, ratio_min_max=(0.6, 0.2))


# ----------------------------------------------------------------------------
# Masks in the training pipeline


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_pipeline_masks_shape_per_batch_counts_and_determinism():
  src = _tiny_source()
  # patch 2 on 16x16 crops: an 8x8 grid, N = 64 (targets >= int(6.4)).
  mk = lambda seed, **kw: train_iterator(src, SMALL, batch_size=4, seed=seed, mask_patch_size=2, **kw)
  a, b, c = _take(mk(0), 3), _take(mk(0), 3), _take(mk(1), 3)
  for x, y in zip(a, b):
    assert x["mask"].shape == (4, 2, 64) and x["mask"].dtype == np.bool_
    np.testing.assert_array_equal(x["mask"], y["mask"])
    np.testing.assert_array_equal(x["global"], y["global"])
    assert x["mask"].reshape(8, 64).any(1).sum() == 4  # int(4 * 2 * 0.5)
  assert not all(np.array_equal(x["mask"], y["mask"]) for x, y in zip(a, c))
  # Masks do not change the images.
  plain = _take(train_iterator(src, SMALL, batch_size=4, seed=0), 3)
  for x, y in zip(a, plain):
    assert "mask" not in y
    np.testing.assert_array_equal(x["global"], y["global"])
  d = _take(mk(0, mask_probability=1.0, mask_ratio=(0.2, 0.3)), 1)[0]
  assert d["mask"].reshape(8, 64).any(1).all()
  with pytest.raises(ValueError):
    train_dataset(src, SMALL, batch_size=4, seed=0, mask_patch_size=-1)
  with pytest.raises(ValueError, match="patch size"):
    train_dataset(src, SMALL, batch_size=4, seed=0, mask_patch_size=32)


def test_pipeline_masks_start_step_and_shards():
  src = _tiny_source()
  kw = dict(batch_size=4, seed=0, mask_patch_size=2)
  ds = train_dataset(src, SMALL, **kw)
  later = train_dataset(src, SMALL, start_step=5, **kw)
  for i in range(2):
    np.testing.assert_array_equal(ds[5 + i]["mask"], later[i]["mask"])
    np.testing.assert_array_equal(ds[5 + i]["global"], later[i]["global"])
  shards = [train_dataset(src, SMALL, shard_index=k, shard_count=2, **kw) for k in range(2)]
  assert not np.array_equal(shards[0][0]["mask"], shards[1][0]["mask"])


def test_pipeline_min_block_size_reaches_the_generator():
  """mask_min_patches=16 on an 8x8 grid with targets of 6-9 cells: block areas are drawn from U(budget, 16), so
  most blocks overshoot the budget and are refused and many masks stay empty; with the default 4 none does."""
  src = _tiny_source()
  counts = {}
  for min_patches in (4, 16):
    it = train_iterator(
      src,
      SMALL,
      batch_size=8,
      seed=0,
      mask_patch_size=2,
      mask_probability=1.0,
      mask_ratio=(0.1, 0.15),
      mask_min_patches=min_patches,
    )
    counts[min_patches] = np.concatenate([x["mask"].reshape(-1, 64).sum(1) for x in _take(it, 3)])
  assert (counts[4] > 0).all()  # targets 6..9 cells are reached with small blocks
  assert (counts[16] == 0).mean() > 0.2
