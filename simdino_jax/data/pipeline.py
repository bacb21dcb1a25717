"""grain input pipelines: multi-crop training stream and deterministic eval.

Training (``train_iterator``), a ``grain.MapDataset``:

  source -> global shuffle (seeded) -> repeat forever -> MultiCrop random map      (the global element stream)
         -> process k's rows of every global batch: element b*G + rows[j]      (G = batch_size x shard_count)
         -> batch (drop remainder) -> [BatchMasks random map] -> skip ``start_step`` batches
         -> iterator (optionally mp_prefetch)

* Shuffle comes before repeat: grain's ``ShuffleMapDataset`` reshuffles each
  epoch with ``seed + epoch``, so element indices ``[e*N, (e+1)*N)`` are one
  permutation of the source (each example once per epoch, a different order per
  epoch).
* Global batch ``b`` is elements ``[b G, (b + 1) G)`` of the global stream, whatever the number of processes; with
  one process that is the whole pipeline (``rows`` is the identity). Process ``k`` of ``n`` takes the positions
  ``rows`` of it (default the contiguous block ``[k batch_size, (k + 1) batch_size)``; the trainer passes the rows
  its devices hold in the global batch array, ``trainer.process_batch_rows``), so the ``n`` processes' batches put
  together in the global array are exactly the one-process batch, row for row: same examples in the same order,
  which per-row randomness (drop path, device-side augmentation) and per-device statistics (``loss.groups``, KoLeo
  groups) see (docs/data.md#process-count; tests/test_multihost_train.py). The index map is lazy, so each process
  only computes its own elements.
* The augmentation RNG is seeded by grain from ``(aug_seed, index)`` where ``index`` is the position in the global
  stream (the random map sits before the row selection): an example gets the same crops, flips and colour jitter
  on any number of processes.
* Masks (``mask_patch_size > 0``, DINOv2 / iBOT, see :mod:`simdino_jax.data.masking`) are drawn per *global*
  batch, after batching, as the official collate draws them per batch: their RNG is seeded from ``(mask seed, batch
  index)``; every process draws the whole global batch's masks (~30 us per crop: 0.06 s per step for a global batch
  of 1,024 on a 14x14 grid, next to decoding its own images) and keeps its rows, so an example's mask does not
  depend on the process count, and a ``start_step`` skip (which comes after) reproduces them exactly.
* Undecodable images (decoding sources, :class:`~simdino_jax.data.sources.SkippingSource`) are replaced, so
  batches stay full; each example's ``"skipped"`` (1 when its own image was replaced) is kept for the first
  epoch only (elements ``[0, N)`` of the global stream), so summing it over every batch of every shard counts
  each bad file exactly once, whatever the number of epochs, workers or processes, and a resumed run
  (``start_step``) does not count again what it skips.
* Everything is index-addressed, so the output depends only on ``seed`` (and the
  rows), not on ``num_workers``/threads, and ``start_step`` is an O(1) skip.

Evaluation (``eval_batches``), deterministic and unaugmented:

  source -> global batch b = examples [b*G, (b+1)*G)   (G = batch_size x shard_count; the last one padded)
         -> shard k's batch = its contiguous slice [b*G + k*batch_size, b*G + (k+1)*batch_size)

* Contiguous blocks, so that the shards' batches concatenated in shard order (what a tiled all-gather over the
  processes returns) are the examples in dataset order: gathered features, labels and every figure computed from
  them are the same on any number of processes (tests/test_eval_multiprocess.py).
* Every shard yields the same number of batches, ``eval_num_batches`` (multi-host collectives line up); slots past
  the end of the dataset are padding (zeros, label -1, ``valid=False``).
* An undecodable image is never replaced: its slot is ``valid=False`` (the evaluators drop those slots, as they
  drop padding) and marked in ``"skipped"``.

Fine-tuning augmentations (the BEiT / iBOT / DeiT recipe, timm's; used by the fine-tuning evaluator only, pre-training
above is unchanged), pure functions with explicit randomness, each tested against timm run on the same draws
(docs/data.md#fine-tuning-augmentations):

  crop + flip -> RandAugment (:mod:`simdino_jax.data.randaugment`: host, PIL, uint8, a ``np.random.Generator``)
  -> normalise -> random erasing (:mod:`simdino_jax.data.random_erasing`: JAX, per image, on normalised values)
  -> mixup / CutMix + label smoothing (:mod:`simdino_jax.data.mixup`: JAX, per batch, (B, K) soft targets)

timm's order: RandAugment inside the per-image transform, erasing after ``Normalize``, mixup on the collated batch.
"""

from __future__ import annotations

import math
from typing import Iterator

import grain
import numpy as np
from PIL import Image

from simdino_jax.data import augment
from simdino_jax.data.masking import BatchMasks
from simdino_jax.data.multicrop import MultiCrop, MultiCropConfig
from simdino_jax.data.sources import eval_example


def _derive_seed(seed: int, *stream: int) -> int:
  return int(np.random.SeedSequence([int(seed), *map(int, stream)]).generate_state(1)[0])


class _GlobalBatchRows(grain.MapDataset):
  """Element ``i`` is element ``(i // b) G + rows[i % b]`` of the parent (``b = len(rows)``): this process's rows of
  every global batch of ``G`` consecutive parent elements."""

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent: grain.MapDataset, global_batch_size: int, rows: np.ndarray):
    super().__init__(parent)
    self._g = int(global_batch_size)
    self._rows = np.asarray(rows, np.int64)
    self._length = (len(parent) // self._g) * len(self._rows)

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, index: int) -> int:
    batch, slot = divmod(int(index), len(self._rows))
    return batch * self._g + int(self._rows[slot])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def _getitems(self, indices):
    return self._parent._getitems([self._parent_index(i) for i in indices])  # pylint: disable=protected-access

  def __str__(self) -> str:
    return f"GlobalBatchRows(G={self._g}, rows={self._rows.tolist()})"


def batch_rows(batch_size: int, shard_index: int = 0, shard_count: int = 1, rows=None) -> np.ndarray:
  """This shard's positions in every global batch of ``batch_size x shard_count`` examples (validated): ``rows``, or
  by default the contiguous block ``[shard_index batch_size, (shard_index + 1) batch_size)``."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}.")
  g = batch_size * shard_count
  if rows is None:
    return np.arange(shard_index * batch_size, (shard_index + 1) * batch_size, dtype=np.int64)
  rows = np.asarray(rows, np.int64)
  if rows.shape != (batch_size,) or len(np.unique(rows)) != batch_size or rows.min() < 0 or rows.max() >= g:
    raise ValueError(f"rows must be {batch_size} distinct positions in [0, {g}), got {rows.tolist()}.")
  return rows


class _FirstEpochSkips:
  """Zeroes an element's ``"skipped"`` after the first epoch (stream index >= ``n``): a bad file is drawn once
  per epoch and must count once per run."""

  def __init__(self, n: int):
    self.n = int(n)

  def __call__(self, index: int, element):
    if index >= self.n and isinstance(element, dict) and element.get("skipped", 0):
      element = dict(element, skipped=np.int32(0))
    return element


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; an unparsed FlagValues raises
  # UnparsedFlagAccessError there (docs/data.md#grain-worker-processes). Marking them parsed is a no-op
  # when the program already ran absl.app.run.
  try:
    from absl import flags  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def train_dataset(
  source,
  cfg: MultiCropConfig,
  *,
  batch_size: int,
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
  start_step: int = 0,
  mask_patch_size: int = 0,
  mask_probability: float = 0.5,
  mask_ratio: tuple[float, float] = (0.1, 0.5),
  mask_min_patches: int = 4,
  rows=None,
) -> grain.MapDataset:
  """The (infinite) batched training ``MapDataset``; see module doc and
  :func:`train_iterator` for the arguments."""
  rows = batch_rows(batch_size, shard_index, shard_count, rows)
  global_batch = batch_size * shard_count
  whole = np.array_equal(rows, np.arange(global_batch))  # one shard: the global stream as it is
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  if len(source) == 0:
    raise ValueError("empty data source.")
  if mask_patch_size < 0:
    raise ValueError(f"mask_patch_size must be >= 0 (0 = no masks), got {mask_patch_size}.")
  masks = None
  if mask_patch_size:
    masks = BatchMasks(
      mask_patch_size,
      mask_probability=mask_probability,
      ratio_min_max=mask_ratio,
      min_num_patches=mask_min_patches,
      global_batch_size=None if whole else global_batch,
      rows=None if whole else rows,
    )
    masks.grid(cfg.global_size, cfg.global_size)  # fails early if too small
  ds = grain.MapDataset.source(source)
  ds = ds.shuffle(seed=_derive_seed(seed, 0))
  ds = ds.repeat()  # infinite; reseeds the shuffle each epoch
  ds = ds.map_with_index(_FirstEpochSkips(len(source)))  # each bad file counted once per run
  ds = ds.random_map(MultiCrop(cfg), seed=_derive_seed(seed, 1))
  if not whole:
    ds = _GlobalBatchRows(ds, global_batch, rows)
  ds = ds.batch(batch_size, drop_remainder=True)
  if masks is not None:
    # Before the start_step slice: global batch b's masks depend on (seed, b) only (the stream "2, 0" is the one
    # a single process has always used).
    ds = ds.random_map(masks, seed=_derive_seed(seed, 2, 0))
  if start_step:
    ds = ds[start_step:]
  return ds


def train_iterator(
  source,
  cfg: MultiCropConfig,
  *,
  batch_size: int,
  seed: int,
  num_workers: int = 0,
  shard_index: int = 0,
  shard_count: int = 1,
  start_step: int = 0,
  mask_patch_size: int = 0,
  mask_probability: float = 0.5,
  mask_ratio: tuple[float, float] = (0.1, 0.5),
  mask_min_patches: int = 4,
  rows=None,
  num_threads: int = 2,
  prefetch_batches: int = 4,
):
  """Infinite iterator of multi-crop batches (dicts of numpy arrays).

  Yields ``{"global": (b, Mg, Hg, Wg, 3) float32, "local": (b, Ml, Hl, Wl, 3)
  float32, "label": (b,) int32, "skipped": (b,) int32}`` with ``b =
  batch_size`` (per process), plus ``"mask": (b, Mg, N) bool`` when
  ``mask_patch_size > 0``, ``N = (Hg // mask_patch_size) * (Wg //
  mask_patch_size)``, and ``"gram_global": (b, Mg, S, S, 3) float32`` when
  ``cfg.gram_size = S > 0`` (the Gram teacher's crops, data/multicrop.py).
  ``"skipped"`` counts the undecodable images the source replaced for each
  example; with ``cfg.augment_mode == "device"`` the crops are uint8
  (augmented in the train step, data/device_augment.py).

  Args:
    source: a random-access source (e.g. ``ArraySource``).
    cfg: multi-crop recipe.
    batch_size: per-process batch size.
    seed: pipeline seed (shuffle and augmentation seeds are derived from it).
    num_workers: grain ``mp_prefetch`` worker processes; 0 = in-process.
      The output does not depend on it. With workers, call ``.close()`` on the
      returned iterator when done; the main program needs an
      ``if __name__ == "__main__"`` guard.
    shard_index, shard_count: this process's shard of every global batch of ``batch_size x shard_count``
      examples: by default the contiguous block of positions ``[shard_index batch_size, (shard_index + 1)
      batch_size)``, so that the shards' batches concatenated in shard order are the one-shard batch.
    rows: this process's positions in the global batch instead of that block (``batch_size`` distinct ints), in
      the order its local batch is laid out: the rows its devices hold in the global array (trainer).
    start_step: number of batches to skip (O(1)), to resume a run.
    mask_patch_size: ViT patch size for DINOv2/iBOT block masks of the global
      crops; 0 = no ``"mask"``.
    mask_probability: fraction of a batch's ``b * Mg`` global crops that are
      masked (DINOv2 ``ibot.mask_sample_probability``, 0.5).
    mask_ratio: range of masked fractions (DINOv2
      ``ibot.mask_ratio_min_max``, (0.1, 0.5)), split into equal bins over the
      masked crops of a batch.
    mask_min_patches: smallest block area drawn by the block-mask generator
      (DINOv2 4; BEiT-style generators use 16 on a 14x14 grid).
    num_threads: grain read threads per process (each computes whole batches).
    prefetch_batches: batches buffered per process (bounded to save memory).

  Returns:
    A grain ``DatasetIterator`` (supports ``next``, ``close``, ``get_state``).
  """
  ds = train_dataset(
    source,
    cfg,
    batch_size=batch_size,
    seed=seed,
    shard_index=shard_index,
    shard_count=shard_count,
    start_step=start_step,
    mask_patch_size=mask_patch_size,
    mask_probability=mask_probability,
    mask_ratio=mask_ratio,
    mask_min_patches=mask_min_patches,
    rows=rows,
  )
  num_threads = max(0, int(num_threads))
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch_batches, num_threads))
  it_ds = ds.to_iter_dataset(read_options=read)
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=1))
  return iter(it_ds)


# ----------------------------------------------------------------------------
# Evaluation


def eval_transform(image: np.ndarray, image_size: int) -> np.ndarray:
  """Deterministic eval view: resize + centre crop + normalise (float32).

  As DINO's ``Resize(256, bicubic) + CenterCrop(224)``, scaled: the shorter side
  is resized to ``round(image_size * 256 / 224)``; images whose shorter side is
  ``<= image_size`` are instead resized (shorter side) to ``image_size``, so
  small images (e.g. 32x32 digits at image_size 32) are not cropped.
  """
  pil = Image.fromarray(augment.to_uint8(image))
  w, h = pil.size
  short, long_ = min(w, h), max(w, h)
  target = image_size if short <= image_size else int(round(image_size * 256 / 224))
  new_long = int(target * long_ / short)  # torchvision truncates the long side
  new_w, new_h = (target, new_long) if w <= h else (new_long, target)
  if (new_w, new_h) != (w, h):
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
  top = int(round((new_h - image_size) / 2.0))
  left = int(round((new_w - image_size) / 2.0))
  pil = pil.crop((left, top, left + image_size, top + image_size))
  return augment.normalize(np.asarray(pil))


def eval_num_batches(num_examples: int, batch_size: int, shard_count: int = 1) -> int:
  """Batches per shard (``batch_size`` examples each); the same for every shard: the number of global batches of
  ``batch_size x shard_count`` examples."""
  return math.ceil(num_examples / (batch_size * shard_count))


def eval_batches(
  source, *, image_size: int, batch_size: int, shard_index: int = 0, shard_count: int = 1, transform=None
) -> Iterator[dict[str, np.ndarray]]:
  """Deterministic, unaugmented batches covering every example exactly once.

  ``transform(image) -> (image_size, image_size, 3) float32`` replaces
  :func:`eval_transform` (e.g. the DINO linear protocol's own resize / crop).

  Global batch ``b`` holds examples ``[b G, (b + 1) G)`` with ``G = batch_size x shard_count``; shard ``k`` yields
  its contiguous part, examples ``b G + k batch_size + [0, batch_size)``. So the shards' ``b``-th batches
  concatenated in shard order are the examples in dataset order, whatever ``shard_count`` (the module docstring).
  Every shard yields ``eval_num_batches(len(source), batch_size, shard_count)`` batches (so that multi-host
  collectives line up); slots past the end are padded with zeros, label ``-1``, ``valid=False`` and index ``-1``.

  An undecodable image is not replaced (a duplicate of another image under its
  label would be scored): its slot is zeros, label ``-1``, ``valid=False`` and
  ``skipped=1``, so evaluators drop it with the padding; ``batch["skipped"].sum()``
  over the batches is the number left out (each file once per pass).

  Yields:
    ``{"image": (batch_size, S, S, 3) float32, "label": (batch_size,) int32,
    "valid": (batch_size,) bool, "skipped": (batch_size,) int32, "index": (batch_size,) int32}`` (``index``: the
    slot's example in ``source``, -1 for padding).
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}.")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  n = len(source)
  n_batches = eval_num_batches(n, batch_size, shard_count)
  for b in range(n_batches):
    image = np.zeros((batch_size, image_size, image_size, 3), np.float32)
    label = np.full((batch_size,), -1, np.int32)
    valid = np.zeros((batch_size,), bool)
    skipped = np.zeros((batch_size,), np.int32)
    start = (b * shard_count + shard_index) * batch_size  # this shard's slice of global batch b
    indices = np.arange(start, min(start + batch_size, n))
    index = np.full((batch_size,), -1, np.int32)
    index[: len(indices)] = indices
    for slot, idx in enumerate(indices):
      ex = eval_example(source, int(idx))
      if ex is None:  # undecodable: left out, not replaced
        skipped[slot] = 1
        continue
      image[slot] = eval_transform(ex["image"], image_size) if transform is None else transform(ex["image"])
      label[slot] = ex["label"]
      valid[slot] = True
    yield {"image": image, "label": label, "valid": valid, "skipped": skipped, "index": index}
