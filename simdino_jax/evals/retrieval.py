"""Image retrieval on revisited Oxford 5k / Paris 6k (or a folder of queries and database images), scored with mAP.

After DINO's ``eval_image_retrieval.py`` (facebookresearch/dino): every database and query image goes through the
frozen backbone, its cls token (after the final norm) is the global descriptor, optionally averaged over 3 scales
(1, 1/sqrt(2), 1/2: DINO's ``multi_scale``, the network input resized as PyTorch's bilinear ``F.interpolate(
scale_factor=s)`` does, to floor(s H) x floor(s W), then cropped at the bottom / right to whole patches as a
stride-p convolution would) and l2-normalised;
the database is ranked for each query by cosine similarity (ties: the database order).

Scoring follows the revisited protocol's code (filipradenovic/revisitop, ``compute_map``): for each query the
zero-based ranks of its positives are reduced by the number of junk images ranked before them (junk is ignored), and
AP = sum_j (P0_j + P1_j) / 2 / n_pos over the positives in ranked order (j = 0, 1, ...; r_j the reduced rank), with
P0_j = j / r_j (1 when r_j = 0) and P1_j = (j + 1) / (r_j + 1): the trapezoid rule on the precision-recall curve. A
query without positives is left out of the mean. mP@k (k = 1, 5, 10): with 1-based reduced ranks p,
k' = min(max(p), k), the fraction of p <= k' over k'. The Medium protocol counts easy + hard as positives and junk
as junk; the Hard protocol hard as positives and easy + junk as junk. Queries are cropped to their bounding box
(``bbx``) as the revisited protocol prescribes (``crop_queries``; DINO's script feeds the whole query image).

Image sizes: ``image_size`` > 0 resizes the shorter side to ``image_size`` (bicubic) and centre-crops a square;
``image_size`` 0 keeps each image's aspect ratio: the shorter side resized to ``short_side``, the longer one scaled
alike and centre-cropped to a multiple of the patch size. Images of one size are batched together (one compilation
per distinct size). DINO's script instead bounds the LONGER side (PIL ``thumbnail(imsize)``, never upscaling).
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
from simdino_jax.errors import ConfigError, DataError, MissingDataError
from simdino_jax.evals import runner
from simdino_jax.models.network import backbone_kwargs

DATASETS = ("roxford5k", "rparis6k")
MODES = (*DATASETS, "folder")
SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)  # DINO's multi_scale
KAPPAS = (1, 5, 10)  # mP@k as DINO's script reports it
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


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
def view_size(w: int, h: int, *, image_size: int, short_side: int, patch: int) -> tuple[int, int]:
  """(H, W) of the network input for a w x h image: image_size x image_size, or (image_size 0) the shorter side
  ``short_side`` and the longer one scaled alike (truncated), then floored to a multiple of ``patch``."""
  if image_size:
    return image_size, image_size
  short, long_ = min(w, h), max(w, h)
  long_ = max(patch, int(short_side * long_ / short) // patch * patch)
  return (long_, short_side) if h > w else (short_side, long_)


def view(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
  """The network input (H, W, 3) float32 normalised: ``image`` resized (bicubic) so that its shorter side is
  min(H, W), the longer one scaled alike (truncated, as torchvision), then centre-cropped to ``size`` (H, W)."""
  th, tw = size
  w, h = image.size
  s = min(th, tw)
  nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
  nw, nh = max(nw, tw), max(nh, th)
  if (nw, nh) != (w, h):
    image = image.resize((nw, nh), Image.BICUBIC)
  left, top = (nw - tw) // 2, (nh - th) // 2
  return augment.normalize(np.asarray(image.crop((left, top, left + tw, top + th))))


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
  when ``multiscale``."""
  scales = SCALES if multiscale else (1.0,)

  def fn(params, images):
    model = nnx.merge(graphdef, params)
    h, w = images.shape[1:3]
    total = 0.0
    for s in scales:
      x = images
      if s != 1.0:
        rows, cols = bilinear_matrix(h, s), bilinear_matrix(w, s)  # trace-time constants (static shapes)
        rows, cols = rows[: rows.shape[0] // patch * patch], cols[: cols.shape[0] // patch * patch]  # whole patches
        x = jnp.einsum("ih,bhwc->biwc", rows, images.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        x = jnp.einsum("jw,biwc->bijc", cols, x, precision=jax.lax.Precision.HIGHEST)
      total = total + model(x, key=None)["cls"].astype(jnp.float32)
    v = total / len(scales)
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

  return fn


def describe(ctx, params, fn, items, *, size_of, batch_size: int, what: str) -> np.ndarray:
  """Descriptors (len(items), D) of ``items``: grouped by network-input size (``size_of(item)``), batches of
  ``batch_size`` (padded to a multiple of the device count) placed on the mesh; progress through ctx.log."""
  n_dev, n_proc = jax.device_count(), jax.process_count()
  groups: dict[tuple[int, int], list[int]] = {}
  for i, item in enumerate(items):
    groups.setdefault(size_of(item), []).append(i)
  out: list = [None] * len(items)
  done, t0, last = 0, time.time(), time.time()
  for size, idx in groups.items():
    for start in range(0, len(idx), batch_size):
      chunk = idx[start : start + batch_size]
      padded = -(-len(chunk) // n_dev) * n_dev
      x = np.zeros((padded, *size, 3), np.float32)
      for k, i in enumerate(chunk):
        x[k] = view(items[i].load(), size)
      local = x.reshape(n_proc, padded // n_proc, *size, 3)[jax.process_index()]
      arr = jax.make_array_from_process_local_data(ctx.batch_sharding, local)
      feats = np.asarray(multihost_utils.process_allgather(fn(params, arr), tiled=True))
      for k, i in enumerate(chunk):
        out[i] = feats[k]
      done += len(chunk)
      if time.time() - last > 30 or done == len(items):
        last = time.time()
        ctx.log(f"retrieval: {what} {done}/{len(items)} images ({len(groups)} sizes, {last - t0:.0f} s)")
  return np.stack(out)


def _percent(x) -> float:
  return float(np.round(100.0 * x, 4))


class RetrievalEvaluator(runner.Evaluator):
  """``type="retrieval"``: image retrieval mAP (module doc) on revisited Oxford / Paris (``map_medium``,
  ``map_hard``, in percent) or a folder of queries and database images (``map``); needs no labels."""

  DEFAULTS = dict(
    dataset="roxford5k",  # roxford5k | rparis6k (data_dir/<dataset>/{jpg/, gnd_<dataset>.pkl}) | folder
    data_dir="",  # the folder holding <dataset>/ (or, for "folder", queries/, database/, ground_truth.json)
    image_size=224,  # square network input (resize shorter side + centre crop); 0: aspect kept, see short_side
    short_side=224,  # image_size 0: the shorter side, pixels (a multiple of the patch size)
    multiscale=False,  # average the descriptors at scales 1, 1/sqrt(2), 1/2 (DINO's multi_scale)
    crop_queries=True,  # crop queries to their bounding box (the revisited protocol; DINO's script does not)
    batch_size=0,  # images per forward pass; 0: config.eval.batch_size
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
    patch = backbone_kwargs(ctx.config.model)["patch_size"]
    n_dev = jax.device_count()
    batch = max(n_dev, -(-(c.batch_size or ctx.config.eval.batch_size) // n_dev) * n_dev)
    graphdef = ctx.graphdef
    fn = ctx.backbone_fn(
      ("retrieval", bool(c.multiscale)), make_descriptor_fn(graphdef, patch=patch, multiscale=bool(c.multiscale))
    )

    def size_of(item):
      if c.image_size:
        return c.image_size, c.image_size
      return view_size(*item.size(), image_size=0, short_side=c.short_side, patch=patch)

    ctx.log(f"retrieval: {c.dataset}, {len(queries)} queries, {len(database)} database images")
    db_f = describe(ctx, params, fn, database, size_of=size_of, batch_size=batch, what="database")
    q_f = describe(ctx, params, fn, queries, size_of=size_of, batch_size=batch, what="queries")
    orders = rank_database(db_f, q_f)
    result = {
      "dataset": c.dataset,
      "num_queries": len(queries),
      "num_database": len(database),
      "image_size": int(c.image_size),
      "multiscale": bool(c.multiscale),
      "crop_queries": bool(c.crop_queries),
      "features": "cls token, l2-normalised" + (", 3 scales" if c.multiscale else ""),
    }
    if not c.image_size:
      result["short_side"] = int(c.short_side)
    protocols = {"map": gnd} if c.dataset == "folder" else {p: protocol_gnd(gnd, p) for p in ("medium", "hard")}
    per_query = {q: {} for q in qnames}
    for protocol, g in protocols.items():
      m, aps, pr, _ = compute_map(orders, g)
      if math.isnan(m):
        where = "ground_truth.json" if c.dataset == "folder" else f"gnd_{c.dataset}.pkl"
        raise DataError(f"{os.path.join(root, where)}: no query has a positive ({protocol} protocol)")
      key = "" if protocol == "map" else f"_{protocol}"
      result[f"map{key}"] = _percent(m)
      result[f"mp{key}"] = {str(k): _percent(v) for k, v in zip(KAPPAS, pr)}
      result[f"num_skipped{key}"] = int(np.isnan(aps).sum())
      for q, ap in zip(qnames, aps):
        per_query[q][protocol] = None if np.isnan(ap) else _percent(ap)
    result["per_query_ap"] = per_query
    return result

  def metrics(self, result: dict) -> dict:
    keys = ("map",) if "map" in result else ("map_medium", "map_hard")
    return {k: result[k] for k in keys}

  def summary(self, r: dict) -> str:
    n = f"{r['num_queries']} queries, {r['num_database']} database images"
    if "map" in r:
      return f"{r['dataset']} mAP {r['map']:.2f} ({n})"
    return f"{r['dataset']} mAP Medium {r['map_medium']:.2f} Hard {r['map_hard']:.2f} ({n})"

  @classmethod
  def validate(cls, cfg, field, *, config, patch, depth, num_devices) -> None:
    runner.require(cfg.dataset in MODES, f"{field}.dataset", f"must be one of {list(MODES)}, got {cfg.dataset!r}")
    runner.require(isinstance(cfg.data_dir, str), f"{field}.data_dir", f"must be a path, got {cfg.data_dir!r}")
    for name in ("multiscale", "crop_queries"):
      runner.require(isinstance(cfg[name], bool), f"{field}.{name}", f"must be True or False, got {cfg[name]!r}")
    runner.require(
      isinstance(cfg.batch_size, int) and cfg.batch_size >= 0,
      f"{field}.batch_size",
      f"must be 0 (config.eval.batch_size) or a positive integer, got {cfg.batch_size!r}",
    )
    if not cfg.data_dir:  # not configured for use: the sizes are checked against the patch size once it is
      return
    min_size = 2 * patch if cfg.multiscale else patch  # the 1/2 scale must hold a patch
    runner.require(
      isinstance(cfg.image_size, int)
      and (cfg.image_size == 0 or (cfg.image_size >= min_size and cfg.image_size % patch == 0)),
      f"{field}.image_size",
      f"must be 0 (aspect kept, short_side) or a multiple of the patch size {patch} of at least {min_size}, "
      f"got {cfg.image_size!r}",
    )
    runner.require(
      cfg.image_size != 0
      or (isinstance(cfg.short_side, int) and cfg.short_side >= min_size and cfg.short_side % patch == 0),
      f"{field}.short_side",
      f"must be a multiple of the patch size {patch} of at least {min_size}, got {cfg.short_side!r}",
    )
