"""Evaluation suite: k-NN over several k, linear probe, few-shot, attention maps, the evaluate CLI and periodic evals.

Numbers are checked against NumPy transcriptions written from the protocols; the end-to-end tests share one tiny
network trained for two steps on the embedded digits.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_cli_errors import parse
from test_cli_errors import run as run_cli

from simdino_jax import config as config_lib
from simdino_jax import evals, evaluate
from simdino_jax.evals import attention, fewshot, knn, linear
from simdino_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- k-NN over several k ----------------------------------------------------------------------------------------
def np_knn_scores(train_f, train_y, test_f, num_classes, k, t):
  train_f = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
  test_f = test_f / np.linalg.norm(test_f, axis=1, keepdims=True)
  scores = np.zeros((len(test_f), num_classes))
  for row, x in enumerate(test_f):
    sims = train_f @ x
    for i in np.argsort(-sims)[:k]:
      scores[row, train_y[i]] += np.exp(sims[i] / t)
  return scores


def test_knn_multi_k_matches_numpy_for_every_k_and_counts_each_test_example_once():
  rng = np.random.default_rng(0)
  centers = rng.standard_normal((7, 12))
  train_y, test_y = rng.integers(0, 7, 150), rng.integers(0, 7, 53)
  train_f = centers[train_y] + 1.2 * rng.standard_normal((150, 12))
  test_f = centers[test_y] + 1.2 * rng.standard_normal((53, 12))
  ks = (1, 10, 20, 100, 200)  # 200 > 150 training examples: every example votes
  # chunk 20 does not divide 53: the padded last chunk must not add or lose examples.
  got = knn.knn_accuracy_multi_k(train_f, train_y, test_f, test_y, num_classes=7, ks=ks, temperature=0.07, chunk=20)
  assert sorted(got) == sorted(ks)
  for k in ks:
    scores = np_knn_scores(train_f, train_y, test_f, 7, k, 0.07)
    top1 = 100 * np.mean(np.argmax(scores, 1) == test_y)
    top5 = 100 * np.mean(np.any(np.argsort(-scores, 1)[:, :5] == test_y[:, None], 1))
    assert got[k]["top1"] == pytest.approx(top1, abs=1e-9), k
    assert got[k]["top5"] == pytest.approx(top5, abs=1e-9), k
  # The single-k path (knn_predict, kept as the public API) agrees with the multi-k pass.
  pred = knn.knn_predict(train_f, train_y, test_f, num_classes=7, k=20, temperature=0.07)
  assert got[20]["top1"] == pytest.approx(100 * np.mean(pred == test_y), abs=1e-9)


# -- linear probe -----------------------------------------------------------------------------------------------
def np_sgd_sweep(x, y, lrs, w0, b0, idx, wts, num_classes, momentum=0.9):
  """SGD with momentum (PyTorch form, dampening 0) and a per-step cosine lr to 0, in float64."""
  epochs, steps, _ = idx.shape
  total = epochs * steps
  out = []
  for lr in lrs:
    w, b = w0.astype(np.float64).copy(), b0.astype(np.float64).copy()
    mw, mb = np.zeros_like(w), np.zeros_like(b)
    t = 0
    for e in range(epochs):
      for s in range(steps):
        xb, yb, wb = x[idx[e, s]].astype(np.float64), y[idx[e, s]], wts[e, s].astype(np.float64)
        logits = xb @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(yb)), yb] -= 1.0  # d CE / d logits
        g = p * wb[:, None] / wb.sum()
        mw, mb = momentum * mw + xb.T @ g, momentum * mb + g.sum(0)
        lr_t = lr * 0.5 * (1 + math.cos(math.pi * t / total))
        w, b = w - lr_t * mw, b - lr_t * mb
        t += 1
    out.append((w, b))
  return out


def test_linear_sweep_equals_numpy_sgd_momentum_with_cosine_lr():
  rng = np.random.default_rng(1)
  n, d, c, bs, epochs = 45, 6, 4, 16, 3  # 45 = 2 full batches + a padded one
  x = rng.standard_normal((n, d)).astype(np.float32)
  y = rng.integers(0, c, n).astype(np.int32)
  lrs = (0.01, 0.3, 2.0)
  key = jax.random.key(5)
  got = linear.train_sweep(
    jnp.asarray(x), jnp.asarray(y), jnp.asarray(lrs, jnp.float32), key, num_classes=c, epochs=epochs, batch_size=bs
  )
  init_key, order_key = jax.random.split(key)
  p0 = linear.init_params(init_key, d, c)
  batches = [linear.epoch_batches(order_key, e, n, bs) for e in range(epochs)]
  idx = np.stack([np.asarray(i) for i, _ in batches])
  wts = np.stack([np.asarray(w) for _, w in batches])
  for e in range(epochs):  # every example exactly once per epoch, the padding weightless
    np.testing.assert_array_equal(np.sort(idx[e][wts[e] > 0]), np.arange(n))
  assert not np.array_equal(idx[0], idx[1])  # a fresh permutation each epoch
  want = np_sgd_sweep(x, y, lrs, np.asarray(p0["w"]), np.asarray(p0["b"]), idx, wts, c)
  for i, (w, b) in enumerate(want):
    np.testing.assert_allclose(np.asarray(got["w"][i]), w, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got["b"][i]), b, rtol=2e-4, atol=2e-5)
  assert not np.allclose(np.asarray(got["w"][0]), np.asarray(got["w"][2]))  # the lrs really differ


def test_linear_probe_reports_numpy_argmax_accuracy_of_the_best_lr():
  rng = np.random.default_rng(2)
  centers = 2.0 * rng.standard_normal((5, 10))
  train_y, test_y = rng.integers(0, 5, 120), rng.integers(0, 5, 61)
  train_x = centers[train_y] + rng.standard_normal((120, 10))
  test_x = centers[test_y] + rng.standard_normal((61, 10))
  lrs = (1e-3, 1e-1)
  res = linear.linear_probe(train_x, train_y, test_x, test_y, num_classes=5, lrs=lrs, epochs=4, batch_size=32, seed=3)
  # Recompute from the same program: standardise, train, then count argmax hits in NumPy.
  tr_s, te_s = linear.standardize(train_x, test_x)
  np.testing.assert_allclose(tr_s.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(tr_s.std(0), 1, atol=1e-4)
  params = linear.train_sweep(
    jnp.asarray(tr_s),
    jnp.asarray(train_y, jnp.int32),
    jnp.asarray(lrs, jnp.float32),
    jax.random.key(3),
    num_classes=5,
    epochs=4,
    batch_size=32,
  )
  accs = [
    100 * np.mean(np.argmax(te_s @ np.asarray(params["w"][i]) + np.asarray(params["b"][i]), 1) == test_y)
    for i in range(len(lrs))
  ]
  for lr, a in zip(lrs, accs):
    assert res["per_lr"][f"{lr:g}"]["top1"] == pytest.approx(a, abs=1e-9)
  assert res["accuracy"] == pytest.approx(max(accs)) and res["lr"] == lrs[int(np.argmax(accs))]
  assert res["accuracy"] > 80  # well separated classes


# -- few-shot ---------------------------------------------------------------------------------------------------
def test_fewshot_splits_hold_n_per_class_are_seeded_and_deterministic():
  labels = np.repeat(np.arange(6), [30, 25, 40, 12, 200, 33])
  for shots in (1, 2, 5):
    a = fewshot.split_indices(labels, num_classes=6, shots=shots, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[a], minlength=6), np.full(6, shots))
    assert len(np.unique(a)) == len(a)
    np.testing.assert_array_equal(a, fewshot.split_indices(labels, num_classes=6, shots=shots, seed=0))
    assert not np.array_equal(a, fewshot.split_indices(labels, num_classes=6, shots=shots, seed=1))
  pct = fewshot.split_indices(labels, num_classes=6, fraction=0.01, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[pct], minlength=6), [1, 1, 1, 1, 2, 1])  # round(1%), >= 1
  with pytest.raises(ValueError, match="class 3 has 12 training examples, fewer than 20 shots"):
    fewshot.split_indices(labels, num_classes=6, shots=20, seed=0)


def test_fewshot_on_linearly_separable_features_is_100_percent():
  rng = np.random.default_rng(3)
  centers = 5.0 * np.eye(8)[:4]  # 4 classes on orthogonal directions, small noise: linearly separable
  train_y, test_y = np.repeat(np.arange(4), 20), np.repeat(np.arange(4), 15)
  train_x = centers[train_y] + 0.3 * rng.standard_normal((80, 8))
  test_x = centers[test_y] + 0.3 * rng.standard_normal((60, 8))
  res = fewshot.fewshot_eval(
    train_x, train_y, test_x, test_y, num_classes=4, shots=(1, 5), fractions=(0.1,), num_splits=3, seed=0
  )
  assert res["headline"] == "5shot" and res["accuracy"] == 100.0
  for name, r in res["settings"].items():
    assert r["per_split"] == [100.0] * 3 and r["std"] == 0.0, name
  assert res["settings"]["1shot"]["num_train"] == [4, 4, 4] and res["settings"]["10pct"]["num_train"] == [8, 8, 8]


# -- attention --------------------------------------------------------------------------------------------------
def test_mass_mask_keeps_the_minimal_set_of_patches_reaching_60_percent():
  rng = np.random.default_rng(4)
  maps = rng.dirichlet(np.full(49, 0.3), size=(3, 5)) * rng.uniform(0.2, 1.0, (3, 5, 1))  # not normalised
  mask = attention.mass_mask(maps, keep=0.6)
  for m, k in zip(maps.reshape(-1, 49), mask.reshape(-1, 49)):
    p = m / m.sum()
    order = np.argsort(-p)
    size = int(np.searchsorted(np.cumsum(p[order]), 0.6) + 1)  # fewest largest entries with mass >= 0.6
    want = np.zeros(49, bool)
    want[order[:size]] = True
    np.testing.assert_array_equal(k, want)
    assert p[k].sum() >= 0.6 and p[k].sum() - p[k].min() < 0.6
  uniform = attention.entropy(np.ones((2, 16)))
  np.testing.assert_allclose(uniform, np.log(16))


# -- config and CLI errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "field,value,match",
  [
    ("evals.knn.type", "svm", f"config.evals.knn.type: must be one of {sorted(evals.TYPES)}"),
    ("evals.knn.every", -2, "config.evals.knn.every: must be -1 (config.eval_every)"),
    ("evals.linear.lrs", (0.0,), "config.evals.linear.lrs"),
    ("evals.linear.lrs", (0.1, -1.0), "config.evals.linear.lrs"),
    ("evals.linear.n_last_blocks", 3, "config.evals.linear.n_last_blocks: must be in [1, depth=2]"),
    ("evals.knn.ks", (10, 0), "config.evals.knn.ks"),
    ("evals.fewshot.shots", (1, -2), "config.evals.fewshot.shots"),
    ("evals.fewshot.fractions", (1.5,), "config.evals.fewshot.fractions"),
    ("evals.fewshot.features", "mean", "config.evals.fewshot.features: must be one of ['cls', 'prenorm_cls']"),
    ("evals.fewshot.subsets", "/no/such/list.txt", "config.evals.fewshot.subsets: '/no/such/list.txt' is neither"),
    ("evals.fewshot.max_iter", 0, "config.evals.fewshot.max_iter"),
    ("evals.attention.keep", 1.0, "config.evals.attention.keep"),
    ("eval.image_size", 18, "config.eval.image_size"),
  ],
)
def test_invalid_eval_config_is_refused_with_the_field_name(tiny_config, field, value, match):
  tiny_config.update_from_flattened_dict({field: value})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(tiny_config, num_devices=1)
  assert match in str(e.value)


def test_unknown_eval_name_lists_the_valid_ones():
  valid = ", ".join(config_lib.base_config().evals)  # every declared evaluator, in the config's (sorted) order
  assert {"attention", "fewshot", "knn", "linear"} <= set(config_lib.base_config().evals)
  with pytest.raises(ValueError, match=f"unknown evaluation.*'svm'.*valid: {valid}$"):
    evaluate.parse_names("knn,svm")
  assert evaluate.parse_names("linear, knn,linear") == ["linear", "knn"]


def test_evaluate_without_checkpoint_names_the_workdir(tiny_config, tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    evaluate.evaluate(tiny_config, str(tmp_path), ["knn"])
  assert not os.path.exists(tmp_path / "checkpoints")  # nothing created


# -- end to end on a tiny trained network -----------------------------------------------------------------------
# The end-to-end run's fields over conftest's tiny config (also written into a config file for the CLI).
E2E_FIELDS = {
  "total_steps": 2,
  "data.num_local": 0,  # one crop shape: a cheaper train step to compile
  "model.num_registers": 1,  # attention maps must leave it out
  "eval_every": 1,  # a periodic evaluation at step 1
  "evals.linear.every": -1,  # with the k-NN, every eval_every steps
  "evals.fewshot.every": -1,
  "evals.linear.epochs": 2,
  "evals.linear.lrs": (0.01, 0.1),
  "evals.fewshot.num_splits": 2,
  "evals.attention.num_images": 3,
}


def _e2e_config():
  from conftest import make_tiny_config

  c = make_tiny_config()
  c.update_from_flattened_dict(E2E_FIELDS)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("evals_run"))
  config = _e2e_config()
  trainer.train(config, workdir)
  return config, workdir


def test_periodic_linear_and_fewshot_are_logged_as_metrics(trained):
  _, workdir = trained
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  first = records[0]
  assert first["step"] == 1
  for key in (
    "knn_top1",
    "knn_top5",
    "linear_top1",
    "linear_top5",
    "fewshot_1shot",
    "fewshot_2shot",
    "fewshot_5shot",
    "fewshot_1pct",
  ):
    assert 0 <= first[key] <= 100, key
  assert first["linear_lr"] in (0.01, 0.1)
  assert "linear_top1" not in records[1]  # the last step's evaluation is the final one (eval/knn.json)
  knn_json = json.load(open(os.path.join(workdir, "eval", "knn.json")))
  assert set(knn_json["per_k"]) == {"10", "20", "100", "200"} and "accuracy_at_init" in knn_json
  assert knn_json["per_k"]["20"]["top1"] == knn_json["accuracy"]


def test_evaluate_writes_every_json_and_attention_pngs(trained):
  config, workdir = trained
  results = evaluate.evaluate(config, workdir, ["knn", "linear", "fewshot", "attention"])
  eval_dir = os.path.join(workdir, "eval")
  for name in ("knn", "linear", "fewshot", "attention"):
    assert json.load(open(os.path.join(eval_dir, f"{name}.json"))) == json.loads(json.dumps(results[name]))
    assert results[name]["step"] == 2
  k = results["knn"]
  assert k["num_test"] == 359 and k["num_train"] == 1438  # every example exactly once
  assert k["accuracy"] == k["per_k"]["20"]["top1"] and "accuracy_at_init" in k
  lin = results["linear"]
  assert lin["accuracy"] == max(v["top1"] for v in lin["per_lr"].values()) and lin["feature_dim"] == 32
  assert results["fewshot"]["accuracy"] == results["fewshot"]["settings"]["5shot"]["mean"]
  att = results["attention"]
  assert att["num_images"] == 3 and att["grid"] == [4, 4] and att["num_heads"] == 2
  assert 0 < att["mean_entropy"] <= att["max_entropy"] == pytest.approx(np.log(16))
  # The saved raw rows: the cls query's attention over [cls, 1 register, 4x4 patches] sums to 1 per head.
  arrays = np.load(os.path.join(eval_dir, att["arrays"]))
  assert arrays["cls_row"].shape == (3, 2, 18) and arrays["images"].shape == (3, 16, 16, 3)
  np.testing.assert_allclose(arrays["cls_row"].sum(-1), 1.0, atol=1e-5)
  patch_maps = attention.cls_attention(arrays["cls_row"][:, :, None], num_registers=1)
  np.testing.assert_array_equal(patch_maps, arrays["cls_row"][:, :, 2:])  # registers and the cls key left out
  want_entropy = attention.entropy(patch_maps).mean()
  assert att["mean_entropy"] == pytest.approx(want_entropy, rel=1e-6)
  tile = attention.upscale_factor(16) * 16
  for rel in att["files"]:
    with Image.open(os.path.join(eval_dir, rel)) as im:
      im.load()
      assert im.size == ((2 + 2) * tile, 2 * tile) and im.mode == "RGB"  # (width, height): 2 + heads columns


def test_cli_evaluates_the_student_and_refuses_unknown_names(trained, tmp_path, monkeypatch):
  _, workdir = trained
  config_file = tmp_path / "tiny.py"  # the run's own config, as a config file for the CLI
  config_file.write_text(
    f"import sys\nsys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
    "from conftest import make_tiny_config\n\n\ndef get_config():\n"
    f"  c = make_tiny_config()\n  c.update_from_flattened_dict({E2E_FIELDS!r})\n  return c\n"
  )
  # In-process: the entry point's flags, parser and main as app.run calls them (test_cli_errors.parse / run).
  base = [f"--config={config_file}", f"--workdir={workdir}"]
  status, message = run_cli("simdino_jax.evaluate", base + ["--eval=knn,svm"], monkeypatch)
  assert status != 0 and f"valid: {', '.join(config_lib.base_config().evals)}" in message
  flag_values, rest = parse(
    "simdino_jax.evaluate",
    base + ["--eval=attention", "--which=student", "--config.evals.attention.num_images=2"],
    monkeypatch,
  )
  evaluate.main(rest, flag_values)  # returns: exit status 0
  student = json.load(open(os.path.join(workdir, "eval", "attention_student.json")))
  assert student["features"] == "student backbone" and student["num_images"] == 2
  assert sorted(os.listdir(os.path.join(workdir, "eval", "attention_student"))) == [
    "attention.npz",
    "attention_0.png",
    "attention_1.png",
  ]
