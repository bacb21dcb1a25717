"""The ``tfds:NAME`` source: a TFDS dataset prepared as ArrayRecord, read with ``tfds.data_source``.

Owns :class:`TfdsSource`, :func:`load_tfds`, :func:`tfds_has_labelled_split` and the mapping of our split names
onto TFDS's (:func:`tfds_split_for`). Random access needs no TensorFlow at read time; building image datasets does
(``tfds build NAME --file_format=array_record``). Decoding, replacing and counting undecodable examples is
:class:`~simdino_jax.data.sources.base.SkippingSource`'s.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from simdino_jax.data.sources.base import DataError, MissingDataError, SkippingSource, _lock, array_to_rgb, decode_image

# Which TFDS split serves our "test" split, in order of preference: the labelled held-out split. imagenet2012 has
# "validation" (50k, labelled) and a "test" split without labels, so "validation" comes first.
_TFDS_SPLITS = {
  "train": ("train",),
  "test": ("validation", "test"),
  "val": ("validation", "test"),
  "validation": ("validation", "test"),
}
_TFDS_MAX_BAD_RUN = 64  # consecutive undecodable examples before giving up


def tfds_split_for(split: str, available, name: str = "?") -> str:
  """The TFDS split to read for our ``split`` (``"train"`` or ``"test"``).

  ``"test"`` (or ``"val"``) maps to ``"validation"`` when the dataset has one, else to ``"test"``. ``available``
  lists the dataset's splits; when it is empty (unknown, e.g. a mocked dataset) the preferred name is returned and
  TFDS checks it. Raises MissingDataError (a DataError) when none of the candidates exists.
  """
  cands = _TFDS_SPLITS.get(split, (split,))
  available = sorted(available)
  if not available:
    return cands[0]
  for c in cands:
    if c in available:
      return c
  raise MissingDataError(
    f"data source {name!r}: no split for our {split!r} split (looked for "
    f"{' or '.join(map(repr, cands))}); the dataset has splits {available}."
  )


def _tfds_where(data_dir: str | None) -> str:
  return data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"


def _tfds_build_hint(name: str, data_dir: str | None) -> str:
  extra = " --manual_dir=DIR_WITH_ILSVRC2012_TARS" if name.startswith("imagenet2012") else ""
  return (
    f"prepare it with `tfds build {name} --file_format=array_record --data_dir={_tfds_where(data_dir)}{extra}` "
    "(see launch/prepare_data.sh; building image datasets needs TensorFlow, reading them does not)"
  )


class TfdsSource(SkippingSource):
  """Random-access source over one split of a TFDS ArrayRecord dataset.

  Reads records with ``tfds.data_source`` (no TensorFlow). An ``Image`` feature is read as its encoded bytes
  (``tfds.decode.SkipDecoding``) and decoded here like the folder source
  (:func:`~simdino_jax.data.sources.base.decode_image`); any other image feature must decode to a uint8 or uint16
  (H, W[, 1|3|4]) array (:func:`~simdino_jax.data.sources.base.array_to_rgb`). Labels are the ``label`` feature
  (int32); a dataset without one is unlabelled (labels -1, ``num_classes`` 0).

  An example that cannot be read or decoded is replaced by ``source[i]`` and left out by ``try_example(i)``
  (:class:`~simdino_jax.data.sources.base.SkippingSource`); more than 64 consecutive failures raise (a broken
  dataset, not a bad image).

  Pickles without the open data source (grain worker processes reopen it). Processes share nothing: each JAX process
  reads only its own rows of every global batch (``pipeline.train_dataset``), as for every source.

  Attributes:
    name: e.g. ``"tfds:imagenet2012/validation"``.
    tfds_name, split: the dataset name and the TFDS split read.
    data_dir: the TFDS data directory given (None: TFDS's default).
    num_classes: ``label``'s ``ClassLabel.num_classes`` (else max label + 1; 0 without labels).
    labels: ``(N,)`` int32, read on first access (one pass over the records).
    file_name(i): record i's ``file_name`` feature, where the dataset has one (imagenet2012 does).
    skipped: distinct undecodable examples found by this object in this process.
  """

  _PROCESS_LOCAL = SkippingSource._PROCESS_LOCAL + ("_ds", "_ds_pid")
  _max_bad_run = _TFDS_MAX_BAD_RUN  # a longer run is a broken dataset, not a bad image

  def __init__(self, tfds_name: str, split: str, data_dir: str | None, data_source, num_classes: int | None = None):
    self.tfds_name = tfds_name
    self.split = split
    self.data_dir = data_dir
    self.name = f"tfds:{tfds_name}/{split}"
    features = data_source.dataset_info.features
    keys = sorted(features.keys())
    if "image" not in keys:
      raise DataError(
        f"data source 'tfds:{tfds_name}': the dataset has no 'image' feature (features: {keys}); the "
        "tfds source reads 'image' and, when present, 'label'."
      )
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    # Image features: read the encoded bytes and decode them here.
    self._encoded = isinstance(features["image"], tfds.features.Image)
    self._labelled = "label" in keys
    self._file_names = "file_name" in keys  # imagenet2012's "n01440764_10026.JPEG" (few-shot split lists)
    self._len = len(data_source)
    self._ds = data_source
    self._ds_pid = os.getpid()
    if num_classes is None:
      label = features["label"] if self._labelled else None
      if isinstance(label, tfds.features.ClassLabel):
        num_classes = label.num_classes
      else:
        num_classes = int(self.labels.max()) + 1 if self._len and self.labels.max() >= 0 else 0
    self.num_classes = int(num_classes)
    self._reset_process_state()

  def __setstate__(self, state):
    super().__setstate__(state)
    self._ds = self._ds_pid = None  # reopened lazily in this process

  def _data_source(self):
    if self._ds is None or self._ds_pid != os.getpid():
      with _lock:
        if self._ds is None or self._ds_pid != os.getpid():
          self._ds = _open_tfds(self.tfds_name, self.split, self.data_dir, self._encoded)
          self._ds_pid = os.getpid()
    return self._ds

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    return f"TfdsSource(name={self.name!r}, n={len(self)}, num_classes={self.num_classes})"

  def _label(self, ex) -> np.int32:
    return np.int32(ex["label"]) if self._labelled else np.int32(-1)

  @functools.cached_property
  def labels(self) -> np.ndarray:
    ds = self._data_source()
    labels = np.array([self._label(ds[i]) for i in range(len(self))], np.int32)
    labels.flags.writeable = False
    return labels

  def file_name(self, index: int) -> str:
    """Record ``index``'s ``file_name`` feature (e.g. imagenet2012's ``"n01440764_10026.JPEG"``); DataError when the
    dataset has none. Reads the whole record (image bytes included), as ``labels`` does."""
    if not self._file_names:
      raise DataError(f"{self.name}: the dataset has no 'file_name' feature")
    name = self._data_source()[int(index)]["file_name"]
    return name.decode("utf-8") if isinstance(name, (bytes, np.bytes_)) else str(name)

  def decode(self, index: int) -> tuple[np.ndarray, np.int32]:
    """Record ``index`` as ``((H, W, 3) uint8, int32 label)``; raises if it cannot be read or decoded."""
    ex = self._data_source()[index]
    what = f"{self.name}[{index}]"
    if self._encoded:
      image = ex["image"]
      if not isinstance(image, (bytes, np.bytes_)):
        raise DataError(f"{what}: expected encoded image bytes, got {type(image).__name__}")
      image = decode_image(bytes(image))
    else:
      image = array_to_rgb(ex["image"], what)
    return image, self._label(ex)

  def _example(self, index: int) -> tuple[np.ndarray, np.int32]:
    return self.decode(index)

  def _describe(self, index: int) -> str:
    return f"example {index}"


def _open_tfds(name: str, split: str, data_dir: str | None, encoded: bool):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  decoders = {"image": tfds.decode.SkipDecoding()} if encoded else None
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=decoders)


def _builder(name: str, data_dir: str | None):
  """``(builder, data_dir)``; DataError naming the spec when TFDS knows no such dataset."""
  if not name:
    raise DataError('tfds spec must be "tfds:NAME", got an empty name.')
  # Read here, not by TFDS: it reads $TFDS_DATA_DIR once, when it is imported.
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return tfds.builder(name, data_dir=data_dir), data_dir
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(
      f"data source 'tfds:{name}': no dataset {name!r} in {_tfds_where(data_dir)!r} and no TFDS builder of that "
      f"name; check the name, the data directory (config.data.tfds_data_dir or $TFDS_DATA_DIR), or "
      f"{_tfds_build_hint(name, data_dir)}."
    ) from None


def tfds_has_labelled_split(name: str, split: str, data_dir: str | None = None) -> bool:
  """Whether the dataset has a split for our ``split`` and a ``label`` feature; reads dataset_info only. A
  dataset TFDS does not know raises DataError (a wrong name is not mistaken for unlabelled data)."""
  builder, _ = _builder(name, data_dir)
  try:
    tfds_split_for(split, list(builder.info.splits.keys()), f"tfds:{name}")
  except MissingDataError:
    return False
  return "label" in builder.info.features


def load_tfds(name: str, split: str, data_dir: str | None = None, *, exact: bool = False) -> TfdsSource:
  """Our ``split`` (``"train"``/``"test"``) of the TFDS dataset ``name``; ``exact``: ``split`` is TFDS's own split
  name, read as is (the transfer evaluator reads ``test`` of datasets that also have a ``validation`` split).

  ``name`` may carry a config and version as TFDS spells them (``imagenet2012``, ``imagenette/full-size-v2:1.0.0``).
  ``data_dir``: the TFDS data directory (local or ``gs://``); None uses ``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets``. The dataset must already be prepared as ArrayRecord (``tfds build NAME
  --file_format=array_record``); nothing is downloaded or built here. ``"test"`` reads ``validation`` when the
  dataset has it, else ``test`` (:func:`tfds_split_for`).

  Raises:
    DataError: unknown dataset, no such split (the message lists the splits), no ``image`` feature, or prepared in
      another file format.
    MissingDataError (also a FileNotFoundError): the dataset is known to TFDS but not prepared in ``data_dir``.
  """
  builder, data_dir = _builder(name, data_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  spec = f"tfds:{name}"
  available = list(builder.info.splits.keys())
  if exact and available and split not in available:
    raise MissingDataError(f"data source {spec!r}: no split {split!r}; the dataset has splits {sorted(available)}.")
  tfds_split = split if exact else tfds_split_for(split, available, spec)
  features = builder.info.features
  encoded = "image" in features and isinstance(features["image"], tfds.features.Image)
  try:
    ds = _open_tfds(name, tfds_split, data_dir, encoded)
  except Exception as e:  # pylint: disable=broad-except
    if not builder.is_prepared():
      raise MissingDataError(
        f"data source {spec!r}: the dataset is not prepared in {builder.data_dir!r}; "
        f"{_tfds_build_hint(name, data_dir)}."
      ) from e
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise DataError(
        f"data source {spec!r}: {builder.data_dir!r} holds the {builder.info.file_format.value} "
        f"format, but random access needs ArrayRecord; rebuild into another data directory: "
        f"{_tfds_build_hint(name, data_dir)}."
      ) from e
    raise
  if len(ds) == 0:
    raise DataError(f"data source {spec!r}: split {tfds_split!r} is empty.")
  return TfdsSource(name, tfds_split, data_dir, ds)
