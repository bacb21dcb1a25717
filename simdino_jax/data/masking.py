"""DINOv2 / iBOT block masking of the global crops' patch grid (host side).

Two levels, as in DINOv2's ``masking.py`` and ``collate.py`` (docs/data.md#block-masking;
SimDINOv2 uses the same code):

* :class:`MaskingGenerator` draws one ``(grid_h, grid_w)`` boolean mask with
  about ``n`` masked cells, built from random rectangles ("blocks"). Repeat
  until ``count >= n`` or a round adds nothing:

  1. ``budget = min(n - count, max_num_patches)``;
  2. up to 10 attempts: ``area ~ U(min_num_patches, budget)``, aspect ratio
     log-uniform in ``[min_aspect, max_aspect]``, ``h = round(sqrt(area *
     aspect))``, ``w = round(sqrt(area / aspect))``; the block must satisfy
     ``h < grid_h`` and ``w < grid_w``; ``top``/``left`` uniform over the valid
     positions; the block is accepted (and the round ends) when the number of
     *newly* masked cells is in ``(0, budget]``.

  The result can end slightly below ``n`` (never above it).
* :func:`batch_masks` applies the generator to one batch of crops:
  ``int(num_crops * mask_probability)`` crops are masked, their targets taken
  one per equal-width bin of ``ratio_min_max`` (crop ``i`` of those gets
  ``int(N * U(bin_i))`` cells, ``N = grid_h * grid_w``), the others get empty
  masks, and the list is shuffled over the crops. The statistics are thus per
  batch, not per image.
* :class:`BatchMasks` is the grain transform that adds ``"mask"`` to a batched
  multi-crop element (apply it after ``.batch``, as in the official collate).

All randomness comes from an explicit ``np.random.Generator``; Python's
``random`` module (used by the official code) is not used, so draws are not
bit-identical to it, only equal in distribution.
"""

from __future__ import annotations

import math

import grain
import numpy as np

MAX_ATTEMPTS = 10  # block placement attempts per round (official value)


class MaskingGenerator:
  """Random block masks on a ``(grid_h, grid_w)`` patch grid (see module doc).

  Args:
    grid_h, grid_w: patch grid size, e.g. 14 x 14 for 224 / 16.
    min_num_patches: smallest block area drawn (official 4).
    max_num_patches: largest number of cells one block may add; ``None`` means
      ``0.5 * grid_h * grid_w`` (DINOv2's setting).
    min_aspect: smallest block aspect ratio ``h / w`` (official 0.3).
    max_aspect: largest aspect ratio; ``None`` means ``1 / min_aspect``.
  """

  def __init__(
    self,
    grid_h: int,
    grid_w: int,
    *,
    min_num_patches: int = 4,
    max_num_patches: float | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
  ):
    if grid_h <= 0 or grid_w <= 0:
      raise ValueError(f"grid must be positive, got {grid_h} x {grid_w}.")
    if min_aspect <= 0:
      raise ValueError(f"min_aspect must be > 0, got {min_aspect}.")
    if max_aspect is None:
      max_aspect = 1.0 / min_aspect
    if max_aspect < min_aspect:
      raise ValueError(f"need min_aspect <= max_aspect, got {min_aspect}, {max_aspect}.")
    self.grid_h = int(grid_h)
    self.grid_w = int(grid_w)
    self.num_patches = self.grid_h * self.grid_w
    self.min_num_patches = min_num_patches
    self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
    self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

  def __repr__(self) -> str:
    return (
      f"MaskingGenerator({self.grid_h}x{self.grid_w}, block area >= "
      f"{self.min_num_patches}, <= {self.max_num_patches} per block, "
      f"aspect in [{math.exp(self.log_aspect[0]):.3f}, "
      f"{math.exp(self.log_aspect[1]):.3f}])"
    )

  def _add_block(self, mask: np.ndarray, budget: float, rng: np.random.Generator) -> int:
    """One round: tries to mask one block adding ``(0, budget]`` new cells."""
    lo, hi = self.min_num_patches, budget
    for _ in range(MAX_ATTEMPTS):
      # lo + (hi - lo) * U, like random.uniform, also when budget < lo.
      area = lo + (hi - lo) * rng.random()
      aspect = math.exp(rng.uniform(*self.log_aspect))
      h = int(round(math.sqrt(area * aspect)))
      w = int(round(math.sqrt(area / aspect)))
      if h < self.grid_h and w < self.grid_w:
        top = int(rng.integers(0, self.grid_h - h + 1))
        left = int(rng.integers(0, self.grid_w - w + 1))
        block = mask[top : top + h, left : left + w]
        new = h * w - int(block.sum())
        if 0 < new <= budget:
          block[...] = True
          return new
    return 0

  def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
    """A ``(grid_h, grid_w)`` bool mask with ``<= num_masking_patches`` cells."""
    mask = np.zeros((self.grid_h, self.grid_w), bool)
    count = 0
    while count < num_masking_patches:
      budget = min(num_masking_patches - count, self.max_num_patches)
      added = self._add_block(mask, budget, rng)
      if added == 0:
        break
      count += added
    return mask


def mask_targets(
  rng: np.random.Generator,
  num_crops: int,
  num_tokens: int,
  *,
  mask_probability: float = 0.5,
  ratio_min_max: tuple[float, float] = (0.1, 0.5),
) -> np.ndarray:
  """Per-crop target counts before shuffling, ``(num_crops,)`` int64.

  Entry ``i < int(num_crops * mask_probability)`` is ``int(num_tokens *
  U(bin_i))`` with ``bin_i`` the ``i``-th of equal-width bins of
  ``ratio_min_max``; the remaining entries are 0.
  """
  rmin, rmax = (float(r) for r in ratio_min_max)
  if not 0.0 <= rmin <= rmax <= 1.0:
    raise ValueError(f"mask ratio_min_max must satisfy 0 <= min <= max <= 1, got {ratio_min_max}.")
  if not 0.0 <= mask_probability <= 1.0:
    raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}.")
  n_masked = int(num_crops * mask_probability)
  edges = np.linspace(rmin, rmax, n_masked + 1)
  targets = np.zeros((num_crops,), np.int64)
  for i in range(n_masked):
    targets[i] = int(num_tokens * rng.uniform(edges[i], edges[i + 1]))
  return targets


def max_masked_tokens(
  num_crops: int,
  num_tokens: int,
  shard_crops: int,
  *,
  mask_probability: float = 0.5,
  ratio_min_max: tuple[float, float] = (0.1, 0.5),
) -> int:
  """The most masked cells any ``shard_crops`` of one :func:`batch_masks` batch of ``num_crops`` crops can hold.

  Crop ``i`` of the masked ones targets ``int(num_tokens * u)``, ``u`` in ``[edge_i, edge_i+1)``, so it gets at most
  ``floor(num_tokens * edge_i+1)`` cells (the generator never exceeds its target); the shuffle may put the largest
  targets in one shard, so the bound is the sum of the ``shard_crops`` largest of those. The train step gathers this
  many tokens per batch shard instead of ``floor(N * ratio_max)`` for every crop (a third as many at DINOv2's
  settings). Exact up to the floor: the largest targets can all come close to their upper edges.
  """
  mask_targets(np.random.default_rng(0), 0, 1, mask_probability=mask_probability, ratio_min_max=ratio_min_max)
  n_masked = int(num_crops * mask_probability)
  edges = np.linspace(float(ratio_min_max[0]), float(ratio_min_max[1]), n_masked + 1)[1:]
  upper = np.floor(num_tokens * edges).astype(np.int64)  # ascending with the bins
  return int(upper[::-1][: max(0, min(shard_crops, n_masked))].sum())


def batch_masks(
  rng: np.random.Generator,
  num_crops: int,
  grid_h: int,
  grid_w: int,
  *,
  mask_probability: float = 0.5,
  ratio_min_max: tuple[float, float] = (0.1, 0.5),
  generator: MaskingGenerator | None = None,
  return_targets: bool = False,
):
  """DINOv2 collate masks for one batch of ``num_crops`` global crops.

  Args:
    rng: the randomness (targets, blocks, then the shuffle, in that order).
    num_crops: crops in the batch (DINOv2: ``2 * B`` global crops).
    grid_h, grid_w: patch grid of one crop.
    mask_probability: fraction of crops that are masked
      (``int(num_crops * mask_probability)`` of them).
    ratio_min_max: range of masked fractions, split into equal bins.
    generator: block generator for the grid; default
      ``MaskingGenerator(grid_h, grid_w)``.
    return_targets: also return each crop's target count (after the shuffle).

  Returns:
    ``(num_crops, grid_h * grid_w)`` bool masks (row-major grid), and with
    ``return_targets`` the ``(num_crops,)`` int64 targets, row ``i`` belonging
    to mask ``i``.
  """
  if generator is None:
    generator = MaskingGenerator(grid_h, grid_w)
  elif (generator.grid_h, generator.grid_w) != (grid_h, grid_w):
    raise ValueError(f"generator grid {generator.grid_h}x{generator.grid_w} != {grid_h}x{grid_w}.")
  n_tokens = grid_h * grid_w
  targets = mask_targets(rng, num_crops, n_tokens, mask_probability=mask_probability, ratio_min_max=ratio_min_max)
  masks = np.zeros((num_crops, n_tokens), bool)
  for i, t in enumerate(targets):
    if t > 0:
      masks[i] = generator(int(t), rng).reshape(-1)
  perm = rng.permutation(num_crops)
  if return_targets:
    return masks[perm], targets[perm]
  return masks[perm]


class BatchMasks(grain.transforms.RandomMap):
  """grain ``RandomMap`` adding DINOv2 masks to a *batched* multi-crop element.

  Input: a batch with ``"global"`` of shape ``(b, Mg, Hg, Wg, 3)``. Output: the
  same dict plus ``"mask"``: ``(b, Mg, N)`` bool with ``N = (Hg // patch_size)
  * (Wg // patch_size)`` (row-major patch grid). The ``b * Mg`` global crops of
  the batch are the collate's crops, flattened batch-major (crop index
  ``example * Mg + view``); since the masks are shuffled over the crops the
  order only fixes which mask goes where.

  With ``global_batch_size`` and ``rows``, the element is the examples at positions ``rows`` of a global batch of
  ``global_batch_size`` (one process's part of a multi-process batch): the masks of the whole global batch are drawn
  (same ``rng``, hence the same masks as one process drawing that batch) and the ``rows`` are kept, so each example
  gets the same mask whatever the number of processes (docs/data.md#process-count).

  Args:
    patch_size: ViT patch size.
    mask_probability, ratio_min_max: as :func:`batch_masks`.
    min_num_patches, max_num_patches, min_aspect, max_aspect: as
      :class:`MaskingGenerator`.
    global_batch_size, rows: the global batch this element is part of and its positions there (None: the element
      is a whole batch).
  """

  def __init__(
    self,
    patch_size: int,
    *,
    mask_probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
    min_num_patches: int = 4,
    max_num_patches: float | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    global_batch_size: int | None = None,
    rows=None,
  ):
    if patch_size <= 0:
      raise ValueError(f"patch_size must be positive, got {patch_size}.")
    self.patch_size = int(patch_size)
    self.mask_probability = float(mask_probability)
    self.ratio_min_max = tuple(float(r) for r in ratio_min_max)
    self.generator_kwargs = dict(
      min_num_patches=min_num_patches, max_num_patches=max_num_patches, min_aspect=min_aspect, max_aspect=max_aspect
    )
    if (global_batch_size is None) != (rows is None):
      raise ValueError("global_batch_size and rows go together.")
    self.global_batch_size = None if global_batch_size is None else int(global_batch_size)
    self.rows = None if rows is None else np.asarray(rows, np.int64)
    if self.rows is not None and (
      self.rows.ndim != 1
      or len(np.unique(self.rows)) != len(self.rows)
      or not 0 <= self.rows.min() <= self.rows.max() < self.global_batch_size
    ):
      raise ValueError(f"rows must be distinct positions in [0, {global_batch_size}), got {rows}.")
    # Validates the arguments once, up front.
    mask_targets(
      np.random.default_rng(0), 0, 1, mask_probability=self.mask_probability, ratio_min_max=self.ratio_min_max
    )

  def grid(self, height: int, width: int) -> tuple[int, int]:
    """Patch grid of a ``height x width`` crop."""
    gh, gw = height // self.patch_size, width // self.patch_size
    if gh == 0 or gw == 0:
      raise ValueError(f"global crops of {height}x{width} are smaller than the patch size {self.patch_size}.")
    return gh, gw

  def random_map(self, element, rng: np.random.Generator):
    b, mg, height, width = np.shape(element["global"])[:4]
    if self.rows is not None and b != len(self.rows):
      raise ValueError(f"a batch of {b} examples, but {len(self.rows)} rows.")
    gh, gw = self.grid(height, width)
    generator = MaskingGenerator(gh, gw, **self.generator_kwargs)
    drawn = b if self.rows is None else self.global_batch_size
    masks = batch_masks(
      rng,
      drawn * mg,
      gh,
      gw,
      mask_probability=self.mask_probability,
      ratio_min_max=self.ratio_min_max,
      generator=generator,
    ).reshape(drawn, mg, gh * gw)
    out = dict(element)
    out["mask"] = masks if self.rows is None else masks[self.rows]
    return out
