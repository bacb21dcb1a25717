"""Last-layer cls attention maps as PNG grids (DINO's visualize_attention.py, several images at once).

For each image: the attention of the cls query over the patch keys in the last block, one map per head
(registers and the cls key excluded), their head average, and DINO's thresholded masks keeping 60% of each map's
mass (``mass_mask``). Maps are upsampled to the image size by repeating each patch (nearest, as DINO), and the
whole grid by an integer factor so that small images stay visible.

Grid layout (``tile`` = image size x upscale, in pixels; ``2 + heads`` columns, 2 rows):
  row 0: input image | head-average attention | head 1 ... head h       (viridis, each map scaled to its max)
  row 1: input inside the head-average mask | head-average mask | mask of head 1 ... head h   (white = kept)
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from flax import nnx
from PIL import Image

from simdino_jax.data import augment, pipeline
from simdino_jax.errors import require
from simdino_jax.evals import runner
from simdino_jax.models.network import backbone_kwargs


def cls_attention(attention: np.ndarray, num_registers: int = 0) -> np.ndarray:
  """attention (B, heads, T, T) with tokens [cls, registers, patches] -> cls-query rows over patch keys (B, heads, N)."""
  attention = np.asarray(attention, np.float32)
  return attention[:, :, 0, 1 + num_registers :]


def mass_mask(maps: np.ndarray, keep: float = 0.6) -> np.ndarray:
  """Boolean mask (same shape) keeping the largest entries of each map (last axis) that hold ``keep`` of its mass.

  DINO's rule: sort ascending, normalise to sum 1, cumulative sum, keep the entries whose cumsum exceeds 1 - keep,
  i.e. the minimal set of largest entries whose mass reaches ``keep``."""
  maps = np.asarray(maps, np.float64)
  order = np.argsort(maps, axis=-1, kind="stable")
  sorted_vals = np.take_along_axis(maps, order, axis=-1)
  cum = np.cumsum(sorted_vals / np.sum(sorted_vals, axis=-1, keepdims=True), axis=-1)
  kept_sorted = cum > 1.0 - keep
  mask = np.empty_like(kept_sorted)
  np.put_along_axis(mask, order, kept_sorted, axis=-1)  # back to the original positions
  return mask


def entropy(maps: np.ndarray) -> np.ndarray:
  """Entropy in nats of each map (last axis) normalised to a distribution; log(N) for a uniform map."""
  p = np.asarray(maps, np.float64)
  p = p / np.sum(p, axis=-1, keepdims=True)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def upscale_factor(image_size: int, min_tile: int = 96) -> int:
  """Integer factor that makes a tile of an ``image_size`` image at least ``min_tile`` pixels wide."""
  return max(1, math.ceil(min_tile / image_size))


def _colorize(m: np.ndarray) -> np.ndarray:
  from matplotlib import colormaps  # the PNG writer only; keeps this import off the training path

  m = m / max(float(m.max()), 1e-12)
  return (colormaps["viridis"](m)[..., :3] * 255).astype(np.uint8)


def _up(m: np.ndarray, factor: int) -> np.ndarray:
  return np.repeat(np.repeat(m, factor, axis=0), factor, axis=1)


def render_grid(image: np.ndarray, maps: np.ndarray, masks: np.ndarray, *, patch_size: int, scale: int) -> np.ndarray:
  """uint8 (2 T, (2 + heads) T, 3) grid for one image (see the module doc); image (S, S, 3) uint8, maps and masks
  (heads + 1, gh, gw) with the head average first."""
  image = np.asarray(image, np.uint8)
  s_h, s_w = image.shape[:2]
  gh, gw = maps.shape[1:]
  if (gh * patch_size, gw * patch_size) != (s_h, s_w):
    raise ValueError(f"a {gh}x{gw} patch grid of {patch_size}px does not cover a {s_h}x{s_w} image")
  row0 = [image] + [_colorize(_up(m, patch_size)) for m in maps]
  inside = (image * _up(masks[0], patch_size)[..., None].astype(np.float32) * 0.85 + image * 0.15).astype(
    np.uint8
  )  # the input dimmed outside the head-average mask
  row1 = [inside] + [np.repeat(_up(k, patch_size)[..., None] * 255, 3, -1).astype(np.uint8) for k in masks]
  grid = np.concatenate([np.concatenate(row0, axis=1), np.concatenate(row1, axis=1)], axis=0)
  return _up(grid, scale)


def save_attention_maps(
  images: np.ndarray,
  attention: np.ndarray,
  out_dir: str,
  *,
  patch_size: int,
  num_registers: int = 0,
  keep: float = 0.6,
  prefix: str = "attention",
) -> dict:
  """Writes ``out_dir/<prefix>_<i>.png`` for each image and ``out_dir/<prefix>.npz`` (``cls_row``: the cls query's
  attention over all keys, (B, heads, T); ``images``); returns a JSON-able summary.

  images (B, S, S, 3) uint8 (the network's input, de-normalised), attention (B, heads, T, T) of the last block.
  The summary holds ``num_images``, ``files`` (relative to out_dir's parent), the mean entropy of the cls
  attention (per head and of the head average, nats, with ``max_entropy`` = log N for reference) and the mean
  fraction of patches inside the ``keep``-mass masks."""
  images = np.asarray(images, np.uint8)
  maps = cls_attention(attention, num_registers)  # (B, h, N)
  b, heads, n = maps.shape
  s_h, s_w = images.shape[1:3]
  gh, gw = s_h // patch_size, s_w // patch_size
  if gh * gw != n:
    raise ValueError(f"attention has {n} patch keys but a {s_h}x{s_w} image with {patch_size}px patches has {gh * gw}")
  maps = np.concatenate([maps.mean(axis=1, keepdims=True), maps], axis=1)  # head average first
  masks = mass_mask(maps, keep)
  scale = upscale_factor(s_h)
  os.makedirs(out_dir, exist_ok=True)
  files = []
  for i in range(b):
    grid = render_grid(
      images[i],
      maps[i].reshape(heads + 1, gh, gw),
      masks[i].reshape(heads + 1, gh, gw),
      patch_size=patch_size,
      scale=scale,
    )
    name = f"{prefix}_{i}.png"
    Image.fromarray(grid).save(os.path.join(out_dir, name))
    files.append(os.path.join(os.path.basename(os.path.normpath(out_dir)), name))
  # The raw rows too: the cls query over every key [cls, registers, patches] (B, heads, T), for analysis.
  np.savez_compressed(
    os.path.join(out_dir, f"{prefix}.npz"),
    cls_row=np.asarray(attention, np.float32)[:, :, 0],
    images=images,
    num_registers=num_registers,
    patch_size=patch_size,
  )
  ent = entropy(maps)  # (B, h + 1)
  return {
    "num_images": int(b),
    "files": files,
    "arrays": os.path.join(os.path.basename(os.path.normpath(out_dir)), f"{prefix}.npz"),
    "num_heads": int(heads),
    "grid": [int(gh), int(gw)],
    "tile_size": int(s_h * scale),
    "png_size": [int(2 * s_h * scale), int((heads + 2) * s_w * scale)],
    "mean_entropy": float(ent[:, 1:].mean()),
    "mean_entropy_head_average": float(ent[:, 0].mean()),
    "max_entropy": float(np.log(n)),
    "mask_keep": keep,
    "mean_mask_fraction": float(masks[:, 1:].mean()),
  }


class _Head:
  """The first ``n`` examples of a source (a view, for eval_batches)."""

  def __init__(self, source, n: int):
    self.source, self.n = source, min(n, len(source))
    self.num_classes = source.num_classes

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index):
    return self.source[index]


class AttentionEvaluator(runner.Evaluator):
  """``type="attention"``: last-layer cls attention maps of the first ``num_images`` test images, written as PNG
  grids and raw rows into DIR/eval/NAME/ (``save_attention_maps``); needs no labels. image_size 0: the eval size."""

  DEFAULTS = dict(num_images=4, keep=0.6, image_size=0)
  needs_labels = False

  def run(self, ctx, params, feats) -> dict:
    c = self.cfg
    size = c.image_size or ctx.image_size
    subset = _Head(ctx.test_source, c.num_images)
    graphdef = ctx.graphdef
    fn = ctx.backbone_fn(
      "attention", lambda p, images: nnx.merge(graphdef, p)(images, key=None, return_attention=True)["attention"]
    )
    attn, _ = ctx.extract(params, subset, fn, image_size=size)
    # The network's input, de-normalised for display (the same eval transform as the features).
    images = np.stack([pipeline.eval_transform(subset[i]["image"], size) for i in range(len(subset))])
    images = np.clip(np.round((images * augment.IMAGENET_STD + augment.IMAGENET_MEAN) * 255), 0, 255).astype(np.uint8)
    kw = backbone_kwargs(ctx.config.model)
    out_dir = os.path.join(ctx.out_dir, self.name + ctx.suffix)
    summary = (
      save_attention_maps(
        images, attn, out_dir, patch_size=kw["patch_size"], num_registers=kw["num_registers"], keep=c.keep
      )
      if jax.process_index() == 0
      else {"num_images": len(subset)}
    )
    return dict(summary, image_size=int(size))

  def summary(self, r: dict) -> str:
    return (
      f"{r['num_images']} images, mean cls-attention entropy {r.get('mean_entropy', float('nan')):.3f} nats "
      f"(uniform {r.get('max_entropy', float('nan')):.3f})"
    )

  @classmethod
  def validate(cls, cfg, field, *, config, patch, depth, num_devices) -> None:
    require(cfg.num_images >= 1, f"{field}.num_images", f"must be >= 1, got {cfg.num_images}")
    require(0 < cfg.keep < 1, f"{field}.keep", f"must be in (0, 1), got {cfg.keep}")
    require(
      cfg.image_size == 0 or (cfg.image_size > 0 and cfg.image_size % patch == 0),
      f"{field}.image_size",
      f"must be 0 (eval.image_size) or a positive multiple of the patch size {patch}, got {cfg.image_size}",
    )
