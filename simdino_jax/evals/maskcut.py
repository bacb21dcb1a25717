"""Unsupervised object discovery with MaskCut (CutLER, facebookresearch/CutLER ``maskcut/maskcut.py``).

Per image (``maskcut_patches``): the image is resized to ``image_size`` x ``image_size`` (Lanczos; rounded to the
nearest multiple of the patch size, as CutLER's ``resize_pil``), the frozen backbone runs once and the features are
the KEY vectors of the last attention block's patch tokens (heads concatenated; cls and registers dropped; CutLER's
``--vit-feat k``), l2-normalised. Then ``num_masks`` rounds of normalised cut:

* affinity: cosine similarity binarised at ``tau`` (> tau -> 1), zeros replaced by 1e-5; D its degree matrix;
* the second-smallest generalised eigenvector of (D - A) v = lambda D v, bipartitioned at its mean;
* orientation (CutLER's rule): if 3 or 4 corners of the patch grid are foreground the partition is flipped; else it
  is flipped when the patch of largest |v| (the seed) is background. The seed is then the argmax of the (flipped)
  eigenvector, and only the 4-connected component (``scipy.ndimage.label``) holding it is kept;
* the kept patches' features are zeroed for the next rounds (CutLER's ``painting``), so their affinities to
  everything become 1e-5 and later cuts find other objects;
* drop rule (CutLER's, rounds after the first only): a mask whose IoU with the PREVIOUS round's mask exceeds 0.5,
  or which covers 1% of the patches or less, is emptied (and the next round compares with that empty mask).

Solvers (``solver``): "scipy" (the default) is CutLER's call, ``scipy.linalg.eigh(D - A, D, subset_by_index=[1,
2])`` in float64 on the host, so the default gives CutLER's vector, bipartition and seed bit for bit (a test runs
CutLER's own functions, taken from its file, on the same affinities). The orientation rule is not sign-invariant
(the seed on the side holding 3+ corners: flipping the vector's sign changes the mask in 53 of the test's 240
synthetic grids),
so the sign matters, and it is LAPACK's: dsygvx reduces the problem to C y = lambda y with C = D^-1/2 (D - A)
D^-1/2, dsyevx tridiagonalises C = Q T Q^T (dsytrd), dstein makes the first largest-magnitude entry of T's
eigenvector z = Q^T y positive, and v = D^-1/2 Q z. "jax" reproduces that: ``jnp.linalg.eigh`` of C in float64
(``jax.enable_x64``), y signed from Q^T y with Q from ``jax.lax.linalg.tridiagonal`` (LAPACK's dsytrd convention;
CPU and GPU, not TPU), on the default device. In float32 the reflectors of near-disconnected graphs (eigenvalues
~1e-5) lost the sign (3 of 200). In float64, on 300 random affinities (240 patch grids, 53 of them sign-sensitive,
and 60 near-disconnected graphs) its masks equal SciPy's except where SciPy's own result is decided by rounding (17
cases: a repeated second eigenvalue 5, an argmax over entries equal up to rounding 12: patches with identical
affinity rows; none in this set from the third kind,
LAPACK's sign rule meeting a tie or a column that is zero in exact arithmetic); there CutLER's mask depends on the
LAPACK build. Timed on 2 shared CPU cores: scipy 0.13 s at 900 patches and 12.6 s at 2,500;
jax 0.41 s and 37 s (it diagonalises fully, then tridiagonalises for the sign), so it is meant for a GPU.

Memory and size: the forward pass takes at most ``batch_size`` images, fewer when XLA's own count of the compiled
program (attention: batch x heads x tokens^2 float32 a few times over) exceeds ``memory_gb`` (0: 90% of the free
memory of the device, the host's RAM on CPU; the smallest choice of all processes); the batch is chosen before any
image is read, and when a single image does not fit, or a cut's ~6-8 N x N float64 matrices exceed the host's free
memory, the evaluation stops in one line naming ``image_size``; so it does, at the same point, with more than
``max_patches`` patches per image (default 4,096; CutLER's ViT-B/8 at 480 px has 3,600): the cut is O(N^3), hours
per image at a patch-4 demo's 14,400. Process p feeds the p-th contiguous block of each batch and every row's index travels with
its keys, so the masks are the same on any number of processes.

Masks at image resolution (``image_masks``): each patch mask is upsampled to the network input by nearest
neighbour (CutLER, before its CRF), the pixels of earlier masks are removed (CutLER's ``masked_out``), holes are
filled (``scipy.ndimage.binary_fill_holes``) and the mask is resized to the original image (PIL bicubic, thresholded
at half, as CutLER's ``create_annotation_info``); an empty mask is dropped.

Not reproduced: CutLER's dense-CRF post-processing (pydensecrf, and its IoU < 0.5 CRF-disagreement filter). Neither
``pydensecrf`` (1.0rc3, 2018) nor the maintained fork ``pydensecrf2`` (1.1, 2024) has a wheel for this platform and
Python (3.11, manylinux x86_64), and both need a C++ build; ``crf`` therefore only accepts False. Without the CRF,
masks follow patch boundaries (blocky at 16 px), which lowers mask AP against pixel-accurate ground truth.

Scores (CutLER's pseudo-masks have none; AP needs a ranking): score = 1 - Ncut(S) / 2 in [0, 1], with Ncut(S) =
cut(S, S')/assoc(S, V) + cut(S, S')/assoc(S', V) of the final patch mask S on the binarised affinity of the round
that found it (a clean, separable object scores close to 1).

Outputs (DIR/eval/NAME/): ``results.json``, COCO results format ([{image_id, category_id 1, segmentation (RLE via
pycocotools), bbox (from the mask), score, area}]), and ``<i>_<name>.png`` (the image and its masks overlaid) for
the first ``num_pictures`` images. With ``annotations`` (a COCO instances JSON whose ``file_name`` are relative to
``images``) the results are scored class-agnostically as CutLER does: every ground-truth category is mapped to one
"fg" category (CutLER's ``*_cls_agnostic.json`` files) and the standard ``COCOeval`` (maxDets 1/10/100) runs for
"bbox" and "segm", reported in percent as ``box_ap``, ``box_ap50``, ``box_ap75``, ``mask_ap``, ``mask_ap50``,
``mask_ap75`` (mask AP is None when an annotation has no segmentation). With a single category this equals
``useCats=0``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from simdino_jax.data import augment
from simdino_jax.data.sources.base import decode_image
from simdino_jax.errors import ConfigError, DataError, MissingDataError, require
from simdino_jax.evals import runner

EPS = 1e-5  # CutLER's value for the affinities below tau
SOLVERS = ("scipy", "jax")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
COLOURS = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)])


# -- normalised cut -------------------------------------------------------------------------------------------
def affinity(feats, tau: float, eps: float = EPS) -> np.ndarray:
  """(N, N) float64: cosine similarity of the rows of ``feats`` (l2-normalised; zero rows stay zero) > ``tau`` as
  1, everything else ``eps`` (CutLER's ``get_affinity_matrix``)."""
  f = np.asarray(feats, np.float64)
  f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
  a = (f @ f.T > tau).astype(np.float64)
  a[a == 0] = eps
  return a


def second_eigenvector_scipy(a: np.ndarray) -> np.ndarray:
  """CutLER's ``second_smallest_eigenvector``: of (D - A) v = lambda D v, v^T D v = 1 (float64, SciPy)."""
  import scipy.linalg  # scipy comes with scikit-learn

  d = np.diag(np.sum(a, axis=1))
  _, v = scipy.linalg.eigh(d - a, d, subset_by_index=[1, 2])
  return v[:, 0]


@jax.jit
def _second_eigenvector_jax(a):
  inv_sqrt = jax.lax.rsqrt(jnp.sum(a, axis=1))
  # C = L^-1 (D - A) L^-T with L = D^1/2 (the Cholesky factor of D): the matrix LAPACK's dsygvx diagonalises.
  lap = jnp.eye(a.shape[0], dtype=a.dtype) - inv_sqrt[:, None] * a * inv_sqrt[None, :]
  _, u = jnp.linalg.eigh(lap, symmetrize_input=False)  # ascending eigenvalues
  y = u[:, 1]
  # LAPACK's sign: dsyevx reduces C = Q T Q^T (dsytrd, lower), dstein scales T's eigenvector z = Q^T y so that its
  # first entry of largest magnitude is positive, dormtr returns y = Q z. Q = H(1) ... H(n-1), so Q^T y applies
  # H(1) first; H(i) = I - tau_i w w^T with w = (0, ..., 0, 1, arr[i + 2:, i]) (1 at i + 1).
  arr, _, _, taus = jax.lax.linalg.tridiagonal(lap, lower=True)
  idx = jnp.arange(a.shape[0])

  def reflect(i, z):
    w = jnp.where(idx > i + 1, arr[:, i], (idx == i + 1).astype(a.dtype))
    return z - taus[i] * w * jnp.dot(w, z, precision=jax.lax.Precision.HIGHEST)

  z = jax.lax.fori_loop(0, a.shape[0] - 1, reflect, y)
  sign = jnp.where(z[jnp.argmax(jnp.abs(z))] < 0, -1.0, 1.0).astype(a.dtype)
  return sign * inv_sqrt * y  # x = L^-T y (dsygvx's back-transformation)


def second_eigenvector_jax(a: np.ndarray) -> np.ndarray:
  """The same vector as ``second_eigenvector_scipy``, with LAPACK's sign, in float64 on the default device: the
  symmetric normalised Laplacian D^-1/2 (D - A) D^-1/2 (the standard form dsygvx reduces the problem to, since the
  Cholesky factor of the diagonal D is D^1/2) diagonalised by ``jnp.linalg.eigh``, its second eigenvector y signed
  as LAPACK's dstein signs it (module doc) and mapped back by D^-1/2. CPU and GPU (the tridiagonal reduction the sign
  needs is not implemented on TPU)."""
  with jax.enable_x64(True):
    return np.asarray(_second_eigenvector_jax(jnp.asarray(a, jnp.float64)), np.float64)


def second_eigenvector(a: np.ndarray, solver: str = "scipy") -> np.ndarray:
  if solver == "scipy":
    return second_eigenvector_scipy(a)
  if solver == "jax":
    return second_eigenvector_jax(a)
  raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


def count_fg_corners(part: np.ndarray) -> int:
  """Foreground corners of a (gh, gw) patch mask (CutLER's ``check_num_fg_corners``)."""
  return int(part[0, 0]) + int(part[0, -1]) + int(part[-1, 0]) + int(part[-1, -1])


def orient(vec: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, int]:
  """(bipartition (N,) bool, seed index): ``vec`` > its mean, flipped when 3+ corners are foreground or when the
  patch of largest |vec| is background; the seed is the argmax of the (flipped) vector (CutLER's rules)."""
  vec = np.asarray(vec, np.float64)
  part = vec > np.sum(vec) / len(vec)
  seed = int(np.argmax(np.abs(vec)))
  reverse = True if count_fg_corners(part.reshape(grid)) >= 3 else not part[seed]
  if reverse:
    return ~part, int(np.argmax(-vec))
  return part, int(np.argmax(vec))


def seed_component(part: np.ndarray, seed: int) -> np.ndarray:
  """The 4-connected component of the (gh, gw) mask ``part`` holding the flat index ``seed`` (TokenCut's
  ``detect_box``: ``ndimage.label`` with its default cross structure)."""
  from scipy import ndimage

  labels, _ = ndimage.label(part)
  return labels == labels[np.unravel_index(seed, part.shape)]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
  """|a & b| / |a | b| (TokenCut's ``metric.IoU``); nan when both are empty."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  union = np.sum(a | b)
  return float(np.sum(a & b) / union) if union else float("nan")


def keep_mask(mask: np.ndarray, previous: np.ndarray | None) -> bool:
  """CutLER's drop rule for a round after the first: False when IoU(previous round's mask, mask) > 0.5 or the mask
  covers 1% of the grid or less. ``previous`` None (the first round): always kept."""
  if previous is None:
    return True
  return not (mask_iou(previous, mask) > 0.5 or np.mean(mask) <= 0.01)


def ncut_value(mask: np.ndarray, a: np.ndarray) -> float:
  """Ncut of the patch set ``mask`` (flat bool) on affinity ``a``: cut/assoc(S) + cut/assoc(S'); 2 when S or S'
  is empty."""
  s = np.asarray(mask, bool).reshape(-1)
  if s.all() or not s.any():
    return 2.0
  cut = float(a[s][:, ~s].sum())
  return cut / float(a[s].sum()) + cut / float(a[~s].sum())


def maskcut_patches(feats, grid: tuple[int, int], *, tau: float, num_masks: int, solver: str = "scipy") -> list[dict]:
  """MaskCut on one image's patch features ``feats`` (N = gh * gw, D): ``num_masks`` rounds (module doc), each
  {"mask": (gh, gw) bool (all False when dropped), "ncut": its Ncut value, "kept": bool}."""
  feats = np.asarray(feats, np.float64)
  painted = np.zeros(feats.shape[0], bool)
  previous = None
  out = []
  for _ in range(num_masks):
    if previous is not None:
      painted |= previous.reshape(-1)
    a = affinity(np.where(painted[:, None], 0.0, feats), tau)
    part, seed = orient(second_eigenvector(a, solver), grid)
    mask = seed_component(part.reshape(grid), seed)
    kept = keep_mask(mask, previous)
    if not kept:
      mask = np.zeros(grid, bool)
    out.append({"mask": mask, "ncut": ncut_value(mask, a), "kept": kept})
    previous = mask
  return out


# -- masks at image resolution and COCO results ---------------------------------------------------------------
def image_masks(patch_masks, patch: int, out_size: tuple[int, int]) -> list[np.ndarray]:
  """(H, W) bool masks for the original image of ``out_size`` (W, H): nearest upsampling of each (gh, gw) patch
  mask to the network input, minus the pixels of earlier masks, holes filled, bicubic resize to (W, H) and
  thresholded at half (module doc). A mask may come out empty."""
  from scipy import ndimage

  taken = None
  out = []
  for m in patch_masks:
    up = np.repeat(np.repeat(np.asarray(m, bool), patch, axis=0), patch, axis=1)
    if taken is None:
      taken = np.zeros_like(up)
    up &= ~taken
    taken |= up
    filled = ndimage.binary_fill_holes(up)
    if (filled.shape[1], filled.shape[0]) != tuple(out_size):
      resized = Image.fromarray(filled.astype(np.uint8) * 255).resize(tuple(out_size), Image.BICUBIC)
      filled = np.asarray(resized) > 127.5
    out.append(filled)
  return out


def encode(mask: np.ndarray) -> dict:
  """COCO RLE of a (H, W) bool mask, counts as str (JSON)."""
  from pycocotools import mask as mask_util

  rle = mask_util.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  rle["counts"] = rle["counts"].decode("ascii")
  return rle


def coco_result(image_id: int, mask: np.ndarray, score: float) -> dict | None:
  """One COCO result (category 1, RLE, box from the mask, area); None for an empty mask."""
  from pycocotools import mask as mask_util

  rle = encode(mask)
  area = float(mask_util.area(rle))
  if area < 1:
    return None
  box = [float(v) for v in mask_util.toBbox(rle)]
  return {
    "image_id": int(image_id),
    "category_id": 1,
    "segmentation": rle,
    "bbox": box,
    "score": float(score),
    "area": area,
  }


def class_agnostic(dataset: dict) -> dict:
  """A copy of a COCO ground truth with every category mapped to one "fg" category (id 1), iscrowd defaulted to 0
  (CutLER's ``*_cls_agnostic.json`` files)."""
  d = copy.deepcopy(dataset)
  d["categories"] = [{"id": 1, "name": "fg", "supercategory": "fg"}]
  for i, ann in enumerate(d.get("annotations", [])):
    ann["category_id"] = 1
    ann.setdefault("iscrowd", 0)
    ann.setdefault("id", i + 1)
  return d


def _coco(dataset: dict):
  from pycocotools.coco import COCO

  gt = COCO()
  gt.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
  return gt


def _fill_boxes_and_areas(dataset: dict) -> None:
  """Ground-truth ``bbox`` and ``area`` from the segmentation (the area else from the box) where missing (COCOeval
  reads both)."""
  from pycocotools import mask as mask_util

  gt = _coco(dataset)
  for ann in dataset.get("annotations", []):
    rle = gt.annToRLE(ann) if ann.get("segmentation") else None
    if "bbox" not in ann:
      ann["bbox"] = [float(v) for v in mask_util.toBbox(rle)]
    if "area" not in ann:
      ann["area"] = float(mask_util.area(rle)) if rle is not None else float(ann["bbox"][2] * ann["bbox"][3])


def coco_ap(gt_dataset: dict, results: list, iou_type: str, image_ids=None) -> dict:
  """{"ap", "ap50", "ap75"} in percent of ``results`` (COCO results format) against the class-agnostic
  ``gt_dataset`` with the standard COCOeval (``iou_type`` "bbox" or "segm"); None where COCOeval has no ground
  truth (-1); 0 without any detection. ``image_ids``: the images evaluated (default: all of the ground truth)."""
  from pycocotools.cocoeval import COCOeval

  gt_dataset = class_agnostic(gt_dataset)
  _fill_boxes_and_areas(gt_dataset)
  gt = _coco(gt_dataset)
  ids = sorted(gt.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
  if not gt.getAnnIds(imgIds=ids, iscrowd=False):
    return {"ap": None, "ap50": None, "ap75": None}
  if not results:
    return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
  dets = copy.deepcopy(results)
  if iou_type == "segm":  # as detectron2: the area and box of a mask result come from its mask
    for d in dets:
      d.pop("bbox", None)
  with contextlib.redirect_stdout(io.StringIO()):
    dt = gt.loadRes(dets)
    ev = COCOeval(gt, dt, iou_type)
    ev.params.imgIds = ids
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return {k: (None if v < 0 else float(np.round(100.0 * v, 4))) for k, v in zip(("ap", "ap50", "ap75"), ev.stats[:3])}


# -- data -----------------------------------------------------------------------------------------------------
def list_images(folder: str) -> list[str]:
  """Image files under ``folder`` (recursively), relative paths, sorted."""
  out = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in files:
      if name.lower().endswith(IMAGE_EXTENSIONS):
        out.append(os.path.relpath(os.path.join(root, name), folder))
  return sorted(out)


def load_annotations(path: str, folder: str) -> tuple[list[tuple[int, str]], dict]:
  """([(image id, file name)], the ground-truth dict) of a COCO instances JSON; Missing/DataError naming the file."""
  if not os.path.isfile(path):
    raise MissingDataError(f"{path}: annotations file not found (config.evals.maskcut.annotations)")
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not readable JSON ({e})") from None
  if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
    raise DataError(f"{path}: must be a COCO instances JSON with a non-empty 'images' list")
  items = []
  for i, im in enumerate(data["images"]):
    if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
      raise DataError(f"{path}: images[{i}] must have an integer 'id' and a 'file_name'")
    file = os.path.join(folder, im["file_name"])
    if not os.path.isfile(file):
      raise MissingDataError(f"{file}: image listed in {path} not found")
    items.append((im["id"], im["file_name"]))
  ids = {i for i, _ in items}
  if len(ids) != len(items):
    raise DataError(f"{path}: image ids are not unique")
  anns = data.setdefault("annotations", [])
  if not isinstance(anns, list):
    raise DataError(f"{path}: 'annotations' must be a list")
  for i, ann in enumerate(anns):
    if not isinstance(ann, dict) or ann.get("image_id") not in ids:
      raise DataError(f"{path}: annotations[{i}] refers to no image of 'images'")
    if not ann.get("segmentation") and not (isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4):
      raise DataError(f"{path}: annotations[{i}] has neither a 'segmentation' nor a 4-number 'bbox'")
  return items, data


def check_size(entry: dict, hw: tuple[int, int], path: str, annotations: str) -> None:
  """Fills a COCO image entry's missing ``height`` / ``width`` from the decoded image (``hw``); DataError naming the
  file when they disagree (the results' masks have the image's size)."""
  for key, v in zip(("height", "width"), hw):
    if entry.setdefault(key, int(v)) != v:
      raise DataError(
        f"{path}: is {hw[0]}x{hw[1]} (HxW) but {annotations} gives {entry.get('height')}x{entry.get('width')}"
      )


def read_image(path: str) -> np.ndarray:
  """(H, W, 3) uint8 (EXIF orientation applied, 16-bit and alpha handled); DataError naming the file."""
  try:
    with open(path, "rb") as f:
      return decode_image(f.read())
  except OSError as e:
    raise DataError(f"{path}: not a readable image ({e})") from None


def network_input(image: np.ndarray, size: int) -> np.ndarray:
  """The normalised (size, size, 3) float32 network input: a Lanczos resize of the whole image (CutLER)."""
  im = Image.fromarray(image)
  if im.size != (size, size):
    im = im.resize((size, size), Image.LANCZOS)
  return augment.normalize(np.asarray(im))


def input_size(image_size: int, patch: int) -> int:
  """``image_size`` rounded to the nearest multiple of ``patch`` (CutLER's ``resize_pil``), at least one patch."""
  return max(patch, int(round(image_size / patch)) * patch)


def render(image: np.ndarray, masks) -> np.ndarray:
  """uint8 (H, 2 W, 3): the image | the image with each mask tinted in its colour and its outline drawn; upscaled
  by an integer factor to at least 192 px high."""
  from scipy import ndimage

  image = np.asarray(image, np.uint8)
  over = image.astype(np.float32)
  for i, m in enumerate(masks):
    colour = COLOURS[i % len(COLOURS)].astype(np.float32)
    over[m] = 0.45 * over[m] + 0.55 * colour
    edge = m & ~ndimage.binary_erosion(m)
    over[edge] = colour
  grid = np.concatenate([image, np.clip(over, 0, 255).astype(np.uint8)], axis=1)
  f = max(1, -(-192 // image.shape[0]))
  return np.repeat(np.repeat(grid, f, axis=0), f, axis=1)


# -- memory ---------------------------------------------------------------------------------------------------
NCUT_MATRICES = {"scipy": 6, "jax": 8}  # N x N float64 arrays alive at once in one cut (SciPy's measured: 5.4)


def available_bytes(device) -> int:
  """Memory free for ``device``: an accelerator's allocator limit minus what it holds; on CPU the host's
  MemAvailable (/proc/meminfo), capped by the cgroup's limit minus its usage where one is set."""
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
      return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  free = None
  with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        free = int(line.split()[1]) * 1024
  for limit, usage in (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
  ):
    with contextlib.suppress(OSError, ValueError):
      with open(limit) as f, open(usage) as g:
        room = int(f.read().strip()) - int(g.read().strip())
      free = room if free is None else min(free, room)
  return free if free is not None else 1 << 62


def forward_bytes(fn, params, global_batch: int, size: int, sharding) -> int:
  """Bytes one device needs to run the jitted ``fn(params, images)`` on a (global_batch, size, size, 3) float32
  batch: XLA's own count for the compiled program (temporaries + arguments + outputs; nothing runs). Attention
  dominates it: batch x heads x tokens^2 float32 a few times over (the 120.7 GB that a ViT of 3 heads at 14,401
  tokens and batch 16 asked for is this count)."""
  x = jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32, sharding=sharding)
  m = fn.lower(params, x).compile().memory_analysis()
  return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def choose_batch(bytes_at, wanted: int, budget: float) -> int:
  """The largest per-device batch <= ``wanted`` whose ``bytes_at(batch)`` fits ``budget``: batches of 1 and 2
  measured, the batch their line allows tried, then halved until it fits; 0 when even a batch of 1 does not fit."""
  one = bytes_at(1)
  if one > budget:
    return 0
  if wanted == 1:
    return 1
  per_image = max(bytes_at(2) - one, 1)
  b = max(1, min(wanted, 1 + int((budget - one) // per_image)))
  while b > 1 and bytes_at(b) > budget:
    b //= 2
  return b


class MaskCutEvaluator(runner.Evaluator):
  """``type="maskcut"``: MaskCut unsupervised object discovery (module doc) on a folder of images, written as COCO
  results and pictures; box / mask AP (class-agnostic, percent) against a COCO instances JSON when one is given."""

  DEFAULTS = dict(
    images="",  # folder of images (searched recursively); with annotations: the root their file_name is relative to
    annotations="",  # optional COCO instances JSON; "" = no scoring, masks and pictures only
    image_size=480,  # network input image_size x image_size (rounded to a multiple of the patch size)
    tau=0.15,  # affinity threshold on the key cosine similarity
    num_masks=3,  # MaskCut rounds (masks at most) per image
    solver="scipy",  # scipy (CutLER's call) | jax (float64 jnp.linalg.eigh with LAPACK's sign: CPU / GPU)
    crf=False,  # dense-CRF post-processing: not available (pydensecrf does not install), only False
    num_pictures=8,  # images drawn with their masks into DIR/eval/NAME/
    max_images=0,  # 0: every image; else the first max_images (of the annotation file's order, or sorted names)
    batch_size=16,  # images per forward pass at most (a multiple of the device count; lowered to fit memory)
    memory_gb=0.0,  # memory one device may use; 0: what is free (an accelerator's, else the host's)
    max_patches=4096,  # patches per image at most (N x N cuts; CutLER's 480 px at patch 8 is 3,600)
  )
  needs_labels = False
  init_keys = ("box_ap50", "mask_ap50")

  def batch(self, ctx, params, fn, size: int, grid: tuple[int, int]) -> int:
    """The per-device batch of the forward pass (``choose_batch`` on XLA's count of the compiled program against
    ``memory_gb`` or the free memory, the same on every process); ConfigError naming image_size when one image's
    forward pass or cut does not fit. Compiles, runs nothing, reads no data."""
    c, field = self.cfg, f"evals.{self.name}"
    n_dev = jax.device_count()
    device = jax.local_devices()[0]
    free = available_bytes(device)
    budget = c.memory_gb * 2**30 if c.memory_gb else 0.9 * free
    where = (
      f"{c.memory_gb:g} GB (config.{field}.memory_gb)"
      if c.memory_gb
      else f"{budget / 2**30:.1f} GB ({device.platform})"
    )
    n = grid[0] * grid[1]
    require(
      n <= c.max_patches,
      f"{field}.image_size",
      f"{size} px at patch {size // grid[0]} is {grid[0]} x {grid[1]} = {n} patches per image, more than "
      f"config.{field}.max_patches = {c.max_patches} (each of the {c.num_masks} cuts per image diagonalises an "
      f"N x N matrix: O(N^3), hours per image at 14,400 on a CPU); lower it (or raise max_patches)",
    )
    cut = NCUT_MATRICES[c.solver] * 8 * n * n
    host = c.memory_gb * 2**30 if c.memory_gb else 0.9 * available_bytes(jax.local_devices(backend="cpu")[0])
    head = f"{size} px at patch {size // grid[0]} is {n} patches per image"
    require(
      cut <= host,
      f"{field}.image_size",
      f"{head}: a cut holds ~{cut / 2**30:.1f} GB of {n} x {n} float64 matrices, more than the "
      f"{host / 2**30:.1f} GB free on the host; lower it",
    )
    per_device = choose_batch(
      lambda b: forward_bytes(fn, params, b * n_dev, size, ctx.batch_sharding),
      runner.device_batch(c.batch_size) // n_dev,
      budget,
    )
    if jax.process_count() > 1:  # one global batch shape: the smallest process's choice
      per_device = int(np.min(multihost_utils.process_allgather(np.array([per_device], np.int32))))
    if per_device == 0:
      need = forward_bytes(fn, params, n_dev, size, ctx.batch_sharding)
      raise ConfigError(
        f"config.{field}.image_size: {head}: one image's forward pass needs {need / 2**30:.1f} GB per device, more than "
        f"{where}; lower it"
      )
    return per_device * n_dev

  def run(self, ctx, params, feats) -> dict:
    c = self.cfg
    field = f"config.evals.{self.name}"
    patch = ctx.patch_size
    size = input_size(c.image_size, patch)
    grid = (size // patch, size // patch)
    graphdef = ctx.graphdef
    fn = ctx.backbone_fn(
      "maskcut_keys",
      lambda p, x: nnx.merge(graphdef, p)(x, key=None, return_keys=True)["keys"].astype(jnp.float32),
    )
    batch = self.batch(ctx, params, fn, size, grid)  # before any data is read
    if not c.images:
      raise ConfigError(f"{field}.images: set it to the folder of images MaskCut reads")
    folder = os.path.expanduser(c.images)
    if not os.path.isdir(folder):
      raise MissingDataError(f"{folder}: image folder not found ({field}.images)")
    gt = None
    if c.annotations:
      items, gt = load_annotations(os.path.expanduser(c.annotations), folder)
      gt_images = {im["id"]: im for im in gt["images"]}
    else:
      names = list_images(folder)
      if not names:
        raise DataError(f"{folder}: holds no image ({', '.join(IMAGE_EXTENSIONS)})")
      items = [(i + 1, n) for i, n in enumerate(names)]
    if c.max_images:
      items = items[: c.max_images]
    n_dev, n_proc = jax.device_count(), jax.process_count()
    batch = min(batch, -(-len(items) // n_dev) * n_dev)  # no padded images beyond the last (e.g. 3 images, not 16)
    out_dir = os.path.join(ctx.out_dir, self.name + ctx.suffix)
    if ctx.is_main:
      os.makedirs(out_dir, exist_ok=True)
    results, pictures, num_masks = [], [], 0
    t0 = last = time.time()
    ctx.log(
      f"maskcut: {len(items)} images at {size}x{size} ({grid[0]}x{grid[1]} patches), batch {batch}, solver {c.solver}"
    )
    for start in range(0, len(items), batch):
      chunk = items[start : start + batch]
      images = [read_image(os.path.join(folder, name)) for _, name in chunk]
      if gt is not None:
        for (image_id, name), im in zip(chunk, images):
          check_size(gt_images[image_id], im.shape[:2], os.path.join(folder, name), c.annotations)
      x = np.zeros((batch, size, size, 3), np.float32)
      for k, im in enumerate(images):
        x[k] = network_input(im, size)
      # Process p feeds the p-th contiguous block of the batch; each row's index travels beside its keys, so the
      # gathered rows are put back in batch order whatever the mesh's device order (the same keys on 1 or N processes).
      local = x.reshape(n_proc, batch // n_proc, size, size, 3)[jax.process_index()]
      rows = np.arange(batch, dtype=np.int32).reshape(n_proc, -1)[jax.process_index()]
      arr = jax.make_array_from_process_local_data(ctx.batch_sharding, local)
      rows = jax.make_array_from_process_local_data(ctx.batch_sharding, rows)
      keys, rows = multihost_utils.process_allgather((fn(params, arr), rows), tiled=True)
      keys = np.asarray(keys)[np.argsort(np.asarray(rows))]
      if not ctx.is_main:  # the host work and the files: the main process only
        continue
      for k, ((image_id, name), im) in enumerate(zip(chunk, images)):
        rounds = maskcut_patches(keys[k], grid, tau=c.tau, num_masks=c.num_masks, solver=c.solver)
        h, w = im.shape[:2]
        masks = image_masks([r["mask"] for r in rounds], patch, (w, h))
        drawn = []
        for r, m in zip(rounds, masks):
          res = coco_result(image_id, m, 1.0 - r["ncut"] / 2.0)
          if res is not None:
            results.append(res)
            drawn.append(m)
        num_masks += len(drawn)
        if start + k < c.num_pictures:
          stem = os.path.splitext(os.path.basename(name))[0]
          pic = f"{start + k}_{stem}.png"
          Image.fromarray(render(im, drawn)).save(os.path.join(out_dir, pic))
          pictures.append(os.path.join(os.path.basename(out_dir), pic))
      done = start + len(chunk)
      if time.time() - last > 30 or done == len(items):
        last = time.time()
        ctx.log(f"maskcut: {done}/{len(items)} images, {num_masks} masks ({last - t0:.0f} s)")
    result = {
      "num_images": len(items),
      "image_size": int(size),
      "tau": float(c.tau),
      "num_masks_per_image": int(c.num_masks),
      "solver": c.solver,
      "batch_size": int(batch),
      "crf": False,
      "score": "1 - Ncut/2 of the patch mask",
      "features": "last-block attention keys of the patch tokens, l2-normalised",
    }
    if not ctx.is_main:
      return result
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
      json.dump(results, f)
    result.update(num_masks=num_masks, results=os.path.join(os.path.basename(out_dir), "results.json"))
    result["pictures"] = pictures
    if gt is not None:
      ids = {i for i, _ in items}
      gt = dict(gt, images=[im for im in gt["images"] if im["id"] in ids])  # the images evaluated (max_images)
      gt["annotations"] = [ann for ann in gt["annotations"] if ann["image_id"] in ids]
      with_segm = all(ann.get("segmentation") for ann in gt["annotations"])
      for prefix, iou_type in (("box", "bbox"), ("mask", "segm")):
        if iou_type == "segm" and not with_segm:
          aps = {"ap": None, "ap50": None, "ap75": None}
        else:
          aps = coco_ap(gt, results, iou_type, ids)
        result.update({f"{prefix}_{k}": v for k, v in aps.items()})
      result["num_annotations"] = len(gt["annotations"])
    return result

  def metrics(self, result: dict) -> dict:
    keys = ("box_ap", "box_ap50", "mask_ap", "mask_ap50")
    return {k: result[k] for k in keys if result.get(k) is not None}

  def summary(self, r: dict) -> str:
    n = f"{r['num_images']} images, {r.get('num_masks', '?')} masks"
    if r.get("box_ap") is None:
      return n

    def fmt(v):
      return "n/a" if v is None else f"{v:.2f}"

    return (
      f"box AP {fmt(r['box_ap'])} AP50 {fmt(r['box_ap50'])}, mask AP {fmt(r.get('mask_ap'))} "
      f"AP50 {fmt(r.get('mask_ap50'))} (class-agnostic; {n})"
    )

  @classmethod
  def validate(cls, cfg, field, *, config, patch, depth, num_devices) -> None:
    for name in ("images", "annotations"):
      require(isinstance(cfg[name], str), f"{field}.{name}", f"must be a path, got {cfg[name]!r}")
    require(
      cfg.crf is False,
      f"{field}.crf",
      "dense-CRF post-processing is not available: pydensecrf (and its fork pydensecrf2) has no wheel for this "
      "platform and does not build here; set it to False",
    )
    require(cfg.solver in SOLVERS, f"{field}.solver", f"must be one of {list(SOLVERS)}, got {cfg.solver!r}")
    require(
      cfg.solver != "jax" or jax.default_backend() != "tpu",
      f"{field}.solver",
      '"jax" needs jax.lax.linalg.tridiagonal (for LAPACK\'s sign), which TPUs lack; use "scipy"',
    )
    require(
      isinstance(cfg.memory_gb, (int, float)) and cfg.memory_gb >= 0,
      f"{field}.memory_gb",
      f"must be >= 0 (0: the free memory), got {cfg.memory_gb!r}",
    )
    require(runner.positive_ints([cfg.max_patches]), f"{field}.max_patches", f"must be >= 1, got {cfg.max_patches!r}")
    require(
      isinstance(cfg.tau, (int, float)) and -1.0 <= cfg.tau < 1.0,
      f"{field}.tau",
      f"must be a cosine threshold in [-1, 1), got {cfg.tau!r}",
    )
    require(runner.positive_ints([cfg.num_masks]), f"{field}.num_masks", f"must be >= 1, got {cfg.num_masks!r}")
    require(runner.positive_ints([cfg.batch_size]), f"{field}.batch_size", f"must be >= 1, got {cfg.batch_size!r}")
    for name in ("num_pictures", "max_images"):
      v = cfg[name]
      require(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{field}.{name}", f"must be >= 0, got {v!r}")
    require(
      isinstance(cfg.image_size, int) and cfg.image_size >= patch,
      f"{field}.image_size",
      f"must be an integer of at least the patch size {patch}, got {cfg.image_size!r}",
    )
