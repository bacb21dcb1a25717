"""Tests for the "folder:PATH" data source (directory trees and tar files)."""

import gzip
import io
import os
import pickle
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image

from simdino_jax.data import sources
from simdino_jax.data.multicrop import MultiCropConfig
from simdino_jax.data.pipeline import train_iterator
from simdino_jax.data.sources import CorruptImageWarning, FolderSource, TarFolderSource, load_folder, load_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIRS = ("/work/shared/data", os.path.join(ROOT, "..", "shared", "data"))


def _real(rel):
  for d in DATA_DIRS:
    p = os.path.join(d, rel)
    if os.path.isfile(p):
      return p
  pytest.skip(
    f"real data {rel} not found under {' or '.join(DATA_DIRS)} (../shared/data exists only on the project machines)"
  )


def _rgb(seed, h=10, w=12):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def _smooth(h=10, w=12):
  y, x = np.mgrid[0:h, 0:w]
  img = np.stack([20 * y, 15 * x, 200 - 10 * (x + y)], -1)
  return np.clip(img, 0, 255).astype(np.uint8)


def _save(path, img: Image.Image, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path, format=fmt)


def _jpeg_bytes(img):
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


# Files of the train split in source order (class, then path) and their labels.
TRAIN_ORDER = [
  "cat/a.png",
  "cat/b.JPEG",
  "dog/c.png",
  "dog/d.jpg",
  "dog/e.png",
  "dog/zz_bad.jpg",
  "emu/f.jpg",
  "emu/g_trunc.jpg",
  "emu/nested/h.png",
]
TRAIN_LABELS = [0, 0, 1, 1, 1, 1, 2, 2, 2]
BAD = {5: 6, 7: 8}  # undecodable index -> the index returned instead


def _make_tree(root):
  """A small tree with every kind of file the source must handle."""
  tr, va = os.path.join(root, "train"), os.path.join(root, "val")
  _save(f"{tr}/cat/a.png", Image.fromarray(_rgb(0)), "PNG")
  _save(f"{tr}/cat/b.JPEG", Image.fromarray(_smooth()), "JPEG")
  _save(f"{tr}/dog/c.png", Image.fromarray(_rgb(2)[..., 0], mode="L"), "PNG")
  _save(f"{tr}/dog/d.jpg", Image.new("CMYK", (7, 5), (10, 200, 30, 40)), "JPEG")
  _save(f"{tr}/dog/e.png", Image.fromarray(_rgb(3)).convert("P"), "PNG")
  _save(f"{tr}/emu/f.jpg", Image.fromarray(_rgb(4, 16, 16)), "JPEG")
  _save(f"{tr}/emu/nested/h.png", Image.fromarray(_rgb(5, 6, 6)), "PNG")
  _save(f"{va}/cat/v1.png", Image.fromarray(_rgb(6)), "PNG")
  _save(f"{va}/dog/v2.jpg", Image.fromarray(_rgb(7)), "JPEG")
  _save(f"{va}/fox/v3.png", Image.fromarray(_rgb(8)), "PNG")  # val-only class
  with open(f"{tr}/dog/zz_bad.jpg", "wb") as f:
    f.write(b"this is not an image at all" * 10)
  with open(f"{tr}/emu/g_trunc.jpg", "wb") as f:
    data = _jpeg_bytes(Image.fromarray(_rgb(9, 64, 64)))
    f.write(data[: len(data) // 2])
  for junk in (f"{tr}/cat/readme.txt", f"{tr}/notes.txt", f"{tr}/cat/._a.png"):
    with open(junk, "wb") as f:
      f.write(b"ignored")
  return root


@pytest.fixture
def tree(tmp_path):
  return _make_tree(str(tmp_path / "data"))


def _make_tar(tree_dir, tar_path, arcname):
  with tarfile.open(tar_path, "w") as tf:
    if arcname is None:  # split directories at the tar's top level
      for d in sorted(os.listdir(tree_dir)):
        tf.add(os.path.join(tree_dir, d), arcname=d)
    else:
      tf.add(tree_dir, arcname=arcname)
  return str(tar_path)


def _check_train(src):
  assert len(src) == len(TRAIN_ORDER)
  assert src.class_names == ("cat", "dog", "emu", "fox")  # union over splits
  assert src.num_classes == 4
  assert src.labels.dtype == np.int32 and not src.labels.flags.writeable
  np.testing.assert_array_equal(src.labels, TRAIN_LABELS)
  names = [src.file_name(i).split("train/")[-1] for i in range(len(src))]
  assert names == TRAIN_ORDER
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", CorruptImageWarning)
    exs = [src[i] for i in range(len(src))]
  for ex in exs:
    assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3
    assert ex["image"].shape[2] == 3 and ex["label"].dtype == np.int32
  np.testing.assert_array_equal(exs[0]["image"], _rgb(0))  # PNG: lossless
  assert np.abs(exs[1]["image"].astype(int) - _smooth()).mean() < 6  # JPEG
  g = exs[2]["image"]  # greyscale -> 3 equal channels
  np.testing.assert_array_equal(g[..., 0], _rgb(2)[..., 0])
  np.testing.assert_array_equal(g[..., 1], g[..., 2])
  assert exs[3]["image"].shape == (5, 7, 3)  # CMYK -> RGB
  assert exs[4]["image"].shape == (10, 12, 3)  # palette -> RGB
  np.testing.assert_array_equal(exs[8]["image"], _rgb(5, 6, 6))  # nested dir
  for bad, good in BAD.items():
    np.testing.assert_array_equal(exs[bad]["image"], exs[good]["image"])
    assert exs[bad]["label"] == src.labels[good]
  return exs


def test_directory_source_decodes_all_kinds(tree):
  src = load_source(f"folder:{tree}", "train")
  assert isinstance(src, FolderSource) and not isinstance(src, TarFolderSource)
  assert src.name == f"folder:{tree}/train" and src.split_dir == "train"
  _check_train(src)


def test_corrupt_files_are_replaced_counted_and_warned_once(tree):
  src = load_folder(tree, "train")
  total0 = sources.num_skipped()
  with pytest.warns(CorruptImageWarning) as rec:
    ex = src[5]
  assert len(rec) == 1 and "zz_bad.jpg" in str(rec[0].message)
  assert ex["label"] == 2 and src.skipped == 1 and ex["skipped"] == 1
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no second warning for the same file
    ex2 = src[5]
  np.testing.assert_array_equal(ex["image"], ex2["image"])
  assert src.skipped == 1 and src.num_skipped() == 1  # a file counts once, however often it is drawn
  with pytest.warns(CorruptImageWarning, match="g_trunc.jpg"):
    assert src[7]["skipped"] == 1  # truncated JPEG
  assert src.skipped == 2 and sources.num_skipped() == total0 + 2
  assert src[4]["skipped"] == 0 and src[6]["skipped"] == 0  # a good file does not count
  assert src.skipped == 2
  # Evaluation: the bad file is left out (None), not replaced, and not counted again.
  assert src.try_example(5) is None and src.try_example(7) is None
  assert src.try_example(4)["label"] == 1 and src.skipped == 2
  assert src[-1]["label"] == 2
  with pytest.raises(IndexError):
    src[len(src)]


@pytest.mark.parametrize("arcname", [None, "mydata", "."])
def test_tar_source_matches_directory_source(tree, tmp_path, arcname):
  tar = _make_tar(tree, tmp_path / "d.tar", arcname)
  src = load_source(f"folder:{tar}", "train")
  assert isinstance(src, TarFolderSource)
  want_split = "mydata/train" if arcname == "mydata" else "train"
  assert src.split_dir == want_split and src.name == f"folder:{tar}/{want_split}"
  with pytest.warns(CorruptImageWarning, match=r"d\.tar:.*zz_bad\.jpg"):
    src[5]
  assert src.skipped == 1
  exs = _check_train(src)
  assert src.skipped == 2  # bad files 5 and 7, each counted once
  ref = load_folder(tree, "train")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", CorruptImageWarning)
    for i, ex in enumerate(exs):
      np.testing.assert_array_equal(ex["image"], ref[i]["image"])
  # Pickles without its file descriptor; the copy reopens it and counts anew.
  copy = pickle.loads(pickle.dumps(src))
  assert copy._fd is None and copy.skipped == 0  # pylint: disable=protected-access
  np.testing.assert_array_equal(copy[1]["image"], exs[1]["image"])
  src.close()
  np.testing.assert_array_equal(src[0]["image"], exs[0]["image"])  # reopens


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_test_split_reads_val_when_there_is_no_test(tree, tmp_path, kind):
  path = tree if kind == "dir" else _make_tar(tree, tmp_path / "d.tar", "top")
  te = load_source(f"folder:{path}", "test")
  assert te.split_dir.endswith("val") and te.name.endswith("/val")
  assert len(te) == 3 and te.class_names == ("cat", "dog", "emu", "fox")
  np.testing.assert_array_equal(te.labels, [0, 1, 3])
  np.testing.assert_array_equal(te[2]["image"], _rgb(8))
  assert load_source(f"folder:{path}", "val").split_dir == te.split_dir
  # "test/" wins over "val/" when both exist (directory case).
  if kind == "dir":
    _save(f"{tree}/test/cat/t.png", Image.fromarray(_rgb(9)), "PNG")
    assert load_folder(tree, "test").split_dir == "test"
    assert load_folder(tree, "val").split_dir == "val"


def test_missing_split_empty_and_missing_path_errors(tmp_path):
  root = tmp_path / "only_train"
  _save(str(root / "train" / "a" / "x.png"), Image.fromarray(_rgb(0)), "PNG")
  (root / "README").write_text("hi")
  with pytest.raises(FileNotFoundError) as e:
    load_folder(str(root), "test")
  msg = str(e.value)
  for s in (str(root), "'test/'", "'val/'", "train", "README", "<root>/<split>/<class>/<image>"):
    assert s in msg, s
  tar = _make_tar(str(root), tmp_path / "t.tar", "top")
  with pytest.raises(FileNotFoundError) as e:
    load_folder(tar, "test")
  assert "t.tar" in str(e.value) and "train" in str(e.value)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="empty"):
    load_folder(str(tmp_path / "empty"), "train")
  with pytest.raises(FileNotFoundError) as e:
    load_source(f"folder:{tmp_path / 'nope'}", "train")
  assert "nope" in str(e.value) and "only_train" in str(e.value)
  no_img = tmp_path / "no_images" / "train" / "cls"
  no_img.mkdir(parents=True)
  (no_img / "notes.txt").write_text("x")
  with pytest.raises(ValueError) as e:
    load_folder(str(tmp_path / "no_images"), "train")
  assert "no images" in str(e.value) and "cls" in str(e.value)
  gz = tmp_path / "t.tar.gz"
  gz.write_bytes(gzip.compress(open(tar, "rb").read()))
  with pytest.raises(ValueError, match="gzip"):
    load_folder(str(gz), "train")
  with pytest.raises(ValueError, match="empty path"):
    load_source("folder:", "train")


def test_tar_source_in_grain_worker_processes(tree, tmp_path):
  tar = _make_tar(tree, tmp_path / "d.tar", None)
  src = load_folder(tar, "val")  # no corrupt files
  cfg = MultiCropConfig(global_size=8, local_size=4, num_local=1)
  kw = dict(batch_size=2, seed=3, mask_patch_size=2)
  it0 = train_iterator(src, cfg, **kw)
  a = [next(it0) for _ in range(2)]
  it = train_iterator(src, cfg, num_workers=1, **kw)
  try:
    b = [next(it) for _ in range(2)]
  finally:
    it.close()
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], np.asarray(y[k]))


# ----------------------------------------------------------------------------
# Real data (../shared/data; skipped where absent)


def test_real_cifar10_tar():
  tar = _real("cifar10/cifar10-jpeg.tar")
  tr = load_source(f"folder:{tar}", "train")
  te = load_source(f"folder:{tar}", "test")
  assert (len(tr), len(te)) == (50000, 10000)
  assert tr.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
  assert tr.num_classes == te.num_classes == 10
  np.testing.assert_array_equal(np.bincount(tr.labels), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(te.labels), [1000] * 10)
  ex = tr[12345]
  assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
  assert ex["label"] == tr.labels[12345] and ex["image"].std() > 0
  assert te[0]["image"].shape == (32, 32, 3)


def test_real_imagenette_mini_tar():
  tar = _real("imagenette224-mini/imagenette224-mini.tar")
  tr = load_source(f"folder:{tar}", "train")
  te = load_source(f"folder:{tar}", "test")  # read from val/
  assert (len(tr), len(te)) == (1000, 500)
  assert tr.split_dir == "imagenette224-mini/train"
  assert te.split_dir == "imagenette224-mini/val"
  assert tr.num_classes == 10 and tr.class_names == te.class_names
  assert list(tr.class_names) == sorted(tr.class_names)
  assert all(c.startswith("n") for c in tr.class_names)
  np.testing.assert_array_equal(np.bincount(tr.labels), [100] * 10)
  for src, i in ((tr, 0), (tr, 999), (te, 250)):
    ex = src[i]
    assert ex["image"].shape == (224, 224, 3) and ex["image"].dtype == np.uint8
