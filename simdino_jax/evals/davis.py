"""DAVIS-2017 semi-supervised video object segmentation by label propagation, scored with J&F.

Propagation follows DINO's ``eval_video_segmentation.py`` (facebookresearch/dino, after UVC): each frame is read with
OpenCV, resized (bilinear) so that its short side is ``short_side`` (480) and its long side ``short_side x aspect``
floored to a multiple of ``size_multiple`` (64), converted to RGB and normalised with the script's constants (note
its std 0.228 for red); the backbone's last-block patch tokens (after the final norm, registers excluded) are
l2-normalised. The first frame's annotation, downsampled to the patch grid (nearest) and one-hot, and the soft labels
predicted for the ``n_last_frames`` (7) previous frames form the context; the affinity of each target patch to every
context patch is exp(cos / ``temperature``) (0.1), restricted to a (2 ``size_mask_neighborhood`` + 1)^2 window (12),
only the ``topk`` (5) largest per target patch are kept (ties at the k-th value included, as the script's
``aff < min(topk)`` rule) and renormalised to sum 1; the target's soft labels are the weighted sum of the context
labels. They are upsampled bilinearly by the patch size (PyTorch's ``align_corners=False``), each channel min-max
normalised (``norm_mask``), argmaxed and resized to the original frame with PIL's nearest filter. The official
neighbourhood mask is a Python 4-loop over a dense (hw, hw) matrix; here it is one broadcast comparison, and one
jitted step does a frame (the context is a fixed-size ring buffer with a validity flag per slot).

Scoring follows the DAVIS 2017 evaluation code (davisvideochallenge/davis2017-evaluation, semi-supervised task):
objects 1..N (N: the largest id of the first annotation; void 255 counts as background, as in that code, whose
void mask is computed after the masks became boolean and is therefore always empty), the first and last frames
excluded; J = region IoU (1 when both masks are empty), F = boundary F-measure with the code's ``_seg2bmap``
boundaries and a dilation by a disk of radius ceil(0.008 x image diagonal) (OpenCV, as the code); per object the
mean, the recall (fraction of frames > 0.5) and the decay (first minus last quarter); the global figures average
over all objects of all sequences, J&F = (Jm + Fm) / 2.
"""

from __future__ import annotations

import functools
import glob
import math
import os
import time

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from simdino_jax.errors import ConfigError, DataError, MissingDataError, require
from simdino_jax.evals import runner
from simdino_jax.progress import hms

# eval_video_segmentation.py's color_normalize (std 0.228 for red, not ImageNet's 0.229).
MEAN = np.array((0.485, 0.456, 0.406), np.float32)
STD = np.array((0.228, 0.224, 0.225), np.float32)
BOUND_TH = 0.008  # DAVIS boundary tolerance, as a fraction of the image diagonal
OVERLAY_HEIGHT = 160  # tile height of the overlay strips, pixels
_CHANNEL_PAD = 8  # label channels are padded to a multiple of this (one compilation for 1..7 objects)


def palette(n: int = 256) -> np.ndarray:
  """The DAVIS / PASCAL VOC colour map (n, 3) uint8: the bits of the index interleaved into r, g, b from the top."""
  idx = np.arange(n)
  cmap = np.zeros((n, 3), np.int64)
  for j in range(8):
    for ch in range(3):
      cmap[:, ch] |= ((idx >> (3 * j + ch)) & 1) << (7 - j)
  return cmap.astype(np.uint8)


# -- frames and annotations ------------------------------------------------------------------------------------
def resized_size(height: int, width: int, short_side: int, multiple: int) -> tuple[int, int]:
  """(th, tw) of eval_video_segmentation.py's read_frame: the short side ``short_side``, the long side scaled with the
  aspect ratio and floored to a multiple of ``multiple`` (a square frame counts as landscape)."""
  if height > width:
    return int((short_side * height / width) // multiple * multiple), short_side
  return short_side, int((short_side * width / height) // multiple * multiple)


def read_frame(path: str, short_side: int, multiple: int, patch: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(network input (th, tw, 3) float32 normalised, cropped to whole patches of ``patch`` px when given, original RGB
  uint8 (h, w, 3)); DataError naming the file."""
  bgr = cv2.imread(path, cv2.IMREAD_COLOR)
  if bgr is None:
    raise DataError(f"{path}: not a readable image")
  h, w = bgr.shape[:2]
  th, tw = resized_size(h, w, short_side, multiple)
  if th < max(1, patch) or tw < max(1, patch):
    raise DataError(
      f"{path}: a {h}x{w} frame resized to {th}x{tw} (short side, long side floored to a multiple of "
      f"{multiple}) holds no whole {patch}px patch"
    )
  x = cv2.resize(bgr, (tw, th)).astype(np.float32) / 255.0  # cv2's default bilinear, as the script
  x = (x[:, :, ::-1] - MEAN) / STD
  if patch:  # what DINO's patch-embedding convolution sees: the pixels past the last whole patch dropped
    x = x[: th // patch * patch, : tw // patch * patch]
  return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(bgr[:, :, ::-1])


def read_annotation(path: str) -> np.ndarray:
  """An indexed (palette or grey) PNG as uint8 ids (h, w); MissingDataError / DataError naming the file."""
  if not os.path.isfile(path):
    raise MissingDataError(f"{path}: annotation missing")
  try:
    with Image.open(path) as im:
      if im.mode not in ("P", "L"):
        raise DataError(f"{path}: annotation must be an indexed (palette) PNG, got mode {im.mode}")
      return np.array(im, np.uint8)
  except OSError as e:
    raise DataError(f"{path}: not a readable PNG ({e})") from None


def first_frame_labels(annotation: np.ndarray, grid_h: int, grid_w: int, channels: int) -> np.ndarray:
  """One-hot (grid_h * grid_w, channels) float32 of the annotation resized to the patch grid with PIL's nearest
  filter (read_seg); void (255) counts as background."""
  small = np.array(Image.fromarray(annotation).resize((grid_w, grid_h), Image.NEAREST))
  small = np.where(small == 255, 0, small).reshape(-1)
  return np.eye(channels, dtype=np.float32)[np.minimum(small, channels - 1)] * (small < channels)[:, None]


# -- propagation -----------------------------------------------------------------------------------------------
def neighbourhood_mask(grid_h: int, grid_w: int, radius: int) -> jax.Array:
  """(hw, hw) bool: target patch (i, j) sees source patch (i', j') iff |i - i'| <= radius and |j - j'| <= radius
  (eval_video_segmentation.py's restrict_neighborhood, without its loops)."""
  i = jnp.arange(grid_h * grid_w) // grid_w
  j = jnp.arange(grid_h * grid_w) % grid_w
  return (jnp.abs(i[:, None] - i[None, :]) <= radius) & (jnp.abs(j[:, None] - j[None, :]) <= radius)


def upsample_matrix(size: int, factor: int) -> np.ndarray:
  """(size * factor, size) bilinear interpolation matrix of PyTorch's F.interpolate(scale_factor=factor,
  mode="bilinear", align_corners=False, recompute_scale_factor=False) along one axis."""
  out = size * factor
  src = np.maximum((np.arange(out) + 0.5) / factor - 0.5, 0.0)
  i0 = np.floor(src).astype(np.int64)
  i1 = np.minimum(i0 + 1, size - 1)
  lam = src - i0
  m = np.zeros((out, size), np.float64)
  np.add.at(m, (np.arange(out), i0), 1.0 - lam)
  np.add.at(m, (np.arange(out), i1), lam)
  return m.astype(np.float32)


def propagate(feat_tar, context_feats, context_segs, valid, *, grid_h, grid_w, temperature, topk, radius):
  """Soft labels (hw, C) of the target frame: feat_tar (hw, D); context_feats (n, hw, D); context_segs (n, hw, C);
  valid (n,) bool (unfilled context slots are ignored). label_propagation of eval_video_segmentation.py."""
  hi = jax.lax.Precision.HIGHEST

  def norm(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  n, hw, d = context_feats.shape
  # (targets, context frames x sources): one matmul; the window and the unfilled slots masked out.
  logits = jnp.matmul(norm(feat_tar), norm(context_feats).reshape(n * hw, d).T, precision=hi) / temperature
  keep = jnp.repeat(valid, hw)[None, :]
  if radius > 0:
    keep = keep & jnp.tile(neighbourhood_mask(grid_h, grid_w, radius), (1, n))
  logits = jnp.where(keep, logits, -jnp.inf)
  k = min(topk, n * hw)
  # The barrier keeps XLA from rewriting this top_k into a full sort of each row (it does so when the matrix has
  # another consumer, the comparison below: 30x slower on CPU).
  top = jax.lax.optimization_barrier(jax.lax.top_k(logits, k)[0])
  kept = logits >= top[:, -1:]  # ties with the k-th value kept, as `aff[aff < tk_val_min] = 0`
  # exp(logit) renormalised over the kept entries; the row max is subtracted first (the same ratios, no overflow).
  w = jnp.where(kept, jnp.exp(logits - top[:, :1]), 0.0)
  w = w / jnp.sum(w, axis=1, keepdims=True)
  return jnp.matmul(w, context_segs.reshape(n * hw, -1).astype(jnp.float32), precision=hi)


def labels_to_mask(seg, *, grid_h, grid_w, patch):
  """(grid_h * patch, grid_w * patch) int32 ids: soft labels (hw, C) upsampled bilinearly, each channel with a
  positive max min-max normalised (norm_mask; a constant positive channel becomes 1), argmax over channels."""
  hi = jax.lax.Precision.HIGHEST
  up_h, up_w = jnp.asarray(upsample_matrix(grid_h, patch)), jnp.asarray(upsample_matrix(grid_w, patch))
  x = seg.reshape(grid_h, grid_w, -1)
  x = jnp.einsum("Hh,hwc->Hwc", up_h, x, precision=hi)
  x = jnp.einsum("Ww,Hwc->HWc", up_w, x, precision=hi)
  lo, hi_ = jnp.min(x, axis=(0, 1)), jnp.max(x, axis=(0, 1))
  span = hi_ - lo
  normed = jnp.where(span > 0, (x - lo) / jnp.where(span > 0, span, 1.0), 1.0)
  x = jnp.where(hi_ > 0, normed, x)
  return jnp.argmax(x, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("grid_h", "grid_w", "patch", "temperature", "topk", "radius"))
def _step(feat_tar, feats, segs, valid, slot, *, grid_h, grid_w, patch, temperature, topk, radius):
  seg = propagate(
    feat_tar, feats, segs, valid, grid_h=grid_h, grid_w=grid_w, temperature=temperature, topk=topk, radius=radius
  )
  mask = labels_to_mask(seg, grid_h=grid_h, grid_w=grid_w, patch=patch)
  feats = jax.lax.dynamic_update_index_in_dim(feats, feat_tar.astype(feats.dtype), slot, 0)
  segs = jax.lax.dynamic_update_index_in_dim(segs, seg, slot, 0)
  valid = valid.at[slot].set(True)
  return seg, mask, feats, segs, valid


class Propagator:
  """The context of one video: the first frame (features and one-hot labels) and a ring buffer of the
  ``n_last_frames`` previous frames' features and predicted soft labels. ``step(features)`` predicts a frame."""

  def __init__(
    self, first_feat, first_seg, *, grid_h, grid_w, patch, n_last_frames=7, temperature=0.1, topk=5, radius=12
  ):
    first_feat = jnp.asarray(first_feat, jnp.float32)
    first_seg = jnp.asarray(first_seg, jnp.float32)
    n = 1 + n_last_frames
    self.feats = jnp.zeros((n, *first_feat.shape), jnp.float32).at[0].set(first_feat)
    self.segs = jnp.zeros((n, *first_seg.shape), jnp.float32).at[0].set(first_seg)
    self.valid = jnp.zeros((n,), bool).at[0].set(True)
    self.n_last, self.count = n_last_frames, 0
    self.kw = dict(
      grid_h=grid_h, grid_w=grid_w, patch=patch, temperature=float(temperature), topk=int(topk), radius=int(radius)
    )

  def step(self, feat) -> tuple[jax.Array, jax.Array]:
    """(soft labels (hw, C), ids (grid_h * patch, grid_w * patch)) of the next frame; it then joins the context
    (replacing the oldest of the previous frames)."""
    slot = 1 + self.count % self.n_last if self.n_last else 0
    seg, mask, feats, segs, valid = _step(
      jnp.asarray(feat, jnp.float32), self.feats, self.segs, self.valid, jnp.int32(slot), **self.kw
    )
    if self.n_last:
      self.feats, self.segs, self.valid = feats, segs, valid
    self.count += 1
    return seg, mask


def propagate_video(feats, first_seg, *, grid_h, grid_w, patch, **kw) -> tuple[list, list]:
  """(soft labels, ids) of frames 1..T-1 from features (T, hw, D) and the first frame's one-hot labels (hw, C)."""
  prop = Propagator(feats[0], first_seg, grid_h=grid_h, grid_w=grid_w, patch=patch, **kw)
  out = [prop.step(f) for f in feats[1:]]
  return [np.asarray(s) for s, _ in out], [np.asarray(m) for _, m in out]


# -- J & F -----------------------------------------------------------------------------------------------------
def region_j(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """Jaccard index per frame of boolean masks (..., H, W); 1 where both are empty (db_eval_iou)."""
  gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
  inter = np.sum(gt & pred, axis=(-2, -1))
  union = np.sum(gt | pred, axis=(-2, -1))
  return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def seg2bmap(seg: np.ndarray) -> np.ndarray:
  """1-pixel boundaries of a binary mask, offset half a pixel towards the origin (the DAVIS code's _seg2bmap)."""
  seg = np.asarray(seg, bool)
  e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
  e[:, :-1] = seg[:, 1:]
  s[:-1, :] = seg[1:, :]
  se[:-1, :-1] = seg[1:, 1:]
  b = (seg ^ e) | (seg ^ s) | (seg ^ se)
  b[-1, :] = seg[-1, :] ^ e[-1, :]
  b[:, -1] = seg[:, -1] ^ s[:, -1]
  b[-1, -1] = False
  return b


def boundary_radius(shape, bound_th: float = BOUND_TH) -> int:
  """Dilation radius in pixels: bound_th itself when >= 1, else ceil(bound_th x image diagonal)."""
  return int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def disk(radius: int) -> np.ndarray:
  """skimage.morphology.disk: (2r + 1, 2r + 1) uint8 with x^2 + y^2 <= r^2."""
  r = np.arange(-radius, radius + 1)
  return (r[:, None] ** 2 + r[None, :] ** 2 <= radius**2).astype(np.uint8)


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> float:
  """Boundary F-measure of one frame (the DAVIS code's f_measure): the boundary pixels of each mask matched within
  the other's boundaries dilated by a disk; precision over the prediction's, recall over the annotation's."""
  pred_b, gt_b = seg2bmap(pred), seg2bmap(gt)
  kernel = disk(boundary_radius(np.shape(pred), bound_th))
  pred_dil = cv2.dilate(pred_b.astype(np.uint8), kernel) > 0
  gt_dil = cv2.dilate(gt_b.astype(np.uint8), kernel) > 0
  n_fg, n_gt = int(pred_b.sum()), int(gt_b.sum())
  if n_fg == 0 or n_gt == 0:
    precision, recall = (1.0 if n_fg == 0 else 0.0), (1.0 if n_gt == 0 else 0.0)
  else:
    precision = float(np.sum(pred_b & gt_dil)) / n_fg
    recall = float(np.sum(gt_b & pred_dil)) / n_gt
  return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def statistics(values) -> tuple[float, float, float]:
  """(mean, recall = fraction > 0.5, decay = mean of the first quarter minus the last) of per-frame values
  (db_statistics: 4 bins at round(linspace(1, n, 5)) - 1, each bin's end included)."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return float("nan"), float("nan"), float("nan")
  ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.int64)
  bins = [v[ids[i] : ids[i + 1] + 1] for i in range(4)]
  return float(np.mean(v)), float(np.mean(v > 0.5)), float(np.mean(bins[0]) - np.mean(bins[3]))


def score_sequence(gt: np.ndarray, pred: np.ndarray, num_objects: int, bound_th: float = BOUND_TH) -> dict:
  """{object id: {"j": per-frame J, "f": per-frame F}} of label maps (T, H, W) (annotation, prediction), the first
  and last frames excluded; void (255) in the annotation counts as background."""
  gt, pred = np.asarray(gt)[1:-1], np.asarray(pred)[1:-1]
  gt = np.where(gt == 255, 0, gt)
  out = {}
  for obj in range(1, num_objects + 1):
    g, p = gt == obj, pred == obj
    out[obj] = {"j": region_j(g, p), "f": np.array([boundary_f(g[t], p[t], bound_th) for t in range(len(g))])}
  return out


def summarize(per_object: dict) -> dict:
  """Global figures in percent over all objects {(seq, id): {"j", "f"}}: jf_mean, j_mean, j_recall, j_decay,
  f_mean, f_recall, f_decay (each averaged over the objects, as the DAVIS code's evaluation_method.py)."""
  stats = {k: [statistics(v[k]) for v in per_object.values()] for k in ("j", "f")}
  r = {}
  for k in ("j", "f"):
    arr = np.array(stats[k], np.float64).reshape(-1, 3)
    for i, name in enumerate(("mean", "recall", "decay")):
      r[f"{k}_{name}"] = float(100 * np.mean(arr[:, i])) if len(arr) else float("nan")
  r = {"jf_mean": (r["j_mean"] + r["f_mean"]) / 2, **r}
  return r


# -- data layout -----------------------------------------------------------------------------------------------
def list_sequences(data_dir: str, split: str, resolution: str, only: str = "") -> list[tuple[str, list[str]]]:
  """[(name, frame paths)] of ImageSets/2017/<split>.txt (or the comma-separated ``only`` among them); one-line
  errors naming the missing file or folder."""
  if not os.path.isdir(data_dir):
    raise MissingDataError(f"{data_dir}: DAVIS folder not found (config.evals.davis.data_dir)")
  listing = os.path.join(data_dir, "ImageSets", "2017", f"{split}.txt")
  if not os.path.isfile(listing):
    raise MissingDataError(f"{listing}: sequence list of split {split!r} not found")
  for sub in ("JPEGImages", "Annotations"):
    folder = os.path.join(data_dir, sub, resolution)
    if not os.path.isdir(folder):
      raise MissingDataError(f"{folder}: folder not found (the DAVIS-2017 layout {sub}/{resolution}/<sequence>/)")
  with open(listing) as f:
    names = [line.strip() for line in f if line.strip()]
  if only:
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in names]
    if unknown:
      raise ConfigError(f"config.evals.davis.sequences: {unknown} not listed in {listing}")
    names = wanted
  if not names:
    raise DataError(f"{listing}: lists no sequence")
  out = []
  for name in names:
    folder = os.path.join(data_dir, "JPEGImages", resolution, name)
    if not os.path.isdir(folder):
      raise MissingDataError(f"{folder}: sequence {name!r} listed in {listing} but absent")
    frames = sorted(glob.glob(os.path.join(folder, "*.jpg")))
    if len(frames) < 3:
      raise DataError(f"{folder}: {len(frames)} frame(s); J&F needs at least 3 (the first and last are not scored)")
    for frame in frames:
      ann = annotation_path(data_dir, resolution, name, frame)
      if not os.path.isfile(ann):
        raise MissingDataError(f"{ann}: annotation missing (every frame needs one to be scored)")
    out.append((name, frames))
  return out


def annotation_path(data_dir: str, resolution: str, name: str, frame: str) -> str:
  stem = os.path.splitext(os.path.basename(frame))[0]
  return os.path.join(data_dir, "Annotations", resolution, name, f"{stem}.png")


def write_indexed(path: str, ids: np.ndarray, colours: np.ndarray) -> None:
  im = Image.fromarray(np.asarray(ids, np.uint8))
  im.putpalette(colours.reshape(-1).tolist())
  im.save(path, format="PNG")


def overlay_strip(frames, gts, preds, colours, height: int = OVERLAY_HEIGHT) -> np.ndarray:
  """uint8 image: a column per frame, the annotation (top) and the prediction (bottom) blended over the frame
  (objects at 50%, as the DAVIS code's overlay_semantic_mask)."""
  cols = []
  for rgb, gt, pred in zip(frames, gts, preds):
    tiles = []
    for ids in (gt, pred):
      ids = np.asarray(ids)
      blend = rgb.astype(np.float32) * 0.5 + colours[ids].astype(np.float32) * 0.5
      tile = np.where((ids > 0)[..., None], blend, rgb).astype(np.uint8)
      w = max(1, round(tile.shape[1] * height / tile.shape[0]))
      tiles.append(np.array(Image.fromarray(tile).resize((w, height), Image.BILINEAR)))
    cols.append(np.concatenate(tiles, axis=0))
  return np.concatenate(cols, axis=1)


class DavisEvaluator(runner.Evaluator):
  """``type="davis"``: DAVIS-2017 video object segmentation by label propagation (module doc); needs no labels of
  the training data. Writes DIR/eval/NAME/<sequence>/<frame>.png (palette PNGs, the DAVIS results layout) and
  DIR/eval/NAME/overlays/<sequence>.png."""

  DEFAULTS = dict(
    data_dir="",  # the DAVIS-2017 folder (JPEGImages/, Annotations/, ImageSets/)
    split="val",  # ImageSets/2017/<split>.txt
    resolution="480p",  # JPEGImages/<resolution>/, Annotations/<resolution>/
    sequences="",  # comma-separated subset of the split ("" = all)
    short_side=480,
    size_multiple=64,  # the long side is floored to a multiple of this
    n_last_frames=7,
    size_mask_neighborhood=12,  # patches; 0 = no restriction
    topk=5,
    temperature=0.1,
    batch_size=8,  # frames per forward pass (rounded down to a multiple of the device count: runner.device_batch)
    overlay_frames=8,  # frames in each sequence's overlay strip (0: none)
  )
  needs_labels = False

  def run(self, ctx, params, feats) -> dict:
    c = self.cfg
    if not c.data_dir:
      raise ConfigError(f"config.evals.{self.name}.data_dir: set it to the DAVIS-2017 folder")
    patch = ctx.patch_size
    root = os.path.expanduser(c.data_dir)
    seqs = list_sequences(root, c.split, c.resolution, c.sequences)
    graphdef = ctx.graphdef
    fn = ctx.backbone_fn(
      ("davis_patch",), lambda p, images: nnx.merge(graphdef, p)(images, key=None)["patch"].astype(jnp.float32)
    )
    batch = runner.device_batch(c.batch_size)
    out_dir = os.path.join(ctx.out_dir, self.name + ctx.suffix)
    colours = palette()
    total = sum(len(f) for _, f in seqs)
    done, t0 = 0, time.time()
    per_object, per_sequence = {}, {}
    for si, (name, frames) in enumerate(seqs):
      first = read_annotation(annotation_path(root, c.resolution, name, frames[0]))
      num_objects = int(np.max(np.where(first == 255, 0, first)))
      channels = -(-(num_objects + 1) // _CHANNEL_PAD) * _CHANNEL_PAD
      gts, preds, shown = [], [], {}
      show = set(np.linspace(0, len(frames) - 1, c.overlay_frames).round().astype(int).tolist())
      prop, shape = None, None
      for start in range(0, len(frames), batch):
        chunk = frames[start : start + batch]
        images, originals = zip(*(read_frame(f, c.short_side, c.size_multiple, patch) for f in chunk))
        shape = shape or originals[0].shape
        for f, rgb in zip(chunk, originals):
          if rgb.shape != shape:
            raise DataError(f"{f}: frame size {rgb.shape[:2]} differs from the sequence's first frame {shape[:2]}")
        size = images[0].shape
        x = np.zeros((batch, *size), np.float32)
        x[: len(chunk)] = np.stack(images)
        # Every process reads every frame (the propagation runs everywhere) and places its own devices' rows: the
        # tokens, gathered in frame order, do not depend on the number of processes or the mesh's device order.
        arr = jax.make_array_from_callback(x.shape, ctx.batch_sharding, lambda index, x=x: x[index])
        tokens = np.asarray(multihost_utils.process_allgather(fn(params, arr), tiled=True))[: len(chunk)]
        grid_h, grid_w = size[0] // patch, size[1] // patch
        for k, (f, rgb) in enumerate(zip(chunk, originals)):
          t = start + k
          ann = annotation_path(root, c.resolution, name, f)
          gt = first if t == 0 else read_annotation(ann)
          if gt.shape != rgb.shape[:2]:
            raise DataError(f"{ann}: annotation size {gt.shape} differs from its frame's {rgb.shape[:2]} ({f})")
          if t == 0:
            prop = Propagator(
              tokens[0],
              first_frame_labels(first, grid_h, grid_w, channels),
              grid_h=grid_h,
              grid_w=grid_w,
              patch=patch,
              n_last_frames=c.n_last_frames,
              temperature=c.temperature,
              topk=c.topk,
              radius=c.size_mask_neighborhood,
            )
            pred = first  # the given annotation, written as is (as the script)
          else:
            ids = np.asarray(prop.step(tokens[k])[1]).astype(np.uint8)
            pred = np.array(Image.fromarray(ids).resize((rgb.shape[1], rgb.shape[0]), Image.NEAREST))
          gts.append(gt)
          preds.append(pred)
          if t in show:
            shown[t] = rgb
      scores = score_sequence(np.stack(gts), np.stack(preds), num_objects)
      objects = {}
      for obj, s in scores.items():
        per_object[(name, obj)] = s
        jm, jr, jd = statistics(s["j"])
        fm, fr, fd = statistics(s["f"])
        objects[str(obj)] = {
          "j_mean": 100 * jm,
          "j_recall": 100 * jr,
          "j_decay": 100 * jd,
          "f_mean": 100 * fm,
          "f_recall": 100 * fr,
          "f_decay": 100 * fd,
        }
      seq_summary = summarize(scores)
      per_sequence[name] = {
        "jf_mean": seq_summary["jf_mean"],
        "j_mean": seq_summary["j_mean"],
        "f_mean": seq_summary["f_mean"],
        "num_frames": len(frames),
        "num_objects": num_objects,
        "input_size": [int(size[0]), int(size[1])],
        "objects": objects,
      }
      if ctx.is_main:
        seq_dir = os.path.join(out_dir, name)
        os.makedirs(seq_dir, exist_ok=True)
        for f, pred in zip(frames, preds):
          write_indexed(os.path.join(seq_dir, os.path.splitext(os.path.basename(f))[0] + ".png"), pred, colours)
        if shown:
          os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
          order = sorted(shown)
          strip = overlay_strip([shown[t] for t in order], [gts[t] for t in order], [preds[t] for t in order], colours)
          Image.fromarray(strip).save(os.path.join(out_dir, "overlays", f"{name}.png"))
      done += len(frames)
      elapsed = time.time() - t0
      ctx.log(
        f"{self.name}: [{si + 1}/{len(seqs)}] {name}: {len(frames)} frames, {num_objects} object(s), "
        f"J&F {seq_summary['jf_mean']:.1f} | elapsed {hms(elapsed)} ETA {hms(elapsed * (total - done) / done)}"
      )
    result = summarize(per_object)
    result.update(
      num_sequences=len(seqs),
      num_objects=len(per_object),
      num_frames=total,
      split=c.split,
      short_side=c.short_side,
      masks=os.path.basename(out_dir),
      features="last-block patch tokens",
      seconds=round(time.time() - t0, 1),
      per_sequence=per_sequence,
    )
    return result

  def metrics(self, result: dict) -> dict:
    return {"jf_mean": result["jf_mean"]}

  def summary(self, r: dict) -> str:
    return (
      f"J&F {r['jf_mean']:.1f} (J {r['j_mean']:.1f}, F {r['f_mean']:.1f}) on {r['num_sequences']} sequence(s), "
      f"{r['num_objects']} object(s)"
    )

  @classmethod
  def validate(cls, cfg, field, *, config, patch, depth, num_devices) -> None:
    def is_int(v):
      return isinstance(v, int) and not isinstance(v, bool)

    for name in ("short_side", "size_multiple"):
      require(is_int(cfg[name]) and cfg[name] > 0, f"{field}.{name}", f"must be a positive integer, got {cfg[name]!r}")
    require(
      is_int(cfg.n_last_frames) and cfg.n_last_frames >= 1,
      f"{field}.n_last_frames",
      f"must be an integer >= 1, got {cfg.n_last_frames!r}",
    )
    require(
      is_int(cfg.size_mask_neighborhood) and cfg.size_mask_neighborhood >= 0,
      f"{field}.size_mask_neighborhood",
      f"must be an integer >= 0 (0: no restriction), got {cfg.size_mask_neighborhood!r}",
    )
    require(is_int(cfg.topk) and cfg.topk >= 1, f"{field}.topk", f"must be an integer >= 1, got {cfg.topk!r}")
    require(
      isinstance(cfg.temperature, (int, float)) and cfg.temperature > 0,
      f"{field}.temperature",
      f"must be > 0, got {cfg.temperature!r}",
    )
    require(
      is_int(cfg.batch_size) and cfg.batch_size >= 1, f"{field}.batch_size", f"must be >= 1, got {cfg.batch_size!r}"
    )
    require(
      is_int(cfg.overlay_frames) and cfg.overlay_frames >= 0,
      f"{field}.overlay_frames",
      f"must be >= 0, got {cfg.overlay_frames!r}",
    )
    for name in ("data_dir", "split", "resolution", "sequences"):
      require(isinstance(cfg[name], str), f"{field}.{name}", f"must be a string, got {cfg[name]!r}")
    require(bool(cfg.split), f"{field}.split", "must name a split (ImageSets/2017/<split>.txt)")
