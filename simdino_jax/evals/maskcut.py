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

Solvers (``solver``): "scipy" is CutLER's call, ``scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])`` in float64 on
the host; "jax" diagonalises the symmetric normalised Laplacian D^-1/2 (D - A) D^-1/2 with ``jnp.linalg.eigh`` in
float32 on the default device and maps its second eigenvector back by D^-1/2 (the same generalised eigenvector,
v^T D v = 1, up to sign). Timed on this 2-core CPU for a 30 x 30 patch grid (900 x 900, 384-d keys, median of 15,
machine under load): scipy 0.11-0.25 s, jax float32 0.06-0.14 s (jax float64 0.14-0.25 s); the two vectors agreed to
7e-6 with identical bipartitions. The default is "jax" (the faster, and on an accelerator it runs there).

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
from simdino_jax.errors import ConfigError, DataError, MissingDataError
from simdino_jax.evals import runner
from simdino_jax.models.network import backbone_kwargs

EPS = 1e-5  # CutLER's value for the affinities below tau
SOLVERS = ("jax", "scipy")
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
  lap = jnp.eye(a.shape[0], dtype=a.dtype) - inv_sqrt[:, None] * a * inv_sqrt[None, :]
  _, u = jnp.linalg.eigh(lap)  # ascending eigenvalues
  return inv_sqrt * u[:, 1]


def second_eigenvector_jax(a: np.ndarray) -> np.ndarray:
  """The same vector from the symmetric normalised Laplacian D^-1/2 (D - A) D^-1/2 (``jnp.linalg.eigh``, float32),
  mapped back by D^-1/2; equal to the SciPy one up to sign (and float32 rounding)."""
  return np.asarray(_second_eigenvector_jax(jnp.asarray(a, jnp.float32)), np.float64)


def second_eigenvector(a: np.ndarray, solver: str = "jax") -> np.ndarray:
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


def maskcut_patches(feats, grid: tuple[int, int], *, tau: float, num_masks: int, solver: str = "jax") -> list[dict]:
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


class MaskCutEvaluator(runner.Evaluator):
  """``type="maskcut"``: MaskCut unsupervised object discovery (module doc) on a folder of images, written as COCO
  results and pictures; box / mask AP (class-agnostic, percent) against a COCO instances JSON when one is given."""

  DEFAULTS = dict(
    images="",  # folder of images (searched recursively); with annotations: the root their file_name is relative to
    annotations="",  # optional COCO instances JSON; "" = no scoring, masks and pictures only
    image_size=480,  # network input image_size x image_size (rounded to a multiple of the patch size)
    tau=0.15,  # affinity threshold on the key cosine similarity
    num_masks=3,  # MaskCut rounds (masks at most) per image
    solver="jax",  # jax (symmetric normalised Laplacian, jnp.linalg.eigh) | scipy (CutLER's generalised eigh)
    crf=False,  # dense-CRF post-processing: not available (pydensecrf does not install), only False
    num_pictures=8,  # images drawn with their masks into DIR/eval/NAME/
    max_images=0,  # 0: every image; else the first max_images (of the annotation file's order, or sorted names)
    batch_size=16,  # images per forward pass (rounded up to a multiple of the device count)
  )
  needs_labels = False
  init_keys = ("box_ap50", "mask_ap50")

  def run(self, ctx, params, feats) -> dict:
    c = self.cfg
    field = f"config.evals.{self.name}"
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
    patch = backbone_kwargs(ctx.config.model)["patch_size"]
    size = input_size(c.image_size, patch)
    grid = (size // patch, size // patch)
    graphdef = ctx.graphdef
    fn = ctx.backbone_fn(
      "maskcut_keys",
      lambda p, x: nnx.merge(graphdef, p)(x, key=None, return_keys=True)["keys"].astype(jnp.float32),
    )
    n_dev, n_proc = jax.device_count(), jax.process_count()
    batch = max(n_dev, -(-c.batch_size // n_dev) * n_dev)
    out_dir = os.path.join(ctx.out_dir, self.name + ctx.suffix)
    if ctx.is_main:
      os.makedirs(out_dir, exist_ok=True)
    results, pictures, num_masks = [], [], 0
    t0 = last = time.time()
    ctx.log(f"maskcut: {len(items)} images at {size}x{size} ({grid[0]}x{grid[1]} patches), solver {c.solver}")
    for start in range(0, len(items), batch):
      chunk = items[start : start + batch]
      images = [read_image(os.path.join(folder, name)) for _, name in chunk]
      if gt is not None:
        for (image_id, name), im in zip(chunk, images):
          check_size(gt_images[image_id], im.shape[:2], os.path.join(folder, name), c.annotations)
      x = np.zeros((batch, size, size, 3), np.float32)
      for k, im in enumerate(images):
        x[k] = network_input(im, size)
      local = x.reshape(n_proc, batch // n_proc, size, size, 3)[jax.process_index()]
      arr = jax.make_array_from_process_local_data(ctx.batch_sharding, local)
      keys = np.asarray(multihost_utils.process_allgather(fn(params, arr), tiled=True))
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
      runner.require(isinstance(cfg[name], str), f"{field}.{name}", f"must be a path, got {cfg[name]!r}")
    runner.require(
      cfg.crf is False,
      f"{field}.crf",
      "dense-CRF post-processing is not available: pydensecrf (and its fork pydensecrf2) has no wheel for this "
      "platform and does not build here; set it to False",
    )
    runner.require(cfg.solver in SOLVERS, f"{field}.solver", f"must be one of {list(SOLVERS)}, got {cfg.solver!r}")
    runner.require(
      isinstance(cfg.tau, (int, float)) and -1.0 <= cfg.tau < 1.0,
      f"{field}.tau",
      f"must be a cosine threshold in [-1, 1), got {cfg.tau!r}",
    )
    runner.require(runner.positive_ints([cfg.num_masks]), f"{field}.num_masks", f"must be >= 1, got {cfg.num_masks!r}")
    runner.require(
      runner.positive_ints([cfg.batch_size]), f"{field}.batch_size", f"must be >= 1, got {cfg.batch_size!r}"
    )
    for name in ("num_pictures", "max_images"):
      v = cfg[name]
      runner.require(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{field}.{name}", f"must be >= 0, got {v!r}"
      )
    runner.require(
      isinstance(cfg.image_size, int) and cfg.image_size >= patch,
      f"{field}.image_size",
      f"must be an integer of at least the patch size {patch}, got {cfg.image_size!r}",
    )
