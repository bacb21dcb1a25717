"""In-memory sources: :class:`ArraySource` and the two specs that load into one, ``digits`` and ``npz:PATH``.

* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1797 real images, no download). Values 0..16 are
  scaled to uint8 0..255, upsampled to 32x32 with PIL bicubic and replicated to RGB. The train/test split is fixed
  (independent of any config seed): a permutation drawn with ``np.random.default_rng(0)``; the first 80% (1438
  images) are ``"train"``, the remaining 359 ``"test"``.
* ``"npz:PATH"``: a ``.npz`` file with ``"<split>_images"`` and optionally ``"<split>_labels"`` (without them the
  split is unlabelled: labels -1, ``num_classes`` 0). Images may be uint8 ``(N, H, W, 3)``, grey ``(N, H, W)`` or
  ``(N, H, W, 1)`` (replicated to RGB), or floating point in ``[0, 1]`` (scaled by 255 and rounded).

Arrays are decoded already, so these sources never skip an image.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image

from simdino_jax.data.sources.base import DataError, MissingDataError

DIGITS_SIZE = 32
DIGITS_TRAIN_FRACTION = 0.8
DIGITS_SPLITS = ("train", "test")


class ArraySource:
  """A grain random-access data source over in-memory uint8 RGB images.

  Attributes:
    images: ``(N, H, W, 3)`` uint8 array (read-only).
    labels: ``(N,)`` int32 array, ``-1`` where there are no labels.
    num_classes: number of classes (``max(labels) + 1``; 0 without labels).
    name: a human-readable name, e.g. ``"digits/train"``.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray | None, name: str, num_classes: int | None = None):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise DataError(f"{name}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    n = images.shape[0]
    if labels is None:
      labels = np.full((n,), -1, np.int32)
    labels = np.asarray(labels)
    if labels.shape != (n,):
      raise DataError(f"{name}: labels must have shape ({n},), got {labels.shape}")
    labels = labels.astype(np.int32)
    if num_classes is None:
      num_classes = int(labels.max()) + 1 if n and labels.max() >= 0 else 0
    images = images.view()  # read-only views; the caller's arrays stay as-is
    labels = labels.view()
    images.flags.writeable = False
    labels.flags.writeable = False
    self.images = images
    self.labels = labels
    self.num_classes = int(num_classes)
    self.name = name

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def __getitem__(self, index) -> dict:
    index = int(index)
    return {"image": self.images[index], "label": self.labels[index]}

  def __repr__(self) -> str:
    return (
      f"ArraySource(name={self.name!r}, n={len(self)}, image_shape={self.images.shape[1:]}, "
      f"num_classes={self.num_classes})"
    )


# ----------------------------------------------------------------------------
# digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits as sk_load_digits  # pylint: disable=g-import-not-at-top

  d = sk_load_digits()
  raw = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  up = np.stack(
    [np.asarray(Image.fromarray(im, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC)) for im in raw]
  )
  rgb = np.repeat(up[..., None], 3, axis=-1)
  return rgb, d.target.astype(np.int32)


def _check_digits_split(split: str) -> None:
  if split not in DIGITS_SPLITS:
    raise MissingDataError(f'data source "digits": no split {split!r}; digits has splits "train" and "test".')


def digits_split_indices(split: str) -> np.ndarray:
  """Indices into scikit-learn's ``load_digits()`` of the fixed ``"train"``/``"test"`` split."""
  _check_digits_split(split)
  n = len(_digits_arrays()[0])
  perm = np.random.default_rng(0).permutation(n)
  n_train = int(round(DIGITS_TRAIN_FRACTION * n))
  return perm[:n_train] if split == "train" else perm[n_train:]


def load_digits(split: str) -> ArraySource:
  """The ``"train"`` or ``"test"`` split of ``digits`` (see module doc)."""
  idx = digits_split_indices(split)
  images, labels = _digits_arrays()
  return ArraySource(images[idx], labels[idx], name=f"digits/{split}", num_classes=10)


def digits_has_labelled_split(split: str) -> bool:
  return split in DIGITS_SPLITS


# ----------------------------------------------------------------------------
# npz


def _npz_keys(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise MissingDataError(f"data source 'npz:{path}': file {path!r} does not exist.")
  with np.load(path, allow_pickle=False) as f:  # lazy: reads the archive's directory, no array
    return sorted(f.files)


def load_npz(path: str, split: str) -> ArraySource:
  """``"<split>_images"`` (and ``"<split>_labels"`` when present) of the ``.npz`` file ``path``."""
  img_key, lbl_key = f"{split}_images", f"{split}_labels"
  keys = _npz_keys(path)
  if img_key not in keys:
    raise MissingDataError(
      f"data source 'npz:{path}': key {img_key!r} for split {split!r} not found; keys present: {keys}."
    )
  with np.load(path, allow_pickle=False) as f:
    images = f[img_key]
    labels = f[lbl_key] if lbl_key in keys else None
  images = _npz_images_to_uint8_rgb(images, path, img_key)
  if labels is not None and (not np.issubdtype(labels.dtype, np.integer) or labels.shape != (images.shape[0],)):
    raise DataError(
      f"data source 'npz:{path}': key {lbl_key!r} must be an integer array of shape "
      f"({images.shape[0]},), got {labels.dtype} {labels.shape}."
    )
  return ArraySource(images, labels, name=f"npz:{path}/{split}")


def npz_has_labelled_split(path: str, split: str) -> bool:
  keys = _npz_keys(path)
  return f"{split}_images" in keys and f"{split}_labels" in keys


def _npz_images_to_uint8_rgb(x: np.ndarray, path: str, key: str) -> np.ndarray:
  expected = "uint8 (N,H,W,3), (N,H,W) or (N,H,W,1), or floating point in [0, 1] with those shapes"

  def bad(what):
    return DataError(f"data source 'npz:{path}': key {key!r} has {what}; expected {expected}.")

  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise bad(f"shape {x.shape}")
  if np.issubdtype(x.dtype, np.floating):
    if x.size and (not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1):
      raise bad(f"float values in [{np.nanmin(x)}, {np.nanmax(x)}]")
    x = np.rint(x.astype(np.float32) * 255.0).astype(np.uint8)
  elif x.dtype != np.uint8:
    raise bad(f"dtype {x.dtype}")
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return np.ascontiguousarray(x)
