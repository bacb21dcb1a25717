"""Image data sources for grain (in-memory arrays and lazily decoded folders).

A source is a grain ``RandomAccessDataSource`` (``__len__`` and ``__getitem__``)
returning ``{"image": (H, W, 3) uint8, "label": int32 scalar}``.

Supported specs (``load_source(spec, split)``):

* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1797 real
  images, no download). Values 0..16 are scaled to uint8 0..255, upsampled to
  32x32 with PIL bicubic and replicated to RGB. The train/test split is fixed
  (independent of any config seed): a permutation drawn with
  ``np.random.default_rng(0)``; the first 80% (1438 images) are ``"train"``,
  the remaining 359 ``"test"``.
* ``"npz:PATH"``: a ``.npz`` file with ``"<split>_images"`` and optionally
  ``"<split>_labels"``. Images may be uint8 ``(N, H, W, 3)``, grey ``(N, H, W)``
  or ``(N, H, W, 1)`` (replicated to RGB), or floating point in ``[0, 1]``
  (scaled by 255 and rounded).
* ``"folder:PATH"``: an image-folder tree ``<root>/<split>/<class>/<image>``
  (see :func:`load_folder`), either a directory or an uncompressed ``.tar``
  holding that tree, possibly under one top-level directory. Images are decoded
  lazily, on access, by a :class:`FolderSource`.
* ``"tfds:NAME"``: a TFDS dataset prepared as ArrayRecord files (``tfds build
  NAME --file_format=array_record``), read with ``tfds.data_source`` (random
  access, no TensorFlow at read time) by a :class:`TfdsSource`; see
  :func:`load_tfds`.

Every source returns ``{"image", "label"}`` examples; the lazily decoding ones
(folder, tfds) add ``"skipped"``: how many undecodable images were passed over
to produce that example (0 almost always), so that the count travels with the
data through grain worker processes to the trainer (``data/skipped``).
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import tarfile
import threading
import warnings

import numpy as np
from PIL import Image

DIGITS_SIZE = 32
DIGITS_TRAIN_FRACTION = 0.8
_SUPPORTED = (
    '"digits" (scikit-learn handwritten digits, upsampled to 32x32 RGB), '
    '"npz:PATH" (a .npz file with "<split>_images" and optional '
    '"<split>_labels"), "folder:PATH" (a directory or uncompressed .tar '
    'with <split>/<class>/<image> files) and "tfds:NAME" (a TFDS dataset '
    "prepared as ArrayRecord: tfds build NAME --file_format=array_record)"
)


class ArraySource:
  """A grain random-access data source over in-memory uint8 RGB images.

  Attributes:
    images: ``(N, H, W, 3)`` uint8 array (read-only).
    labels: ``(N,)`` int32 array, ``-1`` where there are no labels.
    num_classes: number of classes (``max(labels) + 1``; 0 without labels).
    name: a human-readable name, e.g. ``"digits/train"``.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray | None,
               name: str, num_classes: int | None = None):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(
          f"{name}: images must be uint8 (N, H, W, 3), got {images.dtype} "
          f"{images.shape}")
    n = images.shape[0]
    if labels is None:
      labels = np.full((n,), -1, np.int32)
    labels = np.asarray(labels)
    if labels.shape != (n,):
      raise ValueError(
          f"{name}: labels must have shape ({n},), got {labels.shape}")
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
    return (f"ArraySource(name={self.name!r}, n={len(self)}, "
            f"image_shape={self.images.shape[1:]}, "
            f"num_classes={self.num_classes})")


def load_source(spec: str, split: str, *, tfds_data_dir: str | None = None):
  """Returns the source for ``spec`` (see module doc) and ``split``.

  An ``ArraySource`` for ``"digits"`` and ``"npz:"``, a :class:`FolderSource`
  for ``"folder:"``, a :class:`TfdsSource` for ``"tfds:"`` (read from
  ``tfds_data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``);
  all have ``__len__``, ``__getitem__``, ``labels``, ``num_classes`` and
  ``name``.
  """
  if spec == "digits":
    return _load_digits(split)
  if spec.startswith("npz:"):
    return _load_npz(spec[len("npz:"):], split)
  if spec.startswith("folder:"):
    return load_folder(spec[len("folder:"):], split)
  if spec.startswith("tfds:"):
    return load_tfds(spec[len("tfds:"):], split, data_dir=tfds_data_dir)
  raise ValueError(f"Unknown data source spec {spec!r}. Supported: {_SUPPORTED}.")


# ----------------------------------------------------------------------------
# digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  raw = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  up = np.stack([
      np.asarray(Image.fromarray(im, mode="L").resize(
          (DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC)) for im in raw])
  rgb = np.repeat(up[..., None], 3, axis=-1)
  return rgb, d.target.astype(np.int32)


def digits_split_indices(split: str) -> np.ndarray:
  """Indices into ``load_digits()`` of the fixed ``"train"``/``"test"`` split."""
  if split not in ("train", "test"):
    raise ValueError(
        f'digits has splits "train" and "test", got {split!r}.')
  n = len(_digits_arrays()[0])
  perm = np.random.default_rng(0).permutation(n)
  n_train = int(round(DIGITS_TRAIN_FRACTION * n))
  return perm[:n_train] if split == "train" else perm[n_train:]


def _load_digits(split: str) -> ArraySource:
  idx = digits_split_indices(split)
  images, labels = _digits_arrays()
  return ArraySource(images[idx], labels[idx], name=f"digits/{split}",
                     num_classes=10)


# ----------------------------------------------------------------------------
# npz


def _load_npz(path: str, split: str) -> ArraySource:
  if not path:
    raise ValueError('npz spec must be "npz:PATH", got an empty path.')
  if not os.path.isfile(path):
    raise FileNotFoundError(f"npz data source: file {path!r} does not exist.")
  img_key, lbl_key = f"{split}_images", f"{split}_labels"
  with np.load(path, allow_pickle=False) as f:
    keys = sorted(f.files)
    if img_key not in keys:
      raise ValueError(
          f"npz data source {path!r}: key {img_key!r} for split {split!r} not "
          f"found; keys present: {keys}.")
    images = f[img_key]
    labels = f[lbl_key] if lbl_key in keys else None
  images = _npz_images_to_uint8_rgb(images, path, img_key)
  if labels is not None:
    if (not np.issubdtype(labels.dtype, np.integer)
        or labels.shape != (images.shape[0],)):
      raise ValueError(
          f"npz data source {path!r}: key {lbl_key!r} must be an integer "
          f"array of shape ({images.shape[0]},), got {labels.dtype} "
          f"{labels.shape}.")
  return ArraySource(images, labels, name=f"npz:{path}/{split}")


def _npz_images_to_uint8_rgb(x: np.ndarray, path: str, key: str) -> np.ndarray:
  expected = ("uint8 (N,H,W,3), (N,H,W) or (N,H,W,1), or floating point "
              "in [0, 1] with those shapes")
  def bad(what):
    return ValueError(
        f"npz data source {path!r}: key {key!r} has {what}; expected {expected}.")
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


# ----------------------------------------------------------------------------
# folder: a <root>/<split>/<class>/<image> tree, in a directory or a .tar

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # matched case-insensitively
_KNOWN_SPLITS = ("train", "test", "val")
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz",
                     b"(\xb5/\xfd": "zstd"}
_MAX_LISTED = 20  # entries quoted in error messages

_lock = threading.Lock()  # counters, warnings and lazy file opening
_skipped_total = 0


class CorruptImageWarning(UserWarning):
  """An image file could not be decoded; another example was returned."""


def _count_skip(source, index: int, error: Exception | None) -> bool:
  """Counts one pass over the bad example ``index`` of ``source`` (its
  ``skipped``, ``_bad`` and the module total); True the first time ``index``
  fails to decode in this process (time to warn)."""
  global _skipped_total
  with _lock:
    source.skipped += 1
    _skipped_total += 1
    first = error is not None and index not in source._bad  # pylint: disable=protected-access
    source._bad.add(index)  # pylint: disable=protected-access
  return first


def num_skipped() -> int:
  """Undecodable images passed over by all folder and tfds sources in this
  process.

  Counts per process: with grain worker processes (``num_workers > 0``) the
  decoding, and hence the count, happens in the workers; the per-example
  ``"skipped"`` field is what reaches the trainer from there.
  """
  return _skipped_total


class _SkippingSource:
  """What the decoding sources (folder, tar, tfds) share: ``source[i]`` returns example ``i``, or, when it cannot be
  read or decoded, the next one that can (``i + 1, i + 2, ...`` cyclically, so the replacement is deterministic),
  with ``"skipped"`` = the number of bad examples passed over; each bad example is warned about once per process
  and counted (``skipped``, :func:`num_skipped`). The per-process state is never pickled, so grain worker processes
  start from zero.

  Subclasses define ``name``, ``__len__``, ``_example(j) -> (image, label)`` (raising on a bad example) and
  ``_describe(j)`` (what the warning names); ``_max_bad_run`` bounds a run of consecutive bad examples (None: try
  every example before giving up).
  """

  _PROCESS_LOCAL = ("skipped", "_bad")
  _max_bad_run: int | None = None

  def _reset_process_state(self) -> None:
    self.skipped = 0
    self._bad = set()

  def __getstate__(self):
    state = self.__dict__.copy()
    for k in self._PROCESS_LOCAL:
      state.pop(k, None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset_process_state()

  def num_skipped(self) -> int:
    """``skipped``: undecodable examples passed over by this object (process)."""
    return self.skipped

  def __getitem__(self, index) -> dict:
    n = len(self)
    index = int(index)
    if not -n <= index < n:
      raise IndexError(f"{self.name}: index {index} out of range for {n} examples.")
    tries = n if self._max_bad_run is None else min(n, self._max_bad_run + 1)
    last_error = None
    for k in range(tries):
      j = (index + k) % n
      if j in self._bad:
        _count_skip(self, j, None)
        continue
      try:
        image, label = self._example(j)
      except Exception as e:  # pylint: disable=broad-except
        last_error = e
        if _count_skip(self, j, e):
          warnings.warn(
              f"{self.name}: cannot decode {self._describe(j)} ({type(e).__name__}: {e}); returning the next "
              f"decodable example instead (counted in {type(self).__name__}.skipped and sources.num_skipped()).",
              CorruptImageWarning, stacklevel=2)
        continue
      return {"image": image, "label": label, "skipped": np.int32(k)}
    raise RuntimeError(
        f"{self.name}: examples {index} .. {index + tries - 1} (mod {n}) cannot be read or decoded; the last error: "
        f"{type(last_error).__name__}: {last_error}") from last_error


def decode_rgb(data: bytes) -> np.ndarray:
  """Encoded image bytes -> ``(H, W, 3)`` uint8 with PIL; raises if they do
  not decode. ``.convert("RGB")`` turns greyscale, CMYK, palette and RGBA
  images into RGB (and forces the full decode, so truncation raises here)."""
  with Image.open(io.BytesIO(data)) as im:
    rgb = im.convert("RGB")
  image = np.asarray(rgb)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"decoded to {image.dtype} {image.shape}")
  return image


def split_dir_candidates(split: str) -> tuple[str, ...]:
  """Directory names accepted for ``split``, in order of preference.

  ``"test"`` is read from ``test/`` or, when there is none, ``val/``;
  ``"val"`` from ``val/`` or else ``test/``; any other split from the
  directory of the same name.
  """
  if split == "test":
    return ("test", "val")
  if split == "val":
    return ("val", "test")
  return (split,)


def _is_image_name(name: str) -> bool:
  return (not name.startswith(".")
          and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)


def _listing(names) -> str:
  names = sorted(names)
  more = len(names) - _MAX_LISTED
  shown = names[:_MAX_LISTED] + ([f"... ({more} more)"] if more > 0 else [])
  return "[" + ", ".join(shown) + "]" if names else "nothing"


def _contents(dirs, files) -> str:
  parts = [f"{what} {_listing(names)}"
           for what, names in (("directories", dirs), ("files", files)) if names]
  return " and ".join(parts) or "nothing"


class FolderSource(_SkippingSource):
  """Random-access source over an image-folder tree, decoded on access.

  ``source[i]`` reads file ``i`` and decodes it with PIL (``.convert("RGB")``,
  so greyscale, CMYK, palette and RGBA images come out as RGB; no EXIF
  rotation, like torchvision's ``ImageFolder``). Files are ordered by class,
  then by path.

  An undecodable file (corrupt, truncated, unreadable) does not raise: it is
  replaced by the next decodable example (``i + 1, i + 2, ...`` cyclically, so
  the replacement is deterministic) together with that example's label; a
  :class:`CorruptImageWarning` naming the file is issued once per file and
  process, and every pass over a bad file adds 1 to ``skipped`` and to the
  module-wide :func:`num_skipped`. Both counters are per process (they restart
  at 0 in unpickled copies, e.g. grain workers); the example itself carries
  the count of bad files passed over for it as ``"skipped"`` (int32), which
  does reach the trainer from any process. ``labels[i]`` is file ``i``'s own
  label.

  Attributes:
    labels: ``(N,)`` int32 class indices (read-only).
    num_classes: number of classes (``len(class_names)``).
    class_names: sorted class directory names; label = index in this tuple.
    name: e.g. ``"folder:/data/imagenette/val"`` (the split directory used).
    path: the directory or tar file given.
    split_dir: path of the split directory used, relative to ``path``.
    skipped: undecodable files passed over by this object in this process.
  """

  def __init__(self, path: str, split_dir: str, class_names, files: np.ndarray,
               labels: np.ndarray):
    labels = np.asarray(labels, np.int32).view()
    labels.flags.writeable = False
    if labels.shape != (len(files),):
      raise ValueError(f"{len(files)} files but labels {labels.shape}.")
    self.path = path
    self.split_dir = split_dir
    self.class_names = tuple(class_names)
    self.num_classes = len(self.class_names)
    self.labels = labels
    self.name = f"folder:{path}/{split_dir}"
    # "S" array of UTF-8 paths (compact when pickled); undecodable bytes in
    # file names survive as surrogate escapes, as in os.fsencode on Linux.
    self._files = files
    self._reset_process_state()

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, "
            f"num_classes={self.num_classes})")

  def file_name(self, index: int) -> str:
    """File ``index``: its path relative to the split directory, or for a tar
    its member name."""
    return self._files[int(index)].decode("utf-8", "surrogateescape")

  def image_path(self, index: int) -> str:
    """Where file ``index`` lives, for messages."""
    return os.path.join(self.path, self.split_dir, self.file_name(index))

  def read_bytes(self, index: int) -> bytes:
    """The encoded bytes of file ``index``."""
    with open(self.image_path(index), "rb") as f:
      return f.read()

  def decode(self, index: int) -> np.ndarray:
    """File ``index`` as ``(H, W, 3)`` uint8; raises if it cannot be decoded."""
    return decode_rgb(self.read_bytes(index))

  def _example(self, index: int) -> tuple[np.ndarray, np.int32]:
    return self.decode(index), self.labels[index]

  def _describe(self, index: int) -> str:
    return self.image_path(index)


class TarFolderSource(FolderSource):
  """A :class:`FolderSource` reading members of an uncompressed tar file.

  The member offsets are indexed once (and cached in memory per tar file);
  bytes are read with ``os.pread`` on a file descriptor opened lazily per
  process (so the source pickles to grain worker processes, which reopen it).
  """

  def __init__(self, path, split_dir, class_names, files, labels,
               offsets: np.ndarray, sizes: np.ndarray):
    super().__init__(path, split_dir, class_names, files, labels)
    self._offsets = np.asarray(offsets, np.int64)
    self._sizes = np.asarray(sizes, np.int64)
    self._fd = None
    self._fd_pid = None

  def __getstate__(self):
    state = super().__getstate__()
    state["_fd"] = state["_fd_pid"] = None
    return state

  def image_path(self, index: int) -> str:
    return f"{self.path}:{self.file_name(index)}"

  def _descriptor(self) -> int:
    pid = os.getpid()
    if self._fd is None or self._fd_pid != pid:
      with _lock:
        if self._fd is None or self._fd_pid != pid:
          # After a fork the inherited descriptor stays open and unused here.
          self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
          self._fd_pid = pid
    return self._fd

  def read_bytes(self, index: int) -> bytes:
    fd = self._descriptor()
    offset, size = int(self._offsets[index]), int(self._sizes[index])
    chunks, got = [], 0
    while got < size:
      if hasattr(os, "pread"):
        chunk = os.pread(fd, size - got, offset + got)
      else:  # pragma: no cover (Windows)
        with _lock:
          os.lseek(fd, offset + got, os.SEEK_SET)
          chunk = os.read(fd, size - got)
      if not chunk:
        raise OSError(f"tar member ends early: {got} of {size} bytes.")
      chunks.append(chunk)
      got += len(chunk)
    return b"".join(chunks)

  def close(self) -> None:
    """Closes this process's file descriptor (reopened on the next read)."""
    fd, self._fd = self._fd, None
    if fd is not None and self._fd_pid == os.getpid():
      try:
        os.close(fd)
      except OSError:  # pragma: no cover
        pass

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  # pragma: no cover
      pass


def load_folder(path: str, split: str) -> FolderSource:
  """The ``split`` of an image-folder tree, as a lazily decoded source.

  ``path`` is a directory or an uncompressed ``.tar`` file containing
  ``<root>/<split>/<class>/<image>`` where ``<root>`` is ``path`` itself (the
  tar's top level) or, when that has no ``train``/``test``/``val`` directory,
  its only subdirectory (e.g. ``imagenette224-mini/train/...``).

  * Split directory: see :func:`split_dir_candidates`; in particular
    ``split="test"`` reads ``test/`` if it exists, else ``val/``.
  * Classes: the sorted union of the class directory names of all
    ``train``/``test``/``val`` split directories present (so labels agree
    between splits); label = index in that list.
  * Images: files with extension ``.jpg``, ``.jpeg`` or ``.png`` (any case)
    anywhere below a class directory; names starting with ``"."`` are ignored.

  Raises:
    FileNotFoundError: ``path`` or the split directory does not exist (the
      message lists what does).
    ValueError: the split has no images, or the tar is compressed.
  """
  if not path:
    raise ValueError('folder spec must be "folder:PATH", got an empty path.')
  if os.path.isdir(path):
    return _load_folder_dir(path, split)
  if os.path.isfile(path):
    return _load_folder_tar(path, split)
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(parent):
    where = f"{parent!r} contains {_listing(os.listdir(parent))}"
  else:
    where = f"its parent directory {parent!r} does not exist either"
  raise FileNotFoundError(
      f"folder data source: {path!r} does not exist; {where}.")


def _choose_split(path: str, split: str, children) -> tuple[str, str, list[str]]:
  """Finds ``(root, split_dir, class_names)`` given ``children(rel) -> (dirs,
  files)`` of the tree (``rel`` is "" or a "/"-joined relative path)."""
  dirs, files = children("")
  root = ""
  wanted = set(_KNOWN_SPLITS) | set(split_dir_candidates(split))
  if not wanted & set(dirs):
    visible = [d for d in dirs if not d.startswith(".")]
    if len(visible) == 1:
      root = visible[0]
      dirs, files = children(root)
  cands = split_dir_candidates(split)
  found = [c for c in cands if c in dirs]
  where = posixpath.join(path, root) if root else path
  if not found:
    if not dirs and not files:
      raise FileNotFoundError(f"folder data source {where!r} is empty.")
    raise FileNotFoundError(
        f"folder data source {path!r}: no directory for split {split!r} "
        f"(looked for {' or '.join(repr(c + '/') for c in cands)} in "
        f"{where!r}); it contains {_contents(dirs, files)}. Expected layout: "
        "<root>/<split>/<class>/<image>.")
  split_rel = posixpath.join(root, found[0]) if root else found[0]
  classes = set()
  for d in sorted(set(_KNOWN_SPLITS) | {found[0]}):
    if d in dirs:
      sub, _ = children(posixpath.join(root, d) if root else d)
      classes.update(c for c in sub if not c.startswith("."))
  return root, split_rel, sorted(classes)


def _empty_split_error(path, split_rel, classes) -> ValueError:
  return ValueError(
      f"folder data source {path!r}: split directory {split_rel!r} has no "
      f"images ({'/'.join(IMAGE_EXTENSIONS)}, any case) in class "
      f"subdirectories; classes found: {_listing(classes)}. Expected layout: "
      "<root>/<split>/<class>/<image>.")


def _labelled(path, split_rel, classes, rel_files):
  """Sorted ``(files "S" array, labels)`` from ``(class, path)`` pairs."""
  if not rel_files:
    raise _empty_split_error(path, split_rel, classes)
  index = {c: i for i, c in enumerate(classes)}
  rel_files.sort()
  labels = np.array([index[c] for c, _ in rel_files], np.int32)
  files = np.array([f.encode("utf-8", "surrogateescape") for _, f in rel_files])
  return files, labels


def _load_folder_dir(path: str, split: str) -> FolderSource:
  def children(rel):
    dirs, files = [], []
    with os.scandir(os.path.join(path, rel)) as it:
      for e in it:
        (dirs if e.is_dir() else files).append(e.name)
    return sorted(dirs), sorted(files)
  _, split_rel, classes = _choose_split(path, split, children)
  split_path = os.path.join(path, split_rel)
  rel_files = []
  for c in classes:
    top = os.path.join(split_path, c)
    if not os.path.isdir(top):
      continue  # a class present in another split only
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
      dirnames[:] = [d for d in dirnames if not d.startswith(".")]
      rel_dir = os.path.relpath(dirpath, split_path)
      rel_files.extend((c, os.path.join(rel_dir, f)) for f in filenames
                       if _is_image_name(f))
  files, labels = _labelled(path, split_rel, classes, rel_files)
  return FolderSource(path, split_rel, classes, files, labels)


_TAR_INDEX_CACHE: dict = {}  # (abspath, size, mtime) -> index; a few entries


def _tar_index(path: str):
  """``(names, offsets, sizes, dir_names)`` of a tar's regular members."""
  st = os.stat(path)
  key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
  if key in _TAR_INDEX_CACHE:
    return _TAR_INDEX_CACHE[key]
  with open(path, "rb") as f:
    head = f.read(6)
  for magic, kind in _COMPRESSED_MAGIC.items():
    if head.startswith(magic):
      raise ValueError(
          f"folder data source {path!r} is a {kind}-compressed file; random "
          "access needs an uncompressed .tar (decompress it first, e.g. "
          "`gunzip -k`).")
  names, offsets, sizes, dir_names = [], [], [], []
  try:
    with tarfile.open(path, "r:") as tf:
      count = 0
      while True:
        m = tf.next()
        if m is None:
          break
        name = posixpath.normpath(m.name.lstrip("/"))
        if name.startswith("./"):
          name = name[2:]
        if m.isdir():
          dir_names.append(name)
        elif m.isreg() and not m.issparse():
          names.append(name)
          offsets.append(m.offset_data)
          sizes.append(m.size)
        count += 1
        if count % 8192 == 0 and isinstance(getattr(tf, "members", None), list):
          del tf.members[:]  # tarfile keeps every TarInfo; we need none
  except tarfile.TarError as e:
    raise ValueError(
        f"folder data source {path!r} is neither a directory nor a readable "
        f"uncompressed tar file ({type(e).__name__}: {e}).") from e
  index = (names, np.array(offsets, np.int64), np.array(sizes, np.int64),
           dir_names)
  if len(_TAR_INDEX_CACHE) >= 4:
    _TAR_INDEX_CACHE.pop(next(iter(_TAR_INDEX_CACHE)))
  _TAR_INDEX_CACHE[key] = index
  return index


def _load_folder_tar(path: str, split: str) -> TarFolderSource:
  names, offsets, sizes, dir_names = _tar_index(path)
  # Children of the top three levels (enough for <root>/<split>/<class>).
  tree: dict[str, tuple[set, set]] = {}
  def add(name, is_dir):
    parts = name.split("/")
    for d in range(min(len(parts), 4)):
      parent = "/".join(parts[:d])
      dirs, files = tree.setdefault(parent, (set(), set()))
      if d < len(parts) - 1 or is_dir:
        dirs.add(parts[d])
      else:
        files.add(parts[d])
  for n in dir_names:
    if n != ".":
      add(n, True)
  for n in names:
    add(n, False)
  def children(rel):
    dirs, files = tree.get(rel, ((), ()))
    return sorted(dirs), sorted(files)
  _, split_rel, classes = _choose_split(path, split, children)
  prefix = split_rel + "/"
  class_set = set(classes)
  rel_files = []
  for i, n in enumerate(names):
    if not n.startswith(prefix):
      continue
    parts = n[len(prefix):].split("/")
    if (len(parts) >= 2 and parts[0] in class_set and _is_image_name(parts[-1])
        and not any(p.startswith(".") for p in parts[1:-1])):
      rel_files.append((parts[0], n, i))
  if not rel_files:
    raise _empty_split_error(path, split_rel, classes)
  rel_files.sort()
  member = np.array([i for _, _, i in rel_files], np.int64)
  index = {c: k for k, c in enumerate(classes)}
  labels = np.array([index[c] for c, _, _ in rel_files], np.int32)
  files = np.array([n.encode("utf-8", "surrogateescape")
                    for _, n, _ in rel_files])
  return TarFolderSource(path, split_rel, classes, files, labels,
                         offsets[member], sizes[member])


# ----------------------------------------------------------------------------
# tfds: a TFDS dataset prepared as ArrayRecord, read with tfds.data_source

# Which TFDS split serves our "test" split, in order of preference: the
# labelled held-out split. imagenet2012 has "validation" (50k, labelled) and a
# "test" split without labels, so "validation" comes first.
_TFDS_SPLITS = {"train": ("train",), "test": ("validation", "test"),
                "val": ("validation", "test"),
                "validation": ("validation", "test")}
_TFDS_MAX_BAD_RUN = 64  # consecutive undecodable examples before giving up


def tfds_split_for(split: str, available, name: str = "?") -> str:
  """The TFDS split to read for our ``split`` (``"train"`` or ``"test"``).

  ``"test"`` (or ``"val"``) maps to ``"validation"`` when the dataset has one,
  else to ``"test"``. ``available`` lists the dataset's splits; when it is
  empty (unknown, e.g. a mocked dataset) the preferred name is returned and
  TFDS checks it.
  """
  cands = _TFDS_SPLITS.get(split, (split,))
  available = sorted(available)
  if not available:
    return cands[0]
  for c in cands:
    if c in available:
      return c
  raise ValueError(
      f"tfds data source {name!r}: no split for our {split!r} split (looked "
      f"for {' or '.join(map(repr, cands))}); the dataset has splits "
      f"{available}.")


def _tfds_where(data_dir: str | None) -> str:
  return data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"


def _tfds_build_hint(name: str, data_dir: str | None) -> str:
  extra = " --manual_dir=DIR_WITH_ILSVRC2012_TARS" if name.startswith("imagenet2012") else ""
  return (f"prepare it with `tfds build {name} --file_format=array_record "
          f"--data_dir={_tfds_where(data_dir)}{extra}` (see "
          "launch/prepare_data.sh; building image datasets needs TensorFlow, "
          "reading them does not)")


def _uint8_rgb(image, what: str) -> np.ndarray:
  """A decoded image feature (uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4))
  -> (H, W, 3) uint8, greyscale replicated and alpha dropped (as PIL's
  ``convert("RGB")`` does)."""
  x = np.asarray(image)
  if x.ndim == 2:
    x = x[..., None]
  if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
    raise ValueError(f"{what}: expected a uint8 (H, W[, 1|3|4]) image, got "
                     f"{x.dtype} {x.shape}")
  if x.shape[-1] == 1:
    return np.repeat(x, 3, axis=-1)
  return np.ascontiguousarray(x[..., :3])


class TfdsSource(_SkippingSource):
  """Random-access source over one split of a TFDS ArrayRecord dataset.

  Reads records with ``tfds.data_source`` (no TensorFlow). An ``Image`` feature
  is read as its encoded bytes (``tfds.decode.SkipDecoding``) and decoded here
  with PIL like the folder source (``.convert("RGB")``: greyscale, CMYK and
  palette images come out RGB); any other image feature must decode to uint8
  (H, W[, 1|3|4]). Labels are the ``label`` feature (int32).

  An example that cannot be read or decoded is replaced, like in
  :class:`FolderSource`, by the next one that can (cyclically), warned about
  once per example and process (:class:`CorruptImageWarning`) and counted in
  ``skipped``, :func:`num_skipped` and the example's ``"skipped"`` field. More
  than 64 consecutive failures raise (a broken dataset, not a bad image).

  Pickles without the open data source (grain worker processes reopen it).
  Processes share nothing: the training pipeline shards the element stream by
  JAX process (``pipeline.train_dataset``), as for every source.

  Attributes:
    name: e.g. ``"tfds:imagenet2012/validation"``.
    tfds_name, split: the dataset name and the TFDS split read.
    data_dir: the TFDS data directory given (None: TFDS's default).
    num_classes: ``label``'s ``ClassLabel.num_classes`` (else max label + 1).
    labels: ``(N,)`` int32, read on first access (one pass over the records).
    skipped: undecodable examples passed over by this object in this process.
  """

  _PROCESS_LOCAL = _SkippingSource._PROCESS_LOCAL + ("_ds", "_ds_pid")
  _max_bad_run = _TFDS_MAX_BAD_RUN  # a longer run is a broken dataset, not a bad image

  def __init__(self, tfds_name: str, split: str, data_dir: str | None,
               data_source, num_classes: int | None = None):
    self.tfds_name = tfds_name
    self.split = split
    self.data_dir = data_dir
    self.name = f"tfds:{tfds_name}/{split}"
    features = data_source.dataset_info.features
    keys = sorted(features.keys())
    for key in ("image", "label"):
      if key not in keys:
        raise ValueError(
            f"tfds data source {tfds_name!r}: the dataset has no {key!r} "
            f"feature (features: {keys}); the tfds source reads 'image' and "
            "'label'.")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    # Image features: read the encoded bytes and decode them here (PIL RGB).
    self._encoded = isinstance(features["image"], tfds.features.Image)
    self._len = len(data_source)
    self._ds = data_source
    self._ds_pid = os.getpid()
    if num_classes is None:
      label = features["label"]
      if isinstance(label, tfds.features.ClassLabel):
        num_classes = label.num_classes
      else:
        num_classes = int(self.labels.max()) + 1 if self._len else 0
    self.num_classes = int(num_classes)
    self._reset_process_state()

  def __setstate__(self, state):
    super().__setstate__(state)
    self._ds = self._ds_pid = None  # reopened lazily in this process

  def _data_source(self):
    if self._ds is None or self._ds_pid != os.getpid():
      with _lock:
        if self._ds is None or self._ds_pid != os.getpid():
          self._ds = _open_tfds(self.tfds_name, self.split, self.data_dir,
                                self._encoded)
          self._ds_pid = os.getpid()
    return self._ds

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    return (f"TfdsSource(name={self.name!r}, n={len(self)}, "
            f"num_classes={self.num_classes})")

  @functools.cached_property
  def labels(self) -> np.ndarray:
    ds = self._data_source()
    labels = np.array([int(ds[i]["label"]) for i in range(len(self))], np.int32)
    labels.flags.writeable = False
    return labels

  def decode(self, index: int) -> tuple[np.ndarray, np.int32]:
    """Record ``index`` as ``((H, W, 3) uint8, int32 label)``; raises if it
    cannot be read or decoded."""
    ex = self._data_source()[index]
    what = f"{self.name}[{index}]"
    if self._encoded:
      image = ex["image"]
      if not isinstance(image, (bytes, np.bytes_)):
        raise ValueError(f"{what}: expected encoded image bytes, got "
                         f"{type(image).__name__}")
      image = decode_rgb(bytes(image))
    else:
      image = _uint8_rgb(ex["image"], what)
    return image, np.int32(ex["label"])

  def _example(self, index: int) -> tuple[np.ndarray, np.int32]:
    return self.decode(index)

  def _describe(self, index: int) -> str:
    return f"example {index}"


def _open_tfds(name: str, split: str, data_dir: str | None, encoded: bool):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoders = {"image": tfds.decode.SkipDecoding()} if encoded else None
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                          decoders=decoders)


def load_tfds(name: str, split: str, data_dir: str | None = None) -> TfdsSource:
  """Our ``split`` (``"train"``/``"test"``) of the TFDS dataset ``name``.

  ``name`` may carry a config and version as TFDS spells them
  (``imagenet2012``, ``imagenette/full-size-v2:1.0.0``). ``data_dir``: the
  TFDS data directory (local or ``gs://``); None uses ``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets``. The dataset must already be prepared as
  ArrayRecord (``tfds build NAME --file_format=array_record``); nothing is
  downloaded or built here. ``"test"`` reads ``validation`` when the dataset
  has it, else ``test`` (:func:`tfds_split_for`).

  Raises:
    ValueError: unknown dataset, no such split (the message lists the splits),
      no ``image``/``label`` feature, or prepared in another file format.
    FileNotFoundError: the dataset is known to TFDS but not prepared in
      ``data_dir``.
  """
  if not name:
    raise ValueError('tfds spec must be "tfds:NAME", got an empty name.')
  # Read here, not by TFDS: it reads $TFDS_DATA_DIR once, when it is imported.
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  spec = f"tfds:{name}"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"tfds data source {spec!r}: no dataset {name!r} in "
        f"{_tfds_where(data_dir)!r} and no TFDS builder of that name; check the "
        f"name, the data directory (config.data.tfds_data_dir or "
        f"$TFDS_DATA_DIR), or {_tfds_build_hint(name, data_dir)}.") from None
  tfds_split = tfds_split_for(split, list(builder.info.splits.keys()), spec)
  features = builder.info.features
  encoded = "image" in features and isinstance(features["image"], tfds.features.Image)
  try:
    ds = _open_tfds(name, tfds_split, data_dir, encoded)
  except Exception as e:  # pylint: disable=broad-except
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"tfds data source {spec!r}: the dataset is not prepared in "
          f"{builder.data_dir!r}; {_tfds_build_hint(name, data_dir)}.") from e
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise ValueError(
          f"tfds data source {spec!r}: {builder.data_dir!r} holds the "
          f"{builder.info.file_format.value} format, but random access needs "
          f"ArrayRecord; rebuild into another data directory: "
          f"{_tfds_build_hint(name, data_dir)}.") from e
    raise
  if len(ds) == 0:
    raise ValueError(f"tfds data source {spec!r}: split {tfds_split!r} is empty.")
  return TfdsSource(name, tfds_split, data_dir, ds)
