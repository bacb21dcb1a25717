"""DAVIS-2017 label propagation and J&F (simdino_jax/evals/davis.py).

References independent of the module: a loop-by-loop NumPy transcription of facebookresearch/dino's
eval_video_segmentation.py (restrict_neighborhood, label_propagation, the context queue, F.interpolate bilinear with
align_corners=False, norm_mask, argmax) and of the DAVIS 2017 evaluation code's _seg2bmap and dilation; J, F and
their statistics on hand-made masks with known answers; end to end through ``simdino_jax.evaluate`` on a generated
DAVIS-layout dataset of moving objects; bad inputs refused naming the file.
"""

import collections
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from simdino_jax import evals, evaluate
from simdino_jax.errors import ConfigError, DataError
from simdino_jax.evals import davis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENETTE = os.path.join(ROOT, "..", "shared", "data", "imagenette224-mini", "imagenette224-mini.tar")


# -- the official propagation, transcribed loop by loop ------------------------------------------------------
def _ref_restrict_neighborhood(h, w, size):
  mask = np.zeros((h, w, h, w))
  for i in range(h):
    for j in range(w):
      for p in range(2 * size + 1):
        for q in range(2 * size + 1):
          if i - size + p < 0 or i - size + p >= h:
            continue
          if j - size + q < 0 or j - size + q >= w:
            continue
          mask[i, j, i - size + p, j - size + q] = 1
  return mask.reshape(h * w, h * w)


def _ref_label_propagation(feat_tar, list_feats, list_segs, h, w, size, topk, temperature):
  """feat_tar (hw, D); list_feats [(D, hw)]; list_segs [(1, C, h, w)] -> (1, C, h, w), as label_propagation."""
  n = len(list_feats)
  sources = np.stack(list_feats)  # n x D x hw
  feat_tar = feat_tar / np.linalg.norm(feat_tar, axis=1, keepdims=True)
  sources = sources / np.linalg.norm(sources, axis=1, keepdims=True)
  aff = np.exp(np.einsum("ntd,nds->nts", np.repeat(feat_tar[None], n, 0), sources) / temperature)
  if size > 0:
    aff = aff * _ref_restrict_neighborhood(h, w, size)[None]
  aff = aff.transpose(0, 2, 1).reshape(-1, h * w)  # n*hw (sources) x hw (targets)
  tk_val = -np.sort(-aff, axis=0)[:topk]
  aff[aff < tk_val.min(axis=0)] = 0
  aff = aff / aff.sum(axis=0, keepdims=True)
  segs = np.concatenate(list_segs)
  c = segs.shape[1]
  segs = segs.reshape(n, c, -1).transpose(0, 2, 1).reshape(-1, c).T
  return (segs @ aff).reshape(1, c, h, w)


def _ref_bilinear(x, factor):
  """F.interpolate(x (C, h, w), scale_factor=factor, mode="bilinear", align_corners=False), pixel by pixel."""
  c, h, w = x.shape
  out = np.zeros((c, h * factor, w * factor))

  def src(d, n):
    s = max((d + 0.5) / factor - 0.5, 0.0)
    i0 = int(s)
    return i0, min(i0 + 1, n - 1), s - i0

  for y in range(h * factor):
    y0, y1, ly = src(y, h)
    for x_ in range(w * factor):
      x0, x1, lx = src(x_, w)
      out[:, y, x_] = (1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1]) + ly * (
        (1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]
      )
  return out


def _ref_norm_mask(mask):
  mask = mask.copy()
  for cnt in range(mask.shape[0]):
    m = mask[cnt]
    if m.max() > 0:
      m = m - m.min()
      mask[cnt] = m / m.max()
  return mask


def _ref_video(feats, first_seg, h, w, *, n_last, size, topk, temperature, patch):
  """eval_video_tracking_davis on features (T, hw, D): soft labels and ids of frames 1..T-1."""
  que = collections.deque()
  frame1_feat = feats[0].T
  segs, ids = [], []
  for cnt in range(1, len(feats)):
    used_feats = [frame1_feat] + [p[0] for p in que]
    used_segs = [first_seg] + [p[1] for p in que]
    seg = _ref_label_propagation(feats[cnt], used_feats, used_segs, h, w, size, topk, temperature)
    if len(que) == n_last:
      que.popleft()
    que.append((feats[cnt].T, seg))
    up = _ref_norm_mask(_ref_bilinear(seg[0], patch))
    segs.append(seg[0].reshape(seg.shape[1], -1).T)
    ids.append(np.argmax(up, axis=0))
  return segs, ids


@pytest.mark.parametrize("size,n_last,topk,repeat", [(2, 3, 5, False), (0, 2, 3, False), (1, 7, 5, True)])
def test_propagation_matches_the_official_loops(size, n_last, topk, repeat):
  rng = np.random.default_rng(size)
  h, w, d, c, t, patch = 5, 6, 16, 3, 9, 4
  # Smoothly varying features (frames drift from the first), so the affinities are informative.
  base = rng.normal(size=(h * w, d))
  feats = np.stack([base + 0.6 * i * rng.normal(size=(h * w, d)) / np.sqrt(i + 1) for i in range(t)])
  if repeat:  # frame 1 repeats frame 0: every affinity to them is tied, and ties with the k-th value are all kept
    feats[1] = feats[0]
  first_ids = rng.integers(0, c, h * w)
  first_seg = np.eye(c)[first_ids]  # (hw, C)
  got_segs, got_ids = davis.propagate_video(
    feats.astype(np.float32),
    first_seg.astype(np.float32),
    grid_h=h,
    grid_w=w,
    patch=patch,
    n_last_frames=n_last,
    temperature=0.1,
    topk=topk,
    radius=size,
  )
  ref_first = first_seg.T.reshape(1, c, h, w)
  ref_segs, ref_ids = _ref_video(
    feats, ref_first, h, w, n_last=n_last, size=size, topk=topk, temperature=0.1, patch=patch
  )
  assert len(got_segs) == t - 1
  for frame, (g, r) in enumerate(zip(got_segs, ref_segs)):
    np.testing.assert_allclose(g[:, :c], r, rtol=2e-4, atol=1e-6, err_msg=f"frame {frame + 1}")
    np.testing.assert_allclose(g.sum(-1), 1.0, rtol=1e-5)  # top-k weights renormalised to 1
  for g, r in zip(got_ids, ref_ids):
    assert g.shape == (h * patch, w * patch)
    np.testing.assert_array_equal(g, r)


def test_neighbourhood_mask_and_upsampling_match_the_loops():
  for h, w, r in ((4, 7, 1), (6, 5, 2), (3, 3, 5)):
    np.testing.assert_array_equal(np.asarray(davis.neighbourhood_mask(h, w, r)), _ref_restrict_neighborhood(h, w, r))
  x = np.random.default_rng(0).normal(size=(2, 3, 5))
  up = np.einsum("Hh,Ww,chw->cHW", davis.upsample_matrix(3, 4), davis.upsample_matrix(5, 4), x)
  np.testing.assert_allclose(up, _ref_bilinear(x, 4), atol=1e-6)


def test_first_frame_labels_and_frame_size():
  ann = np.zeros((8, 12), np.uint8)
  ann[:4, 6:] = 2
  ann[6:, :3] = 255  # void counts as background
  one_hot = davis.first_frame_labels(ann, 2, 3, 8)
  assert one_hot.shape == (6, 8)
  np.testing.assert_array_equal(one_hot.argmax(-1), [0, 2, 2, 0, 0, 0])  # PIL nearest samples x = 2, 6, 10
  assert one_hot[3].sum() == 1  # void (255) sampled at (6, 2): background
  # The script: short side 480, the long side floored to a multiple of 64.
  assert davis.resized_size(480, 854, 480, 64) == (480, 832)
  assert davis.resized_size(854, 480, 480, 64) == (832, 480)
  assert davis.resized_size(100, 100, 480, 64) == (480, 448)
  p = davis.palette()
  assert p.shape == (256, 3) and p[1].tolist() == [128, 0, 0] and p[2].tolist() == [0, 128, 0]
  assert p[5].tolist() == [128, 0, 128] and p[255].tolist() == [224, 224, 192]


# -- J and F ---------------------------------------------------------------------------------------------------
def _square(shape, y, x, s):
  m = np.zeros(shape, bool)
  m[y : y + s, x : x + s] = True
  return m


def _ref_seg2bmap(seg):  # the DAVIS code's _seg2bmap, width/height = the mask's
  seg = seg.astype(bool)
  e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
  e[:, :-1] = seg[:, 1:]
  s[:-1, :] = seg[1:, :]
  se[:-1, :-1] = seg[1:, 1:]
  b = seg ^ e | seg ^ s | seg ^ se
  b[-1, :] = seg[-1, :] ^ e[-1, :]
  b[:, -1] = seg[:, -1] ^ s[:, -1]
  b[-1, -1] = 0
  return b


def _ref_f(pred, gt):
  """f_measure with the disk dilation done by brute force: a boundary pixel matches if one of the other mask's
  boundary pixels lies within x^2 + y^2 <= r^2."""
  r = np.ceil(0.008 * np.linalg.norm(pred.shape))
  pb, gb = _ref_seg2bmap(pred), _ref_seg2bmap(gt)
  pp, gp = np.argwhere(pb), np.argwhere(gb)
  if len(pp) == 0 or len(gp) == 0:
    return {(0, 0): 1.0, (1, 0): 0.0, (0, 1): 0.0}.get((min(len(pp), 1), min(len(gp), 1)))
  d2 = ((pp[:, None, :] - gp[None, :, :]) ** 2).sum(-1)
  precision = np.mean(d2.min(1) <= r * r)
  recall = np.mean(d2.min(0) <= r * r)
  return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_j_and_f_on_hand_made_masks():
  shape = (100, 100)
  a = _square(shape, 10, 10, 10)
  assert davis.region_j(a, a) == 1.0 and davis.boundary_f(a, a) == 1.0
  far = _square(shape, 60, 60, 10)
  assert davis.region_j(a, far) == 0.0 and davis.boundary_f(a, far) == 0.0
  empty = np.zeros(shape, bool)
  assert davis.region_j(empty, empty) == 1.0 and davis.boundary_f(empty, empty) == 1.0
  assert davis.region_j(a, empty) == 0.0 and davis.boundary_f(a, empty) == 0.0
  shifted = _square(shape, 10, 15, 10)  # 5 columns right: 50 px shared out of 150
  assert davis.region_j(a, shifted) == pytest.approx(1 / 3)
  # radius ceil(0.008 x 141.4) = 2: a 1 px shift is within tolerance, a 5 px shift only on the horizontal edges.
  assert davis.boundary_f(a, _square(shape, 10, 11, 10)) == 1.0
  f5 = davis.boundary_f(a, shifted)
  assert 0.2 < f5 < 0.8 and f5 == pytest.approx(_ref_f(shifted, a))
  rng = np.random.default_rng(0)
  for _ in range(5):  # blobs of random squares
    g = np.zeros((40, 60), bool)
    p = np.zeros((40, 60), bool)
    for m in (g, p):
      for y, x, s in rng.integers((0, 0, 3), (35, 55, 12), (3, 3)):
        m[y : y + s, x : x + s] = True
    assert davis.boundary_f(g, p) == pytest.approx(_ref_f(p, g))
  j = davis.region_j(np.stack([a, a, a]), np.stack([a, shifted, empty]))
  np.testing.assert_allclose(j, [1, 1 / 3, 0])


def test_boundary_map_radius_and_disk():
  seg = np.zeros((4, 4), bool)
  seg[1:3, 1:3] = True
  expected = np.array([[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], bool)  # half a pixel to the origin
  np.testing.assert_array_equal(davis.seg2bmap(seg), expected)
  assert davis.boundary_radius((480, 854)) == 8  # ceil(0.008 x 979.7)
  assert davis.boundary_radius((100, 100)) == 2
  assert davis.boundary_radius((1080, 1920)) == 18
  assert davis.boundary_radius((100, 100), 3) == 3  # bound_th >= 1: pixels
  np.testing.assert_array_equal(
    davis.disk(2),
    [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]],
  )


def test_statistics_and_first_last_frame_exclusion():
  m, r, d = davis.statistics([0.2, 0.6, 0.9, 0.4])
  assert m == pytest.approx(0.525) and r == 0.5
  assert d == pytest.approx(0.4 - 0.65)  # bins at [0, 1, 2, 2, 3]: mean(v[0:2]) - mean(v[2:4])
  shape = (5, 20, 20)
  gt = np.zeros(shape, np.uint8)
  gt[:, 5:10, 5:10] = 1
  gt[:, 12:18, 12:18] = 2
  gt[2, 0, 0] = 255  # void: background
  pred = gt.copy()
  pred[2, 0, 0] = 0
  pred[0] = 0  # the first and last frames are not scored
  pred[4] = 2
  scores = davis.score_sequence(gt, pred, 2)
  for obj in (1, 2):
    np.testing.assert_array_equal(scores[obj]["j"], [1, 1, 1])
    np.testing.assert_array_equal(scores[obj]["f"], [1, 1, 1])
  pred[2] = 0  # a missed middle frame
  scores = davis.score_sequence(gt, pred, 2)
  np.testing.assert_array_equal(scores[1]["j"], [1, 0, 1])
  s = davis.summarize({("a", 1): scores[1], ("a", 2): scores[2]})
  assert s["j_mean"] == pytest.approx(200 / 3) and s["j_recall"] == pytest.approx(200 / 3)
  assert s["jf_mean"] == pytest.approx((s["j_mean"] + s["f_mean"]) / 2)


# -- end to end ------------------------------------------------------------------------------------------------
H, W, T = 48, 72, 6
OBJECTS = {1: ((230, 30, 30), 14, 8), 2: ((30, 60, 230), 34, 6)}  # id: (colour, row of the centre, radius)


def _background(rng):
  if os.path.isfile(IMAGENETTE):  # a real photograph when ../shared is there
    with tarfile.open(IMAGENETTE) as tar:
      member = next(m for m in tar if m.name.lower().endswith(".jpeg"))
      img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
    return np.array(img.resize((W, H), Image.BILINEAR))
  noise = rng.integers(0, 256, (H // 4, W // 4, 3)).astype(np.uint8)
  return np.array(Image.fromarray(noise).resize((W, H), Image.BICUBIC))


def _object_masks(t):
  yy, xx = np.mgrid[:H, :W]
  x1 = 12 + 9 * t  # id 1, a disc, moving right
  x2 = 60 - 9 * t  # id 2, a square, moving left
  disc = (yy - OBJECTS[1][1]) ** 2 + (xx - x1) ** 2 <= OBJECTS[1][2] ** 2
  square = (np.abs(yy - OBJECTS[2][1]) <= OBJECTS[2][2]) & (np.abs(xx - x2) <= OBJECTS[2][2])
  return disc, square


def _write_davis(root, sequences=("alpha", "beta"), listed=None):
  rng = np.random.default_rng(0)
  colours = davis.palette()
  for s, name in enumerate(sequences):
    jpg = os.path.join(root, "JPEGImages", "480p", name)
    ann = os.path.join(root, "Annotations", "480p", name)
    os.makedirs(jpg)
    os.makedirs(ann)
    bg = _background(rng)
    if s:
      bg = bg[:, ::-1]
    for t in range(T):
      img = bg.copy()
      ids = np.zeros((H, W), np.uint8)
      for obj, m in zip((1, 2), _object_masks(t)):
        img[m] = OBJECTS[obj][0]
        ids[m] = obj
      Image.fromarray(img).save(os.path.join(jpg, f"{t:05d}.jpg"), quality=95)
      davis.write_indexed(os.path.join(ann, f"{t:05d}.png"), ids, colours)
  os.makedirs(os.path.join(root, "ImageSets", "2017"))
  with open(os.path.join(root, "ImageSets", "2017", "val.txt"), "w") as f:
    f.write("\n".join(listed or sequences) + "\n")


@pytest.fixture(scope="module")
def davis_run(tmp_path_factory):
  """(config, workdir, data root): the tiny network at initialisation, checkpointed, and a DAVIS-layout folder."""
  from conftest import checkpoint_at_init, make_tiny_config

  root = tmp_path_factory.mktemp("davis")
  data = str(root / "DAVIS")
  _write_davis(data)
  config = make_tiny_config()
  config.evals.davis.data_dir = data
  config.evals.davis.short_side = 48
  config.evals.davis.size_multiple = 16  # 48 x 72 frames -> 48 x 64 inputs, a 12 x 16 grid of 4 px patches
  config.evals.davis.overlay_frames = 4
  workdir = str(root / "run")
  checkpoint_at_init(config, workdir)
  return config, workdir, data


def test_davis_end_to_end_tracks_the_objects_and_writes_masks(davis_run):
  config, workdir, data = davis_run
  r = evaluate.evaluate(config, workdir, ["davis"])["davis"]
  out = os.path.join(workdir, "eval")
  assert json.load(open(os.path.join(out, "davis.json"))) == json.loads(json.dumps(r))
  assert r["step"] == 0 and r["features"] == "teacher backbone: last-block patch tokens"
  assert r["num_sequences"] == 2 and r["num_objects"] == 4 and r["num_frames"] == 2 * T
  assert set(r["per_sequence"]) == {"alpha", "beta"}
  assert r["per_sequence"]["alpha"]["input_size"] == [48, 64]
  for k in ("jf_mean", "j_mean", "j_recall", "f_mean", "f_recall"):
    assert 0 <= r[k] <= 100, (k, r)
  # Baseline: the first-frame annotation copied to every frame (the objects move 9 px a frame: it loses them).
  gt = np.stack([np.select(list(_object_masks(t)), [1, 2], 0) for t in range(T)]).astype(np.uint8)
  copy = davis.summarize({(0, k): v for k, v in davis.score_sequence(gt, np.stack([gt[0]] * T), 2).items()})
  assert copy["jf_mean"] < 25, copy
  assert r["j_mean"] > 60 and r["jf_mean"] > copy["jf_mean"] + 35, (r, copy)
  # Palette PNGs in the DAVIS results layout, the first one the given annotation; overlay strips.
  for seq in ("alpha", "beta"):
    names = sorted(os.listdir(os.path.join(out, "davis", seq)))
    assert names == [f"{t:05d}.png" for t in range(T)]
    first = Image.open(os.path.join(out, "davis", seq, "00000.png"))
    assert first.mode == "P" and first.size == (W, H)
    np.testing.assert_array_equal(np.array(first), gt[0])
    assert first.getpalette()[3:6] == [128, 0, 0]
    strip = Image.open(os.path.join(out, "davis", "overlays", f"{seq}.png"))
    assert strip.size[1] == 2 * davis.OVERLAY_HEIGHT
  assert evals.build(config, ["davis"])["davis"].metrics(r) == {"jf_mean": r["jf_mean"]}


def test_bad_inputs_are_refused_naming_the_file(davis_run, tmp_path):
  config, workdir, _ = davis_run
  with pytest.raises(DataError, match="nowhere"):
    davis.list_sequences(str(tmp_path / "nowhere"), "val", "480p")
  data = str(tmp_path / "D")
  _write_davis(data, sequences=("alpha",), listed=("alpha", "gamma"))
  with pytest.raises(DataError, match=r"JPEGImages/480p/gamma: sequence 'gamma' listed"):
    davis.list_sequences(data, "val", "480p")
  with pytest.raises(DataError, match=r"ImageSets/2017/train.txt"):
    davis.list_sequences(data, "train", "480p")
  with pytest.raises(ConfigError, match="config.evals.davis.sequences"):
    davis.list_sequences(data, "val", "480p", "delta")
  assert [s for s, _ in davis.list_sequences(data, "val", "480p", "alpha")] == ["alpha"]
  os.remove(os.path.join(data, "Annotations", "480p", "alpha", "00003.png"))
  with pytest.raises(DataError, match=r"alpha/00003.png: annotation missing"):
    davis.list_sequences(data, "val", "480p", "alpha")
  # An annotation whose size differs from its frame, through the evaluator.
  Image.new("P", (W, H - 2)).save(os.path.join(data, "Annotations", "480p", "alpha", "00003.png"))
  c = config.copy_and_resolve_references()
  c.evals.davis.data_dir = data
  c.evals.davis.sequences = "alpha"
  with pytest.raises(DataError, match=r"alpha/00003.png: annotation size \(46, 72\) differs from its frame's"):
    evaluate.evaluate(c, workdir, ["davis"])
  c.evals.davis.topk = 0
  with pytest.raises(ConfigError, match="config.evals.davis.topk"):
    evaluate.evaluate(c, workdir, ["davis"])
