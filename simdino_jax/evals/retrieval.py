"""Image retrieval on revisited Oxford 5k / Paris 6k (or a folder of queries and database images), scored with mAP.

``protocol="dino"`` (the default) is DINO's ``eval_image_retrieval.py`` (facebookresearch/dino), the script behind
DINO's retrieval table (its README runs it with ``--imsize 224 --multiscale 0`` on Oxford, ``--imsize 512
--multiscale 1`` on Paris; the SimDINO papers report no retrieval figure). Its ``OxfordParisDataset.__getitem__``
reads every image, database and query alike, as ``Image.open(f).convert('RGB')`` (LOAD_TRUNCATED_IMAGES), then
``img.thumbnail((imsize, imsize), Image.ANTIALIAS)``: the longer side bounded by ``imsize``, aspect ratio kept,
never upscaled, Lanczos (ANTIALIAS is Pillow's old name of LANCZOS; the same Pillow call is made here, so its
rounding of the size and its ``reducing_gap=2.0`` reduction apply alike), then ``ToTensor`` + ``Normalize`` with the
ImageNet mean / std. Queries are WHOLE images (the script never reads ``bbx``). Each image is its own forward pass
(batch 1) at its own size, e.g. 224 x 168 for a 640 x 480 photo: the ViT's stride-p patch convolution drops the
bottom / right pixels that do not fill a patch (224 x 160 at patch 16) and the positional embeddings are interpolated
to the patch grid. Here images of one size are batched together and cropped at the bottom / right to whole patches
(the same pixels as the convolution uses). The descriptor is the cls token after the final norm (the model's output
with ``num_classes=0``); ``--multiscale`` (``utils.multi_scale``) sums it over the scales 1, 1/sqrt(2), 1/2 of the
normalised input (``F.interpolate(scale_factor=s, mode='bilinear', align_corners=False)``: floor(s H) x floor(s W),
sampled at (i + 0.5) / s - 0.5), divides by 3 and by its norm (no power / GeM); then every descriptor is
l2-normalised (``F.normalize``), ``sim = train_features @ query_features.T`` and ``ranks = argsort(-sim, dim=0)``.
The ranking here is the same cosine order in float64 (ties keep the database order; torch's argsort leaves them
unspecified).

``protocol="center_crop"`` (this evaluator's former sizing, kept as a named option): ``image_size`` > 0 resizes the
shorter side to ``image_size`` (bicubic) and centre-crops a square; ``image_size`` 0 keeps each image's aspect ratio:
the shorter side resized to ``short_side``, the longer one scaled alike and centre-cropped to a multiple of the patch
size. The former default was ``protocol="center_crop", crop_queries=True``. ``crop_queries`` (either protocol) crops
each query to its ``bbx`` first, as the revisited protocol prescribes; DINO's script does not (default False).

Scoring follows the revisited protocol's code (filipradenovic/revisitop, ``compute_map``, which DINO's
``utils.compute_map`` copies): for each query the zero-based ranks of its positives are reduced by the number of junk
images ranked before them (junk is ignored), and AP = sum_j (P0_j + P1_j) / 2 / n_pos over the positives in ranked
order (j = 0, 1, ...; r_j the reduced rank), with P0_j = j / r_j (1 when r_j = 0) and P1_j = (j + 1) / (r_j + 1):
the trapezoid rule on the precision-recall curve. A query without positives is left out of the mean. mP@k (k = 1, 5,
10): with 1-based reduced ranks p, k' = min(max(p), k), the fraction of p <= k' over k'. The Medium protocol counts
easy + hard as positives and junk as junk; the Hard protocol hard as positives and easy + junk as junk (the gnd_t
lists DINO's script builds). When no query has a hard positive, revisitop's mean is 0 / 0 (a ZeroDivisionError that stops DINO's
script): the result then reports Medium and ``map_hard: null`` with ``hard_undefined`` saying why.

Memory: one image's forward pass holds about 4 float32 (tokens x tokens) attention maps per head (XLA's CPU program
measured 3: logits, exponentials, probabilities) plus its activations, e.g. 0.49 GB for a 224 x 224 input at patch 4
(3,137 tokens, 3 heads). The forward batch of each input size is chosen to fit ``memory_gb`` (0: a quarter of the
device's memory; host RAM shared by the local CPU devices on CPU); the config is refused in one line naming
``image_size`` when one largest input does not fit, before any data is read. Each batch is assembled on the mesh
with ``jax.make_array_from_callback`` (every process loads only the images of its own devices' rows) and gathered
in dataset order, so the descriptors do not depend on the number of processes.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image, ImageFile

from simdino_jax.data import augment
from simdino_jax.errors import ConfigError, DataError, MissingDataError, require
from simdino_jax.evals import runner
from simdino_jax.models.network import backbone_kwargs

DATASETS = ("roxford5k", "rparis6k")
MODES = (*DATASETS, "folder")
SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)  # DINO's multi_scale
KAPPAS = (1, 5, 10)  # mP@k as DINO's script reports it
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
PROTOCOLS = ("dino", "center_crop")
# Forward-pass memory per image, in float32 values: ATTENTION_COPIES (tokens x tokens) maps per head (XLA's CPU program
# measured 3.0-3.1x the logits' size for 3,137 tokens; one more for backends that keep another copy) and
# ACTIVATION_COPIES (tokens x width) activations (the MLP's 4x hidden, residual, norms, q / k / v; measured under 3).
ATTENTION_COPIES, ACTIVATION_COPIES = 4, 16


# -- scoring ---------------------------------------------------------------------------------------------------
def average_precision(ranks, num_positives: int) -> float:
  """revisitop's ``compute_ap``: AP by the trapezoid rule from the zero-based, junk-reduced, increasing ranks of the
  retrieved positives; ``num_positives`` counts all positives of the query (those never retrieved add nothing)."""
  ap = 0.0
  for j, r in enumerate(np.asarray(ranks, np.int64).tolist()):
    p0 = 1.0 if r == 0 else j / r
    p1 = (j + 1) / (r + 1)
    ap += (p0 + p1) / (2.0 * num_positives)
  return ap


def positive_ranks(order, positives, junk=()) -> np.ndarray:
  """Zero-based ranks of ``positives`` (database indices) in ``order`` (database indices, best first), each reduced
  by the number of ``junk`` images ranked before it; increasing."""
  order = np.asarray(order, np.int64)
  pos = np.flatnonzero(np.isin(order, np.asarray(positives, np.int64)))
  junk_at = np.flatnonzero(np.isin(order, np.asarray(junk, np.int64)))
  return pos - np.searchsorted(junk_at, pos)


def compute_map(orders, gnd, kappas=KAPPAS) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
  """revisitop's ``compute_map``: (mAP, per-query AP (nan: no positive, left out of the mean), mean precision at
  ``kappas``, per-query precision at ``kappas``). orders (Q, N): database indices, best first, per query; gnd: per
  query {"ok": positives, "junk": ignored} (database indices). mAP is nan when no query has a positive."""
  orders = np.asarray(orders)
  aps = np.full(len(gnd), np.nan)
  prs = np.full((len(gnd), len(kappas)), np.nan)
  for i, g in enumerate(gnd):
    ok, junk = np.asarray(g["ok"], np.int64), np.asarray(g.get("junk", ()), np.int64)
    if ok.size == 0:
      continue
    if np.intersect1d(ok, junk).size:
      raise ValueError(f"query {i}: database images {np.intersect1d(ok, junk).tolist()} are both positive and junk")
    ranks = positive_ranks(orders[i], ok, junk)
    aps[i] = average_precision(ranks, ok.size)
    pos = ranks + 1
    for j, k in enumerate(kappas):
      kq = min(int(pos.max()), k)
      prs[i, j] = np.sum(pos <= kq) / kq
  scored = ~np.isnan(aps)
  if not scored.any():
    return float("nan"), aps, np.full(len(kappas), np.nan), prs
  return float(aps[scored].mean()), aps, prs[scored].mean(axis=0), prs


def protocol_gnd(gnd, protocol: str) -> list[dict]:
  """The revisited ground truth {bbx, easy, hard, junk} per query as {ok, junk} for ``protocol``: "medium"
  (ok = easy + hard, junk = junk) or "hard" (ok = hard, junk = easy + junk)."""
  out = []
  for g in gnd:
    easy, hard, junk = (np.asarray(g.get(k, ()), np.int64).reshape(-1) for k in ("easy", "hard", "junk"))
    if protocol == "medium":
      out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
    elif protocol == "hard":
      out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
    else:
      raise ValueError(f"protocol must be 'medium' or 'hard', got {protocol!r}")
  return out


def rank_database(database, queries) -> np.ndarray:
  """(Q, N) database indices by decreasing cosine similarity to each query (features l2-normalised here; ties keep
  the database order)."""

  def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  sim = unit(queries) @ unit(database).T
  return np.argsort(-sim, axis=1, kind="stable")


# -- data ------------------------------------------------------------------------------------------------------
class Item:
  """One image to describe: its file and (queries) the integer crop box (x1, y1, x2, y2) or None."""

  def __init__(self, path: str, box=None):
    self.path, self.box = path, box

  def size(self) -> tuple[int, int]:
    """(w, h) after the crop, from the file header."""
    if self.box is not None:
      return self.box[2] - self.box[0], self.box[3] - self.box[1]
    try:
      with Image.open(self.path) as im:
        return im.size
    except OSError as e:
      raise DataError(f"{self.path}: not a readable image ({e})") from None

  def load(self) -> Image.Image:
    """The RGB image, cropped; a truncated JPEG is read as far as it goes (DINO's LOAD_TRUNCATED_IMAGES)."""
    truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
    try:
      with Image.open(self.path) as im:
        im = im.convert("RGB")
    except OSError as e:
      raise DataError(f"{self.path}: not a readable image ({e})") from None
    finally:
      ImageFile.LOAD_TRUNCATED_IMAGES = truncated
    return im if self.box is None else im.crop(self.box)


def crop_box(bbx, where: str) -> tuple[int, int, int, int]:
  """An (x1, y1, x2, y2) box rounded to integers as PIL's crop rounds it; DataError naming ``where`` if malformed."""
  try:
    box = tuple(round(float(v)) for v in np.asarray(bbx).reshape(-1))
  except (TypeError, ValueError):
    box = ()
  if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
    raise DataError(f"{where}: bounding box must be [x1, y1, x2, y2] with x2 > x1 and y2 > y1, got {bbx!r}")
  return box


def load_revisited(data_dir: str, dataset: str, crop_queries: bool):
  """(database items, query items, query names, gnd) of revisited Oxford / Paris: data_dir/<dataset>/gnd_<dataset>.pkl
  ({imlist, qimlist, gnd}) and data_dir/<dataset>/jpg/<name>.jpg; Missing/DataError naming the file."""
  root = os.path.join(data_dir, dataset)
  pkl = os.path.join(root, f"gnd_{dataset}.pkl")
  if not os.path.isfile(pkl):
    raise MissingDataError(
      f"{pkl}: ground truth not found (the revisited layout <data_dir>/{dataset}/gnd_{dataset}.pkl)"
    )
  try:
    with open(pkl, "rb") as f:
      cfg = pickle.load(f)
  except Exception as e:  # noqa: BLE001 -- any unpickling failure is a bad file
    raise DataError(f"{pkl}: not a readable pickle ({type(e).__name__}: {e})") from None
  if not isinstance(cfg, dict) or not all(k in cfg for k in ("imlist", "qimlist", "gnd")):
    raise DataError(f"{pkl}: must hold a dict with 'imlist', 'qimlist' and 'gnd'")
  imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
  if len(gnd) != len(qimlist):
    raise DataError(f"{pkl}: {len(gnd)} 'gnd' entries for {len(qimlist)} queries in 'qimlist'")
  if not imlist or not qimlist:
    raise DataError(f"{pkl}: lists {len(imlist)} database images and {len(qimlist)} queries")
  jpg = os.path.join(root, "jpg")
  if not os.path.isdir(jpg):
    raise MissingDataError(f"{jpg}: image folder not found (the revisited layout <data_dir>/{dataset}/jpg/*.jpg)")
  n = len(imlist)
  for i, g in enumerate(gnd):
    for key in ("easy", "hard", "junk"):
      idx = np.asarray(g.get(key, ()), np.int64).reshape(-1)
      if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DataError(f"{pkl}: gnd[{i}][{key!r}] indexes outside the {n} database images")
  paths = [os.path.join(jpg, f"{name}.jpg") for name in imlist + qimlist]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise MissingDataError(f"{missing[0]}: image listed in {pkl} not found ({len(missing)} missing)")
  database = [Item(p) for p in paths[:n]]
  queries = []
  for i, p in enumerate(paths[n:]):
    box = None
    if crop_queries:
      if "bbx" not in gnd[i]:
        raise DataError(f"{pkl}: gnd[{i}] has no 'bbx' (set crop_queries=False to use whole query images)")
      box = crop_box(gnd[i]["bbx"], f"{pkl}: gnd[{i}]['bbx']")
    queries.append(Item(p, box))
  return database, queries, [str(q) for q in qimlist], gnd


def load_folder(data_dir: str, crop_queries: bool):
  """(database items, query items, query names, {ok, junk} per query) of the generic layout: data_dir/queries/,
  data_dir/database/ and data_dir/ground_truth.json (docs/evaluation.md); Missing/DataError naming the file."""
  qdir, ddir = os.path.join(data_dir, "queries"), os.path.join(data_dir, "database")
  gt_path = os.path.join(data_dir, "ground_truth.json")
  for folder in (qdir, ddir):
    if not os.path.isdir(folder):
      raise MissingDataError(f"{folder}: folder not found (the retrieval folder layout: queries/, database/)")
  if not os.path.isfile(gt_path):
    raise MissingDataError(f"{gt_path}: ground truth not found ({{query file: [positive database files]}})")
  try:
    with open(gt_path) as f:
      gt = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{gt_path}: not readable JSON ({e})") from None
  if not isinstance(gt, dict) or not gt:
    raise DataError(f"{gt_path}: must be a non-empty object {{query file name: [positive database file names]}}")
  names = sorted(n for n in os.listdir(ddir) if n.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise DataError(f"{ddir}: holds no image ({', '.join(IMAGE_EXTENSIONS)})")
  index = {n: i for i, n in enumerate(names)}

  def indices(query, values, what):
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
      raise DataError(f"{gt_path}: {what} of {query!r} must be a list of database file names")
    for v in values:
      if v not in index:
        raise MissingDataError(f"{os.path.join(ddir, v)}: listed in {gt_path} ({what} of {query!r}) but not found")
    return [index[v] for v in values]

  queries, qnames, gnd = [], [], []
  for query, entry in gt.items():
    path = os.path.join(qdir, query)
    if not os.path.isfile(path):
      raise MissingDataError(f"{path}: query listed in {gt_path} but not found")
    entry = {"positives": entry} if isinstance(entry, list) else entry
    if not isinstance(entry, dict) or "positives" not in entry or set(entry) - {"positives", "junk", "bbx"}:
      raise DataError(
        f"{gt_path}: entry of {query!r} must be a list of positives or {{positives, junk (optional), bbx (optional)}}"
      )
    ok = indices(query, entry["positives"], "positives")
    junk = indices(query, entry.get("junk", []), "junk")
    if set(ok) & set(junk):
      raise DataError(
        f"{gt_path}: {query!r} lists {sorted(names[i] for i in set(ok) & set(junk))} as positive and junk"
      )
    box = crop_box(entry["bbx"], f"{gt_path}: bbx of {query!r}") if crop_queries and "bbx" in entry else None
    queries.append(Item(path, box))
    qnames.append(query)
    gnd.append({"ok": ok, "junk": junk})
  return [Item(os.path.join(ddir, n)) for n in names], queries, qnames, gnd


# -- features --------------------------------------------------------------------------------------------------
def thumbnail_size(w: int, h: int, imsize: int) -> tuple[int, int]:
  """(w, h) of a w x h image after PIL's ``thumbnail((imsize, imsize))`` (Pillow's ``preserve_aspect_ratio``: unchanged
  when both sides fit; else the longer side becomes imsize and the other the floor or ceil of its scaled length,
  whichever gives the closer aspect ratio, at least 1), from the file header, to group the images by input size
  before they are read."""
  if imsize >= w and imsize >= h:
    return w, h
  aspect = w / h
  x = y = imsize
  if x / y >= aspect:
    x = max(min(math.floor(y * aspect), math.ceil(y * aspect), key=lambda n: abs(aspect - n / y)), 1)
  else:
    y = max(min(math.floor(x / aspect), math.ceil(x / aspect), key=lambda n: 0 if n == 0 else abs(aspect - x / n)), 1)
  return x, y


def dino_view(image: Image.Image, imsize: int) -> np.ndarray:
  """DINO's ``OxfordParisDataset`` view (H, W, 3) float32: ``img.thumbnail((imsize, imsize), Image.ANTIALIAS)`` on the
  RGB image (in place; LANCZOS is ANTIALIAS's name since Pillow 10), then ToTensor + Normalize (ImageNet mean / std)."""
  image.thumbnail((imsize, imsize), Image.Resampling.LANCZOS)
  return augment.normalize(np.asarray(image))


def view_size(w: int, h: int, *, image_size: int, short_side: int, patch: int) -> tuple[int, int]:
  """center_crop: (H, W) of the network input for a w x h image: image_size x image_size, or (image_size 0) the
  shorter side ``short_side`` and the longer one scaled alike (truncated), then floored to a multiple of ``patch``."""
  if image_size:
    return image_size, image_size
  short, long_ = min(w, h), max(w, h)
  long_ = max(patch, int(short_side * long_ / short) // patch * patch)
  return (long_, short_side) if h > w else (short_side, long_)


def view(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
  """center_crop: the network input (H, W, 3) float32 normalised: ``image`` resized (bicubic) so that its shorter side
  is min(H, W), the longer one scaled alike (truncated, as torchvision), then centre-cropped to ``size`` (H, W)."""
  th, tw = size
  w, h = image.size
  s = min(th, tw)
  nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
  nw, nh = max(nw, tw), max(nh, th)
  if (nw, nh) != (w, h):
    image = image.resize((nw, nh), Image.BICUBIC)
  left, top = (nw - tw) // 2, (nh - th) // 2
  return augment.normalize(np.asarray(image.crop((left, top, left + tw, top + th))))


def scaled_sizes(h: int, w: int, *, patch: int, multiscale: bool) -> list[tuple[int, int]]:
  """(H, W) the backbone sees at each scale for an h x w input: floor(s h) x floor(s w) (F.interpolate with a scale
  factor), cropped at the bottom / right to whole patches (what the stride-p patch convolution reads)."""
  out = []
  for s in SCALES if multiscale else (1.0,):
    sh, sw = (h, w) if s == 1.0 else (math.floor(h * s), math.floor(w * s))
    out.append((sh // patch * patch, sw // patch * patch))
  return out


def bilinear_matrix(in_size: int, scale: float) -> np.ndarray:
  """(floor(in_size * scale), in_size) matrix of PyTorch's ``F.interpolate(scale_factor=scale, mode="bilinear",
  align_corners=False)`` along one axis: output i reads the input at (i + 0.5) / scale - 0.5 (the given factor, not
  the size ratio), clamped at 0, linearly between its two neighbours (no antialiasing)."""
  out_size = math.floor(in_size * scale)
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = max((i + 0.5) / scale - 0.5, 0.0)
    i0 = min(int(src), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    frac = src - i0
    m[i, i0] += 1.0 - frac
    m[i, i1] += frac
  return m.astype(np.float32)


def make_descriptor_fn(graphdef, *, patch: int, multiscale: bool):
  """(params, images (B, H, W, 3)) -> l2-normalised cls descriptors (B, D) float32, averaged over DINO's 3 scales
  when ``multiscale``; at every scale the input is cropped at the bottom / right to whole patches (``scaled_sizes``)."""
  scales = SCALES if multiscale else (1.0,)

  def fn(params, images):
    model = nnx.merge(graphdef, params)
    h, w = images.shape[1:3]
    total = 0.0
    for s, (sh, sw) in zip(scales, scaled_sizes(h, w, patch=patch, multiscale=multiscale)):
      x = images
      if s != 1.0:
        rows, cols = bilinear_matrix(h, s), bilinear_matrix(w, s)  # trace-time constants (static shapes)
        x = jnp.einsum("ih,bhwc->biwc", rows[:sh], images.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        x = jnp.einsum("jw,biwc->bijc", cols[:sw], x, precision=jax.lax.Precision.HIGHEST)
      total = total + model(x[:, :sh, :sw], key=None)["cls"].astype(jnp.float32)
    v = total / len(scales)
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

  return fn


# -- memory ----------------------------------------------------------------------------------------------------
def forward_bytes(h: int, w: int, *, patch: int, heads: int, dim: int, registers: int = 0) -> int:
  """Estimated peak bytes of ONE h x w image's forward pass (the scale-1 pass, the largest): ATTENTION_COPIES float32
  (T x T) maps per head and ACTIVATION_COPIES (T x dim) float32 activations, T = patches + cls + registers, plus the
  input at the three scales."""
  t = (h // patch) * (w // patch) + 1 + registers
  return 4 * (ATTENTION_COPIES * heads * t * t + ACTIVATION_COPIES * t * dim + 2 * 3 * h * w)


def device_memory_bytes() -> int:
  """Memory of one local device: an accelerator's ``bytes_limit``; on CPU the host's RAM (or its cgroup limit, if
  lower) shared by the local CPU devices; 16 GB when the backend does not say."""
  dev = jax.local_devices()[0]
  if dev.platform == "cpu":
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
      try:
        with open(path) as f:
          total = min(total, int(f.read().strip()))
      except (OSError, ValueError):  # absent, or "max"
        pass
    return total // jax.local_device_count()
  stats = dev.memory_stats() or {}
  return int(stats.get("bytes_limit", 0)) or 16 * 10**9


def memory_budget(memory_gb: float) -> int:
  """Bytes one device's forward pass may use: ``memory_gb`` GB, or (0) a quarter of ``device_memory_bytes()``."""
  return int(memory_gb * 1e9) if memory_gb else device_memory_bytes() // 4


def per_device_batch(h: int, w: int, *, budget: int, field: str, what: str, **model) -> int:
  """Images of size h x w one device may take in a forward pass within ``budget`` bytes (at least 1); ConfigError
  naming ``field`` (the size to lower) when one image does not fit."""
  need = forward_bytes(h, w, **model)
  if need > budget:
    t = (h // model["patch"]) * (w // model["patch"]) + 1 + model.get("registers", 0)
    root = field.rsplit(".", 1)[0]
    raise ConfigError(
      f"config.{field}: one {h}x{w} input ({what}; {t} tokens, {model['heads']} heads) needs about "
      f"{need / 1e9:.2f} GB in the forward pass, more than the {budget / 1e9:.2f} GB allowed "
      f"(config.{root}.memory_gb; 0: a quarter of the device's memory): lower {field.rsplit('.', 1)[1]} "
      "or raise memory_gb"
    )
  return budget // need


def model_dims(config) -> dict:
  """The backbone's patch, heads, width and registers (``forward_bytes``'s model arguments) from config.model."""
  kw = backbone_kwargs(config.model)
  return dict(patch=kw["patch_size"], heads=kw["num_heads"], dim=kw["embed_dim"], registers=kw["num_registers"])


# -- extraction ------------------------------------------------------------------------------------------------
def describe(ctx, params, fn, items, *, keys, load, batch_of, what: str) -> np.ndarray:
  """Descriptors (len(items), D) of ``items`` in their order: grouped by network-input size (``keys[i]`` = (H, W)),
  batches of ``batch_of(H, W)`` (a multiple of the device count; the last one padded with zeros) built on the mesh
  by ``jax.make_array_from_callback`` (each process loads, with ``load(i, (H, W))``, only the rows its devices hold)
  and gathered in row order, so the result does not depend on the number of processes."""
  n_dev = jax.device_count()
  groups: dict[tuple[int, int], list[int]] = {}
  for i, key in enumerate(keys):
    groups.setdefault(key, []).append(i)
  out: list = [None] * len(items)
  done, t0, last = 0, time.time(), time.time()
  for size, idx in groups.items():
    step = batch_of(*size)
    for start in range(0, len(idx), step):
      chunk = idx[start : start + step]
      padded = -(-len(chunk) // n_dev) * n_dev

      def rows(index, chunk=chunk, padded=padded, size=size):
        sel = range(padded)[index[0]]
        x = np.zeros((len(sel), *size, 3), np.float32)
        for k, r in enumerate(sel):
          if r < len(chunk):
            x[k] = load(chunk[r], size)
        return x

      arr = jax.make_array_from_callback((padded, *size, 3), ctx.batch_sharding, rows)
      feats = np.asarray(multihost_utils.process_allgather(fn(params, arr), tiled=True))
      for k, i in enumerate(chunk):
        out[i] = feats[k]
      done += len(chunk)
      if time.time() - last > 30 or done == len(items):
        last = time.time()
        ctx.log(f"retrieval: {what} {done}/{len(items)} images ({len(groups)} sizes, {last - t0:.0f} s)")
  return np.stack(out)


# -- scores ----------------------------------------------------------------------------------------------------
def _percent(x) -> float:
  return float(np.round(100.0 * x, 4))


def score(orders, gnd, qnames, *, folder: bool, where: str) -> dict:
  """The result's scores: ``map``, ``mp``, ``num_skipped`` (folder) or their ``_medium`` / ``_hard`` versions
  (revisited gnd), and ``per_query_ap``. Hard without any hard positive is undefined (revisitop's 0 / 0): map_hard
  and mp_hard are None and ``hard_undefined`` says why; DataError naming ``where`` if Medium (or the folder's
  ground truth) has no positive at all."""
  protocols = {"map": gnd} if folder else {p: protocol_gnd(gnd, p) for p in ("medium", "hard")}
  result, per_query = {}, {q: {} for q in qnames}
  for protocol, g in protocols.items():
    m, aps, pr, _ = compute_map(orders, g)
    key = "" if protocol == "map" else f"_{protocol}"
    if math.isnan(m) and protocol != "hard":
      raise DataError(f"{where}: no query has a positive ({protocol} protocol)")
    if math.isnan(m):
      result["map_hard"], result["mp_hard"] = None, None
      result["hard_undefined"] = f"no query has a hard positive in {where}: Hard mAP is undefined (0 / 0)"
    else:
      result[f"map{key}"] = _percent(m)
      result[f"mp{key}"] = {str(k): _percent(v) for k, v in zip(KAPPAS, pr)}
    result[f"num_skipped{key}"] = int(np.isnan(aps).sum())
    for q, ap in zip(qnames, aps):
      per_query[q][protocol] = None if np.isnan(ap) else _percent(ap)
  result["per_query_ap"] = per_query
  return result


class RetrievalEvaluator(runner.Evaluator):
  """``type="retrieval"``: image retrieval mAP (module doc) on revisited Oxford / Paris (``map_medium``,
  ``map_hard``, in percent) or a folder of queries and database images (``map``); needs no labels. ``protocol``
  "dino" (default) is DINO's ``eval_image_retrieval.py``; "center_crop" the former sizing."""

  DEFAULTS = dict(
    dataset="roxford5k",  # roxford5k | rparis6k (data_dir/<dataset>/{jpg/, gnd_<dataset>.pkl}) | folder
    data_dir="",  # the folder holding <dataset>/ (or, for "folder", queries/, database/, ground_truth.json)
    protocol="dino",  # dino: DINO's script (thumbnail, whole queries) | center_crop: resize + centre crop
    image_size=224,  # dino: thumbnail bound (longer side); center_crop: square input, 0: aspect kept (short_side)
    short_side=224,  # center_crop with image_size 0: the shorter side, pixels (a multiple of the patch size)
    multiscale=False,  # average the descriptors at scales 1, 1/sqrt(2), 1/2 (DINO's multi_scale)
    crop_queries=False,  # crop queries to their bounding box (the revisited protocol; DINO's script does not)
    batch_size=0,  # images per forward pass at most; 0: config.eval.batch_size (either capped to fit memory_gb)
    memory_gb=0.0,  # forward-pass memory per device, GB; 0: a quarter of the device's memory
  )
  needs_labels = False
  init_keys = ("map_medium", "map_hard", "map")

  def run(self, ctx, params, feats) -> dict:
    c = self.cfg
    if not c.data_dir:
      raise ConfigError(f"config.evals.{self.name}.data_dir: set it to the folder holding the retrieval data")
    root = os.path.expanduser(c.data_dir)
    if not os.path.isdir(root):
      raise MissingDataError(f"{root}: retrieval data folder not found (config.evals.{self.name}.data_dir)")
    if c.dataset == "folder":
      database, queries, qnames, gnd = load_folder(root, c.crop_queries)
    else:
      database, queries, qnames, gnd = load_revisited(root, c.dataset, c.crop_queries)
    dims = model_dims(ctx.config)
    patch = dims["patch"]
    n_dev = jax.device_count()
    wanted = runner.device_batch(c.batch_size or ctx.config.eval.batch_size) // n_dev  # per device
    budget = memory_budget(c.memory_gb)
    dino = c.protocol == "dino"
    size_field = f"evals.{self.name}." + ("short_side" if not dino and not c.image_size else "image_size")
    batches: dict[str, int] = {}

    def batch_of(h, w):
      h, w = scaled_sizes(h, w, patch=patch, multiscale=False)[0]  # the scale-1 pass, the largest
      fits = per_device_batch(h, w, budget=budget, field=size_field, what=f"protocol {c.protocol}", **dims)
      batches[f"{w}x{h}"] = min(wanted, fits) * n_dev  # keyed W x H, as PIL and the issue write sizes
      return batches[f"{w}x{h}"]

    def keys_of(items):
      """Each item's network-input size (H, W) from its header; DataError when a scale holds no whole patch."""
      keys = []
      for item in items:
        w, h = item.size()
        if dino:
          tw, th = thumbnail_size(w, h, c.image_size)
          smallest = scaled_sizes(th, tw, patch=patch, multiscale=c.multiscale)[-1]
          if min(smallest) < patch:
            raise DataError(
              f"{item.path}: its {tw}x{th} thumbnail holds no whole {patch}-pixel patch"
              + (" at scale 1/2" if c.multiscale else "")
              + f" (config.evals.{self.name}.image_size {c.image_size}; DINO's script fails on it too)"
            )
          # Without multiscale the pixels past the last whole patch are never read: one size per patch grid.
          keys.append((th, tw) if c.multiscale else scaled_sizes(th, tw, patch=patch, multiscale=False)[0])
        else:
          keys.append(view_size(w, h, image_size=c.image_size, short_side=c.short_side, patch=patch))
      return keys

    def loader(items):
      def load(i, size):
        image = items[i].load()
        if not dino:
          return view(image, size)
        x = dino_view(image, c.image_size)
        if x.shape[0] < size[0] or x.shape[1] < size[1]:
          raise DataError(f"{items[i].path}: decoded to a {x.shape[1]}x{x.shape[0]} thumbnail, its header says larger")
        return x[: size[0], : size[1]]  # the bottom / right pixels the patch convolution drops

      return load

    fn = ctx.backbone_fn(
      ("retrieval", bool(c.multiscale)), make_descriptor_fn(ctx.graphdef, patch=patch, multiscale=bool(c.multiscale))
    )
    ctx.log(f"retrieval: {c.dataset}, {len(queries)} queries, {len(database)} database images, {c.protocol} protocol")
    if dino and c.crop_queries:
      ctx.log("retrieval: queries cropped to their bbx (crop_queries=True); DINO's script feeds whole queries")
    db_keys, q_keys = keys_of(database), keys_of(queries)
    db_f = describe(ctx, params, fn, database, keys=db_keys, load=loader(database), batch_of=batch_of, what="database")
    q_f = describe(ctx, params, fn, queries, keys=q_keys, load=loader(queries), batch_of=batch_of, what="queries")
    orders = rank_database(db_f, q_f)
    result = {
      "dataset": c.dataset,
      "protocol": c.protocol,
      "num_queries": len(queries),
      "num_database": len(database),
      "image_size": int(c.image_size),
      "multiscale": bool(c.multiscale),
      "crop_queries": bool(c.crop_queries),
      "features": "cls token, l2-normalised" + (", 3 scales" if c.multiscale else ""),
      "input_sizes": len(set(db_keys) | set(q_keys)),
      "forward_batch": batches,
      "memory_budget_gb": round(budget / 1e9, 3),
    }
    if not dino and not c.image_size:
      result["short_side"] = int(c.short_side)
    where = os.path.join(root, "ground_truth.json" if c.dataset == "folder" else f"{c.dataset}/gnd_{c.dataset}.pkl")
    result.update(score(orders, gnd, qnames, folder=c.dataset == "folder", where=where))
    return result

  def metrics(self, result: dict) -> dict:
    keys = ("map",) if "map" in result else ("map_medium", "map_hard")
    return {k: result[k] for k in keys if result[k] is not None}

  def summary(self, r: dict) -> str:
    n = f"{r['num_queries']} queries, {r['num_database']} database images"
    if "map" in r:
      return f"{r['dataset']} mAP {r['map']:.2f} ({n})"
    hard = "undefined (no hard positive)" if r["map_hard"] is None else f"{r['map_hard']:.2f}"
    return f"{r['dataset']} mAP Medium {r['map_medium']:.2f} Hard {hard} ({n})"

  @classmethod
  def validate(cls, cfg, field, *, config, patch, depth, num_devices) -> None:
    require(cfg.dataset in MODES, f"{field}.dataset", f"must be one of {list(MODES)}, got {cfg.dataset!r}")
    require(cfg.protocol in PROTOCOLS, f"{field}.protocol", f"must be one of {list(PROTOCOLS)}, got {cfg.protocol!r}")
    require(isinstance(cfg.data_dir, str), f"{field}.data_dir", f"must be a path, got {cfg.data_dir!r}")
    for name in ("multiscale", "crop_queries"):
      require(isinstance(cfg[name], bool), f"{field}.{name}", f"must be True or False, got {cfg[name]!r}")
    require(
      isinstance(cfg.batch_size, int) and cfg.batch_size >= 0,
      f"{field}.batch_size",
      f"must be 0 (config.eval.batch_size) or a positive integer, got {cfg.batch_size!r}",
    )
    require(
      isinstance(cfg.memory_gb, (int, float)) and cfg.memory_gb >= 0,
      f"{field}.memory_gb",
      f"must be 0 (a quarter of the device's memory) or a positive number of GB, got {cfg.memory_gb!r}",
    )
    if not cfg.data_dir:  # not configured for use: the sizes are checked against the patch size once it is
      return
    min_size = 2 * patch if cfg.multiscale else patch  # the 1/2 scale must hold a patch
    if cfg.protocol == "dino":
      require(
        isinstance(cfg.image_size, int) and cfg.image_size >= min_size,
        f"{field}.image_size",
        f"must be the thumbnail bound (longer side), at least {min_size} pixels, got {cfg.image_size!r}",
      )
      largest = (cfg.image_size, cfg.image_size)  # a square image at least image_size wide
    else:
      require(
        isinstance(cfg.image_size, int)
        and (cfg.image_size == 0 or (cfg.image_size >= min_size and cfg.image_size % patch == 0)),
        f"{field}.image_size",
        f"must be 0 (aspect kept, short_side) or a multiple of the patch size {patch} of at least {min_size}, "
        f"got {cfg.image_size!r}",
      )
      require(
        cfg.image_size != 0
        or (isinstance(cfg.short_side, int) and cfg.short_side >= min_size and cfg.short_side % patch == 0),
        f"{field}.short_side",
        f"must be a multiple of the patch size {patch} of at least {min_size}, got {cfg.short_side!r}",
      )
      side = cfg.image_size or cfg.short_side  # image_size 0: the square is the smallest input (checked per size later)
      largest = (side, side)
    if config is not None:  # the memory of one largest input, before any data is read
      h, w = scaled_sizes(*largest, patch=patch, multiscale=False)[0]
      size_field = f"{field}." + ("short_side" if cfg.protocol != "dino" and not cfg.image_size else "image_size")
      per_device_batch(
        h,
        w,
        budget=memory_budget(cfg.memory_gb),
        field=size_field,
        what=f"protocol {cfg.protocol}",
        **model_dims(config),
      )
