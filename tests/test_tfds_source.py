"""The "tfds:NAME" source: TFDS ArrayRecord datasets read with tfds.data_source, without TensorFlow.

Two kinds of data: ``tfds.testing.mock_data`` (fake examples of a real builder such as mnist), and a small real
ArrayRecord dataset built here. Building image datasets normally needs TensorFlow (TFDS encodes images with
tf.image), which this project does not install: the builder below encodes with PIL instead by patching
``tfds.features.Image.encode_example`` during the build. What lands on disk is what ``tfds build`` writes for an
Image feature (encoded PNG/JPEG bytes in ArrayRecord files, dataset_info.json, features.json); reading it goes
through the unpatched TFDS code. mock_data needs the same patch for a data source that reads encoded images (its
fake examples are encoded on the fly).
"""

import contextlib
import io
import json
import os
import pickle
import sys
import warnings
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from simdino_jax.data.multicrop import MultiCropConfig
from simdino_jax.data.pipeline import train_dataset
from simdino_jax.data.sources import (
  CorruptImageWarning,
  DataError,
  TfdsSource,
  has_labelled_split,
  load_source,
  tfds_split_for,
)

NUM_TRAIN, NUM_VAL, NUM_CLASSES = 24, 8, 3
BAD_INDEX = 5  # train example whose bytes are not an image
GREY_INDEX, CMYK_INDEX, PALETTE_INDEX = 2, 3, 7


def _encode(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt)
  return buf.getvalue()


def _pil_encode_example(self, value):
  """tfds.features.Image.encode_example without TensorFlow: arrays -> PNG bytes; bytes pass through."""
  del self
  if isinstance(value, bytes):
    return value
  arr = np.asarray(value)
  return _encode(Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr), "PNG")


def _example(split: str, i: int):
  """(stored image: array or encoded bytes, expected (H, W, 3) uint8 or None if undecodable, label)."""
  rng = np.random.default_rng((0 if split == "train" else 1000) + i)
  h, w = 12 + i % 5, 10 + i % 3
  rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  label = i % NUM_CLASSES
  if split == "train" and i == BAD_INDEX:
    return b"\x89PNG but not really", None, label
  if split == "train" and i == GREY_INDEX:
    grey = rng.integers(0, 256, (h, w), dtype=np.uint8)
    return _encode(Image.fromarray(grey, "L"), "PNG"), np.repeat(grey[..., None], 3, -1), label
  if split == "train" and i == CMYK_INDEX:
    data = _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG")
    cmyk = np.asarray(Image.open(io.BytesIO(data))).astype(int)  # as decoded (lossy); PIL's CMYK -> RGB rule:
    return data, np.clip(255 - cmyk[..., :3] - cmyk[..., 3:], 0, 255).astype(np.uint8), label
  if split == "train" and i == PALETTE_INDEX:
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=8)
    data = _encode(pal, "PNG")
    lut = np.asarray(pal.getpalette()[: 3 * 256] + [0] * (768 - len(pal.getpalette()[:768])), np.uint8).reshape(256, 3)
    return data, lut[np.asarray(pal)], label
  return rgb, rgb, label


class SimdinoTestImages(tfds.core.GeneratorBasedBuilder):
  """A tiny labelled image dataset with a train and a validation split."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
          "index": tfds.features.Scalar(dtype=np.int64),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
      "train": self._generate_examples("train", NUM_TRAIN),
      "validation": self._generate_examples("validation", NUM_VAL),
    }

  def _generate_examples(self, split, n):
    for i in range(n):
      stored, _, label = _example(split, i)
      yield i, {"image": stored, "label": label, "index": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  with mock.patch.object(tfds.features.Image, "encode_example", _pil_encode_example):
    builder = SimdinoTestImages(data_dir=path, file_format="array_record")
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    )
  return path


def _by_index(src):
  """{stored index: example} over the whole source (records are stored shuffled)."""
  raw = src._data_source()  # pylint: disable=protected-access
  return {int(raw[i]["index"]): i for i in range(len(src))}


def test_mock_data_serves_the_tfds_source_without_tensorflow():
  with (
    tfds.testing.mock_data(num_examples=12),
    mock.patch.object(tfds.features.Image, "encode_example", _pil_encode_example),
  ):
    src = load_source("tfds:mnist", "train")
    test = load_source("tfds:mnist", "test")
    ex = src[3]
  assert isinstance(src, TfdsSource) and len(src) == 12 and src.num_classes == 10
  assert ex["image"].shape == (28, 28, 3) and ex["image"].dtype == np.uint8  # grey (28, 28, 1) -> RGB
  np.testing.assert_array_equal(ex["image"][..., 0], ex["image"][..., 2])
  assert ex["label"].dtype == np.int32 and 0 <= ex["label"] < 10 and ex["skipped"] == 0
  assert test.split == "validation"  # a mocked dataset lists no splits: the preferred held-out name
  assert "tensorflow" not in sys.modules


def test_tfds_source_decodes_images_to_rgb_with_their_labels(data_dir):
  src = load_source("tfds:simdino_test_images", "train", tfds_data_dir=data_dir)
  assert (len(src), src.num_classes, src.split, src.name) == (
    NUM_TRAIN,
    NUM_CLASSES,
    "train",
    "tfds:simdino_test_images/train",
  )
  where = _by_index(src)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", CorruptImageWarning)
    for i in range(NUM_TRAIN):
      _, expected, label = _example("train", i)
      if expected is None:
        continue
      ex = src[where[i]]
      assert ex["image"].dtype == np.uint8 and ex["label"] == label and ex["skipped"] == 0, i
      np.testing.assert_array_equal(ex["image"], expected, err_msg=f"example {i}")
  np.testing.assert_array_equal(src.labels, [_example("train", i)[2] for i in sorted(where, key=where.get)])
  assert "tensorflow" not in sys.modules


def test_tfds_test_split_reads_validation_and_lists_the_splits_otherwise(data_dir):
  val = load_source("tfds:simdino_test_images", "test", tfds_data_dir=data_dir)
  assert (val.split, len(val)) == ("validation", NUM_VAL)
  assert tfds_split_for("test", ["train", "test"]) == "test"
  assert tfds_split_for("test", ["test", "train", "validation"]) == "validation"  # imagenet2012: test unlabelled
  with pytest.raises(ValueError, match=r"no split for our 'test' split.*\['extra', 'train'\]"):
    tfds_split_for("test", ["train", "extra"], "tfds:x")
  with pytest.raises(ValueError, match=r"'train'.*\['test'\]"):
    tfds_split_for("train", ["test"], "tfds:x")


def test_tfds_has_labelled_split_reads_dataset_info(data_dir):
  spec = "tfds:simdino_test_images"
  assert has_labelled_split(spec, "train", tfds_data_dir=data_dir)
  assert has_labelled_split(spec, "test", tfds_data_dir=data_dir)  # served by "validation"
  assert not has_labelled_split(spec, "extra", tfds_data_dir=data_dir)
  with pytest.raises(DataError, match="no dataset 'no_such_dataset_xyz'"):  # a typo is an error, not "unlabelled"
    has_labelled_split("tfds:no_such_dataset_xyz", "test", tfds_data_dir=data_dir)
  assert "tensorflow" not in sys.modules


def test_tfds_data_dir_comes_from_the_environment_when_not_given(data_dir, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
  assert len(load_source("tfds:simdino_test_images", "test")) == NUM_VAL


def test_tfds_corrupt_example_is_replaced_counted_and_warned_about(data_dir):
  src = load_source("tfds:simdino_test_images", "train", tfds_data_dir=data_dir)
  where = _by_index(src)
  bad = where[BAD_INDEX]
  with pytest.warns(CorruptImageWarning, match=rf"example {bad}"):
    ex = src[bad]
  nxt = src[(bad + 1) % NUM_TRAIN]
  np.testing.assert_array_equal(ex["image"], nxt["image"])
  assert ex["label"] == nxt["label"] and ex["skipped"] == 1 and src.skipped == 1
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # warned once per example and process
    assert src[bad]["skipped"] == 1 and src.skipped == 1  # counted once per example
  assert src.try_example(bad) is None and src.skipped == 1  # evaluation leaves it out


def test_tfds_source_pickles_for_grain_workers_and_reopens(data_dir):
  src = load_source("tfds:simdino_test_images", "train", tfds_data_dir=data_dir)
  copy = pickle.loads(pickle.dumps(src))
  assert copy._ds is None  # pylint: disable=protected-access  (reopened lazily in the worker)
  for i in (0, 11, NUM_TRAIN - 1):
    if i == _by_index(src)[BAD_INDEX]:
      continue
    np.testing.assert_array_equal(copy[i]["image"], src[i]["image"])
    assert copy[i]["label"] == src[i]["label"]


def test_tfds_missing_or_unprepared_datasets_are_clear_errors(tmp_path):
  with pytest.raises(
    ValueError,
    match=r"no dataset 'no_such_dataset_xyz'.*tfds build no_such_dataset_xyz "
    r"--file_format=array_record",
  ):
    load_source("tfds:no_such_dataset_xyz", "train", tfds_data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"not prepared in .*mnist.*--file_format=array_record"):
    load_source("tfds:mnist", "train", tfds_data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"--manual_dir"):
    load_source("tfds:imagenet2012", "train", tfds_data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="empty name"):
    load_source("tfds:", "train")


def test_tfds_source_is_sharded_by_process_like_every_source(data_dir):
  src = load_source("tfds:simdino_test_images", "train", tfds_data_dir=data_dir)
  cfg = MultiCropConfig(global_size=8, local_size=4, num_local=1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", CorruptImageWarning)
    whole = train_dataset(src, cfg, batch_size=4, seed=1)[0]
    shards = [train_dataset(src, cfg, batch_size=2, seed=1, shard_index=k, shard_count=2)[0] for k in (0, 1)]
  # Process k takes its contiguous rows [2k, 2k + 2) of every global batch of the one stream, crops included.
  for key in ("global", "label", "skipped"):
    np.testing.assert_array_equal(whole[key][0:2], shards[0][key])
    np.testing.assert_array_equal(whole[key][2:4], shards[1][key])


def test_trainer_trains_on_a_tfds_source(data_dir, tmp_path):
  from conftest import make_tiny_config  # pylint: disable=g-import-not-at-top

  from simdino_jax.train import trainer  # pylint: disable=g-import-not-at-top

  c = make_tiny_config()
  c.data.source = "tfds:simdino_test_images"
  c.data.tfds_data_dir = data_dir
  c.total_steps = 2
  c.model.depth = 1
  with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
    warnings.simplefilter("ignore", CorruptImageWarning)
    result = trainer.train(c, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
  # k-NN on train / validation; the undecodable train example is left out of the memory bank, not duplicated.
  assert (result["num_train"], result["num_test"]) == (NUM_TRAIN - 1, NUM_VAL)
  assert os.path.exists(tmp_path / "eval" / "knn.json")
