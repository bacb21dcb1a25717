"""Semantic-segmentation datasets for ``config.evals.<name>.source`` (evals/segmentation.py): image / mask pairs.

Layouts (``split`` is "train" or "val"):

* ``ade20k:PATH``: ADE20K's SceneParsing release, ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png`` (same stem); PATH is the ADEChallengeData2016 folder or its parent.
  150 classes with mmseg's ``reduce_zero_label``: annotation 0 ("other") becomes the ignore index 255 and class k
  (1..150) becomes k - 1.
* ``voc:PATH``: Pascal VOC 2012, ``JPEGImages/ID.jpg``, ``SegmentationClass/ID.png`` (palette PNGs: the palette
  index is the class), ids listed in ``ImageSets/Segmentation/{train,val}.txt``; 21 classes (background = 0), 255 =
  the boundary / ignore. PATH is the VOC2012 folder or a parent holding ``VOCdevkit/VOC2012`` or ``VOC2012``.
* ``folder:PATH``: ``images/{train,val}/*.{jpg,jpeg,png}`` and ``masks/{train,val}/STEM.png`` holding class ids
  (single-channel 8/16-bit or palette PNGs) below ``num_classes``; 255 is ignored.

Every refusal is a one-line ``DataError`` naming the folder or file: a missing folder or list, an image without its
mask, a mask whose size differs from its image, a multi-channel mask, a class id >= num_classes other than 255. Sizes
and ids are checked when an example is read (the evaluator reads every validation example).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from simdino_jax.errors import DataError, MissingDataError

IGNORE_INDEX = 255
KINDS = ("ade20k", "voc", "folder")
DEFAULT_CLASSES = {"ade20k": 150, "voc": 21}
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def parse_spec(spec: str) -> tuple[str, str]:
  """``"KIND:PATH"`` -> (kind, expanded path); DataError for another form."""
  kind, sep, path = str(spec).partition(":")
  if not sep or kind not in KINDS or not path:
    raise DataError(f"segmentation source {spec!r}: expected one of {', '.join(k + ':PATH' for k in KINDS)}")
  return kind, os.path.abspath(os.path.expanduser(path))


def _need_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise MissingDataError(f"{what}: folder {path} does not exist")
  return path


class SegmentationSource:
  """(image, mask) pairs: ``source[i]`` is {"image": (H, W, 3) uint8 RGB, "mask": (H, W) int32 class ids with 255
  ignored, "name": the image file}; ``num_classes``; ``pairs``: the (image path, mask path) list."""

  def __init__(self, pairs, *, num_classes: int, reduce_zero_label: bool = False, name: str = ""):
    self.pairs = list(pairs)
    self.num_classes = int(num_classes)
    self.reduce_zero_label = bool(reduce_zero_label)
    self.name = name

  def __len__(self) -> int:
    return len(self.pairs)

  def load_mask(self, index: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
    path = self.pairs[index][1]
    try:
      with Image.open(path) as m:
        mask = np.asarray(m)
    except OSError as e:
      raise DataError(f"segmentation mask {path}: cannot be read ({e})") from None
    if mask.ndim != 2:
      raise DataError(f"segmentation mask {path}: has shape {mask.shape}; expected one channel of class ids")
    if image_size is not None and mask.shape != image_size:
      raise DataError(
        f"segmentation mask {path}: size {mask.shape[1]}x{mask.shape[0]} differs from its image "
        f"{self.pairs[index][0]} ({image_size[1]}x{image_size[0]})"
      )
    mask = mask.astype(np.int32)
    if self.reduce_zero_label:  # mmseg: 0 -> 255 (ignored), k -> k - 1
      mask = np.where(mask == 0, IGNORE_INDEX, mask - 1)
      mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX  # 255 - 1 stays ignored, as mmseg's uint8 arithmetic does
    bad = (mask >= self.num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
      ids = sorted(set(np.unique(mask[bad]).tolist()))[:5]
      raise DataError(
        f"segmentation mask {path}: class id(s) {ids} >= num_classes={self.num_classes} (only {IGNORE_INDEX} is "
        "ignored)"
      )
    return mask

  def load_image(self, index: int) -> np.ndarray:
    path = self.pairs[index][0]
    try:
      with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I"):  # scale 16-bit to 8 bit (PIL's convert clips)
          a = np.asarray(im).astype(np.float64)
          im = Image.fromarray((a * 255.0 / max(a.max(), 1.0)).astype(np.uint8))
        return np.asarray(im.convert("RGB"))
    except OSError as e:
      raise DataError(f"segmentation image {path}: cannot be read ({e})") from None

  def __getitem__(self, index: int) -> dict:
    image = self.load_image(index)
    return {"image": image, "mask": self.load_mask(index, image.shape[:2]), "name": self.pairs[index][0]}


def _ade_root(path: str) -> str:
  for cand in (path, os.path.join(path, "ADEChallengeData2016")):
    if os.path.isdir(os.path.join(cand, "images")) and os.path.isdir(os.path.join(cand, "annotations")):
      return cand
  raise MissingDataError(
    f"ade20k source: neither {path} nor {os.path.join(path, 'ADEChallengeData2016')} holds images/ and annotations/"
  )


def _pairs_by_stem(image_dir: str, mask_dir: str, what: str) -> list[tuple[str, str]]:
  _need_dir(image_dir, what)
  _need_dir(mask_dir, what)
  images = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(_IMAGE_EXTS))
  if not images:
    raise MissingDataError(f"{what}: no .jpg/.png images in {image_dir}")
  pairs = []
  for f in images:
    mask = os.path.join(mask_dir, os.path.splitext(f)[0] + ".png")
    if not os.path.isfile(mask):
      raise MissingDataError(f"{what}: image {os.path.join(image_dir, f)} has no mask {mask}")
    pairs.append((os.path.join(image_dir, f), mask))
  return pairs


def _voc_root(path: str) -> str:
  for cand in (path, os.path.join(path, "VOC2012"), os.path.join(path, "VOCdevkit", "VOC2012")):
    if os.path.isdir(os.path.join(cand, "JPEGImages")) and os.path.isdir(os.path.join(cand, "SegmentationClass")):
      return cand
  raise MissingDataError(
    f"voc source: {path} (or its VOC2012 / VOCdevkit/VOC2012) holds no JPEGImages/ and SegmentationClass/"
  )


def load(spec: str, split: str, num_classes: int = 0) -> SegmentationSource:
  """The ``split`` ("train" / "val") of the dataset ``spec`` (module doc). ``num_classes`` 0: the layout's (ADE20K
  150, VOC 21); required for folder sources."""
  if split not in ("train", "val"):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  kind, path = parse_spec(spec)
  if kind != "folder":
    _need_dir(path, f"{kind} source")
  if kind == "ade20k":
    root = _ade_root(path)
    sub = {"train": "training", "val": "validation"}[split]
    pairs = _pairs_by_stem(
      os.path.join(root, "images", sub), os.path.join(root, "annotations", sub), f"ade20k source ({split})"
    )
    return SegmentationSource(pairs, num_classes=num_classes or 150, reduce_zero_label=True, name=f"ade20k {split}")
  if kind == "voc":
    root = _voc_root(path)
    listing = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    if not os.path.isfile(listing):
      raise MissingDataError(f"voc source: split list {listing} does not exist")
    with open(listing) as f:
      ids = [line.strip() for line in f if line.strip()]
    pairs = []
    for i in ids:
      image = os.path.join(root, "JPEGImages", i + ".jpg")
      mask = os.path.join(root, "SegmentationClass", i + ".png")
      for p in (image, mask):
        if not os.path.isfile(p):
          raise MissingDataError(f"voc source: {p} (listed in {listing}) does not exist")
      pairs.append((image, mask))
    if not pairs:
      raise MissingDataError(f"voc source: {listing} lists no images")
    return SegmentationSource(pairs, num_classes=num_classes or 21, name=f"voc {split}")
  _need_dir(path, "folder source")
  if num_classes < 1:
    raise DataError(f"folder source {path}: needs num_classes (the number of class ids in its masks)")
  pairs = _pairs_by_stem(
    os.path.join(path, "images", split), os.path.join(path, "masks", split), f"folder source ({split})"
  )
  return SegmentationSource(pairs, num_classes=num_classes, name=f"folder {split}")
