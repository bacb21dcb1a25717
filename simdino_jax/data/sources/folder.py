"""The ``folder:PATH`` source: image files in a directory tree or an uncompressed ``.tar``, decoded on access.

Owns the layout rules (:func:`load_folder`, :func:`folder_has_labelled_split`), :class:`FolderSource` (files in a
directory) and :class:`TarFolderSource` (members of a tar, read by offset). Decoding, replacing and counting
undecodable files is :class:`~simdino_jax.data.sources.base.SkippingSource`'s.

Layouts (``<root>`` is ``PATH``, the tar's top level, or the only subdirectory of either when that holds the split
directories, e.g. ``imagenette224-mini/train/...``):

* labelled: ``<root>/<split>/<class>/<image>``; label = index of ``<class>`` in the sorted union of the class
  directories of all ``train``/``test``/``val`` split directories (so labels agree between splits).
* unlabelled split: ``<root>/<split>/<image>``, image files directly in the split directory (subdirectories are
  read too, not as classes); labels -1, ``num_classes`` 0.
* unlabelled tree: no ``train``/``test``/``val`` directory at all (a flat folder of images, or any class-less or
  class-ignored tree): every image below ``PATH`` is the ``"train"`` split (labels -1, ``num_classes`` 0), the
  normal case of self-supervised pre-training; there is no evaluation split.

Images: ``.jpg``, ``.jpeg``, ``.png`` files (any case); names starting with ``"."`` are ignored.
"""

from __future__ import annotations

import os
import posixpath
import tarfile

import numpy as np

from simdino_jax.data.sources.base import DataError, MissingDataError, SkippingSource, _lock, decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # matched case-insensitively
KNOWN_SPLITS = ("train", "test", "val")
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"(\xb5/\xfd": "zstd"}
_MAX_LISTED = 20  # entries quoted in error messages
_LAYOUT = "<root>/<split>/<class>/<image> (labelled), <root>/<split>/<image> or a flat folder (unlabelled)"


def split_dir_candidates(split: str) -> tuple[str, ...]:
  """Directory names accepted for ``split``, in order of preference.

  ``"test"`` is read from ``test/`` or, when there is none, ``val/``; ``"val"`` from ``val/`` or else ``test/``;
  any other split from the directory of the same name.
  """
  if split == "test":
    return ("test", "val")
  if split == "val":
    return ("val", "test")
  return (split,)


def _is_image_name(name: str) -> bool:
  return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _listing(names) -> str:
  names = sorted(names)
  more = len(names) - _MAX_LISTED
  shown = names[:_MAX_LISTED] + ([f"... ({more} more)"] if more > 0 else [])
  return "[" + ", ".join(shown) + "]" if names else "nothing"


def _contents(dirs, files) -> str:
  parts = [f"{what} {_listing(names)}" for what, names in (("directories", dirs), ("files", files)) if names]
  return " and ".join(parts) or "nothing"


# ----------------------------------------------------------------------------
# Sources


class FolderSource(SkippingSource):
  """Random-access source over image files, decoded on access.

  ``source[i]`` reads file ``i`` and decodes it (:func:`~simdino_jax.data.sources.base.decode_image`: every PIL
  mode to 8-bit RGB, alpha over white, EXIF orientation applied). Files are ordered by class, then by path. An
  undecodable file is replaced by ``source[i]`` and left out by ``try_example(i)``; see
  :class:`~simdino_jax.data.sources.base.SkippingSource`. ``labels[i]`` is file ``i``'s own label.

  Attributes:
    labels: ``(N,)`` int32 class indices, -1 for an unlabelled split (read-only).
    num_classes: number of classes (``len(class_names)``; 0 when unlabelled).
    class_names: sorted class directory names; label = index in this tuple (empty when unlabelled).
    name: e.g. ``"folder:/data/imagenette/val"`` (the split directory used).
    path: the directory or tar file given.
    split_dir: path of the split directory used, relative to ``path`` ("" for an unlabelled tree).
    skipped: distinct undecodable files found by this object in this process.
  """

  def __init__(self, path: str, split_dir: str, class_names, files: np.ndarray, labels: np.ndarray):
    labels = np.asarray(labels, np.int32).view()
    labels.flags.writeable = False
    if labels.shape != (len(files),):
      raise DataError(f"folder:{path}: {len(files)} files but labels {labels.shape}.")
    self.path = path
    self.split_dir = split_dir
    self.class_names = tuple(class_names)
    self.num_classes = len(self.class_names)
    self.labels = labels
    self.name = f"folder:{path}/{split_dir}" if split_dir else f"folder:{path}"
    # "S" array of UTF-8 paths (compact when pickled); undecodable bytes in file names survive as surrogate
    # escapes, as in os.fsencode on Linux.
    self._files = files
    self._reset_process_state()

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def __repr__(self) -> str:
    return f"{type(self).__name__}(name={self.name!r}, n={len(self)}, num_classes={self.num_classes})"

  def file_name(self, index: int) -> str:
    """File ``index``: its path relative to the split directory, or for a tar its member name."""
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
    return decode_image(self.read_bytes(index))

  def _example(self, index: int) -> tuple[np.ndarray, np.int32]:
    return self.decode(index), self.labels[index]

  def _describe(self, index: int) -> str:
    return self.image_path(index)


class TarFolderSource(FolderSource):
  """A :class:`FolderSource` reading members of an uncompressed tar file.

  The member offsets are indexed once (and cached in memory per tar file); bytes are read with ``os.pread`` on a
  file descriptor opened lazily per process (so the source pickles to grain worker processes, which reopen it).
  """

  def __init__(self, path, split_dir, class_names, files, labels, offsets: np.ndarray, sizes: np.ndarray):
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


# ----------------------------------------------------------------------------
# Trees: a directory or a tar seen through the same two questions


class _DirTree:
  """A directory: ``children(rel) -> (dirs, files)`` and ``images(rel)`` (image paths below ``rel``, relative to
  the tree's top, "/"-joined)."""

  def __init__(self, path: str):
    self.path = path

  def children(self, rel: str):
    dirs, files = [], []
    top = os.path.join(self.path, rel)
    if not os.path.isdir(top):
      return [], []
    with os.scandir(top) as it:
      for e in it:
        (dirs if e.is_dir() else files).append(e.name)
    return sorted(dirs), sorted(files)

  def images(self, rel: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(self.path, rel), followlinks=True):
      dirnames[:] = [d for d in dirnames if not d.startswith(".")]
      rel_dir = os.path.relpath(dirpath, self.path).replace(os.sep, "/")
      rel_dir = "" if rel_dir == "." else rel_dir
      out.extend(posixpath.join(rel_dir, f) for f in filenames if _is_image_name(f))
    return out


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
      raise DataError(
        f"data source 'folder:{path}' is a {kind}-compressed file; random access needs an uncompressed "
        ".tar (decompress it first, e.g. `gunzip -k`)."
      )
  names, offsets, sizes, dir_names = [], [], [], []
  try:
    with tarfile.open(path, "r:") as tf:
      count = 0
      while True:
        m = tf.next()
        if m is None:
          break
        name = posixpath.normpath(m.name.lstrip("/")).removeprefix("./")
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
    raise DataError(
      f"data source 'folder:{path}': neither a directory nor a readable uncompressed tar file "
      f"({type(e).__name__}: {e})."
    ) from e
  index = (names, np.array(offsets, np.int64), np.array(sizes, np.int64), dir_names)
  if len(_TAR_INDEX_CACHE) >= 4:
    _TAR_INDEX_CACHE.pop(next(iter(_TAR_INDEX_CACHE)))
  _TAR_INDEX_CACHE[key] = index
  return index


class _TarTree:
  """A tar file's members, as :class:`_DirTree` sees a directory."""

  def __init__(self, path: str):
    self.path = path
    self.names, self.offsets, self.sizes, dir_names = _tar_index(path)
    self.member = {n: i for i, n in enumerate(self.names)}
    # Children of the top three levels (enough for <root>/<split>/<class>).
    self._tree: dict[str, tuple[set, set]] = {}
    for n in dir_names:
      if n != ".":
        self._add(n, True)
    for n in self.names:
      self._add(n, False)

  def _add(self, name, is_dir):
    parts = name.split("/")
    for d in range(min(len(parts), 4)):
      dirs, files = self._tree.setdefault("/".join(parts[:d]), (set(), set()))
      (dirs if d < len(parts) - 1 or is_dir else files).add(parts[d])

  def children(self, rel: str):
    dirs, files = self._tree.get(rel, ((), ()))
    return sorted(dirs), sorted(files)

  def images(self, rel: str) -> list[str]:
    prefix = rel + "/" if rel else ""
    return [
      n
      for n in self.names
      if n.startswith(prefix)
      and _is_image_name(posixpath.basename(n))
      and not any(p.startswith(".") for p in n[len(prefix) :].split("/")[:-1])
    ]


# ----------------------------------------------------------------------------
# Layout


def _open_tree(path: str):
  if not path:
    raise DataError('folder spec must be "folder:PATH", got an empty path.')
  if os.path.isdir(path):
    return _DirTree(path)
  if os.path.isfile(path):
    return _TarTree(path)
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(parent):
    where = f"{parent!r} contains {_listing(os.listdir(parent))}"
  else:
    where = f"its parent directory {parent!r} does not exist either"
  raise MissingDataError(f"data source 'folder:{path}': {path!r} does not exist; {where}.")


def _find_root(tree, split: str) -> tuple[str, bool]:
  """``(root, has_splits)``: where the split directories are ("" = the top), and whether there are any."""
  wanted = set(KNOWN_SPLITS) | set(split_dir_candidates(split))
  dirs, files = tree.children("")
  if wanted & set(dirs):
    return "", True
  visible = [d for d in dirs if not d.startswith(".")]
  # One wrapping directory (a tar of "mydata/"): look inside it, unless images sit next to it at the top.
  if len(visible) == 1 and not any(_is_image_name(f) for f in files) and wanted & set(tree.children(visible[0])[0]):
    return visible[0], True
  return "", False


def _split_plan(tree, path: str, split: str):
  """``(split_rel, class_names or None (unlabelled), kind)`` for ``split``; raises MissingDataError when there
  is no such split. ``kind``: "labelled", "flat split" or "tree". Reads directory listings only (no walk)."""
  root, has_splits = _find_root(tree, split)
  if not has_splits:
    dirs, files = tree.children("")
    if not dirs and not files:
      raise MissingDataError(f"data source 'folder:{path}': {path!r} is empty; expected {_LAYOUT}.")
    if split != "train":
      raise MissingDataError(
        f"data source 'folder:{path}': no {split!r} split: {path!r} has no train/, test/ or val/ directory, so all "
        f"its images are one unlabelled 'train' split (it contains {_contents(dirs, files)}); a labelled "
        f"evaluation split needs <root>/<split>/<class>/<image>."
      )
    return "", None, "tree"
  dirs, _ = tree.children(root)
  cands = split_dir_candidates(split)
  found = [c for c in cands if c in dirs]
  if not found:
    where = posixpath.join(path, root) if root else path
    _, files = tree.children(root)
    raise MissingDataError(
      f"data source 'folder:{path}': no directory for split {split!r} (looked for "
      f"{' or '.join(repr(c + '/') for c in cands)} in {where!r}); it contains {_contents(dirs, files)}. "
      f"Expected layout: <root>/<split>/<class>/<image>."
    )
  split_rel = posixpath.join(root, found[0]) if root else found[0]
  _, sub_files = tree.children(split_rel)
  if any(_is_image_name(f) for f in sub_files):
    return split_rel, None, "flat split"
  classes = set()
  for d in sorted(set(KNOWN_SPLITS) | {found[0]}):
    if d in dirs:
      d_rel = posixpath.join(root, d) if root else d
      d_dirs, d_files = tree.children(d_rel)
      if not any(_is_image_name(f) for f in d_files):  # a flat (unlabelled) split has no classes
        classes.update(c for c in d_dirs if not c.startswith("."))
  return split_rel, sorted(classes), "labelled"


def load_folder(path: str, split: str) -> FolderSource:
  """The ``split`` of the image folder or tar ``path`` (see module doc for the layouts), decoded lazily.

  * Split directory: see :func:`split_dir_candidates`; in particular ``split="test"`` reads ``test/`` if it
    exists, else ``val/``.
  * A folder without split directories is one unlabelled ``"train"`` split; asking it for any other split raises.

  Raises:
    MissingDataError (a DataError and a FileNotFoundError): ``path`` or the split does not exist (the message
      lists what does).
    DataError: the split has no images, or the tar is compressed.
  """
  tree = _open_tree(path)
  split_rel, classes, kind = _split_plan(tree, path, split)
  images = tree.images(split_rel)
  if classes is None:
    pairs = sorted(("", n) for n in images)
    labels = np.full((len(pairs),), -1, np.int32)
    class_names = ()
  else:
    prefix = split_rel + "/"
    class_set = set(classes)
    pairs = sorted(
      (c, n) for n in images for c in [n[len(prefix) :].split("/", 1)[0]] if c in class_set and "/" in n[len(prefix) :]
    )
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[c] for c, _ in pairs], np.int32)
    class_names = classes
  if not pairs:
    where = posixpath.join(path, split_rel) if split_rel else path
    detail = (
      f"class subdirectories; classes found: {_listing(classes)}" if kind == "labelled" else "it or its subdirectories"
    )
    raise DataError(
      f"data source 'folder:{path}': {where!r} has no images ({'/'.join(IMAGE_EXTENSIONS)}, any "
      f"case) in {detail}. Expected {_LAYOUT}."
    )
  if isinstance(tree, _TarTree):
    member = np.array([tree.member[n] for _, n in pairs], np.int64)
    files = np.array([n.encode("utf-8", "surrogateescape") for _, n in pairs])
    return TarFolderSource(path, split_rel, class_names, files, labels, tree.offsets[member], tree.sizes[member])
  strip = len(split_rel) + 1 if split_rel else 0  # file names are relative to the split directory
  files = np.array([n[strip:].encode("utf-8", "surrogateescape") for _, n in pairs])
  return FolderSource(path, split_rel, class_names, files, labels)


def folder_has_labelled_split(path: str, split: str) -> bool:
  """Whether ``split`` of ``path`` exists with class directories (``<root>/<split>/<class>/``). Reads directory
  listings only (a tar's member index, cached for the load that follows); raises MissingDataError / DataError
  when ``path`` itself is missing or unreadable, so a wrong path is not mistaken for unlabelled data."""
  tree = _open_tree(path)
  try:
    split_rel, classes, _ = _split_plan(tree, path, split)
  except MissingDataError:
    if not tree.children("")[0] and not tree.children("")[1]:
      raise
    return False
  if classes is None:
    return False
  dirs, _ = tree.children(split_rel)
  return any(d in classes for d in dirs)
