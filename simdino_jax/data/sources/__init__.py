"""Image data sources for grain: :func:`load_source` picks a family by the spec's prefix (a small registry).

A source is a grain ``RandomAccessDataSource`` (``__len__`` and ``__getitem__``) returning ``{"image": (H, W, 3)
uint8, "label": int32 scalar}`` and has ``labels``, ``num_classes`` (0 when unlabelled) and ``name``. Families, one
module each:

* :mod:`.arrays`: ``"digits"`` (scikit-learn's handwritten digits) and ``"npz:PATH"``, in memory.
* :mod:`.folder`: ``"folder:PATH"``, image files in a directory or an uncompressed ``.tar``, labelled
  (``<root>/<split>/<class>/<image>``) or not (a flat folder: the ``"train"`` split only).
* :mod:`.tfds`: ``"tfds:NAME"``, a TFDS dataset prepared as ArrayRecord.
* :mod:`.base`: what the decoding families (folder, tfds) share: :func:`decode_image`, :class:`SkippingSource`
  (undecodable images replaced by ``source[i]`` for training, left out by ``source.try_example(i)`` for
  evaluation, each counted once; those sources' examples carry ``"skipped"``), the error types.

:func:`has_labelled_split` answers, from directory listings or metadata only, whether ``load_source(spec, split)``
would give a labelled split: the trainer asks it before compiling anything, to switch label-based evaluation off
for unlabelled data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from simdino_jax.data.sources import arrays, folder
from simdino_jax.data.sources import tfds as tfds_family
from simdino_jax.data.sources.arrays import ArraySource, digits_split_indices, load_digits, load_npz
from simdino_jax.data.sources.base import (
  ALPHA_BACKGROUND,
  CorruptImageWarning,
  DataError,
  MissingDataError,
  SkippingSource,
  array_to_rgb,
  decode_image,
  decode_rgb,
  num_skipped,
  pil_to_rgb,
)
from simdino_jax.data.sources.folder import (
  IMAGE_EXTENSIONS,
  FolderSource,
  TarFolderSource,
  load_folder,
  split_dir_candidates,
)
from simdino_jax.data.sources.tfds import TfdsSource, load_tfds, tfds_split_for

__all__ = [
  "ALPHA_BACKGROUND",
  "IMAGE_EXTENSIONS",
  "ArraySource",
  "CorruptImageWarning",
  "DataError",
  "FolderSource",
  "MissingDataError",
  "SkippingSource",
  "TarFolderSource",
  "TfdsSource",
  "array_to_rgb",
  "decode_image",
  "decode_rgb",
  "digits_split_indices",
  "eval_example",
  "has_labelled_split",
  "load_digits",
  "load_folder",
  "load_npz",
  "load_source",
  "load_tfds",
  "num_skipped",
  "pil_to_rgb",
  "split_dir_candidates",
  "tfds_split_for",
]


@dataclasses.dataclass(frozen=True)
class _Family:
  """One spec form: ``load(arg, split, options)`` and ``has_labelled_split(arg, split, options)``; ``arg`` is the
  text after ``"<prefix>:"`` (None for a spec without one, e.g. ``"digits"``)."""

  form: str  # as the user writes it, e.g. "npz:PATH"
  description: str
  load: Callable
  has_labelled_split: Callable

  @property
  def takes_arg(self) -> bool:
    return ":" in self.form


_FAMILIES = {
  "digits": _Family(
    "digits",
    "scikit-learn handwritten digits, upsampled to 32x32 RGB",
    lambda arg, split, opts: load_digits(split),
    lambda arg, split, opts: arrays.digits_has_labelled_split(split),
  ),
  "npz": _Family(
    "npz:PATH",
    'a .npz file with "<split>_images" and optional "<split>_labels"',
    lambda arg, split, opts: load_npz(arg, split),
    lambda arg, split, opts: arrays.npz_has_labelled_split(arg, split),
  ),
  "folder": _Family(
    "folder:PATH",
    "a directory or uncompressed .tar with <split>/<class>/<image> files, or a "
    "flat folder of unlabelled training images",
    lambda arg, split, opts: load_folder(arg, split),
    lambda arg, split, opts: folder.folder_has_labelled_split(arg, split),
  ),
  "tfds": _Family(
    "tfds:NAME",
    "a TFDS dataset prepared as ArrayRecord: tfds build NAME --file_format=array_record",
    lambda arg, split, opts: load_tfds(arg, split, data_dir=opts.get("tfds_data_dir")),
    lambda arg, split, opts: tfds_family.tfds_has_labelled_split(arg, split, opts.get("tfds_data_dir")),
  ),
}


def _family(spec: str) -> tuple[_Family, str | None]:
  prefix, colon, arg = str(spec).partition(":")
  fam = _FAMILIES.get(prefix)
  if fam is None or fam.takes_arg != bool(colon):
    supported = ", ".join(f'"{f.form}" ({f.description})' for f in _FAMILIES.values())
    raise DataError(f"Unknown data source spec {spec!r}. Supported: {supported}.")
  if fam.takes_arg and not arg:
    what = fam.form.partition(":")[2].lower()
    raise DataError(f'{prefix} spec must be "{fam.form}", got an empty {what}.')
  return fam, (arg if fam.takes_arg else None)


def load_source(spec: str, split: str, *, tfds_data_dir: str | None = None):
  """The source for ``spec`` and ``split``: an :class:`ArraySource` for ``"digits"`` and ``"npz:"``, a
  :class:`FolderSource` / :class:`TarFolderSource` for ``"folder:"``, a :class:`TfdsSource` for ``"tfds:"`` (read
  from ``tfds_data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``).

  Raises DataError (one line naming the spec or file and what was expected) for an unknown spec or an unusable
  file; MissingDataError (a DataError and a FileNotFoundError) for a file or split that does not exist.
  """
  fam, arg = _family(spec)
  return fam.load(arg, split, {"tfds_data_dir": tfds_data_dir})


def has_labelled_split(spec: str, split: str, *, tfds_data_dir: str | None = None) -> bool:
  """Whether ``load_source(spec, split)`` gives a split with labels (``num_classes > 0``), without decoding
  anything: directory listings (a tar's member index), an npz's key list or TFDS's dataset_info.

  False when the split does not exist or has no labels (a flat image folder, an npz without
  ``"<split>_labels"``). Raises DataError for a spec that cannot be read at all (unknown form, missing path or
  dataset), so that a typo is reported rather than taken for unlabelled data. k-NN and linear evaluation need
  both ``has_labelled_split(spec, "train")`` and ``has_labelled_split(spec, "test")``.
  """
  fam, arg = _family(spec)
  return bool(fam.has_labelled_split(arg, split, {"tfds_data_dir": tfds_data_dir}))


def eval_example(source, index: int) -> dict | None:
  """Example ``index`` of ``source`` for evaluation: None when its image is undecodable (a decoding source's
  ``try_example``), never a replacement. Sources that cannot fail (arrays, or any object without
  ``try_example``) answer ``source[index]``."""
  try_example = getattr(source, "try_example", None)
  return try_example(index) if try_example is not None else source[int(index)]


def from_config(data_cfg, split: str, *, evaluation: bool = False):
  """``load_source`` of a config's ``data`` block: ``data.source`` (training), or for ``evaluation``
  ``data.eval_source`` when set (the labelled data the evaluators read; "" = ``data.source``); tfds specs read
  ``data.tfds_data_dir`` (or $TFDS_DATA_DIR)."""
  return load_source(
    eval_spec(data_cfg) if evaluation else data_cfg.source, split, tfds_data_dir=data_cfg.get("tfds_data_dir") or None
  )


def eval_spec(data_cfg) -> str:
  """The data the evaluators read: ``data.eval_source``, else ``data.source``."""
  return data_cfg.get("eval_source", "") or data_cfg.source
