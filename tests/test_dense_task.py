"""benchmarks/make_dense_task.py (CIFAR mosaics, the dense task of issue 32's Gram miniature): built from a tiny tar
this file writes, whose images are solid colours that name their class, so every pixel's label is checked against
its colour read back from the PNG (not through the builder's code); determinism; cuts off the patch grid; the
segmentation evaluator end to end on the task; bad input in one line."""

import io
import os
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import make_dense_task as mdt  # noqa: E402

CLASSES = ("ant", "bee", "cat", "dog", "elk")  # sorted: label k = CLASSES[k]
PER_CLASS = 3
SIZE, GRID = 16, 4  # the tiny test config's 16-px images and patch 4


def colour(split: int, k: int, i: int) -> tuple[int, int, int]:
  """A distinct colour for image i of class k of a split: the class is colour[0] // 40."""
  return (40 * k + 10, 60 * i + 20 + 10 * split, 200)


@pytest.fixture(scope="module")
def tar_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("dense") / "fake_cifar.tar")
  with tarfile.open(path, "w") as tf:
    for s, split in enumerate(("train", "test")):
      for k, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
          buf = io.BytesIO()
          Image.fromarray(np.full((32, 32, 3), colour(s, k, i), np.uint8)).save(buf, format="PNG")
          info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.png")
          info.size = len(buf.getvalue())
          tf.addfile(info, io.BytesIO(buf.getvalue()))
  return path


def read_task(out: str, split: str, n: int):
  images = np.stack([np.asarray(Image.open(os.path.join(out, "images", split, f"{i:05d}.png"))) for i in range(n)])
  masks = np.stack([np.asarray(Image.open(os.path.join(out, "masks", split, f"{i:05d}.png"))) for i in range(n)])
  return images, masks


@pytest.fixture(scope="module")
def task(tar_path, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("dense") / "task")
  mdt.build(tar_path, out, train=12, val=8, seed=0, size=SIZE, grid=GRID)
  return out


def test_every_pixel_is_labelled_with_its_source_images_class(task):
  for s, split, n in ((0, "train", 12), (1, "val", 8)):
    images, masks = read_task(task, split, n)
    assert images.shape == (n, SIZE, SIZE, 3) and masks.shape == (n, SIZE, SIZE) and masks.dtype == np.uint8
    # Each pixel's colour must be one of its split's source colours; its class is the colour's.
    table = {colour(s, k, i): k for k in range(len(CLASSES)) for i in range(PER_CLASS)}
    pixels = [tuple(int(v) for v in p) for p in images.reshape(-1, 3)]
    assert set(pixels) <= set(table), set(pixels) - set(table)
    np.testing.assert_array_equal(masks.reshape(-1), [table[p] for p in pixels])
    for m in masks:  # 2-4 images of different classes, each a rectangle
      ids = np.unique(m)
      assert 2 <= len(ids) <= 4
      for k in ids:
        ys, xs = np.nonzero(m == k)
        assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)


def test_cuts_fall_inside_patches(task):
  _, masks = read_task(task, "train", 12)
  cuts = set()
  for m in masks:
    cuts |= {int(x) for x in np.nonzero((m[:, 1:] != m[:, :-1]).any(0))[0] + 1}
    cuts |= {int(y) for y in np.nonzero((m[1:] != m[:-1]).any(1))[0] + 1}
  assert cuts and not any(c % GRID == 0 for c in cuts), sorted(cuts)


def test_deterministic_from_the_seed(tar_path, task, tmp_path):
  again = str(tmp_path / "again")
  mdt.build(tar_path, again, train=5, val=3, seed=0, size=SIZE, grid=GRID)  # sample i depends on (seed, split, i)
  for split, n in (("train", 5), ("val", 3)):
    for a, b in zip(read_task(task, split, n), read_task(again, split, n)):
      np.testing.assert_array_equal(a, b)
  other = str(tmp_path / "other")
  mdt.build(tar_path, other, train=5, val=3, seed=1, size=SIZE, grid=GRID)
  assert not np.array_equal(read_task(task, "train", 5)[1], read_task(other, "train", 5)[1])
  # A rebuild into the task's own folder replaces it (no stale samples of the larger build remain).
  mdt.build(tar_path, again, train=2, val=1, seed=0, size=SIZE, grid=GRID)
  assert sorted(os.listdir(os.path.join(again, "masks", "train"))) == ["00000.png", "00001.png"]


def test_bad_input_is_one_line_naming_it(tar_path, tmp_path, capsys):
  missing = str(tmp_path / "nope.tar")
  for argv, named in (
    ([f"--tar={missing}", f"--out={tmp_path / 'o1'}"], missing),
    ([f"--tar={tar_path}", f"--out={tmp_path / 'o2'}", "--train=0"], "--train"),
    ([f"--tar={tar_path}", f"--out={ROOT}"], ROOT),  # not a task folder
  ):
    with pytest.raises(SystemExit) as e:
      mdt.main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code and named in e.value.code, e.value.code


def test_segmentation_evaluator_runs_on_the_task(task, tmp_path):
  from conftest import make_tiny_config

  from simdino_jax import evaluate

  c = make_tiny_config()
  c.model.depth = 1
  workdir = str(tmp_path / "run")
  assert mdt.init_checkpoint(c, workdir).endswith(os.path.join("checkpoints", "0"))
  s = c.evals.segmentation
  s.source, s.num_classes, s.crop_size = f"folder:{task}", len(CLASSES), SIZE
  s.iterations, s.batch_size, s.num_images = 3, 4, 0
  r = evaluate.evaluate(c, workdir, ["segmentation"])["segmentation"]
  assert r["num_val"] == 8 and r["num_train"] == 12 and r["num_classes"] == len(CLASSES) and r["step"] == 0
  assert np.isfinite(r["miou"]) and 0.0 <= r["miou"] <= 100.0, r["miou"]
