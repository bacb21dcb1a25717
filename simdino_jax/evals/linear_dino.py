"""DINO's linear evaluation protocol (``config.evals.linear.protocol = "dino"``), with its lr sweep in one program.

What DINO's ``eval_linear.py`` (facebookresearch/dino, also SimDINO's) does, and what we do:

* Training views, drawn afresh every epoch: ``RandomResizedCrop(crop)`` (scale (0.08, 1), ratio (3/4, 4/3),
  torchvision's default *bilinear* filter) + ``RandomHorizontalFlip()`` on the host (``train_view``, uint8: a
  quarter of float32's host-to-device bytes), ImageNet normalisation on the device. Every epoch the training
  images go through the frozen backbone again: nothing is cached, as in DINO.
* Evaluation view: ``Resize(resize, bicubic)`` of the shorter side + ``CenterCrop(crop)`` (``eval_view``); crop 224 /
  resize 256 on ImageNet, scaled for small data (``resolve_sizes``). The view is deterministic, so its features are
  computed once and every epoch's validation reuses them (DINO recomputes the same numbers every epoch).
* Features (``runner.make_feature_fn``, spec ("linear", n, avgpool)): cls tokens of the last ``n_last_blocks`` blocks after the final norm,
  plus the average of the last block's patch tokens with ``avgpool``. DINO's choice by architecture
  (``dino_feature_choice``): ViT-S and smaller 4 blocks, no avgpool; ViT-B and larger 1 block + avgpool. DINO
  interleaves [cls, avg] element-wise; we concatenate, a permutation of the same vector (the N(0, 0.01) init is
  i.i.d., so the classifier's distribution is the same).
* Classifier: ``nn.Linear`` with weight N(0, 0.01), bias 0; cross-entropy (mean over the batch); SGD momentum 0.9
  in PyTorch's form (buf = 0.9 buf + g; w -= lr buf), weight decay 0; lr = base lr x batch / 256 (linear scaling
  rule); ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per epoch (``epoch_lr_factors``); every
  training example once per epoch in a fresh random order (the last batch is smaller: padded slots carry weight 0).
  No feature standardisation (the frozen protocol's choice, not DINO's).
* Validation after every epoch (DINO's ``val_freq`` 1); DINO reports the best top-1 over the epochs ("Max accuracy
  so far"). DINO trains one lr per run and the paper sweeps it; here every lr of ``lrs`` trains in the same
  program (``jax.vmap`` over the lrs inside the jitted step, sharing the backbone's forward pass), and the best lr's
  best-epoch top-1 is reported, with the whole table.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from simdino_jax.data import augment, device_augment
from simdino_jax.evals import linear  # accuracies: the frozen probe's scoring, shared
from simdino_jax.progress import hms

_HIGHEST = jax.lax.Precision.HIGHEST
RRC_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults, which eval_linear.py keeps
RRC_RATIO = (3 / 4, 4 / 3)


def dino_feature_choice(embed_dim: int) -> tuple[int, bool]:
  """(n_last_blocks, avgpool) as DINO's eval_linear.py recommends: ViT-S (width 384) and smaller concatenate the
  cls tokens of the last 4 blocks; ViT-B (768) and larger use the last block's cls + average-pooled patch tokens."""
  return (4, False) if embed_dim <= 384 else (1, True)


def resolve_sizes(crop_size: int, resize_size: int, eval_image_size: int) -> tuple[int, int]:
  """(crop, resize) in pixels: crop 0 -> the run's eval image size; resize 0 -> round(crop x 256 / 224), DINO's
  ratio (224 -> 256, 32 -> 37)."""
  crop = crop_size or eval_image_size
  return crop, resize_size or int(round(crop * 256 / 224))


def scaled_lrs(lrs, batch_size: int) -> np.ndarray:
  """DINO's linear scaling rule: the given lrs are per 256 images."""
  return np.asarray(lrs, np.float64) * batch_size / 256.0


def epoch_lr_factors(epochs: int) -> np.ndarray:
  """(epochs,) multipliers of the peak lr: CosineAnnealingLR(T_max=epochs, eta_min=0), stepped after each epoch,
  so epoch e trains at (1 + cos(pi e / epochs)) / 2 (epoch 0 at the peak; the lr never reaches 0 while training)."""
  e = np.arange(epochs, dtype=np.float64)
  return 0.5 * (1.0 + np.cos(np.pi * e / epochs))


# -- views (host) -----------------------------------------------------------------------------------------------
def _resize(img: Image.Image | np.ndarray, size: tuple[int, int], backend: str, bicubic: bool) -> np.ndarray:
  """(w, h) resize: PIL (torchvision on PIL images, antialiased when shrinking) or OpenCV (area when shrinking)."""
  if backend == "pil":
    pil = img if isinstance(img, Image.Image) else Image.fromarray(augment.to_uint8(img))
    return np.asarray(pil.resize(size, Image.BICUBIC if bicubic else Image.BILINEAR))
  import cv2  # pylint: disable=g-import-not-at-top  (augment already imports it)

  arr = np.ascontiguousarray(augment.to_uint8(np.asarray(img)))
  shrink = size[0] < arr.shape[1] or size[1] < arr.shape[0]
  interp = cv2.INTER_AREA if shrink else (cv2.INTER_CUBIC if bicubic else cv2.INTER_LINEAR)
  return cv2.resize(arr, size, interpolation=interp)


def train_view(
  image: np.ndarray, rng: np.random.Generator, crop: int, resize: str = "pil", bicubic: bool = False
) -> np.ndarray:
  """RandomResizedCrop(crop) (bilinear as DINO's; ``bicubic`` as DINOv2's) + RandomHorizontalFlip: (crop, crop, 3)
  uint8 (normalised on the device, ``make_train_step``)."""
  image = augment.to_uint8(image)
  top, left, h, w = augment.rrc_params(image.shape[0], image.shape[1], rng, RRC_SCALE, RRC_RATIO)
  patch = image[top : top + h, left : left + w]
  x = patch if (h, w) == (crop, crop) else _resize(patch, (crop, crop), resize, bicubic=bicubic)
  if rng.random() < 0.5:
    x = x[:, ::-1]
  return np.ascontiguousarray(x)


def eval_view(image: np.ndarray, crop: int, resize_to: int) -> np.ndarray:
  """Resize(resize_to, bicubic) of the shorter side (torchvision truncates the long side) + CenterCrop(crop) +
  normalise: (crop, crop, 3) float32. Always PIL: the view is computed once, its exactness is cheap."""
  image = augment.to_uint8(image)
  h, w = image.shape[:2]
  if min(h, w) != resize_to:
    new = (resize_to, int(resize_to * h / w)) if w <= h else (int(resize_to * w / h), resize_to)
    image = _resize(image, new, "pil", bicubic=True)
  h, w = image.shape[:2]
  if h < crop or w < crop:  # torchvision's CenterCrop pads with zeros first (only if resize_to < crop)
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    image = np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    h, w = image.shape[:2]
  top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
  return augment.normalize(image[top : top + crop, left : left + crop])


def epoch_order(seed: int, epoch: int, num_train: int) -> np.ndarray:
  """The epoch's permutation of the training set (DistributedSampler's reshuffle each epoch)."""
  return np.random.default_rng([seed, 0x11AE, epoch]).permutation(num_train)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The crop / flip draws of example ``index`` in ``epoch``: a pure function of (seed, epoch, index), so a run
  is reproducible and independent of threads, batch size and process count, and each epoch draws new views."""
  return np.random.default_rng([seed, 0x11AF, epoch, index])


def train_batches(
  source,
  *,
  epoch: int,
  seed: int,
  batch_size: int,
  crop: int,
  resize: str = "pil",
  shard_index: int = 0,
  shard_count: int = 1,
  pool: concurrent.futures.Executor | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's part of each global batch of ``epoch``: ``{"image": (b, crop, crop, 3) uint8, "label": (b,)
  int32, "weight": (b,) float32}`` with ``b = batch_size // shard_count`` (process ``k`` holds slots
  ``[k b, (k + 1) b)``); slots past the end of the epoch are zeros with weight 0. Views are computed by ``pool``
  (threads: decoding, PIL and OpenCV release the GIL), one batch ahead of the one yielded."""
  n = len(source)
  order = epoch_order(seed, epoch, n)
  per = batch_size // shard_count
  steps = math.ceil(n / batch_size)

  def one(slot_index):
    ex = source[int(slot_index)]
    return train_view(ex["image"], example_rng(seed, epoch, int(slot_index)), crop, resize), int(ex["label"])

  def submit(step):
    lo = step * batch_size + shard_index * per
    idx = order[lo : min(lo + per, n)] if lo < n else order[:0]
    return [pool.submit(one, i) for i in idx] if pool is not None else list(idx)

  def assemble(work):
    image = np.zeros((per, crop, crop, 3), np.uint8)
    label = np.zeros((per,), np.int32)
    weight = np.zeros((per,), np.float32)
    for slot, w in enumerate(work):
      image[slot], label[slot] = w.result() if pool is not None else one(w)
      weight[slot] = 1.0
    return {"image": image, "label": label, "weight": weight}

  pending = submit(0)
  for step in range(steps):
    current, pending = pending, (submit(step + 1) if step + 1 < steps else None)
    yield assemble(current)


# -- the classifier sweep (device) ------------------------------------------------------------------------------
def init_classifiers(key: jax.Array, num_lrs: int, dim: int, num_classes: int) -> dict:
  """Every lr's LinearClassifier starts from the same N(0, 0.01) / 0 init; momentum buffers 0."""
  p = linear.init_params(key, dim, num_classes)
  rep = lambda a: jnp.broadcast_to(a, (num_lrs,) + a.shape)  # noqa: E731
  return {
    "w": rep(p["w"]),
    "b": rep(p["b"]),
    "mw": jnp.zeros((num_lrs, dim, num_classes), jnp.float32),
    "mb": jnp.zeros((num_lrs, num_classes), jnp.float32),
  }


def _loss(wb, x, y, weight):
  logits = jnp.matmul(x, wb[0], precision=_HIGHEST) + wb[1]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def sgd_update(
  state: dict, x: jax.Array, y: jax.Array, weight: jax.Array, lrs: jax.Array, momentum: float = 0.9
) -> tuple[dict, jax.Array]:
  """One SGD step of every classifier on features ``x`` (B, D): PyTorch's momentum (buf = m buf + g; p -= lr buf,
  dampening 0, no weight decay); the loss is the mean cross-entropy over the weighted examples. Returns the new
  state and the (L,) losses."""

  def one(w, b, mw, mb, lr):
    loss, (gw, gb) = jax.value_and_grad(_loss)((w, b), x, y, weight)
    mw, mb = momentum * mw + gw, momentum * mb + gb
    return w - lr * mw, b - lr * mb, mw, mb, loss

  w, b, mw, mb, loss = jax.vmap(one)(state["w"], state["b"], state["mw"], state["mb"], lrs)
  return {"w": w, "b": b, "mw": mw, "mb": mb}, loss


def make_train_step(feature_fn: Callable, key: str) -> Callable:
  """(state, backbone params, images, labels, weights, lrs (L,)) -> (state, losses (L,)): the frozen backbone's
  features of the batch (computed once, shared by every lr) and one SGD step of every classifier. uint8 images
  (``train_view``) are normalised here, as ``augment.normalize`` does on the host."""

  def step(state, params, images, labels, weights, lrs):
    if images.dtype == jnp.uint8:
      images = device_augment.normalize(images.astype(jnp.float32))
    x = jax.lax.stop_gradient(feature_fn(params, images)[key])
    return sgd_update(state, x, labels, weights, lrs)

  return step


# -- the loop ---------------------------------------------------------------------------------------------------
def run(
  *,
  step_fn: Callable,
  batches_fn: Callable[[int], Iterator],
  test_x,
  test_y,
  num_classes: int,
  dim: int,
  lrs,
  batch_size: int,
  epochs: int,
  seed: int,
  num_train: int,
  log: Callable[[str], None] = print,
) -> dict:
  """The protocol's epochs: ``batches_fn(epoch)`` yields device batches (images, labels, weights), ``step_fn(state,
  images, labels, weights, lrs)`` trains every classifier on one; after each epoch every classifier is validated
  on the test features. Returns the summary written to linear.json (module doc)."""
  base = tuple(float(lr) for lr in lrs)
  peak = scaled_lrs(base, batch_size)
  factors = epoch_lr_factors(epochs)
  state = init_classifiers(jax.random.key(seed), len(base), dim, num_classes)
  test_x = jnp.asarray(test_x, jnp.float32)
  steps = math.ceil(num_train / batch_size)
  curve = np.zeros((epochs, len(base), 2))  # per epoch, per lr: top-1 / top-5
  t0 = last_log = time.time()
  for epoch in range(epochs):
    lr_now = jnp.asarray(peak * factors[epoch], jnp.float32)
    losses = []
    for i, (images, labels, weights) in enumerate(batches_fn(epoch)):
      state, loss = step_fn(state, images, labels, weights, lr_now)
      losses.append(loss)
      now = time.time()
      if now - last_log > 60 and i + 1 < steps:  # long (ImageNet) epochs: a line a minute
        done = epoch + (i + 1) / steps
        log(
          f"linear (dino) epoch {epoch + 1}/{epochs} step {i + 1}/{steps} | elapsed {hms(now - t0)} "
          f"ETA {hms((now - t0) * (epochs - done) / done)}"
        )
        last_log = now
    curve[epoch] = linear.accuracies({"w": state["w"], "b": state["b"]}, test_x, test_y)
    mean_loss = np.mean(np.stack([np.asarray(v) for v in losses]), axis=0)
    now, last_log = time.time(), time.time()
    best = int(np.argmax(curve[epoch, :, 0]))
    log(
      f"linear (dino) epoch {epoch + 1}/{epochs} | loss {mean_loss[best]:.4f} top-1 {curve[epoch, best, 0]:.2f}% "
      f"(lr {base[best]:g}) | elapsed {hms(now - t0)} ETA {hms((now - t0) * (epochs - epoch - 1) / (epoch + 1))}"
    )

  best_epoch = np.argmax(curve[:, :, 0], axis=0)  # per lr: DINO's "max accuracy so far" (first of equal values)
  best_top1 = curve[best_epoch, np.arange(len(base)), 0]
  b = int(np.argmax(best_top1))  # the first of equal accuracies: the smallest such lr
  per_lr = {
    f"{lr:g}": {
      "top1": float(best_top1[i]),
      "top5": float(curve[best_epoch[i], i, 1]),
      "best_epoch": int(best_epoch[i]) + 1,
      "last_top1": float(curve[-1, i, 0]),
      "scaled_lr": float(peak[i]),
      "top1_per_epoch": [float(v) for v in curve[:, i, 0]],
    }
    for i, lr in enumerate(base)
  }
  return {
    "accuracy": float(best_top1[b]),
    "top5": per_lr[f"{base[b]:g}"]["top5"],
    "lr": base[b],
    "scaled_lr": float(peak[b]),
    "best_epoch": int(best_epoch[b]) + 1,
    "last_top1": float(curve[-1, b, 0]),
    "per_lr": per_lr,
    "epochs": epochs,
    "batch_size": batch_size,
    "num_train": int(num_train),
    "num_test": int(test_x.shape[0]),
    "feature_dim": int(dim),
    "seconds": time.time() - t0,
  }


def default_threads() -> int:
  return max(1, min(32, os.cpu_count() or 1))
