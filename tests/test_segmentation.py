"""Linear semantic segmentation (evals/segmentation.py, data/segmentation.py).

References are independent NumPy transcriptions of mmseg 0.x: ``intersect_and_union`` / ``mean_iou`` for the
metrics, ``EncoderDecoder.slide_inference`` for the sliding windows; plus the dataset layouts, refusals naming the
file, and the evaluator end to end through ``simdino_jax.evaluate`` on a generated folder dataset.
"""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from simdino_jax import evaluate
from simdino_jax.data import segmentation as seg_data
from simdino_jax.errors import ConfigError, DataError
from simdino_jax.evals import segmentation as seg


# -- metrics ----------------------------------------------------------------------------------------------------
def _mmseg_metrics(preds, labels, num_classes, ignore_index=255):
  """mmseg's intersect_and_union summed over images, then total_area_to_metrics (mIoU, mAcc, aAcc)."""
  ti, tu, tp, tl = (np.zeros(num_classes) for _ in range(4))
  for pred, label in zip(preds, labels):
    mask = label != ignore_index
    pred, label = pred[mask], label[mask]
    intersect = pred[pred == label]
    ai = np.histogram(intersect, bins=num_classes, range=(0, num_classes - 1))[0]
    ap = np.histogram(pred, bins=num_classes, range=(0, num_classes - 1))[0]
    al = np.histogram(label, bins=num_classes, range=(0, num_classes - 1))[0]
    ti, tu, tp, tl = ti + ai, tu + ap + al - ai, tp + ap, tl + al
  with np.errstate(invalid="ignore", divide="ignore"):
    iou, acc = ti / tu, ti / tl
  return np.nanmean(iou) * 100, np.nanmean(acc) * 100, ti.sum() / tl.sum() * 100, iou * 100


def test_metrics_match_mmseg_on_hand_made_masks():
  gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 2, 2]])
  pr = np.array([[0, 1, 1, 1], [0, 0, 1, 3], [3, 3, 2, 0]])
  conf = seg.confusion(gt, pr, 5)
  assert conf.sum() == 10  # the two ignored pixels never count, whatever was predicted there
  r = seg.scores(conf)
  # By hand: class 0: I=3, GT=4, P=4 -> IoU 3/5; class 1: I=3, GT=4, P=4 -> 3/5; class 2: I=1, GT=2, P=1 -> 1/2;
  # class 3: predicted once, absent from GT -> IoU 0 (counts), acc NaN; class 4: nowhere -> NaN (skipped).
  np.testing.assert_allclose(r["iou"][:4], [60, 60, 50, 0])
  assert np.isnan(r["iou"][4]) and np.isnan(r["acc"][3]) and np.isnan(r["acc"][4])
  assert r["miou"] == pytest.approx((60 + 60 + 50 + 0) / 4)
  assert r["macc"] == pytest.approx((75 + 75 + 50) / 3)
  assert r["aacc"] == pytest.approx(70.0)
  rng = np.random.default_rng(0)
  labels = [np.where(rng.random((9, 7)) < 0.1, 255, rng.integers(0, 6, (9, 7))) for _ in range(4)]
  preds = [rng.integers(0, 6, (9, 7)) for _ in range(4)]
  total = sum(seg.confusion(g, p, 7) for g, p in zip(labels, preds))  # class 6 never appears
  miou, macc, aacc, iou = _mmseg_metrics(preds, labels, 7)
  r = seg.scores(total)
  assert (r["miou"], r["macc"], r["aacc"]) == pytest.approx((miou, macc, aacc))
  np.testing.assert_allclose(r["iou"], iou)


# -- sliding windows --------------------------------------------------------------------------------------------
def _mmseg_slide(image, model, crop, stride):
  """mmseg's slide_inference on an (H, W, C) array: windows, F.pad into preds, count_mat, division."""
  h, w = image.shape[:2]
  hg = max(h - crop + stride - 1, 0) // stride + 1
  wg = max(w - crop + stride - 1, 0) // stride + 1
  preds, count = None, np.zeros((h, w, 1))
  for hi in range(hg):
    for wi in range(wg):
      y1, x1 = hi * stride, wi * stride
      y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
      y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
      out = model(image[y1:y2, x1:x2])
      preds = np.zeros((h, w, out.shape[-1])) if preds is None else preds
      preds[y1:y2, x1:x2] += out
      count[y1:y2, x1:x2] += 1
  assert (count > 0).all()
  return preds / count


@pytest.mark.parametrize("h,w", [(21, 50), (16, 16), (30, 17), (10, 40)])
def test_slide_windows_cover_every_pixel_and_average_as_mmseg(h, w):
  crop, stride = 16, 11
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  rng = np.random.default_rng(1)
  truth = np.stack([yy, xx, rng.normal(size=(h, w))], -1).astype(np.float32)  # logits encode the position
  boxes = seg.slide_boxes(h, w, crop, stride)
  covered = np.zeros((h, w), int)
  for y1, y2, x1, x2 in boxes:
    covered[y1:y2, x1:x2] += 1
  assert covered.min() >= 1
  # A "model" with 1-pixel patches whose logits are the image values (here the position): every window's logits
  # are the truth at those pixels, so the average is exactly the truth everywhere.
  window_logits = [truth[y1:y2, x1:x2] for y1, y2, x1, x2 in boxes]
  out = seg.assemble(window_logits, boxes, h, w, h, w, patch=1)
  np.testing.assert_allclose(out, truth, atol=1e-4)
  np.testing.assert_allclose(out, _mmseg_slide(truth, lambda x: x, crop, stride), atol=1e-4)
  # Window-dependent logits (a bias per window) are averaged with mmseg's count map.
  bias = {b: float(i) for i, b in enumerate(boxes)}
  window_logits = [truth[y1:y2, x1:x2] + bias[(y1, y2, x1, x2)] for y1, y2, x1, x2 in boxes]
  counter = iter(range(len(boxes)))
  ref = _mmseg_slide(truth, lambda x: x + next(counter), crop, stride)
  np.testing.assert_allclose(seg.assemble(window_logits, boxes, h, w, h, w, patch=1), ref, atol=1e-4)


def test_padded_windows_keep_the_cells_over_their_content():
  # An image shorter than the crop (21 rows, crop 32, patch 4): the window was padded to 32 rows and its logits
  # cover 8 cells, of which the first ceil(21 / 4) = 6 lie over the content; a per-cell ramp survives upsampling.
  h, w, crop, patch = 21, 40, 32, 4
  boxes = seg.slide_boxes(h, w, crop, 21)
  assert boxes == [(0, 21, 0, 32), (0, 21, 8, 40)]
  cells = np.arange(8, dtype=np.float32)[:, None, None] * np.ones((8, 8, 2), np.float32)  # logit = row cell
  out = seg.assemble([cells, cells], boxes, h, w, 2 * h, w, patch)
  assert out.shape == (42, 40, 2)
  rows = (np.arange(42) + 0.5) / 2 - 0.5  # output row -> image row -> cell coordinate, away from the clamped edges
  expect = (rows + 0.5) / patch - 0.5
  np.testing.assert_allclose(out[5:40, 17, 0], expect[5:40], atol=1e-4)
  assert out[:, :, 0].min() >= 0 and out[:, :, 0].max() <= 5  # only the 6 content cells contribute


def test_training_view_crops_pads_and_keeps_the_classes():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (40, 60, 3)).astype(np.uint8)
  mask = np.zeros((40, 60), np.int32)
  mask[:, 30:] = 1
  mask[:5] = 255
  for i in range(8):
    img, m, (ch, cw) = seg.train_view(image, mask, np.random.default_rng(i), 32)
    assert img.shape == (32, 32, 3) and m.shape == (32, 32) and img.dtype == m.dtype == np.uint8
    assert set(np.unique(m)) <= {0, 1, 255} and (m[ch:] == 255).all() and (m[:, cw:] == 255).all()
    assert (img[ch:] == 0).all() and ch <= 32 and cw <= 32


def test_bilinear_matrix_is_half_pixel_upsampling():
  x = np.random.default_rng(2).normal(size=(5, 7)).astype(np.float32)
  up = seg.bilinear_matrix(5, 20) @ x @ seg.bilinear_matrix(7, 28).T
  ref = jax.image.resize(x, (20, 28), "bilinear")  # upsampling: jax's triangle kernel = align_corners False
  np.testing.assert_allclose(up, np.asarray(ref), atol=1e-5)
  assert seg.slide_boxes(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
  assert seg.rescale_size(375, 500, 2048, 512) == (512, 683)
  assert seg.ibot_blocks(12) == (3, 5, 7, 11) and seg.ibot_blocks(24) == (7, 11, 15, 23)
  lr = seg.poly_warmup_lr(1e-3, 40_000, 1500)
  assert float(lr(0)) == pytest.approx(1e-9, rel=1e-3) and float(lr(1500)) == pytest.approx(1e-3 * (1 - 1500 / 40_000))


# -- iBOT's protocol -------------------------------------------------------------------------------------------
def _evaluator(protocol, **cfg):
  from conftest import make_tiny_config

  from simdino_jax import evals

  c = make_tiny_config()
  c.evals.segmentation.protocol = protocol
  c.evals.segmentation.update(cfg)
  return evals.build(c, ["segmentation"])["segmentation"]


def test_ibot_lr_per_architecture_and_the_documented_command():
  expected = {  # width: (ibot_linear = README's command where documented, ibot_linear_config = the files)
    384: (3e-5, 3e-5),
    768: (8e-4, 7e-4),
    1024: (2e-5, 2e-5),
    96: (8e-4, 7e-4),  # not an iBOT width: ViT-B's
  }
  for width, lrs in expected.items():
    for protocol, lr in zip(("ibot_linear", "ibot_linear_config"), lrs):
      s = _evaluator(protocol).settings(12 if width < 1024 else 24, width)
      assert s["lr"] == lr and s["iterations"] == 160_000 and s["weight_decay"] == 0.05 and s["warmup"] == 1500
      assert s["blocks"] == ((3, 5, 7, 11) if width < 1024 else (7, 11, 15, 23))
      assert ("none of iBOT's" in s["lr_source"]) == (width == 96)
  s = _evaluator("ibot_linear", lr=1e-3).settings(12, 768)
  assert s["lr"] == 1e-3 and s["lr_source"] == "config.evals.segmentation.lr"


def test_ibot_numbers_equal_ibots_files():
  """IBOT_LR and the protocol's numbers against iBOT's clone: each configs/linear/vit_*_512_ade20k_160k.py's
  optimizer lr / weight decay, lr_config (poly, warm-up 1500 from 1e-6) and out_indices, and evaluation/README.md's
  ViT-B/16 linear command (out_with_norm=true, optimizer.lr=8e-4)."""
  import ast
  import re

  root = os.environ.get("SIMDINO_OFFICIAL_DIR")
  ibot = os.path.join(root or "", "ibot", "evaluation")
  if not root or not os.path.isdir(ibot):
    pytest.skip("needs SIMDINO_OFFICIAL_DIR holding the iBOT clone (ibot/evaluation)")
  widths = {"vit_small": 384, "vit_base": 768, "vit_large": 1024}
  for arch, width in widths.items():
    path = os.path.join(ibot, "semantic_segmentation", "configs", "linear", f"{arch}_512_ade20k_160k.py")
    cfg = {}
    for node in ast.parse(open(path).read()).body:  # the file's plain assignments: dict(...) calls and literals
      if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and node.value.func.id == "dict":
        cfg[node.targets[0].id] = {k.arg: k.value for k in node.value.keywords}
    opt, sched = cfg["optimizer"], cfg["lr_config"]
    backbone = {k.arg: k.value for k in cfg["model"]["backbone"].keywords}
    assert ast.literal_eval(opt["lr"]) == seg.IBOT_LR["ibot_linear_config"][width][0], arch
    assert ast.literal_eval(opt["weight_decay"]) == seg.PROTOCOLS["ibot_linear"]["weight_decay"]
    assert ast.literal_eval(sched["warmup_iters"]) == seg.PROTOCOLS["ibot_linear"]["warmup"]
    assert ast.literal_eval(sched["warmup_ratio"]) == seg.WARMUP_RATIO and ast.literal_eval(sched["power"]) == 1.0
    depth = ast.literal_eval(backbone["depth"])
    assert tuple(ast.literal_eval(backbone["out_indices"])) == seg.ibot_blocks(depth)
    assert "out_with_norm" not in backbone  # the backbone's default: False (register_backbone.py)
    if arch != "vit_base":  # no documented command: the file's lr
      assert seg.IBOT_LR["ibot_linear"][width][0] == seg.IBOT_LR["ibot_linear_config"][width][0]
  readme = open(os.path.join(ibot, "README.md")).read()
  command = re.search(r"linear head as the task layer, run:\n```\n(.*?)```", readme, re.S).group(1)
  assert "ade20k_dense_linear" in command and "vit_base" in command
  assert "model.backbone.out_with_norm=true" in command
  assert float(re.search(r"optimizer\.lr=([0-9.e-]+)", command).group(1)) == seg.IBOT_LR["ibot_linear"][768][0]
  gpus, per_gpu = re.search(r"teacher (\d+) \\\n\s*data\.samples_per_gpu=(\d+)", command).groups()
  assert int(gpus) * int(per_gpu) == seg.SegmentationEvaluator.DEFAULTS["batch_size"]


def test_ibot_features_with_and_without_the_final_norm():
  """iBOT's backbone (register_backbone.py) for each out index: ``xp = self.norm(x[:, 1:, :])``, where ``self.norm``
  is the final LayerNorm with out_with_norm=true and ``nn.Identity()`` without; transcribed on the tiny ViT's own
  blocks run one by one."""
  from conftest import make_tiny_config
  from flax import nnx

  from simdino_jax.models.network import backbone_kwargs
  from simdino_jax.models.vit import VisionTransformer

  kw = backbone_kwargs(make_tiny_config().model)
  vit = VisionTransformer(**kw, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(vit)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  depth, patch, blocks = kw["depth"], kw["patch_size"], (0, 1)
  x = vit.prepare_tokens(jax.numpy.asarray(images))  # (B, T, D); the blocks take the (B * T, D) layout
  x = x.reshape(-1, kw["embed_dim"])
  outs = []
  for blk in vit.blocks:
    x, _, _ = blk(x, 2, key=None)
    outs.append(x.reshape(2, -1, kw["embed_dim"])[:, 1 + vit.num_registers :])
  for final_norm in (True, False):
    fn = seg.make_feature_fn(graphdef, blocks, depth, patch, final_norm)
    got = np.asarray(fn(params, images))
    ref = [np.asarray(vit.norm(outs[i]) if final_norm else outs[i]) for i in blocks]
    ref = np.concatenate(ref, axis=-1).reshape(2, 32 // patch, 32 // patch, -1)
    np.testing.assert_allclose(got, ref, atol=1e-5)


# -- data -------------------------------------------------------------------------------------------------------
def _png(path, array, palette=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im = Image.fromarray(np.asarray(array, np.uint8))
  if palette:
    im = im.convert("P") if im.mode != "P" else im
    im.putpalette(seg.palette().ravel().tolist())
  im.save(path)


def test_ade20k_and_voc_layouts_load(tmp_path):
  ade = tmp_path / "ade" / "ADEChallengeData2016"
  for split in ("training", "validation"):
    for i in range(2):
      _png(str(ade / "images" / split / f"ADE_{split}_{i:08d}.jpg"), np.full((6, 8, 3), 100))
      _png(str(ade / "annotations" / split / f"ADE_{split}_{i:08d}.png"), np.array([[0, 1, 150, 2] * 2] * 6))
  for root in (ade, tmp_path / "ade"):  # the ADEChallengeData2016 folder or its parent
    src = seg_data.load(f"ade20k:{root}", "val")
    assert len(src) == 2 and src.num_classes == 150
    ex = src[0]
    assert ex["image"].shape == (6, 8, 3) and ex["mask"][0].tolist() == [255, 0, 149, 1] * 2  # reduce_zero_label
  voc = tmp_path / "VOCdevkit" / "VOC2012"
  ids = {"train": ["2007_000032"], "val": ["2007_000033", "2007_000039"]}
  for split, names in ids.items():
    os.makedirs(voc / "ImageSets" / "Segmentation", exist_ok=True)
    (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    for n in names:
      _png(str(voc / "JPEGImages" / f"{n}.jpg"), np.full((5, 4, 3), 50))
      _png(str(voc / "SegmentationClass" / f"{n}.png"), np.array([[0, 15, 20, 255]] * 5), palette=True)
  src = seg_data.load(f"voc:{tmp_path}", "val")
  assert len(src) == 2 and src.num_classes == 21
  assert src[1]["mask"][0].tolist() == [0, 15, 20, 255]  # palette indices are the classes


def test_bad_inputs_are_refused_naming_the_file(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    seg_data.load(f"folder:{tmp_path / 'nope'}", "train", 3)
  root = tmp_path / "d"
  _png(str(root / "images" / "train" / "a.png"), np.zeros((8, 8, 3)))
  _png(str(root / "masks" / "train" / "a.png"), np.zeros((8, 6)))  # size mismatch
  _png(str(root / "images" / "train" / "b.png"), np.zeros((8, 8, 3)))
  _png(str(root / "masks" / "train" / "b.png"), np.full((8, 8), 7))  # class 7 >= 3
  _png(str(root / "images" / "train" / "c.png"), np.zeros((8, 8, 3)))
  _png(str(root / "masks" / "train" / "c.png"), np.full((8, 8), 255))  # ignored: fine
  with pytest.raises(DataError, match=r"images/val does not exist"):  # the val folders are missing
    seg_data.load(f"folder:{root}", "val", 3)
  src = seg_data.load(f"folder:{root}", "train", 3)
  with pytest.raises(DataError, match=r"masks/train/a\.png.*size 6x8 differs"):
    src[0]
  with pytest.raises(DataError, match=r"masks/train/b\.png.*class id\(s\) \[7\]"):
    src[1]
  assert (src[2]["mask"] == 255).all()
  os.remove(root / "masks" / "train" / "c.png")
  with pytest.raises(DataError, match=r"images/train/c\.png has no mask"):
    seg_data.load(f"folder:{root}", "train", 3)
  with pytest.raises(DataError, match="ade20k:PATH"):
    seg_data.load(f"cityscapes:{root}", "train")


# -- end to end -------------------------------------------------------------------------------------------------
COLOURS = ((220, 40, 40), (40, 60, 220))  # class 1: red discs, class 2: blue squares; 0: noisy grey background


def _write_shapes(root, n_train=12, n_val=6, size=48):
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:size, :size]
  for split, n in (("train", n_train), ("val", n_val)):
    for i in range(n):
      img = (110 + rng.integers(0, 30, (size, size, 3))).astype(np.uint8)
      mask = np.zeros((size, size), np.uint8)
      r = int(rng.integers(7, 12))
      cy, cx = rng.integers(r, size - r, 2)
      disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
      s0, s1 = rng.integers(0, size - 14, 2)
      square = (yy >= s0) & (yy < s0 + 14) & (xx >= s1) & (xx < s1 + 14)
      img[disc], mask[disc] = COLOURS[0], 1
      img[square], mask[square] = COLOURS[1], 2
      _png(os.path.join(root, "images", split, f"{i}.png"), img)
      _png(os.path.join(root, "masks", split, f"{i}.png"), mask)


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
  from conftest import make_tiny_config

  from simdino_jax.io import checkpointing
  from simdino_jax.train import trainer

  root = tmp_path_factory.mktemp("segmentation")
  _write_shapes(str(root / "shapes"))
  c = make_tiny_config()
  s = c.evals.segmentation
  s.source, s.num_classes = f"folder:{root / 'shapes'}", 3
  s.iterations, s.crop_size, s.batch_size, s.lr, s.num_images = 60, 32, 8, 0.01, 2
  workdir = str(root / "run")
  tr = trainer.Trainer(c, workdir)
  with tr.checkpointer() as ckpt:
    ckpt.save(0, tr.init_state(), checkpointing.config_dict(c))
    ckpt.wait()
  return c, workdir


@pytest.mark.parametrize("protocol", ["dinov2_linear", "ibot_linear", "ibot_linear_config"])
def test_segmentation_through_evaluate_beats_chance_and_writes_json_and_pictures(seg_run, protocol):
  config, workdir = seg_run
  config = config.copy_and_resolve_references()
  config.evals.segmentation.protocol = protocol
  r = evaluate.evaluate(config, workdir, ["segmentation"])["segmentation"]
  path = os.path.join(workdir, "eval", "segmentation.json")
  stored = json.load(open(path))
  assert stored["miou"] == pytest.approx(r["miou"]) and stored["step"] == 0 and "data" in stored
  assert r["protocol"] == protocol and r["iterations"] == 60 and r["num_val"] == 6 and r["num_classes"] == 3
  assert len(r["per_class_iou"]) == 3 and r["stride"] == 21 and r["warmup"] == (2 if protocol == "dinov2_linear" else 1)
  assert r["blocks"] == ([1] if protocol == "dinov2_linear" else [0, 0, 0, 1])
  assert r["head"] == ("BatchNorm + 1x1 conv" if protocol == "dinov2_linear" else "1x1 conv")
  assert r["features"].endswith("no final norm" if protocol == "ibot_linear_config" else ", final norm")
  for f in r["files"]:
    im = Image.open(os.path.join(workdir, "eval", f))
    assert im.size[0] > 2 * im.size[1]  # image | ground truth | prediction
  assert len(r["files"]) == 2
  # Colour is linearly readable from a random backbone's patch tokens: far above chance (mIoU ~20% for 3 classes).
  assert r["miou"] >= 45.0 and r["aacc"] >= 75.0, r


def test_validation_refuses_bad_fields():
  from conftest import make_tiny_config

  from simdino_jax import config as config_lib

  for field, value, match in [
    ("protocol", "fcn", "protocol"),
    ("crop_size", 30, "crop_size"),
    ("blocks", (5,), "blocks"),
    ("source", "folder:/x", "num_classes"),
    ("source", "kitti:/x", "source"),
  ]:
    c = make_tiny_config()
    c.evals.segmentation[field] = value
    with pytest.raises(ConfigError, match=f"evals.segmentation.{match}"):
      config_lib.validate(c, num_devices=1, num_processes=1, num_local_devices=1)
