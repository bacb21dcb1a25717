"""Image decoding (every PIL mode to 8-bit RGB), undecodable images in training and evaluation, unlabelled folders.

The images are written here: 16-bit greyscale and RGB PNGs (the RGB one by hand, PIL cannot write 48-bit PNGs),
alpha, palette with transparency, CMYK, 1-bit, EXIF-rotated JPEGs, corrupt files and flat (class-less) folders.
"""

import io
import os
import struct
import tarfile
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from simdino_jax.data import sources
from simdino_jax.data.multicrop import MultiCropConfig
from simdino_jax.data.pipeline import eval_batches, train_dataset, train_iterator
from simdino_jax.data.sources import (
  ALPHA_BACKGROUND,
  CorruptImageWarning,
  DataError,
  decode_image,
  has_labelled_split,
  load_source,
  pil_to_rgb,
)
from simdino_jax.errors import SimdinoError


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _png16_rgb(x: np.ndarray) -> bytes:
  """A 48-bit (16 bits per channel) RGB PNG of ``x`` (H, W, 3) uint16, written by hand."""
  h, w, _ = x.shape

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

  rows = b"".join(b"\x00" + x[r].astype(">u2").tobytes() for r in range(h))
  return (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
    + chunk(b"IDAT", zlib.compress(rows))
    + chunk(b"IEND", b"")
  )


def _ramp16(h=16, w=24):
  return (np.arange(h * w).reshape(h, w) * (65535 // (h * w - 1))).astype(np.uint16)


# ----------------------------------------------------------------------------
# Modes


def test_16bit_grey_png_is_scaled_not_clipped():
  x = _ramp16()
  data = _encode(Image.fromarray(x), "PNG")
  assert Image.open(io.BytesIO(data)).mode.startswith("I")  # PIL opens it as 16-bit
  out = decode_image(data)
  assert out.shape == (16, 24, 3) and out.dtype == np.uint8
  # convert("RGB") clips everything above 255 to white: mean ~254 instead of ~127.
  assert abs(out.mean() - x.mean() / 257) < 0.6
  np.testing.assert_array_equal(out[..., 0], np.rint(x / 257.0).astype(np.uint8))
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_32bit_int_I_mode_is_read_as_16bit():
  x = _ramp16().astype(np.int32)
  data = _encode(Image.fromarray(x, "I"), "TIFF")
  assert Image.open(io.BytesIO(data)).mode == "I"
  out = decode_image(data)
  assert abs(out.mean() - x.mean() / 257) < 0.6


def test_16bit_rgb_png_keeps_its_colours():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 65536, (10, 12, 3), dtype=np.uint16)
  x[..., 0] //= 4  # a dark red channel, a full-range blue one: channel means must survive
  out = decode_image(_png16_rgb(x))
  assert out.shape == (10, 12, 3)
  np.testing.assert_allclose(out.reshape(-1, 3).mean(0), x.reshape(-1, 3).mean(0) / 257, atol=1.0)


def test_alpha_is_composited_on_white():
  rgb = np.zeros((4, 5, 3), np.uint8)
  rgb[..., 0] = 200
  a = np.array([0, 64, 128, 255], np.uint8)[:, None] * np.ones((1, 5), np.uint8)
  rgba = np.dstack([rgb, a])
  out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
  assert ALPHA_BACKGROUND == 255
  np.testing.assert_array_equal(out[0], 255)  # fully transparent -> background
  np.testing.assert_array_equal(out[3], np.broadcast_to([200, 0, 0], (5, 3)))  # opaque -> itself
  want = (200 * 128 + 255 * 127 + 127) // 255, (255 * 127 + 127) // 255
  assert tuple(out[2, 0, :2]) == want
  la = np.dstack([np.full((4, 5), 10, np.uint8), a])
  out = decode_image(_encode(Image.fromarray(la, "LA"), "PNG"))
  np.testing.assert_array_equal(out[0], 255)
  np.testing.assert_array_equal(out[3], 10)
  assert out[1, 0, 0] == (10 * 64 + 255 * 191 + 127) // 255


def test_palette_with_transparency_and_plain_palette():
  pal = Image.new("P", (6, 4))
  pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (768 - 9))
  pal.putdata([0, 1, 2] * 8)
  plain = decode_image(_encode(pal, "PNG"))
  np.testing.assert_array_equal(plain[0, :3], [[0, 0, 0], [255, 0, 0], [0, 255, 0]])
  transparent = decode_image(_encode(pal, "PNG", transparency=0))  # index 0 transparent (tRNS)
  np.testing.assert_array_equal(transparent[0, :3], [[255, 255, 255], [255, 0, 0], [0, 255, 0]])


def test_cmyk_one_bit_and_grey():
  cmyk = Image.new("CMYK", (7, 5), (10, 200, 30, 40))
  data = _encode(cmyk, "JPEG")
  out = decode_image(data)
  assert out.shape == (5, 7, 3)
  np.testing.assert_array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
  bits = Image.fromarray(np.array([[0, 255, 0], [255, 0, 255]], np.uint8)).convert("1")
  out = decode_image(_encode(bits, "PNG"))
  np.testing.assert_array_equal(out[..., 1], [[0, 255, 0], [255, 0, 255]])
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(grey, "L"), "PNG"))[..., 2], grey)


def test_float_mode_and_arrays():
  f = Image.fromarray(np.full((2, 3), 0.5, np.float32), "F")
  np.testing.assert_array_equal(pil_to_rgb(f), 128)
  x16 = np.full((2, 2), 65535, np.uint16)
  np.testing.assert_array_equal(sources.array_to_rgb(x16, "x"), 255)
  rgba = np.zeros((2, 2, 4), np.uint8)  # fully transparent
  np.testing.assert_array_equal(sources.array_to_rgb(rgba, "x"), 255)
  with pytest.raises(DataError, match=r"x: expected a uint8 or uint16"):
    sources.array_to_rgb(np.zeros((2, 2, 2), np.uint8), "x")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt):
  x = np.zeros((4, 8, 3), np.uint8)
  x[0, 0] = 255  # a white top-left corner
  exif = Image.Exif()
  exif[0x0112] = 6  # stored rotated: display rotated 90 degrees clockwise
  out = decode_image(_encode(Image.fromarray(x), fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {})))
  assert out.shape == (8, 4, 3)
  assert out[0, -1].mean() > 100 and out[0, 0].mean() < 100  # the corner moved to the top right


# ----------------------------------------------------------------------------
# A folder with a 16-bit image and bad files: training replaces and counts once, evaluation leaves out


def _png(path, arr, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr, mode).save(path, format="PNG")


def _rgb(seed, size=8):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)


def _bad(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"not an image")


@pytest.fixture
def labelled(tmp_path):
  """train: 3 classes x 4 files, files 4, 5, 6 (consecutive) undecodable; test: 6 files, file 2 undecodable."""
  root = tmp_path / "labelled"
  for c in range(3):
    for i in range(4):
      k = 4 * c + i
      path = str(root / "train" / f"c{c}" / f"{i}.png")
      _bad(path) if k in (4, 5, 6) else _png(path, _rgb(k))
  for c in range(3):
    for i in range(2):
      path = str(root / "test" / f"c{c}" / f"{i}.png")
      _bad(path) if (c, i) == (1, 0) else _png(path, _rgb(100 + 2 * c + i))
  _png(str(root / "train" / "c0" / "deep16.png"), _ramp16(8, 8))
  return str(root)


def test_folder_decodes_16bit_png(labelled):
  src = load_source(f"folder:{labelled}", "train")
  i = [src.file_name(k) for k in range(len(src))].index("c0/deep16.png")
  assert abs(src[i]["image"].mean() - _ramp16(8, 8).mean() / 257) < 0.6


def test_training_replaces_bad_files_and_counts_each_once_per_run(labelled):
  src = load_source(f"folder:{labelled}", "train")
  n = len(src)
  cfg = MultiCropConfig(global_size=8, local_size=4, num_local=1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", CorruptImageWarning)
    whole = train_dataset(src, cfg, batch_size=n, seed=0)  # one batch = one epoch
    epochs = [whole[e] for e in range(3)]
    shards = [train_dataset(src, cfg, batch_size=n // 2 + 1, seed=0, shard_index=k, shard_count=2) for k in (0, 1)]
    shard_total = sum(int(ds[b]["skipped"].sum()) for ds in shards for b in range(4))
  # 3 consecutive bad files: each replaced (full batches) and counted once, in the first epoch only.
  assert [int(b["skipped"].sum()) for b in epochs] == [3, 0, 0]
  assert all(b["global"].shape[0] == n for b in epochs)
  assert shard_total == 3  # over shards too (4 batches of 7 per shard = more than 2 epochs)
  assert src.skipped == 3


def test_eval_leaves_bad_files_out_and_counts_them(labelled):
  te = load_source(f"folder:{labelled}", "test")
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    batches = list(eval_batches(te, image_size=8, batch_size=4))
  labels = np.concatenate([b["label"][b["valid"]] for b in batches])
  skipped = np.concatenate([b["skipped"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  # File 2 (class 1) is out: 5 scored images, not 6 with a duplicate of file 3 under file 2's label.
  np.testing.assert_array_equal(labels, [0, 0, 1, 2, 2])
  assert skipped.sum() == 1 and skipped[2] == 1 and not valid[2]
  assert np.all(batches[0]["image"][2] == 0)
  assert te.skipped == 1 and sum(issubclass(w.category, CorruptImageWarning) for w in rec) == 1
  again = list(eval_batches(te, image_size=8, batch_size=4))  # a second pass: the same result, warned once
  assert sum(int(b["skipped"].sum()) for b in again) == 1 and te.skipped == 1


# ----------------------------------------------------------------------------
# Unlabelled folders


def _flat(root, n=5, nested=False):
  for i in range(n):
    sub = f"part{i % 2}/" if nested else ""
    _png(os.path.join(root, f"{sub}img{i}.png"), _rgb(i))
  return root


@pytest.mark.parametrize("nested", [False, True])
def test_flat_or_classless_folder_is_an_unlabelled_train_split(tmp_path, nested):
  root = _flat(str(tmp_path / "flat"), nested=nested)
  spec = f"folder:{root}"
  src = load_source(spec, "train")
  assert len(src) == 5 and src.num_classes == 0 and src.class_names == ()
  np.testing.assert_array_equal(src.labels, -1)
  assert src.name == spec and src[0]["label"] == -1
  assert not has_labelled_split(spec, "train") and not has_labelled_split(spec, "test")
  with pytest.raises(DataError) as e:
    load_source(spec, "test")
  msg = str(e.value)
  assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, SimdinoError)
  assert root in msg and "'test'" in msg and "<root>/<split>/<class>/<image>" in msg and "\n" not in msg
  # It trains: full batches with labels -1.
  it = train_iterator(src, MultiCropConfig(global_size=8, local_size=4, num_local=1), batch_size=4, seed=0)
  batch = next(it)
  assert batch["global"].shape[0] == 4 and np.all(batch["label"] == -1)


def test_flat_folder_in_a_tar(tmp_path):
  root = _flat(str(tmp_path / "flat"), nested=True)
  tar = str(tmp_path / "flat.tar")
  with tarfile.open(tar, "w") as tf:
    tf.add(root, arcname="flat")
  src = load_source(f"folder:{tar}", "train")
  assert len(src) == 5 and src.num_classes == 0
  names = [src.file_name(i) for i in range(len(src))]
  assert names == sorted(names) and names[0] == "flat/part0/img0.png"  # members by path
  np.testing.assert_array_equal(src[names.index("flat/part0/img4.png")]["image"], _rgb(4))
  assert not has_labelled_split(f"folder:{tar}", "test")


def test_unlabelled_train_split_next_to_a_labelled_test_split(tmp_path, labelled):
  root = tmp_path / "mixed"
  _flat(str(root / "train"))
  _png(str(root / "test" / "cat" / "a.png"), _rgb(1))
  _png(str(root / "test" / "dog" / "b.png"), _rgb(2))
  spec = f"folder:{root}"
  tr, te = load_source(spec, "train"), load_source(spec, "test")
  assert (len(tr), tr.num_classes, len(te), te.num_classes) == (5, 0, 2, 2)
  assert not has_labelled_split(spec, "train") and has_labelled_split(spec, "test")
  assert has_labelled_split(f"folder:{labelled}", "train") and has_labelled_split(f"folder:{labelled}", "test")


def test_has_labelled_split_for_every_family_and_bad_specs(tmp_path):
  assert has_labelled_split("digits", "train") and has_labelled_split("digits", "test")
  assert not has_labelled_split("digits", "validation")
  npz = tmp_path / "d.npz"
  z = np.zeros((2, 4, 4, 3), np.uint8)
  np.savez(npz, train_images=z, train_labels=np.array([0, 1]), test_images=z)
  assert has_labelled_split(f"npz:{npz}", "train") and not has_labelled_split(f"npz:{npz}", "test")
  assert not has_labelled_split(f"npz:{npz}", "val")
  for spec, what in (
    (f"folder:{tmp_path / 'nope'}", "nope"),
    (f"npz:{tmp_path / 'nope.npz'}", "nope.npz"),
    ("imagenet", "Supported"),
  ):
    with pytest.raises(DataError, match=what) as e:  # a typo is an error, not "unlabelled"
      has_labelled_split(spec, "test")
    assert "\n" not in str(e.value)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="empty"):
    has_labelled_split(f"folder:{tmp_path / 'empty'}", "train")
