"""Image retrieval (evals.retrieval, simdino_jax/evals/retrieval.py).

AP / mAP / mP@k against values worked out by hand from the revisited protocol's definition and (with
SIMDINO_OFFICIAL_DIR) against revisitop's own ``compute_map`` on DINO's ranking; DINO's protocol against
transcriptions of ``eval_image_retrieval.py`` (its dataset's PIL lines, ToTensor + Normalize) and of
``utils.multi_scale`` (PyTorch's bilinear ``F.interpolate`` written out in NumPy from ATen's source-index rule);
PIL's thumbnail sizing (640 x 480 -> 224 x 168); a ground truth without hard positives; the memory guard (batch from
the token count, the one-line refusal before any data, the estimate against XLA's own memory analysis); end to end
through ``simdino_jax.evaluate`` on a tiny network at initialisation, on a generated revisited-layout dataset (queries
= database images pasted into a larger distracting canvas, bbx = the pasted region) and on the generic folder layout;
bad inputs refused naming the file.
"""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from simdino_jax import evals, evaluate
from simdino_jax.errors import ConfigError, DataError, MissingDataError
from simdino_jax.evals import retrieval

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 220), (230, 210, 40), (200, 60, 200)]


# -- AP / mAP by hand ------------------------------------------------------------------------------------------
def test_average_precision_trapezoid_by_hand():
  # Positives at ranks 0 and 2 of 2: (1 + 1) / 2 / 2 + (1/2 + 2/3) / 2 / 2 = 1/2 + 7/24 = 19/24.
  assert retrieval.average_precision([0, 2], 2) == pytest.approx(19 / 24)
  # One of two positives retrieved, at rank 1: (0/1 + 1/2) / 2 / 2 = 1/8 (the missing one adds nothing).
  assert retrieval.average_precision([1], 2) == pytest.approx(1 / 8)
  assert retrieval.average_precision([0, 1, 2], 3) == pytest.approx(1.0)
  # A single positive at rank 3: (0/3 + 1/4) / 2 = 1/8 (the trapezoid, not 1/4 as the step rule would give).
  assert retrieval.average_precision([3], 1) == pytest.approx(1 / 8)


def test_junk_is_removed_from_the_ranking():
  order = [5, 3, 7, 1, 0, 6]  # database indices, best first
  # Positives 7 (position 2) and 1 (position 3), junk 3 (position 1, before both) and 6 (after both).
  ranks = retrieval.positive_ranks(order, [1, 7], [3, 6])
  np.testing.assert_array_equal(ranks, [1, 2])
  # (0/1 + 1/2) / 4 + (1/2 + 2/3) / 4 = 3/24 + 7/24 = 5/12; without the junk removal, ranks 2, 3 give 7/24.
  assert retrieval.average_precision(ranks, 2) == pytest.approx(5 / 12)
  np.testing.assert_array_equal(retrieval.positive_ranks(order, [1, 7]), [2, 3])


def test_map_skips_queries_without_positives_and_precision_at_k():
  orders = np.array([[0, 1, 2, 3, 4, 5], [5, 3, 2, 1, 0, 4], [0, 1, 2, 3, 4, 5]])
  gnd = [
    {"ok": [0], "junk": []},  # AP 1
    {"ok": [1, 2], "junk": [3]},  # as above: ranks 2, 3 reduced to 1, 2 -> AP 5/12
    {"ok": [], "junk": [1]},  # no positive: left out of the mean
  ]
  m, aps, pr, prs = retrieval.compute_map(orders, gnd, kappas=(1, 5, 10))
  assert m == pytest.approx((1 + 5 / 12) / 2)
  assert aps[0] == pytest.approx(1.0) and aps[1] == pytest.approx(5 / 12) and np.isnan(aps[2])
  # revisitop's mP@k: 1-based reduced ranks p, k' = min(max(p), k), fraction of p <= k' over k'.
  # Query 0: p = [1] -> 1 at every k. Query 1: p = [2, 3] -> k=1: 0/1; k=5, 10: k' = 3, 2/3.
  np.testing.assert_allclose(prs[0], [1, 1, 1])
  np.testing.assert_allclose(prs[1], [0, 2 / 3, 2 / 3])
  np.testing.assert_allclose(pr, [0.5, 5 / 6, 5 / 6])
  m, aps, _, _ = retrieval.compute_map(orders[2:], gnd[2:])
  assert np.isnan(m) and np.isnan(aps).all()


def test_medium_and_hard_protocols_from_a_hand_made_gnd():
  gnd = [{"bbx": [0, 0, 1, 1], "easy": [2], "hard": [1], "junk": [4]}, {"easy": [0, 3], "hard": [], "junk": []}]
  medium, hard = retrieval.protocol_gnd(gnd, "medium"), retrieval.protocol_gnd(gnd, "hard")
  assert sorted(medium[0]["ok"]) == [1, 2] and sorted(medium[0]["junk"]) == [4]
  assert sorted(hard[0]["ok"]) == [1] and sorted(hard[0]["junk"]) == [2, 4]
  assert sorted(medium[1]["ok"]) == [0, 3] and list(hard[1]["ok"]) == [] and sorted(hard[1]["junk"]) == [0, 3]
  orders = np.array([[2, 3, 0, 1, 4], [0, 1, 2, 3, 4]])
  # Medium, query 0: positives 2, 1 at positions 0, 3 -> 1/2 + (1/3 + 2/4) / 4 = 17/24. Query 1: 0, 3 at 0, 3 -> same.
  m, aps, _, _ = retrieval.compute_map(orders, medium)
  np.testing.assert_allclose(aps, [17 / 24, 17 / 24])
  # Hard, query 0: positive 1 at position 3, junk 2 before it -> rank 2 -> (0/2 + 1/3) / 2 = 1/6; query 1 skipped.
  m, aps, _, _ = retrieval.compute_map(orders, hard)
  assert m == pytest.approx(1 / 6) and np.isnan(aps[1])
  with pytest.raises(ValueError, match="protocol"):
    retrieval.protocol_gnd(gnd, "easy")


def test_ranking_by_cosine_keeps_the_database_order_on_ties():
  db = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [1.0, 1.0]])
  q = np.array([[2.0, 0.0], [0.0, 1.0]])
  np.testing.assert_array_equal(retrieval.rank_database(db, q), [[0, 2, 3, 1], [1, 3, 0, 2]])


def test_view_sizes():
  assert retrieval.view_size(40, 30, image_size=0, short_side=16, patch=4) == (16, 20)  # 16 x 21.3 -> 20
  assert retrieval.view_size(30, 41, image_size=0, short_side=16, patch=4) == (20, 16)
  assert retrieval.view_size(30, 41, image_size=24, short_side=16, patch=4) == (24, 24)
  img = Image.fromarray(np.zeros((30, 41, 3), np.uint8))
  assert retrieval.view(img, (16, 20)).shape == (16, 20, 3)
  assert retrieval.view(img, (24, 24)).shape == (24, 24, 3)


def test_bilinear_matrix_is_pytorchs_interpolate_with_a_scale_factor():
  # scale 1/2: output i reads (i + 0.5) * 2 - 0.5 = 2i + 0.5, the mean of inputs 2i and 2i + 1.
  np.testing.assert_allclose(retrieval.bilinear_matrix(4, 0.5), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
  # scale 1/sqrt(2), 4 -> floor(2.83) = 2 outputs at 0.5 sqrt(2) - 0.5 = 0.2071 and 1.5 sqrt(2) - 0.5 = 1.6213
  # (the factor's inverse, not the size ratio 4 / 2, which would read 0.5 and 2.5).
  a, b = 0.5 * 2**0.5 - 0.5, 1.5 * 2**0.5 - 0.5
  want = [[1 - a, a, 0, 0], [0, 2 - b, b - 1, 0]]
  np.testing.assert_allclose(retrieval.bilinear_matrix(4, 2**-0.5), want, rtol=1e-6)
  # Clamped at the borders: upsampling by 2 reads -0.25 (-> 0) first and 3.75 (-> 3 and its clipped neighbour) last.
  m = retrieval.bilinear_matrix(4, 2.0)
  np.testing.assert_allclose(m[0], [1, 0, 0, 0])
  np.testing.assert_allclose(m[-1], [0, 0, 0, 1])


def _torch_bilinear(x: np.ndarray, s: float) -> np.ndarray:
  """PyTorch's ``F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)`` on NHWC, written out from
  ATen (UpSample.h): output size floor(in * s); ``area_pixel_compute_source_index(scale, dst, False, cubic=False)`` =
  max(scale * (dst + 0.5) - 0.5, 0) with scale = 1 / s (the factor the caller gave); i1 = i0 + 1 unless at the last
  pixel; weights l0 = 1 - l1, l1 = src - i0."""

  def axis(n_in):
    src = np.maximum((np.arange(int(np.floor(n_in * s))) + 0.5) * (1.0 / s) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0)[:, None]

  r0, r1, ly = axis(x.shape[1])
  c0, c1, lx = axis(x.shape[2])
  rows = x[:, r0] * (1 - ly)[None, :, :, None] + x[:, r1] * ly[None, :, :, None]
  return rows[:, :, c0] * (1 - lx)[None, None] + rows[:, :, c1] * lx[None, None]


@pytest.fixture(scope="module")
def tiny_backbone():
  import jax
  from conftest import make_tiny_config
  from flax import nnx

  from simdino_jax.models.network import build_backbone

  model = build_backbone(make_tiny_config().model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  return graphdef, params, jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, key=None)["cls"])


def test_dino_multiscale_on_a_non_square_input_is_dinos_multi_scale(tiny_backbone):
  import jax

  graphdef, params, cls = tiny_backbone
  # A 26 x 18 input at patch 4 (neither side a multiple of the patch, as DINO's 224 x 168 thumbnails at patch 16).
  images = np.random.default_rng(0).normal(size=(2, 26, 18, 3)).astype(np.float32)
  got = np.asarray(jax.jit(retrieval.make_descriptor_fn(graphdef, patch=4, multiscale=True))(params, images))
  # utils.multi_scale: for s in [1, 1/2**(1/2), 1/2]: inp = samples (s == 1) or interpolate(samples, scale_factor=s,
  # mode='bilinear', align_corners=False); v += model(inp); v /= 3; v /= v.norm(). The model's stride-4 patch
  # convolution reads the top-left whole patches only: 26 x 18 -> 24 x 16; 18 x 12 -> 16 x 12; 13 x 9 -> 12 x 8.
  v = 0.0
  for s in (1, 1 / 2 ** (1 / 2), 1 / 2):
    inp = images if s == 1 else _torch_bilinear(images.astype(np.float64), s).astype(np.float32)
    h, w = inp.shape[1] // 4 * 4, inp.shape[2] // 4 * 4
    v = v + np.asarray(cls(params, inp[:, :h, :w]), np.float64)
  v /= 3
  v /= np.linalg.norm(v, axis=-1, keepdims=True)  # batch 1 in DINO's loader: v.norm() is the per-image norm
  want = v / np.linalg.norm(v, axis=-1, keepdims=True)  # then nn.functional.normalize(features, dim=1, p=2)
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert retrieval.scaled_sizes(26, 18, patch=4, multiscale=True) == [(24, 16), (16, 12), (12, 8)]
  # Without multiscale: model(samples) on the whole patches, then F.normalize.
  single = np.asarray(jax.jit(retrieval.make_descriptor_fn(graphdef, patch=4, multiscale=False))(params, images))
  one = np.asarray(cls(params, images[:, :24, :16]), np.float64)
  np.testing.assert_allclose(single, one / np.linalg.norm(one, axis=-1, keepdims=True), atol=2e-5)


# -- DINO's preprocessing --------------------------------------------------------------------------------------
def test_thumbnail_size_is_pils_thumbnail():
  rng = np.random.default_rng(0)
  cases = [(640, 480, 224), (480, 640, 224), (1024, 768, 224), (100, 80, 224), (224, 224, 224), (225, 3, 224)]
  cases += [
    (int(w), int(h), int(m))
    for w, h, m in zip(rng.integers(1, 900, 150), rng.integers(1, 900, 150), rng.choice([30, 224, 512], 150))
  ]
  for w, h, imsize in cases:
    im = Image.new("L", (w, h))
    im.thumbnail((imsize, imsize), Image.Resampling.LANCZOS)
    assert retrieval.thumbnail_size(w, h, imsize) == im.size, (w, h, imsize)
  assert retrieval.thumbnail_size(640, 480, 224) == (224, 168)  # the example: W x H = 224 x 168
  assert retrieval.thumbnail_size(100, 80, 224) == (100, 80)  # never upscaled


def _dino_getitem(path: str, imsize: int) -> np.ndarray:
  """DINO's eval_image_retrieval.py, OxfordParisDataset.__getitem__ with its transform, transcribed (NHWC):
    with open(path, 'rb') as f: img = Image.open(f); img = img.convert('RGB')
    if self.imsize is not None: img.thumbnail((self.imsize, self.imsize), Image.ANTIALIAS)
    transform = Compose([ToTensor(), Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
  (Image.ANTIALIAS was Pillow's alias of LANCZOS until Pillow 10 removed it; ToTensor divides by 255 in float32.)"""
  from PIL import ImageFile

  truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
  try:  # PIL's global flag restored: other tests check that truncated files are detected
    with open(path, "rb") as f:
      img = Image.open(f)
      img = img.convert("RGB")
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = truncated
  img.thumbnail((imsize, imsize), getattr(Image, "ANTIALIAS", Image.LANCZOS))
  t = np.asarray(img).astype(np.float32) / np.float32(255)
  return (t - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])


def test_dino_view_is_dinos_dataset_item(tmp_path):
  rng = np.random.default_rng(3)
  yy, xx = np.mgrid[:480, :640]
  photo = np.stack([xx % 251, (yy * 3) % 256, (xx + yy) % 256], -1).astype(np.uint8)
  Image.fromarray(photo).save(tmp_path / "landscape.jpg", quality=90)
  Image.fromarray(rng.integers(0, 255, (500, 300, 3)).astype(np.uint8)).save(tmp_path / "portrait.png")
  Image.fromarray(rng.integers(0, 255, (80, 100)).astype(np.uint8)).save(tmp_path / "small_grey.png")  # L mode
  for name, shape in (("landscape.jpg", (168, 224)), ("portrait.png", (224, 134)), ("small_grey.png", (80, 100))):
    path = str(tmp_path / name)
    want = _dino_getitem(path, 224)
    assert want.shape[:2] == shape, name
    item = retrieval.Item(path)  # a whole image (queries too, as DINO's script)
    got = retrieval.dino_view(item.load(), 224)
    assert got.shape == want.shape, name
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=name)
    w, h = item.size()
    assert retrieval.thumbnail_size(w, h, 224)[::-1] == shape


# -- ground truth without hard positives; revisitop's compute_map ---------------------------------------------
def test_missing_hard_reports_medium_and_says_hard_is_undefined():
  orders = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
  gnd = [{"easy": [0], "hard": [], "junk": [1]}, {"easy": [2], "hard": [], "junk": []}]
  r = retrieval.score(orders, gnd, ["a", "b"], folder=False, where="gnd_x.pkl")
  # Medium: query a, positive 0 at rank 0 -> AP 1; query b, positive 2 at rank 1 -> (0/1 + 1/2) / 2 = 1/4.
  assert r["map_medium"] == 62.5 and r["num_skipped_medium"] == 0
  assert r["map_hard"] is None and r["mp_hard"] is None and r["num_skipped_hard"] == 2
  assert "no query has a hard positive in gnd_x.pkl" in r["hard_undefined"]
  assert r["per_query_ap"] == {"a": {"medium": 100.0, "hard": None}, "b": {"medium": 25.0, "hard": None}}
  ev = retrieval.RetrievalEvaluator("r", evals.declare("retrieval"), None)
  full = {**r, "dataset": "roxford5k", "num_queries": 2, "num_database": 4}
  assert ev.metrics(full) == {"map_medium": 62.5}
  assert "Hard undefined" in ev.summary(full)
  json.dumps(full)  # null in the JSON
  # One query without a hard positive: left out of Hard's mean, as revisitop does.
  gnd[1]["hard"] = [3]
  r = retrieval.score(orders, gnd, ["a", "b"], folder=False, where="gnd_x.pkl")
  assert r["map_hard"] == 100.0 and r["num_skipped_hard"] == 1 and r["per_query_ap"]["a"]["hard"] is None
  assert "hard_undefined" not in r
  with pytest.raises(DataError, match="gnd_x.pkl: no query has a positive"):
    retrieval.score(orders, [{"easy": [], "hard": [], "junk": []}] * 2, ["a", "b"], folder=False, where="gnd_x.pkl")


def _revisitop(monkeypatch):
  """revisitop's python/evaluate.py (numpy only), from SIMDINO_OFFICIAL_DIR/revisitop; np.in1d (removed in NumPy 2.4)
  restored as np.isin, which it equals on 1-D arrays."""
  import importlib.util

  root = os.environ.get("SIMDINO_OFFICIAL_DIR")
  path = os.path.join(root or "", "revisitop", "python", "evaluate.py")
  if not root or not os.path.isfile(path):
    pytest.skip("SIMDINO_OFFICIAL_DIR (a folder holding the official clones, revisitop among them) is not set")
  if not hasattr(np, "in1d"):
    monkeypatch.setattr(np, "in1d", np.isin, raising=False)
  spec = importlib.util.spec_from_file_location("revisitop_evaluate", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_scores_equal_revisitops_compute_map_on_dinos_ranking(monkeypatch):
  official = _revisitop(monkeypatch)
  rng = np.random.default_rng(7)
  n, q = 40, 6
  db, qf = rng.normal(size=(n, 8)).astype(np.float32), rng.normal(size=(q, 8)).astype(np.float32)
  gnd = []
  for i in range(q):
    perm = rng.permutation(n)
    gnd.append({"easy": perm[:3], "hard": perm[3 : 3 + (i % 3)], "junk": perm[5:8]})  # query 0, 3: no hard
  # DINO's Step 2 and 3: normalize, sim = torch.mm(train, query.T), ranks = argsort(-sim, dim=0), gnd_t per protocol.
  dbn = db / np.linalg.norm(db, axis=1, keepdims=True)
  qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
  ranks = np.argsort(-(dbn @ qn.T), axis=0)
  gnd_m = [{"ok": np.concatenate([g["easy"], g["hard"]]), "junk": np.concatenate([g["junk"]])} for g in gnd]
  gnd_h = [{"ok": np.concatenate([g["hard"]]), "junk": np.concatenate([g["junk"], g["easy"]])} for g in gnd]
  orders = retrieval.rank_database(db, qf)
  np.testing.assert_array_equal(orders, ranks.T)
  r = retrieval.score(orders, gnd, [str(i) for i in range(q)], folder=False, where="gnd")
  for gnd_t, key in ((gnd_m, "medium"), (gnd_h, "hard")):
    m, aps, pr, prs = official.compute_map(ranks, gnd_t, [1, 5, 10])
    ours = retrieval.compute_map(orders, retrieval.protocol_gnd(gnd, key))
    assert abs(ours[0] - m) < 1e-12 and r[f"map_{key}"] == float(np.round(100 * m, 4))
    np.testing.assert_allclose(ours[1], aps, atol=1e-12)  # nan (no positive) in both
    np.testing.assert_allclose(ours[2], pr, atol=1e-12)
    np.testing.assert_allclose(ours[3], prs, atol=1e-12)
  # No hard positive anywhere: revisitop's mean is 0 / 0 (Python ints: ZeroDivisionError, so DINO's script stops
  # there); the result reports Medium and says Hard is undefined instead.
  with pytest.raises(ZeroDivisionError):
    official.compute_map(ranks, [{"ok": np.zeros(0), "junk": g["junk"]} for g in gnd_m], [1, 5, 10])


# -- memory ----------------------------------------------------------------------------------------------------
DEMO = {"patch": 4, "heads": 3, "dim": 96, "registers": 0}  # configs/demo.py's backbone


def test_forward_batch_from_the_token_count_and_the_one_line_refusal():
  # A 224 x 224 input at patch 4: 3,137 tokens; 4 maps of 3 heads x 3137^2 float32 + 16 x 3137 x 96 + 3 scales input.
  per_image = retrieval.forward_bytes(224, 224, **DEMO)
  assert per_image == 4 * (4 * 3 * 3137**2 + 16 * 3137 * 96 + 6 * 224 * 224)
  assert 0.45e9 < per_image < 0.5e9
  assert retrieval.per_device_batch(224, 224, budget=6 * 10**9, field="evals.r.image_size", what="x", **DEMO) == 12
  with pytest.raises(ConfigError) as e:
    retrieval.per_device_batch(224, 224, budget=3 * 10**8, field="evals.r.image_size", what="x", **DEMO)
  msg = str(e.value)
  assert msg.startswith("config.evals.r.image_size: one 224x224 input") and "\n" not in msg
  assert "3137 tokens" in msg and "lower image_size or raise memory_gb" in msg


def test_validate_refuses_an_input_over_the_memory_budget_before_reading_data(tiny_config):
  tiny_config.model.embed_dim, tiny_config.model.num_heads = 96, 3  # the demo's backbone at patch 4
  ok = evals.declare("retrieval", data_dir="/absent/data", image_size=224)
  retrieval.RetrievalEvaluator.validate(ok, "evals.r", config=tiny_config, patch=4, depth=2, num_devices=1)
  # Default budget: a quarter of this machine's memory per device must hold one 224 px image at patch 4.
  assert retrieval.memory_budget(0) >= retrieval.forward_bytes(224, 224, **DEMO)
  tight = evals.declare("retrieval", data_dir="/absent/data", image_size=224, memory_gb=0.25)
  with pytest.raises(ConfigError, match=r"^config\.evals\.r\.image_size: one 224x224 input .*lower image_size"):
    retrieval.RetrievalEvaluator.validate(tight, "evals.r", config=tiny_config, patch=4, depth=2, num_devices=1)
  crop = evals.declare(
    "retrieval", data_dir="/absent/data", protocol="center_crop", image_size=0, short_side=224, memory_gb=0.25
  )
  with pytest.raises(ConfigError, match=r"^config\.evals\.r\.short_side: one 224x224 input"):
    retrieval.RetrievalEvaluator.validate(crop, "evals.r", config=tiny_config, patch=4, depth=2, num_devices=1)


def test_memory_estimate_bounds_xlas_own_analysis(tiny_backbone):
  import jax
  import jax.numpy as jnp

  graphdef, params, _ = tiny_backbone  # width 32, 2 heads, patch 4
  fn = jax.jit(retrieval.make_descriptor_fn(graphdef, patch=4, multiscale=False))
  measured = fn.lower(params, jax.ShapeDtypeStruct((2, 96, 64, 3), jnp.float32)).compile().memory_analysis()
  estimate = 2 * retrieval.forward_bytes(96, 64, patch=4, heads=2, dim=32)
  # XLA's temporaries for the batch of 2 (385 tokens): 7.3 MB measured against the 11.4 MB estimate.
  assert measured.temp_size_in_bytes <= estimate <= 2 * measured.temp_size_in_bytes, (measured, estimate)


# -- data ------------------------------------------------------------------------------------------------------
def _shape_image(i: int, size: int = 32) -> np.ndarray:
  """Database image i: a background of colour i // 2 (two images per colour), a disc or a square of another colour."""
  rng = np.random.default_rng(i)
  img = np.empty((size, size, 3), np.uint8)
  img[:] = COLOURS[(i // 2) % len(COLOURS)]
  img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
  yy, xx = np.mgrid[:size, :size]
  fg = COLOURS[(i // 2 + 2) % len(COLOURS)]
  if i % 2:
    img[8:24, 6:22] = fg
  else:
    img[(yy - 16) ** 2 + (xx - 14) ** 2 <= 64] = fg
  return img


def _query_image(source: np.ndarray, offset=(10, 6), size=(52, 60)) -> tuple[np.ndarray, list]:
  """``source`` pasted into a noisy grey canvas at ``offset`` (x, y); the bounding box of the paste (x1, y1, x2, y2)."""
  rng = np.random.default_rng(99)
  canvas = rng.integers(0, 255, (size[1], size[0], 3)).astype(np.uint8)
  x, y = offset
  h, w = source.shape[:2]
  canvas[y : y + h, x : x + w] = source
  return canvas, [float(x), float(y), float(x + w), float(y + h)]


def _write_revisited(root, dataset="roxford5k", n=10, sources=(0, 4, 6)):
  d = os.path.join(root, dataset, "jpg")
  os.makedirs(d)
  imlist = [f"db_{i}" for i in range(n)]
  for i, name in enumerate(imlist):
    Image.fromarray(_shape_image(i)).save(os.path.join(d, f"{name}.jpg"), quality=95)
  qimlist, gnd = [], []
  for q, s in enumerate(sources):
    img, bbx = _query_image(_shape_image(s))
    Image.fromarray(img).save(os.path.join(d, f"query_{q}.jpg"), quality=95)
    qimlist.append(f"query_{q}")
    # The source image itself is "easy", its sibling of the same colour "hard", the next image junk.
    gnd.append({"bbx": bbx, "easy": [s], "hard": [s ^ 1], "junk": [(s + 2) % n]})
  with open(os.path.join(root, dataset, f"gnd_{dataset}.pkl"), "wb") as f:
    pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
  return gnd


def _write_folder(root, n=10):
  for sub in ("queries", "database"):
    os.makedirs(os.path.join(root, sub))
  for i in range(n):
    Image.fromarray(_shape_image(i)).save(os.path.join(root, "database", f"img{i:02d}.png"))
  # A landscape distractor: with image_size 0 the database has two input sizes (16 x 16 and 16 x 24), batched apart.
  noise = np.random.default_rng(5).integers(0, 255, (32, 48, 3)).astype(np.uint8)
  Image.fromarray(noise).save(os.path.join(root, "database", "wide.png"))
  img, bbx = _query_image(_shape_image(2))
  Image.fromarray(img).save(os.path.join(root, "queries", "boxed.png"))
  Image.fromarray(_shape_image(7)).save(os.path.join(root, "queries", "plain.png"))
  gt = {
    "boxed.png": {"positives": ["img02.png", "img03.png"], "junk": ["img09.png"], "bbx": bbx},
    "plain.png": ["img07.png"],
  }
  with open(os.path.join(root, "ground_truth.json"), "w") as f:
    json.dump(gt, f)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config, workdir): the tiny network at initialisation, checkpointed; evaluators declared on generated data."""
  from conftest import checkpoint_at_init, make_tiny_config

  root = tmp_path_factory.mktemp("retrieval")
  _write_revisited(str(root / "revisited"))
  _write_folder(str(root / "folder"))
  config = make_tiny_config()
  # The former default: square centre crops, queries cropped to their box.
  config.evals.retrieval.update(data_dir=str(root / "revisited"), protocol="center_crop", image_size=32)
  config.evals.retrieval.crop_queries = True
  # DINO's protocol (the default): 30 px thumbnails (26 x 30 queries, 30 x 30 database), whole queries, 3 scales.
  config.evals.retrieval_whole = evals.declare(
    "retrieval", data_dir=str(root / "revisited"), image_size=30, multiscale=True
  )
  config.evals.retrieval_folder = evals.declare(
    "retrieval",
    dataset="folder",
    data_dir=str(root / "folder"),
    protocol="center_crop",
    image_size=0,
    short_side=16,
    multiscale=True,
    crop_queries=True,
  )
  workdir = str(root / "run")
  checkpoint_at_init(config, workdir)
  return config, workdir


# -- end to end ------------------------------------------------------------------------------------------------
def test_revisited_layout_through_evaluate(run):
  config, workdir = run
  r = evaluate.evaluate(config, workdir, ["retrieval"])["retrieval"]
  with open(os.path.join(workdir, "eval", "retrieval.json")) as f:
    assert json.load(f)["map_medium"] == r["map_medium"]
  assert r["num_queries"] == 3 and r["num_database"] == 10 and r["dataset"] == "roxford5k"
  # Random ranking of 2 positives among 9 non-junk images gives a medium mAP around 35%; the crops of the
  # database images retrieve them first.
  assert r["map_medium"] > 80, r
  assert r["map_hard"] > 50, r
  assert all(q["medium"] >= 50 for q in r["per_query_ap"].values()), r
  assert set(r["mp_medium"]) == {"1", "5", "10"} and r["mp_medium"]["1"] == 100.0
  ev = evals.build(config, ["retrieval"])["retrieval"]
  assert ev.metrics(r) == {"map_medium": r["map_medium"], "map_hard": r["map_hard"]}
  assert "Medium" in ev.summary(r)
  # The whole query images (DINO's script: no bbx crop) are mostly distracting canvas: the crop is what found them.
  whole = evaluate.evaluate(config, workdir, ["retrieval_whole"])["retrieval_whole"]
  assert whole["protocol"] == "dino" and not whole["crop_queries"], whole
  assert whole["map_medium"] < r["map_medium"] - 20, whole
  # W x H: 32 x 32 database images -> 30 x 30 thumbnails -> 28 x 28 whole patches; 52 x 60 queries -> 26 x 30 ->
  # 24 x 28 (multiscale: grouped by the exact thumbnail sizes), each batch of one size.
  assert whole["input_sizes"] == 2 and set(whole["forward_batch"]) == {"28x28", "24x28"}, whole


def test_folder_layout_multiscale_through_evaluate(run):
  config, workdir = run
  r = evaluate.evaluate(config, workdir, ["retrieval_folder"])["retrieval_folder"]
  assert os.path.isfile(os.path.join(workdir, "eval", "retrieval_folder.json"))
  assert r["num_queries"] == 2 and r["num_database"] == 11 and r["multiscale"] and r["short_side"] == 16
  assert r["map"] > 70, r
  assert r["per_query_ap"]["plain.png"]["map"] == 100.0, r
  assert evals.build(config, ["retrieval_folder"])["retrieval_folder"].metrics(r) == {"map": r["map"]}


# -- bad inputs ------------------------------------------------------------------------------------------------
def test_revisited_bad_inputs_name_the_file(tmp_path):
  with pytest.raises(MissingDataError, match="gnd_rparis6k.pkl"):
    retrieval.load_revisited(str(tmp_path), "rparis6k", True)
  _write_revisited(str(tmp_path))
  os.remove(tmp_path / "roxford5k" / "jpg" / "db_3.jpg")
  with pytest.raises(MissingDataError, match=r"db_3\.jpg: image listed in .*gnd_roxford5k.pkl"):
    retrieval.load_revisited(str(tmp_path), "roxford5k", True)
  (tmp_path / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(b"not a pickle")
  with pytest.raises(DataError, match="gnd_roxford5k.pkl: not a readable pickle"):
    retrieval.load_revisited(str(tmp_path), "roxford5k", True)


def test_folder_bad_inputs_name_the_file(tmp_path):
  with pytest.raises(MissingDataError, match="queries: folder not found"):
    retrieval.load_folder(str(tmp_path), True)
  _write_folder(str(tmp_path))
  gt_path = tmp_path / "ground_truth.json"
  gt_path.write_text(json.dumps({"plain.png": ["img07.png", "absent.png"]}))
  with pytest.raises(MissingDataError, match=r"absent\.png: listed in .*ground_truth\.json"):
    retrieval.load_folder(str(tmp_path), True)
  gt_path.write_text(json.dumps({"nowhere.png": ["img07.png"]}))
  with pytest.raises(MissingDataError, match=r"nowhere\.png: query listed in"):
    retrieval.load_folder(str(tmp_path), True)
  gt_path.write_text(json.dumps({"plain.png": {"positives": ["img07.png"], "junk": ["img07.png"]}}))
  with pytest.raises(DataError, match="as positive and junk"):
    retrieval.load_folder(str(tmp_path), True)
  gt_path.write_text("{")
  with pytest.raises(DataError, match="ground_truth.json: not readable JSON"):
    retrieval.load_folder(str(tmp_path), True)
  (tmp_path / "database" / "img05.png").write_bytes(b"garbage")
  with pytest.raises(DataError, match=r"img05\.png: not a readable image"):
    retrieval.Item(str(tmp_path / "database" / "img05.png")).load()


def test_missing_data_dir_through_evaluate(run, tmp_path):
  config, workdir = run
  config = config.copy_and_resolve_references()
  config.evals.retrieval.data_dir = str(tmp_path / "absent")
  with pytest.raises(MissingDataError, match="absent: retrieval data folder not found"):
    evaluate.evaluate(config, workdir, ["retrieval"])


def test_validation():
  cfg = evals.declare("retrieval", data_dir="/data")
  retrieval.RetrievalEvaluator.validate(cfg, "evals.r", config=None, patch=16, depth=12, num_devices=1)
  for field, value in (
    ("dataset", "oxford"),
    ("protocol", "revisited"),
    ("image_size", 8),
    ("multiscale", "yes"),
    ("batch_size", -1),
    ("memory_gb", -1.0),
  ):
    bad = evals.declare("retrieval", data_dir="/data", **{field: value})
    with pytest.raises(ConfigError, match=f"config.evals.r.{field}"):
      retrieval.RetrievalEvaluator.validate(bad, "evals.r", config=None, patch=16, depth=12, num_devices=1)
  # DINO's thumbnail bound need not be a multiple of the patch size; center_crop's square must be.
  odd = evals.declare("retrieval", data_dir="/data", image_size=100)
  retrieval.RetrievalEvaluator.validate(odd, "evals.r", config=None, patch=16, depth=12, num_devices=1)
  bad = evals.declare("retrieval", data_dir="/data", protocol="center_crop", image_size=100)
  with pytest.raises(ConfigError, match="config.evals.r.image_size"):
    retrieval.RetrievalEvaluator.validate(bad, "evals.r", config=None, patch=16, depth=12, num_devices=1)
  bad = evals.declare("retrieval", data_dir="/data", protocol="center_crop", image_size=0, short_side=20)
  with pytest.raises(ConfigError, match="config.evals.r.short_side"):
    retrieval.RetrievalEvaluator.validate(bad, "evals.r", config=None, patch=16, depth=12, num_devices=1)
  bad = evals.declare("retrieval", data_dir="/data", image_size=16, multiscale=True)  # the 1/2 scale: no patch
  with pytest.raises(ConfigError, match="config.evals.r.image_size"):
    retrieval.RetrievalEvaluator.validate(bad, "evals.r", config=None, patch=16, depth=12, num_devices=1)
