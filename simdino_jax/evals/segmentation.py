"""Linear semantic segmentation on frozen patch tokens (``type="segmentation"``), DINOv2's and iBOT's linear protocols.

Data (``source``, data/segmentation.py): ``ade20k:PATH``, ``voc:PATH`` or ``folder:PATH`` (+ ``num_classes``); the
evaluator has its own labelled data (``needs_labels = False``) and ignores config.data.

Protocols (``protocol``; 0 / negative config values take the protocol's number):

* ``dinov2_linear`` (DINOv2's ``ade20k_linear`` config, BNHead): the last block's patch tokens after the final
  norm, BatchNorm (batch statistics while training, running statistics with PyTorch's momentum 0.1 at test; SyncBN:
  the statistics span the whole global batch) then a 1x1 conv to the classes; 40k iterations, AdamW lr 1e-3, wd 1e-4,
  batch 16.
* ``ibot_linear``: iBOT's documented command, the one behind its published linear mIoU (iBOT
  ``evaluation/README.md``, "To train ViT-B/16 with fixed backbone and linear head": ``./run.sh ade20k_dense_linear
  $JOB_NAME vit_base teacher 4 data.samples_per_gpu=4 model.backbone.out_with_norm=true optimizer.lr=8e-4``, i.e.
  ``configs/linear/vit_base_512_ade20k_160k.py`` with those overrides, batch 4 x 4 = 16): the patch tokens of
  blocks [3, 5, 7, 11] of a 12-block ViT, each through the final norm (``out_with_norm=true``: iBOT's backbone
  applies ``self.norm`` to every output block), concatenated, FCNHead with ``num_convs=0`` (no BatchNorm: one 1x1
  conv); 160k iterations, AdamW wd 0.05, batch 16. For depth d the blocks are round(d/3) - 1, d/2 - 1, round(2d/3) -
  1, d - 1 (iBOT's ViT-L uses [7, 11, 15, 23], the same rule); ``blocks`` overrides them. The lr depends on the
  architecture (``IBOT_LR``, by embedding width): ViT-B (768) 8e-4, the README command's ``optimizer.lr=8e-4``;
  ViT-S (384) 3e-5, ``configs/linear/vit_small_512_ade20k_160k.py``'s ``optimizer = dict(..., lr=3e-5, ...)``;
  ViT-L (1024) 2e-5, ``configs/linear/vit_large_512_ade20k_160k.py``'s ``lr=2e-5`` (no command is documented for
  those two, so ``run.sh`` runs their configs as they are); any other width takes ViT-B's 8e-4, the only documented
  linear command (the result's ``lr_source`` says which applied). iBOT publishes only ViT-B/16's linear mIoU.
* ``ibot_linear_config``: iBOT's config files as they are, without the command's overrides: no final norm on the
  blocks (``out_with_norm=False``, the backbone's default) and the files' lr, ViT-B 7e-4 (``lr=7e-4``), ViT-S 3e-5,
  ViT-L 2e-5 (other widths: ViT-B's 7e-4); everything else as ``ibot_linear``.

Both: mmcv's ``poly`` schedule (power 1, min lr 0) over the iterations with a linear warm-up of 1,500 iterations from
1e-6 of the lr (``lr_at``; the warm-up scales with ``iterations`` when they are overridden: round(1500 x iterations /
the protocol's)), AdamW betas (0.9, 0.999) with decoupled decay on every head parameter (neither config exempts
any); conv weight N(0, 0.01), bias 0 (mmseg's ``conv_seg`` init); logits upsampled bilinearly (align_corners False)
to the crop before a cross-entropy that ignores 255 and averages over all pixels (mmseg 0.x's
``avg_non_ignore=False``).

The ADE20K pipeline, generalised to ``crop_size`` c (512 officially): training: Resize to img_scale (4c, c) times a
ratio in U(0.5, 2.0) keeping the aspect (mmcv's ``imrescale``: bilinear image, nearest mask), RandomCrop c x c with
``cat_max_ratio`` 0.75 (10 tries), horizontal flip p 0.5, PhotoMetricDistortion (brightness, contrast, saturation,
hue, mmseg's order and ranges), normalise, pad to c (image 0 after normalisation, mask 255). Test: Resize to
(4c, c) keeping the aspect, sliding-window inference with window c and stride round(2c / 3) (341 for 512, as
configured officially), window logits upsampled to the window and averaged by the count map (mmseg's
``slide_inference``), then resized bilinearly to the original image size, argmax, scored against the original
mask. mIoU / mAcc / aAcc come from one confusion matrix over the validation set (mmseg's ``intersect_and_union``:
ignored pixels never count; a class absent from both the ground truth and the predictions has IoU NaN and is left
out of the mean; a class absent from the ground truth has accuracy NaN).

Not reproduced: multi-scale / flip test augmentation (neither linear protocol uses it); mmseg's ``slide_inference``
runs the backbone on a smaller window when the resized image is smaller than c, we pad that window to c (zeros after
normalisation) and crop its logits; mixed precision (iBOT trains in fp16) -- we train in float32; the data loader's
sampler (we draw each epoch as a fresh permutation of the training set, batch per iteration). Features are not
cached: the training pipeline augments every iteration, so the frozen backbone runs on every batch (as officially);
validation windows pass through the backbone once.

Several processes (a pod): every process draws the same views (each a pure function of the seed, the iteration and
the slot) and cuts the same validation windows, and feeds only its own devices' rows of each batch; BatchNorm's
statistics and the gradients span the global batch; the window logits are gathered back in order. The figures are
therefore those of one process (tests/test_eval_multiprocess.py); the host work is repeated on every process, not
split.

Result: ``miou``, ``macc``, ``aacc`` (percent), ``per_class_iou`` / ``per_class_acc`` (percent, null for NaN),
the protocol and its numbers (``lr_source``: where the lr came from; ``head``; ``features``); pictures DIR/eval/NAME/val_<i>.png (image | ground truth | prediction, VOC's palette:
class k gets colour k, ignored pixels 255's cream).
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import time
from typing import Callable

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from simdino_jax.data import device_augment
from simdino_jax.data import segmentation as seg_data
from simdino_jax.errors import ConfigError, require
from simdino_jax.evals import runner
from simdino_jax.models.network import backbone_kwargs
from simdino_jax.progress import hms

IGNORE = seg_data.IGNORE_INDEX
PROTOCOLS = {
  # iterations, lr, weight decay, warm-up
  "dinov2_linear": dict(iterations=40_000, lr=1e-3, weight_decay=1e-4, warmup=1500),
  "ibot_linear": dict(iterations=160_000, lr=None, weight_decay=0.05, warmup=1500),  # lr: IBOT_LR
  "ibot_linear_config": dict(iterations=160_000, lr=None, weight_decay=0.05, warmup=1500),
}
# iBOT's linear ADE20K lr per architecture, keyed by the embedding width: {protocol: {width: (lr, source)}}.
IBOT_LR = {
  "ibot_linear": {
    384: (3e-5, "vit_small: configs/linear/vit_small_512_ade20k_160k.py lr=3e-5 (no documented command)"),
    768: (8e-4, "vit_base: evaluation/README.md linear command, optimizer.lr=8e-4"),
    1024: (2e-5, "vit_large: configs/linear/vit_large_512_ade20k_160k.py lr=2e-5 (no documented command)"),
  },
  "ibot_linear_config": {
    384: (3e-5, "vit_small: configs/linear/vit_small_512_ade20k_160k.py lr=3e-5"),
    768: (7e-4, "vit_base: configs/linear/vit_base_512_ade20k_160k.py lr=7e-4"),
    1024: (2e-5, "vit_large: configs/linear/vit_large_512_ade20k_160k.py lr=2e-5"),
  },
}
WARMUP_RATIO = 1e-6
CAT_MAX_RATIO = 0.75
BN_MOMENTUM, BN_EPS = 0.1, 1e-5
_HIGHEST = jax.lax.Precision.HIGHEST


# -- metrics ----------------------------------------------------------------------------------------------------
def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
  """(C, C) int64 counts, rows = ground truth, columns = prediction; pixels whose ground truth is the ignore index
  (or any id >= C) are left out."""
  gt, pred = np.asarray(gt).ravel().astype(np.int64), np.asarray(pred).ravel().astype(np.int64)
  keep = (gt >= 0) & (gt < num_classes)
  return np.bincount(gt[keep] * num_classes + pred[keep], minlength=num_classes * num_classes).reshape(
    num_classes, num_classes
  )


def scores(conf: np.ndarray) -> dict:
  """mIoU, mAcc, aAcc (percent) and the per-class IoU / accuracy (NaN: undefined) of a confusion matrix."""
  conf = np.asarray(conf, np.float64)
  inter, label, pred = np.diag(conf), conf.sum(1), conf.sum(0)
  union = label + pred - inter
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, inter / union, np.nan)
    acc = np.where(label > 0, inter / label, np.nan)
  total = label.sum()
  nanmean = lambda a: float(np.nanmean(a)) * 100 if np.isfinite(a).any() else float("nan")  # noqa: E731
  return {
    "miou": nanmean(iou),
    "macc": nanmean(acc),
    "aacc": float(inter.sum() / total * 100) if total else float("nan"),
    "iou": iou * 100,
    "acc": acc * 100,
  }


# -- resizing (PyTorch's bilinear, align_corners=False) --------------------------------------------------------
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float32 matrix of F.interpolate(mode="bilinear", align_corners=False) along one axis."""
  m = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for o in range(out_size):
    src = max((o + 0.5) * scale - 0.5, 0.0)
    i0 = min(int(src), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    lam = src - i0
    m[o, i0] += 1.0 - lam
    m[o, i1] += lam
  return m.astype(np.float32)


def rescale_size(h: int, w: int, long_max: float, short_max: float) -> tuple[int, int]:
  """mmcv.imrescale's (new_h, new_w) for img_scale (long_max, short_max), keep_ratio."""
  sf = min(long_max / max(h, w), short_max / min(h, w))
  return int(h * sf + 0.5), int(w * sf + 0.5)


# -- the training pipeline (host) -------------------------------------------------------------------------------
def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """mmseg's PhotoMetricDistortion on an RGB uint8 image (brightness +-32, contrast / saturation x U(0.5, 1.5), hue
  +-18 on OpenCV's 0-180 scale, each with probability 1/2; contrast before or after the HSV steps)."""

  def convert(x, alpha=1.0, beta=0.0):
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

  if rng.integers(2):
    img = convert(img, beta=rng.uniform(-32, 32))
  mode = rng.integers(2)
  if mode == 1 and rng.integers(2):
    img = convert(img, alpha=rng.uniform(0.5, 1.5))
  if rng.integers(2):  # saturation, then hue: each its own HSV round trip, as mmseg
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if rng.integers(2):
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + rng.integers(-18, 18)) % 180
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if mode == 0 and rng.integers(2):
    img = convert(img, alpha=rng.uniform(0.5, 1.5))
  return img


def train_view(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, crop: int):
  """(image (crop, crop, 3) uint8, mask (crop, crop) uint8, (h, w) of the content at the top left) of one
  training example through the ADE20K pipeline (module doc)."""
  ratio = rng.uniform(0.5, 2.0)  # mmseg's random_sample_ratio: the scale truncated to integers
  h, w = rescale_size(image.shape[0], image.shape[1], int(4 * crop * ratio), int(crop * ratio))
  image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
  mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)

  def bbox():
    return rng.integers(0, max(h - crop, 0) + 1), rng.integers(0, max(w - crop, 0) + 1)

  top, left = bbox()
  for _ in range(10):  # RandomCrop's cat_max_ratio: up to 10 redraws, the last one unchecked (as mmseg)
    m = mask[top : top + crop, left : left + crop]
    _, counts = np.unique(m[m != IGNORE], return_counts=True)
    if len(counts) > 1 and counts.max() / counts.sum() < CAT_MAX_RATIO:
      break
    top, left = bbox()
  image, mask = image[top : top + crop, left : left + crop], mask[top : top + crop, left : left + crop]
  if rng.random() < 0.5:
    image, mask = image[:, ::-1], mask[:, ::-1]
  image = photometric_distortion(np.ascontiguousarray(image), rng)
  ch, cw = mask.shape
  out_i = np.zeros((crop, crop, 3), np.uint8)
  out_m = np.full((crop, crop), IGNORE, np.uint8)
  out_i[:ch, :cw], out_m[:ch, :cw] = image, mask
  return out_i, out_m, (ch, cw)


# -- sliding windows --------------------------------------------------------------------------------------------
def slide_boxes(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
  """mmseg's slide_inference windows (y1, y2, x1, x2) over an h x w image, row-major."""
  hg = max(h - crop + stride - 1, 0) // stride + 1
  wg = max(w - crop + stride - 1, 0) // stride + 1
  boxes = []
  for hi in range(hg):
    for wi in range(wg):
      y2, x2 = min(hi * stride + crop, h), min(wi * stride + crop, w)
      boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
  return boxes


def slide_factors(window_logits, boxes, h: int, w: int, out_h: int, out_w: int, patch: int):
  """(out_h, out_w, C) logits of an h x w image from its windows' patch-grid logits (n, g, g, C), as mmseg's
  ``slide_inference`` + rescale: each window's logits upsampled bilinearly to the window, summed into the image,
  divided by the count map, then resized bilinearly to out_h x out_w. A window smaller than the grid's ``g *
  patch`` pixels (an image smaller than the crop, padded) keeps the ceil(box / patch) cells over its content, upsampled
  to those cells' pixels and cropped to the box. Separable: the windows form a grid, so the count map is an outer
  product and every step is a pair of matrix products."""
  rows = list(dict.fromkeys((b[0], b[1]) for b in boxes))
  cols = list(dict.fromkeys((b[2], b[3]) for b in boxes))
  count_h, count_w = np.zeros(h, np.float32), np.zeros(w, np.float32)
  for y1, y2 in rows:
    count_h[y1:y2] += 1
  for x1, x2 in cols:
    count_w[x1:x2] += 1
  if count_h.min() < 1 or count_w.min() < 1:
    raise ValueError(f"the windows {boxes} do not cover the {h}x{w} image")
  rh = bilinear_matrix(h, out_h) / count_h[None]
  rw = bilinear_matrix(w, out_w) / count_w[None]
  left, right = [], []
  for logits, (y1, y2, x1, x2) in zip(window_logits, boxes):
    gh, gw = -(-(y2 - y1) // patch), -(-(x2 - x1) // patch)
    logits = np.asarray(logits, np.float32)[:gh, :gw]
    mh = rh[:, y1:y2] @ bilinear_matrix(gh, gh * patch)[: y2 - y1]  # (out_h, gh)
    mw = rw[:, x1:x2] @ bilinear_matrix(gw, gw * patch)[: x2 - x1]  # (out_w, gw)
    left.append(mh)
    right.append(np.matmul(mw[None], logits).reshape(gh, -1))  # (gh, out_w * C)
  # One GEMM sums the windows: [mh_1 ... mh_n] @ [part_1; ...; part_n].
  return np.concatenate(left, axis=1), np.concatenate(right, axis=0)


def assemble(window_logits, boxes, h: int, w: int, out_h: int, out_w: int, patch: int) -> np.ndarray:
  """The (out_h, out_w, C) logits of ``slide_factors`` (which see), multiplied out on the host."""
  left, right = slide_factors(window_logits, boxes, h, w, out_h, out_w, patch)
  return (left @ right).reshape(out_h, out_w, -1)


def _pad_to(n: int, m: int = 64) -> int:
  return -(-n // m) * m


def make_argmax_fn(num_classes: int) -> Callable:
  """(left (H, K), right (K, W * C)) -> argmax over the classes of their product (H, W) int32, on the device (the
  product is H x W x C floats: the largest array of the evaluation)."""

  def argmax(left, right):
    out = jnp.matmul(left, right, precision=_HIGHEST)
    return jnp.argmax(out.reshape(left.shape[0], -1, num_classes), axis=-1).astype(jnp.int32)

  return argmax


def device_argmax(fn: Callable, left: np.ndarray, right: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """``fn`` (a jitted ``make_argmax_fn``) on factors zero-padded to multiples of 64 (few distinct shapes, so few
  compilations over a validation set of many image sizes); the (out_h, out_w) prediction."""
  k, c = left.shape[1], right.shape[1] // out_w
  hp, kp, wp = _pad_to(out_h), _pad_to(k), _pad_to(out_w)
  lp = np.zeros((hp, kp), np.float32)
  lp[:out_h, :k] = left
  rp = np.zeros((kp, wp, c), np.float32)
  rp[:k, :out_w] = right.reshape(k, out_w, c)
  return np.asarray(fn(lp, rp.reshape(kp, wp * c)))[:out_h, :out_w]


# -- the head (device) ------------------------------------------------------------------------------------------
def poly_warmup_lr(base: float, iterations: int, warmup: int) -> Callable:
  """mmcv's PolyLrUpdaterHook(power=1, min_lr=0, warmup="linear", warmup_ratio=1e-6) as an optax schedule."""

  def lr(t):
    t = jnp.asarray(t, jnp.float32)
    regular = base * (1.0 - t / iterations)
    # mmcv: regular x (1 - k), k = (1 - t / warmup)(1 - ratio); written as ratio + (1 - ratio) t / warmup (float32)
    return jnp.where(t < warmup, regular * (WARMUP_RATIO + (1.0 - WARMUP_RATIO) * t / max(warmup, 1)), regular)

  return lr


def ibot_blocks(depth: int) -> tuple[int, ...]:
  """iBOT's [3, 5, 7, 11] (12 blocks) / [7, 11, 15, 23] (24 blocks) for any depth (module doc)."""
  return tuple(max(0, min(depth - 1, round(depth * f) - 1)) for f in (1 / 3, 1 / 2, 2 / 3, 1.0))


def make_feature_fn(graphdef, blocks: tuple[int, ...], depth: int, patch: int, final_norm: bool) -> Callable:
  """(backbone params, normalised images (B, H, W, 3)) -> the patch tokens of ``blocks`` concatenated, (B, H/p, W/p,
  F) float32; each block's through the final norm (DINOv2's get_intermediate_layers; iBOT's ``out_with_norm=true``:
  ``xp = self.norm(x[:, 1:, :])`` per output block) or the blocks' raw outputs (iBOT's config files)."""
  keep = depth - min(blocks)

  def features(params, images):
    b, h, w, _ = images.shape
    backbone = nnx.merge(graphdef, params)
    if final_norm:
      layers = backbone.get_intermediate_layers(images, keep)
      parts = [layers[i - (depth - keep)]["patch"] for i in blocks]
    else:
      _, _, kept = backbone._blocks(backbone.prepare_tokens(images), key=None, return_attention=False, keep_last=keep)
      r = 1 + backbone.num_registers
      parts = [kept[i - (depth - keep)].reshape(b, -1, backbone.embed_dim)[:, r:] for i in blocks]
    return jnp.concatenate(parts, axis=-1).astype(jnp.float32).reshape(b, h // patch, w // patch, -1)

  return features


def init_head(key, dim: int, num_classes: int, batchnorm: bool) -> dict:
  state = {"params": {"w": 0.01 * jax.random.normal(key, (dim, num_classes)), "b": jnp.zeros((num_classes,))}}
  if batchnorm:
    state["params"].update(scale=jnp.ones((dim,)), bias=jnp.zeros((dim,)))
    state["stats"] = {"mean": jnp.zeros((dim,)), "var": jnp.ones((dim,))}
  return state


def head_logits(params: dict, stats: dict | None, x, train: bool):
  """(B, h, w, F) features -> ((B, h, w, C) logits, new BN statistics)."""
  if "scale" in params:
    if train:
      axes = (0, 1, 2)
      mean, var = jnp.mean(x, axes), jnp.var(x, axes)
      n = x.shape[0] * x.shape[1] * x.shape[2]
      unbiased = var * n / max(n - 1, 1)
      stats = jax.tree.map(
        lambda s, v: (1 - BN_MOMENTUM) * s + BN_MOMENTUM * jax.lax.stop_gradient(v),
        stats,
        {"mean": mean, "var": unbiased},
      )
    else:
      mean, var = stats["mean"], stats["var"]
    x = (x - mean) * jax.lax.rsqrt(var + BN_EPS) * params["scale"] + params["bias"]
  return jnp.einsum("bhwf,fc->bhwc", x, params["w"], precision=_HIGHEST) + params["b"], stats


def _normalise(images, hw):
  """uint8 (B, S, S, 3) + content sizes (B, 2) -> normalised float32, padding 0 (mmseg pads after Normalize)."""
  x = device_augment.normalize(images.astype(jnp.float32))
  s = images.shape[1]
  idx = jnp.arange(s)
  valid = (idx[None, :, None] < hw[:, 0, None, None]) & (idx[None, None, :] < hw[:, 1, None, None])
  return jnp.where(valid[..., None], x, 0.0)


def make_train_step(feature_fn, tx, crop: int) -> Callable:
  """(head state, backbone params, uint8 crops, uint8 labels, content sizes) -> (state, loss): the frozen features,
  the head's logits upsampled to the crop (bilinear, align_corners False), cross-entropy, one AdamW step."""

  def step(state, params, images, labels, hw):
    feats = jax.lax.stop_gradient(feature_fn(params, _normalise(images, hw)))
    uh = jnp.asarray(bilinear_matrix(feats.shape[1], crop))  # built at trace time
    uw = jnp.asarray(bilinear_matrix(feats.shape[2], crop))

    def loss_fn(head_params):
      logits, stats = head_logits(head_params, state.get("stats"), feats, train=True)
      logits = jnp.einsum("yh,bhwc->bywc", uh, logits, precision=_HIGHEST)
      logits = jnp.einsum("xw,bywc->byxc", uw, logits, precision=_HIGHEST)
      lab = labels.astype(jnp.int32)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(lab == IGNORE, 0, lab))
      return jnp.mean(jnp.where(lab == IGNORE, 0.0, ce)), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new = {"params": optax.apply_updates(state["params"], updates), "opt": opt}
    if stats is not None:
      new["stats"] = stats
    return new, loss

  return step


def make_window_fn(feature_fn) -> Callable:
  """(head state, backbone params, uint8 windows, content sizes) -> low-resolution logits (B, h, w, C)."""

  def windows(state, params, images, hw):
    feats = feature_fn(params, _normalise(images, hw))
    return head_logits(state["params"], state.get("stats"), feats, train=False)[0]

  return windows


# -- pictures ---------------------------------------------------------------------------------------------------
def palette() -> np.ndarray:
  """(256, 3) uint8: Pascal VOC's colour map (class k -> colour k; 255, the ignore index, is cream)."""
  pal = np.zeros((256, 3), np.uint8)
  for i in range(256):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    pal[i] = (r, g, b)
  return pal


def save_picture(path: str, image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> None:
  pal = palette()
  h = image.shape[0]
  scale = max(1, math.ceil(96 / h))
  gap = np.full((h, 4, 3), 255, np.uint8)
  row = np.concatenate([image, gap, pal[np.asarray(gt).astype(np.uint8)], gap, pal[pred.astype(np.uint8)]], axis=1)
  row = np.repeat(np.repeat(row, scale, 0), scale, 1)
  Image.fromarray(row).save(path)


# -- the evaluator ----------------------------------------------------------------------------------------------
def _global(x, sharding) -> jax.Array:
  """A global array of the host value ``x``, which every process computes alike (the batch of views, the head's
  init): each process places only its own devices' rows, so the figures do not depend on the number of processes."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class SegmentationEvaluator(runner.Evaluator):
  """Linear semantic segmentation on frozen patch tokens; see the module docstring."""

  # iterations / lr 0 and weight_decay / warmup -1: the protocol's; blocks (): the protocol's (dinov2: the last);
  # num_classes 0: the layout's (folder sources need it); max_val_images 0: the whole validation split.
  DEFAULTS = dict(
    source="",
    num_classes=0,
    protocol="dinov2_linear",
    iterations=0,
    crop_size=512,
    batch_size=16,
    lr=0.0,
    weight_decay=-1.0,
    warmup=-1,
    blocks=(),
    num_images=4,
    max_val_images=0,
    log_every_s=30.0,
  )
  needs_labels = False

  def settings(self, depth: int, width: int) -> dict:
    """The protocol's numbers for a backbone of ``depth`` blocks and embedding ``width``, config overrides applied;
    ``lr_source`` says where the lr comes from."""
    c = self.cfg
    p = PROTOCOLS[c.protocol]
    iterations = c.iterations or p["iterations"]
    warmup = c.warmup if c.warmup >= 0 else int(round(p["warmup"] * iterations / p["iterations"]))
    blocks = tuple(c.blocks) or ((depth - 1,) if c.protocol == "dinov2_linear" else ibot_blocks(depth))
    if c.lr:
      lr, source = c.lr, f"config.evals.{self.name}.lr"
    elif p["lr"] is not None:
      lr, source = p["lr"], f"{c.protocol}'s"
    else:  # iBOT's per-architecture lr; another width: ViT-B's
      table = IBOT_LR[c.protocol]
      lr, source = table.get(width, table[768])
      if width not in table:
        source = f"width {width} is none of iBOT's (384 / 768 / 1024): {source}"
    return dict(
      lr_source=source,
      iterations=iterations,
      lr=lr,
      weight_decay=p["weight_decay"] if c.weight_decay < 0 else c.weight_decay,
      warmup=warmup,
      blocks=blocks,
    )

  def run(self, ctx, params, feats) -> dict:
    c, config = self.cfg, self.config
    if not c.source:
      raise ConfigError(f"config.evals.{self.name}.source: set it to ade20k:PATH, voc:PATH or folder:PATH")
    train_src = seg_data.load(c.source, "train", c.num_classes)
    val_src = seg_data.load(c.source, "val", c.num_classes)
    num_classes = train_src.num_classes
    kw = backbone_kwargs(config.model)  # the variant's depth unless config.model.depth overrides it
    depth, patch = kw["depth"], kw["patch_size"]
    s = self.settings(depth, kw["embed_dim"])
    crop, stride = c.crop_size, int(round(c.crop_size * 2 / 3))
    final_norm = c.protocol in ("dinov2_linear", "ibot_linear")  # ibot_linear_config: out_with_norm=False
    what = f"patch tokens of block(s) {list(s['blocks'])}, " + ("final norm" if final_norm else "no final norm")
    feature_fn = make_feature_fn(ctx.graphdef, s["blocks"], depth, patch, final_norm)
    dim = jax.eval_shape(feature_fn, params, jax.ShapeDtypeStruct((1, crop, crop, 3), jnp.float32)).shape[-1]
    schedule = poly_warmup_lr(s["lr"], s["iterations"], s["warmup"])
    tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=s["weight_decay"])
    state = init_head(jax.random.key(config.seed), dim, num_classes, batchnorm=c.protocol == "dinov2_linear")
    state["opt"] = tx.init(state["params"])
    b, r = ctx.batch_sharding, ctx.replicated
    key = (
      self.name,
      c.protocol,
      tuple(s["blocks"]),
      crop,
      num_classes,
      *(s[k] for k in ("iterations", "lr", "weight_decay", "warmup")),
    )
    step = ctx.compiled(
      ("segmentation_step",) + key,
      lambda: jax.jit(
        make_train_step(feature_fn, tx, crop),
        donate_argnums=0,
        in_shardings=(r, ctx.param_sharding, b, b, b),
        out_shardings=(r, r),
      ),
    )
    window = ctx.compiled(
      ("segmentation_windows",) + key,
      lambda: jax.jit(make_window_fn(feature_fn), in_shardings=(r, ctx.param_sharding, b, b), out_shardings=b),
    )
    ctx.log(
      f"segmentation ({c.protocol}): {len(train_src)} train / {len(val_src)} val images, {num_classes} classes, "
      f"{what}, dim {dim}, crop {crop}, batch {c.batch_size}, {s['iterations']} iterations, lr {s['lr']:g}, "
      f"wd {s['weight_decay']:g}, warm-up {s['warmup']}"
    )
    t0 = time.time()
    state, losses = self._train(
      ctx, step, jax.tree.map(lambda x: _global(x, r), state), params, train_src, s["iterations"], crop
    )
    train_s = time.time() - t0
    result = self._validate(ctx, window, state, params, val_src, crop, stride, patch, num_classes)
    tail = losses[-min(50, len(losses)) :]
    return dict(
      result,
      protocol=c.protocol,
      features=what,
      blocks=[int(i) for i in s["blocks"]],
      iterations=s["iterations"],
      lr=s["lr"],
      lr_source=s["lr_source"],
      head="BatchNorm + 1x1 conv" if c.protocol == "dinov2_linear" else "1x1 conv",
      weight_decay=s["weight_decay"],
      warmup=s["warmup"],
      batch_size=c.batch_size,
      crop_size=crop,
      stride=stride,
      num_classes=num_classes,
      num_train=len(train_src),
      source=c.source,
      final_loss=float(np.mean(tail)) if tail else float("nan"),
      train_seconds=train_s,
      seconds=time.time() - t0,
    )

  def _train(self, ctx, step, state, params, src, iterations: int, crop: int):
    """``iterations`` steps on batches of fresh training views (threads, one batch ahead); (state, losses)."""
    seed, bsz, b = self.config.seed, self.cfg.batch_size, ctx.batch_sharding
    order_rng = np.random.default_rng([seed, 0x5E6])
    order, pos = order_rng.permutation(len(src)), 0

    def draw():  # the next batch of indices: one permutation of the training set per epoch
      nonlocal order, pos
      idx = []
      while len(idx) < bsz:
        if pos == len(order):
          order, pos = order_rng.permutation(len(src)), 0
        idx.append(int(order[pos]))
        pos += 1
      return idx

    def one(it, slot, i):
      ex = src[i]
      return train_view(ex["image"], ex["mask"], np.random.default_rng([seed, 0x5E7, it, slot]), crop)

    losses, t0 = [], time.time()
    last = t0
    with concurrent.futures.ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:

      def submit(it):
        return [pool.submit(one, it, slot, i) for slot, i in enumerate(draw())]

      pending = submit(0) if iterations else []
      for it in range(iterations):
        work, pending = pending, (submit(it + 1) if it + 1 < iterations else None)
        views = [w.result() for w in work]
        images = _global(np.stack([v[0] for v in views]), b)
        labels = _global(np.stack([v[1] for v in views]), b)
        hw = _global(np.asarray([v[2] for v in views], np.int32), b)
        state, loss = step(state, params, images, labels, hw)
        losses.append(loss)
        now = time.time()
        if now - last >= self.cfg.log_every_s and it + 1 < iterations:
          ctx.log(
            f"segmentation train {it + 1}/{iterations} | loss {float(loss):.4f} | elapsed {hms(now - t0)} "
            f"ETA {hms((now - t0) * (iterations - it - 1) / (it + 1))}"
          )
          last = now
    return state, [float(v) for v in losses]

  def _validate(self, ctx, window, state, params, src, crop, stride, patch, num_classes) -> dict:
    """Sliding-window predictions of the validation images, their confusion matrix and the first pictures."""
    c = self.cfg
    wb = runner.device_batch(c.batch_size)  # windows per device call
    n = min(len(src), c.max_val_images) if c.max_val_images else len(src)
    conf = np.zeros((num_classes, num_classes), np.int64)
    argmax = ctx.compiled(("segmentation_argmax", num_classes), lambda: jax.jit(make_argmax_fn(num_classes)))
    out_dir = os.path.join(ctx.out_dir, self.name + ctx.suffix)
    files = []
    t0 = last = time.time()

    def windows_of(i):
      ex = src[i]
      h, w = rescale_size(ex["image"].shape[0], ex["image"].shape[1], 4 * crop, crop)
      resized = cv2.resize(ex["image"], (w, h), interpolation=cv2.INTER_LINEAR)
      boxes = slide_boxes(h, w, crop, stride)
      crops = []
      for y1, y2, x1, x2 in boxes:
        pad = np.zeros((crop, crop, 3), np.uint8)
        pad[: y2 - y1, : x2 - x1] = resized[y1:y2, x1:x2]
        crops.append((pad, (y2 - y1, x2 - x1)))
      return ex, (h, w), boxes, crops

    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
      for g0 in range(0, n, wb):
        items = list(pool.map(windows_of, range(g0, min(n, g0 + wb))))
        flat = [cr for item in items for cr in item[3]]
        logits = []
        for k in range(0, len(flat), wb):
          chunk = flat[k : k + wb]
          images = np.zeros((wb, crop, crop, 3), np.uint8)
          hw = np.full((wb, 2), crop, np.int32)
          for j, (img, size) in enumerate(chunk):
            images[j], hw[j] = img, size
          out = window(state, params, _global(images, ctx.batch_sharding), _global(hw, ctx.batch_sharding))
          logits.extend(np.asarray(multihost_utils.process_allgather(out, tiled=True))[: len(chunk)])
        k = 0
        for j, (ex, (h, w), boxes, _) in enumerate(items):
          mask = ex["mask"]
          left, right = slide_factors(logits[k : k + len(boxes)], boxes, h, w, mask.shape[0], mask.shape[1], patch)
          k += len(boxes)
          pred = device_argmax(argmax, left, right, mask.shape[0], mask.shape[1])
          conf += confusion(mask, pred, num_classes)
          if g0 + j < c.num_images and ctx.is_main:
            os.makedirs(out_dir, exist_ok=True)
            name = f"val_{g0 + j}.png"
            save_picture(os.path.join(out_dir, name), ex["image"], mask, pred)
            files.append(os.path.join(os.path.basename(out_dir), name))
        now, done = time.time(), min(n, g0 + wb)
        if now - last >= c.log_every_s and done < n:
          eta = hms((now - t0) * (n - done) / done)
          ctx.log(f"segmentation val {done}/{n} images | elapsed {hms(now - t0)} ETA {eta}")
          last = now
    sc = scores(conf)
    clean = lambda a: [float(v) if np.isfinite(v) else None for v in a]  # noqa: E731
    return {
      "miou": sc["miou"],
      "macc": sc["macc"],
      "aacc": sc["aacc"],
      "per_class_iou": clean(sc["iou"]),
      "per_class_acc": clean(sc["acc"]),
      "num_val": int(n),
      "files": files,
      "val_seconds": time.time() - t0,
    }

  def metrics(self, result: dict) -> dict:
    return {"miou": result["miou"]}

  def summary(self, r: dict) -> str:
    return (
      f"mIoU {r['miou']:.2f}% mAcc {r['macc']:.2f}% aAcc {r['aacc']:.2f}% ({r['protocol']}, {r['iterations']} "
      f"iterations, {r['num_val']} val images)"
    )

  @classmethod
  def validate(cls, cfg, field, *, config, patch, depth, num_devices) -> None:
    require(cfg.protocol in PROTOCOLS, f"{field}.protocol", f"must be one of {sorted(PROTOCOLS)}, got {cfg.protocol!r}")
    if cfg.source:
      kind, sep, path = str(cfg.source).partition(":")
      require(
        bool(sep) and kind in seg_data.KINDS and bool(path),
        f"{field}.source",
        f"must be ade20k:PATH, voc:PATH or folder:PATH, got {cfg.source!r}",
      )
      require(
        kind != "folder" or cfg.num_classes >= 1,
        f"{field}.num_classes",
        f"a folder source needs the number of classes, got {cfg.num_classes}",
      )
    require(
      isinstance(cfg.num_classes, int) and 0 <= cfg.num_classes <= 255,
      f"{field}.num_classes",
      f"must be 0 (the layout's) or in [1, 255], got {cfg.num_classes!r}",
    )
    require(
      isinstance(cfg.crop_size, int) and cfg.crop_size > 0 and cfg.crop_size % patch == 0,
      f"{field}.crop_size",
      f"must be a positive multiple of the patch size {patch}, got {cfg.crop_size!r}",
    )
    require(
      isinstance(cfg.batch_size, int) and cfg.batch_size >= 1 and cfg.batch_size % num_devices == 0,
      f"{field}.batch_size",
      f"must be a positive multiple of the {num_devices} devices, got {cfg.batch_size!r}",
    )
    require(
      isinstance(cfg.iterations, int) and cfg.iterations >= 0,
      f"{field}.iterations",
      f"must be >= 0, got {cfg.iterations!r}",
    )
    require(cfg.lr >= 0, f"{field}.lr", f"must be >= 0 (0: the protocol's), got {cfg.lr}")
    require(
      all(isinstance(i, int) and 0 <= i < depth for i in cfg.blocks),
      f"{field}.blocks",
      f"must be block indices in [0, depth={depth}), got {tuple(cfg.blocks)!r}",
    )
    require(cfg.num_images >= 0, f"{field}.num_images", f"must be >= 0, got {cfg.num_images}")
    require(cfg.max_val_images >= 0, f"{field}.max_val_images", f"must be >= 0, got {cfg.max_val_images}")
