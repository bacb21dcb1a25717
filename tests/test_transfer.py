"""The transfer evaluator (evals/transfer.py) against its independent references: scikit-learn's LogisticRegression
(what Ericsson et al.'s linusericsson/ssl-transfer ``linear.py`` fits: ``LogReg(solver='lbfgs',
multi_class='multinomial')`` at ``C = 1. / wd.item()`` for ``wd`` in ``torch.logspace(-6, 5, 45)``) with
scikit-learn's own ``GridSearchCV`` / ``StratifiedKFold``, and ``linear.py``'s mean per-class accuracy lines run on
the same predictions; then the evaluator end to end on a tiny ViT (a dataset absent on disk skipped in one line)."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from simdino_jax import evals, sharding
from simdino_jax.data import sources
from simdino_jax.errors import ConfigError
from simdino_jax.evals import fewshot, runner, transfer
from simdino_jax.models.network import build_backbone

sklearn_linear = pytest.importorskip("sklearn.linear_model")
sklearn_selection = pytest.importorskip("sklearn.model_selection")
sklearn_metrics = pytest.importorskip("sklearn.metrics")


def gaussian_problem(seed=0, k=4, d=30, n=160, n_test=400, spread=0.6):
  """Classes as Gaussian clouds around random means: few training rows per dimension, so the strength matters (the
  cross-validated score has a clear optimum inside the grid)."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(k, d)) * spread

  def draw(m):
    y = rng.integers(0, k, m)
    return (means[y] + rng.normal(size=(m, d))).astype(np.float32), y

  return (*draw(n), *draw(n_test))


def test_grid_is_ericssons_logspace():
  wds = transfer.weight_decays()
  # linear.py: torch.logspace(-6, 5, 45) (float32), C = 1. / wd.item()
  np.testing.assert_allclose(wds, 10.0 ** np.linspace(-6, 5, 45), rtol=1e-6)
  assert wds.dtype == np.float32 and len(wds) == 45


def test_cross_validation_picks_sklearns_strength_and_matches_its_accuracy():
  x, y, tx, ty = gaussian_problem()
  wds = transfer.weight_decays()[::2]  # every other value of Ericsson's grid (23: 10^-6 ... 10^5), for time
  ours = transfer.select_and_fit(x, y, tx, ty, num_classes=4, folds=5, seed=0, wds=wds)
  grid = {"C": [float(1.0 / w) for w in wds]}  # wd ascending, linear.py's order (ties: the first)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # scikit-learn's multi_class deprecation and ConvergenceWarnings
    search = sklearn_selection.GridSearchCV(
      sklearn_linear.LogisticRegression(max_iter=1000),
      grid,
      cv=sklearn_selection.StratifiedKFold(5, shuffle=True, random_state=0),
      scoring="accuracy",
    ).fit(x.astype(np.float64), y)
  assert ours["C"] == pytest.approx(search.best_params_["C"], rel=1e-6)
  assert abs(ours["accuracy"] - 100.0 * search.score(tx, ty)) <= 0.5
  # The curve, held-out fold by fold: within two of the 32 held-out images where either solver is converged.
  cv = 100.0 * search.cv_results_["mean_test_score"]
  assert np.max(np.abs(np.asarray(ours["cv_scores"]) - cv)) <= 2 * 100 / 32 + 1e-6
  assert 5 <= sum(ours["converged"]) <= 23 and ours["selection"] == "kfold" and ours["folds"] == 5


def test_solution_is_sklearns_minimiser_at_one_strength():
  """The objective's scaling: scikit-learn at C = 1 / wd (its lbfgs minimises C sum loss + ||W||^2 / 2, intercept
  free) and our L-BFGS reach the same weights and objective."""
  x, y, _, _ = gaussian_problem(seed=1, n=120)
  wd = 3.0
  ref = sklearn_linear.LogisticRegression(C=1.0 / wd, tol=1e-10, max_iter=10000).fit(x.astype(np.float64), y)
  onehot = jnp.asarray(np.eye(4, dtype=np.float32)[y])
  weights = jnp.ones(len(y), jnp.float32)
  init = (jnp.zeros((x.shape[1], 4)), jnp.log(jnp.full((4,), 0.25)))
  (w, b), _, gmax = transfer._solve(jnp.asarray(x), onehot, weights, wd, init, max_iter=1000, tol=1e-4)
  f = lambda w_, b_: float(transfer._objective((w_, b_), x, onehot, weights, wd, 0.0))  # noqa: E731
  assert float(gmax) <= 1e-4
  assert f(w, b) == pytest.approx(f(jnp.asarray(ref.coef_.T, jnp.float32), jnp.asarray(ref.intercept_)), rel=1e-5)
  np.testing.assert_allclose(np.asarray(w), ref.coef_.T, atol=2e-3 * np.abs(ref.coef_).max())


def test_mean_per_class_is_ericssons_confusion_matrix_lines():
  rng = np.random.default_rng(3)
  y_true = rng.choice(5, size=300, p=[0.5, 0.2, 0.15, 0.1, 0.05])  # imbalanced: top-1 and per-class differ
  y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 5, 300))
  # linear.py, metric 'mean per-class accuracy':
  cm = sklearn_metrics.confusion_matrix(y_true, y_pred)
  cm = cm.diagonal() / cm.sum(axis=1)
  official = 100.0 * cm.mean()
  assert transfer.mean_per_class_accuracy(y_true, y_pred) == pytest.approx(official, abs=1e-9)
  # The in-graph score the sweep reports, on logits whose argmax is y_pred.
  onehot = np.eye(5, dtype=np.float32)
  top1, mpc = transfer._scores((jnp.eye(5), jnp.zeros(5)), onehot[y_pred], onehot[y_true], jnp.ones(300))
  assert float(mpc) == pytest.approx(official, abs=1e-4)
  assert float(top1) == pytest.approx(100.0 * np.mean(y_true == y_pred), abs=1e-4)


def test_holdout_is_linear_pys_validation_split():
  # linear.py get_train_valid_loader (no predefined val split): valid_size 0.2, random_seed 0.
  num_train = 37
  indices = list(range(num_train))
  split = int(np.floor(0.2 * num_train))
  np.random.seed(0)
  np.random.shuffle(indices)
  valid_idx = indices[:split]
  w = transfer.holdout_weights(num_train)
  assert sorted(np.flatnonzero(w[0] == 0).tolist()) == sorted(valid_idx)
  np.testing.assert_array_equal(transfer.holdout_weights(10, num_val=3)[0], [1] * 7 + [0] * 3)  # predefined val last


def test_fewshot_l2_preprocessing_is_dinos_normalize():
  """DINO's Table 12 features: eval_knn.py's ``nn.functional.normalize(x, dim=1, p=2)`` (x / max(||x||, 1e-12)),
  no centring; MSN's (the default) centres each row first."""
  x = np.random.default_rng(0).normal(size=(6, 5)) + 3.0
  np.testing.assert_allclose(fewshot.preprocess(x, "l2"), x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-12)
  c = x - x.mean(1, keepdims=True)
  np.testing.assert_allclose(fewshot.preprocess(x), c / np.linalg.norm(c, axis=1, keepdims=True), rtol=1e-12)
  y = np.arange(6) % 3
  fit = fewshot.fit_logistic(x, y, lambd=0.1, preprocessing="l2")
  xp = fewshot.preprocess(x, "l2")
  assert fit["objective"] == pytest.approx(fewshot.objective(xp, y, fit["model"].coef_.T, 0.1), rel=1e-12)


def test_unknown_dataset_and_bad_metric_are_config_errors():
  cfg = evals.declare("transfer", datasets="cifar10,mystery")
  with pytest.raises(ConfigError, match=r"config\.evals\.transfer\.datasets: 'mystery' is none of"):
    transfer.dataset_table(cfg, "evals.transfer")
  cfg = evals.declare("transfer", datasets="mystery", sources="mystery=digits", metrics="mystery=top5")
  with pytest.raises(ConfigError, match=r"config\.evals\.transfer\.metrics: mystery: must be one of"):
    transfer.dataset_table(cfg, "evals.transfer")


def test_evaluator_writes_each_dataset_and_skips_an_absent_one(tmp_path, tiny_config):
  config = tiny_config
  few = tmp_path / "few.npz"  # two images per class: 5-fold cross-validation cannot split it
  images = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
  np.savez(few, train_images=images, train_labels=[0, 0, 1, 1], test_images=images, test_labels=[0, 0, 1, 1])
  config.evals = {
    "transfer": evals.declare(
      "transfer",
      datasets="aircraft,few,digits",
      sources=f"digits=digits,few=npz:{few}",
      metrics="digits=mean_per_class",
      num_wds=3,
      wd_range=(0.0, 2.0),  # strong strengths only: few L-BFGS iterations (the test's time)
    )
  }
  graphdef, state = nnx.split(nnx.jit(lambda: build_backbone(config.model, rngs=nnx.Rngs(0)))())
  mesh = sharding.make_mesh(config.mesh)
  logged = []
  ctx = runner.Context(
    config,
    graphdef=graphdef,
    param_sharding=jax.tree.map(lambda _: sharding.replicated(mesh), state),
    mesh=mesh,
    train_source=sources.load_source("digits", "train"),
    test_source=sources.load_source("digits", "test"),
    out_dir=str(tmp_path / "eval"),
    log=logged.append,
  )
  extracted = []  # what the evaluator extracted: train, then test
  extract = ctx.extract
  ctx.extract = lambda *a, **k: extracted.append(extract(*a, **k)) or extracted[-1]
  result = runner.run_round(ctx, evals.build(config), state)["transfer"]
  assert list(result["per_dataset"]) == ["digits"] and list(result["absent"]) == ["aircraft"]
  assert any(line.startswith("transfer: aircraft: absent, skipped (FGVC-Aircraft") for line in logged)
  assert list(result["failed"]) == ["few"] and "5-fold cross-validation" in result["failed"]["few"]
  assert any(line.startswith("transfer: few: FAILED: DataError") for line in logged)
  saved = json.loads((tmp_path / "eval" / "transfer_digits.json").read_text())
  assert saved["metric"] == "mean_per_class" and len(saved["cv_scores"]) == 3 and saved["num_classes"] == 10
  assert saved["accuracy"] == result["per_dataset"]["digits"] == result["accuracy"]
  assert "| digits |" in result["table"] and "| aircraft | - | absent" in result["table"]
  # The same figure from the extracted features, selected and fitted directly.
  (f, y), (tf, ty) = extracted[-2:]
  assert len(y) == len(ctx.train_source) and len(ty) == len(ctx.test_source) and f["cls"].shape[1] == 32
  direct = transfer.select_and_fit(
    f["cls"], y, tf["cls"], ty, num_classes=10, metric="mean_per_class", wds=transfer.weight_decays(0, 2, 3)
  )
  assert direct["accuracy"] == saved["accuracy"] and direct["C"] == saved["C"]


def test_tfds_splits_are_read_by_their_own_names(tmp_path):
  """A transfer dataset's "test" is TFDS's test split: never the validation split our usual "test" mapping reads
  (DTD, Flowers and SUN397 have both)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from unittest import mock

  from test_tfds_source import SimdinoTestImages, _pil_encode_example  # train + validation, no test

  with mock.patch.object(tfds.features.Image, "encode_example", _pil_encode_example):
    SimdinoTestImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    )
  spec = "tfds:simdino_test_images"
  assert sources.load_source(spec, "test", tfds_data_dir=str(tmp_path)).split == "validation"  # the usual mapping
  assert transfer.load_split(spec, "validation", str(tmp_path)).split == "validation"
  with pytest.raises(
    sources.MissingDataError, match=r"no split 'test'; the dataset has splits \['train', 'validation'\]"
  ):
    transfer.load_split(spec, "test", str(tmp_path))
  ds = transfer.Dataset(spec, ("train",), "test", "top1")
  with pytest.raises(sources.MissingDataError):
    transfer.load_dataset(ds, str(tmp_path))
