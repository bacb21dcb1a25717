"""Image retrieval (evals.retrieval, simdino_jax/evals/retrieval.py).

AP / mAP / mP@k against values worked out by hand from the revisited protocol's definition (revisitop compute_ap /
compute_map: trapezoid rule over the ranked positives, junk removed from the ranking, queries without positives left
out); the Medium / Hard sets from a hand-made gnd; end to end through ``simdino_jax.evaluate`` on a tiny network at
initialisation, on a generated revisited-layout dataset (queries = database images pasted into a larger distracting
canvas, bbx = the pasted region) and on the generic folder layout; bad inputs refused naming the file.
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


def test_multiscale_descriptor_averages_the_three_scales_then_normalises():
  import jax
  from conftest import make_tiny_config
  from flax import nnx

  from simdino_jax.models.network import build_backbone

  config = make_tiny_config()
  model = build_backbone(config.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  cls = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, key=None)["cls"])
  images = np.random.default_rng(0).normal(size=(2, 24, 20, 3)).astype(np.float32)
  got = np.asarray(jax.jit(retrieval.make_descriptor_fn(graphdef, patch=4, multiscale=True))(params, images))
  parts = []
  for s, (h, w) in ((1.0, (24, 20)), (2**-0.5, (16, 12)), (0.5, (12, 8))):  # floor(24 s), floor(20 s) -> whole patches
    x = np.einsum("ih,bhwc,jw->bijc", retrieval.bilinear_matrix(24, s), images, retrieval.bilinear_matrix(20, s))
    parts.append(np.asarray(cls(params, x[:, :h, :w]), np.float64))
  want = np.mean(parts, axis=0)
  want /= np.linalg.norm(want, axis=-1, keepdims=True)
  np.testing.assert_allclose(got, want, atol=2e-5)
  single = np.asarray(jax.jit(retrieval.make_descriptor_fn(graphdef, patch=4, multiscale=False))(params, images))
  np.testing.assert_allclose(single, parts[0] / np.linalg.norm(parts[0], axis=-1, keepdims=True), atol=2e-5)


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
  config.evals.retrieval.data_dir = str(root / "revisited")
  config.evals.retrieval.image_size = 32
  config.evals.retrieval_whole = evals.declare(
    "retrieval", data_dir=str(root / "revisited"), image_size=32, crop_queries=False
  )
  config.evals.retrieval_folder = evals.declare(
    "retrieval", dataset="folder", data_dir=str(root / "folder"), image_size=0, short_side=16, multiscale=True
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
  assert not whole["crop_queries"] and whole["map_medium"] < r["map_medium"] - 20, whole


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
  for field, value in (("dataset", "oxford"), ("image_size", 100), ("multiscale", "yes"), ("batch_size", -1)):
    bad = evals.declare("retrieval", data_dir="/data", **{field: value})
    with pytest.raises(ConfigError, match=f"config.evals.r.{field}"):
      retrieval.RetrievalEvaluator.validate(bad, "evals.r", config=None, patch=16, depth=12, num_devices=1)
  bad = evals.declare("retrieval", data_dir="/data", image_size=0, short_side=20)
  with pytest.raises(ConfigError, match="config.evals.r.short_side"):
    retrieval.RetrievalEvaluator.validate(bad, "evals.r", config=None, patch=16, depth=12, num_devices=1)
  bad = evals.declare("retrieval", data_dir="/data", image_size=16, multiscale=True)  # the 1/2 scale: no patch
  with pytest.raises(ConfigError, match="config.evals.r.image_size"):
    retrieval.RetrievalEvaluator.validate(bad, "evals.r", config=None, patch=16, depth=12, num_devices=1)
