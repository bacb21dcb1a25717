"""Few-shot evaluation as MSN's logistic_eval.py: pre-norm cls features, MSN's / SimCLR's split lists, the cyanure
objective solved to convergence (simdino_jax/evals/fewshot.py).

The objective is checked against a NumPy transcription of what MSN runs, and against cyanure itself (not a dependency:
test_solution_equals_cyanure_on_the_same_features runs tests/cyanure_driver.py with SIMDINO_CYANURE_PYTHON, a Python
where ``pip install cyanure`` worked):

  MSN logistic_eval.py:  cyan.preprocess(embs, normalize=normalize, columns=False, centering=True)
                         classifier = cyan.MultiClassifier(loss='multiclass-logistic', penalty='l2', fit_intercept=False)
                         lambd /= len(embs); classifier.fit(embs, labs, lambd=lambd, ...)
  cyanure (before 1.0):  MultiClassifier minimises (1/n) sum_i L(y_i, W^T x_i) + psi(W), psi(W) = sum_j (lambd/2)||w_j||^2
                         ('l2' => psi(w) = (lambd/2) ||w||_2^2); MultiClassLogisticLoss::eval: col.add(-col[y]);
                         sum += col.logsumexp(); return sum / n.  preprocess_(X.T, centering, normalize, not columns):
                         Matrix::center() subtracts each column's mean, Matrix::normalize() scales it to unit l2 norm.

minimised here by scipy's L-BFGS to a tight gradient tolerance, independently of the evaluator's solver.
"""

import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from scipy import optimize, special

from simdino_jax import evals, sharding
from simdino_jax.data import sources
from simdino_jax.errors import ConfigError
from simdino_jax.evals import fewshot, runner
from simdino_jax.models.network import build_backbone


# -- the cyanure objective, transcribed ---------------------------------------------------------------------------
def cyanure_preprocess(x):
  """cyan.preprocess(X, centering=True, normalize=True, columns=False): each row minus its mean, then unit norm."""
  x = np.array(x, np.float64)
  x -= x.mean(axis=1, keepdims=True)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.where(norms > 1e-10, norms, 1.0)


def cyanure_fit(x, y, msn_lambd):
  """argmin_W (1/n) sum_i [logsumexp(W^T x_i) - w_{y_i}^T x_i] + (lam / 2) ||W||^2, lam = msn_lambd / n, no
  intercept; x preprocessed, y in 0..k-1. Returns (W (d, k), objective value)."""
  n, d = x.shape
  k = int(y.max()) + 1
  lam = msn_lambd / n
  onehot = np.eye(k)[y]

  def f(flat):
    w = flat.reshape(d, k)
    z = x @ w
    lse = special.logsumexp(z, axis=1)
    value = np.mean(lse - z[np.arange(n), y]) + 0.5 * lam * np.sum(w**2)
    grad = x.T @ (np.exp(z - lse[:, None]) - onehot) / n + lam * w
    return value, grad.ravel()

  res = optimize.minimize(
    f, np.zeros(d * k), jac=True, method="L-BFGS-B", options=dict(gtol=1e-13, ftol=0, maxiter=50000)
  )
  return res.x.reshape(d, k), float(res.fun)


def noisy_problem(seed, n_per_class=15, k=4, d=8, n_test=40):
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal((k, d))
  y = np.repeat(np.arange(k), n_per_class)
  x = centers[y] + 0.9 * rng.standard_normal((len(y), d)) + 2.0  # overlapping classes; offset: centring matters
  ty = rng.integers(0, k, n_test)
  tx = centers[ty] + 0.9 * rng.standard_normal((n_test, d)) + 2.0
  return x, y, tx, ty


@pytest.mark.parametrize("lambd", [0.0025, 0.075])  # MSN's README value and the DINO-vMF paper's
def test_solution_is_the_minimiser_of_msn_cyanure_objective(lambd):
  x, y, tx, ty = noisy_problem(0)
  w_ref, f_ref = cyanure_fit(cyanure_preprocess(x), y, lambd)
  fit = fewshot.logistic_fit_accuracy(x, y, tx, ty, lambd=lambd, tol=1e-10)
  assert fit["converged"] and fit["duality_gap"] <= 1e-10
  w = fit["model"].coef_.T
  np.testing.assert_allclose(w, w_ref, rtol=0, atol=2e-5 * np.abs(w_ref).max())
  np.testing.assert_allclose(fit["objective"], f_ref, rtol=1e-9)
  ref_accuracy = 100.0 * np.mean(np.argmax(cyanure_preprocess(tx) @ w_ref, axis=1) == ty)
  assert fit["accuracy"] == ref_accuracy


def test_solution_equals_cyanure_on_the_same_features(tmp_path):
  """cyanure itself (MSN's solver; pip install cyanure in another environment) on the same features: the same
  preprocessing, minimiser, objective and predictions when run to a tight tolerance; with MSN's settings (tol 1e-3,
  300 epochs) it stops within its duality-gap guarantee of the minimiser."""
  python = os.environ.get("SIMDINO_CYANURE_PYTHON")
  if not python:
    pytest.skip("needs SIMDINO_CYANURE_PYTHON, a Python with cyanure (pip install cyanure)")
  x, y, tx, ty = noisy_problem(4, n_per_class=5, k=20, d=32, n_test=400)
  fit = fewshot.logistic_fit_accuracy(x, y, tx, ty, lambd=0.0025, tol=1e-10)
  for tol, max_iter in ((1e-10, 100000), (1e-3, 300)):
    np.savez(tmp_path / "in.npz", x=x, y=y, tx=tx, lambd=0.0025, tol=tol, max_iter=max_iter)
    driver = os.path.join(os.path.dirname(__file__), "cyanure_driver.py")
    subprocess.run([python, driver, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")], check=True, timeout=300)
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(out["xp"], fewshot.preprocess(x), rtol=0, atol=1e-12)
    gap = fewshot.duality_gap(out["xp"], y, out["w"], 0.0025)
    if tol < 1e-3:
      w = fit["model"].coef_.T
      np.testing.assert_allclose(out["w"], w, rtol=0, atol=1e-4 * np.abs(w).max())
      np.testing.assert_allclose(fewshot.objective(out["xp"], y, out["w"], 0.0025), fit["objective"], rtol=1e-9)
      np.testing.assert_array_equal(out["pred"], fit["model"].predict(fewshot.preprocess(tx)))
    else:
      assert gap <= 1e-3  # cyanure's stopping rule, measured by our gap
      assert (fewshot.objective(out["xp"], y, out["w"], 0.0025) - fit["objective"]) / fit["objective"] <= 1e-3


def test_duality_gap_bounds_the_relative_suboptimality():
  x, y, _, _ = noisy_problem(1)
  xp = cyanure_preprocess(x)
  w_ref, f_ref = cyanure_fit(xp, y, 0.0025)
  assert fewshot.duality_gap(xp, y, w_ref, 0.0025) < 1e-9
  for scale in (0.5, 0.9, 1.1):
    f = fewshot.objective(xp, y, scale * w_ref, 0.0025)
    gap = fewshot.duality_gap(xp, y, scale * w_ref, 0.0025)
    assert gap >= (f - f_ref) / f > 0


def test_two_classes_solve_cyanure_binary_classifier_objective():
  """Two classes: scikit-learn fits one vector (cyanure's BinaryClassifier: mean log(1 + exp(-y w^T x)) + lam/2 ||w||^2,
  labels -1/+1; its MultiClassifier refuses two classes)."""
  x, y, tx, ty = noisy_problem(2, k=2)
  xp, s = cyanure_preprocess(x), 2.0 * y - 1.0
  lam = 0.0025 / len(x)

  def f(w):
    m = s * (xp @ w)
    return np.mean(np.logaddexp(0, -m)) + 0.5 * lam * w @ w, -(xp.T @ (s * special.expit(-m))) / len(x) + lam * w

  ref = optimize.minimize(f, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B", options=dict(gtol=1e-13, ftol=0))
  fit = fewshot.fit_logistic(x, y, lambd=0.0025, tol=1e-10)
  assert fit["converged"]
  np.testing.assert_allclose(fit["model"].coef_[0], ref.x, atol=2e-5 * np.abs(ref.x).max())
  np.testing.assert_allclose(fit["objective"], ref.fun, rtol=1e-9)


def test_solver_reports_when_it_did_not_converge():
  x, y, tx, ty = noisy_problem(3)
  fit = fewshot.fit_logistic(x, y, lambd=0.0025, max_iter=1, tol=1e-12)
  assert not fit["converged"] and fit["n_iter"] == 1 and fit["duality_gap"] > 1e-12
  assert any("converge" in w for w in fit["warnings"])  # scikit-learn's ConvergenceWarning, recorded
  res = fewshot.fewshot_eval(x, y, tx, ty, num_classes=4, shots=(2,), fractions=(), num_splits=2, max_iter=1, tol=1e-12)
  assert res["converged"] is False and res["settings"]["2shot"]["converged"] == [False, False]
  assert res["settings"]["2shot"]["n_iter"] == [1, 1]
  ok = fewshot.fewshot_eval(x, y, tx, ty, num_classes=4, shots=(2,), fractions=(), num_splits=2)
  assert ok["converged"] is True and max(ok["settings"]["2shot"]["duality_gap"]) <= 1e-6


# -- features -----------------------------------------------------------------------------------------------------
def test_prenorm_cls_feature_is_the_last_block_cls_token_before_the_final_norm(tiny_config):
  model = nnx.jit(lambda: build_backbone(tiny_config.model, rngs=nnx.Rngs(0)))()  # one compile, not op by op
  graphdef, state = nnx.split(model)
  images = jax.random.normal(jax.random.key(1), (3, 16, 16, 3), jnp.float32)
  got = jax.jit(runner.make_feature_fn(graphdef, (("prenorm_cls",), ("cls",))))(state, images)

  @nnx.jit
  def by_hand(model, images):  # tokens through every block (MSN's forward_blocks loop), cls row, no final norm
    x = model.prepare_tokens(images)
    b, t, d = x.shape
    x = x.reshape(b * t, d)
    for block in model.blocks:
      x, _, _ = block(x, b)
    prenorm = x.reshape(b, t, d)[:, 0]
    return prenorm, model.norm(prenorm), model(images)["cls"]

  prenorm, normed, output = by_hand(model, images)
  np.testing.assert_allclose(got["prenorm_cls"], prenorm, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["cls"], output, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["cls"], normed, rtol=1e-5, atol=1e-5)
  assert not np.allclose(got["cls"], got["prenorm_cls"], atol=1e-2)


# -- split lists --------------------------------------------------------------------------------------------------
CLASSES = ("n001", "n002", "n003")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """train/<class>/<class>_<i>.png (6 per class), val/<class>/... (3 per class): tiny images, one colour per class."""
  root = tmp_path_factory.mktemp("fewshot_folder")
  rng = np.random.default_rng(0)
  for split, n in (("train", 6), ("val", 3)):
    for c, name in enumerate(CLASSES):
      os.makedirs(root / split / name)
      for i in range(n):
        image = np.clip(rng.normal(60 + 70 * c, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / split / name / f"{name}_{i}.png")
  return root


def write_list(path, names):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(f"{n}\n" for n in names))  # MSN's format: one file name per line


def test_split_lists_map_to_the_listed_training_examples(folder, tmp_path):
  source = sources.load_source(f"folder:{folder}", "train")
  index = fewshot.file_name_index(source, "evals.fewshot.subsets")
  listed = ["n003_4.png", "n001_2.png", "n002_0.png", "n001_5.png", "n002_3.png", "n003_1.png"]
  write_list(tmp_path / "3imgs_class.txt", listed)  # misnamed as MSN's imagenet_subsets3/3imgs_class.txt
  names = fewshot.read_list(str(tmp_path / "3imgs_class.txt"))
  idx = fewshot.list_indices(names, index, path="3imgs_class.txt", field="evals.fewshot.subsets")
  assert [os.path.basename(source.file_name(i)) for i in idx] == listed
  np.testing.assert_array_equal(source.labels[idx], [2, 0, 1, 0, 1, 2])
  assert fewshot.list_setting("3imgs_class.txt", source.labels[idx]) == "2shot"  # named by what it holds
  assert fewshot.list_setting("1percent.txt", source.labels[idx]) == "1pct"
  assert fewshot.list_setting("mine.txt", source.labels[idx[:3]][[0, 0, 1]]) == "mine"  # 2, 1: not n per class
  with pytest.raises(ConfigError, match=r"config\.evals\.fewshot\.subsets: 1 file\(s\) of L\.txt is not in the train"):
    fewshot.list_indices(["n001_0.png", "n009_1.png"], index, path="L.txt", field="evals.fewshot.subsets")
  digits = sources.load_source("digits", "train")
  with pytest.raises(ConfigError, match=r"config\.evals\.fewshot\.subsets: the training source .* has no file names"):
    fewshot.file_name_index(digits, "evals.fewshot.subsets")
  with pytest.raises(ConfigError, match=r"config\.evals\.fewshot\.subsets: .*nowhere.* is neither"):
    fewshot.subset_paths(f"{tmp_path},{tmp_path}/nowhere", "evals.fewshot.subsets")


def test_evaluator_scores_each_list_as_one_split_of_its_setting(folder, tmp_path, tiny_config):
  lists = {
    "s1/1imgs_class.txt": ["n001_0.png", "n002_1.png", "n003_2.png"],
    "s1/2imgs_class.txt": ["n001_0.png", "n001_3.png", "n002_1.png", "n002_4.png", "n003_2.png", "n003_5.png"],
    "s2/1imgs_class.txt": ["n001_5.png", "n002_5.png", "n003_5.png"],
  }
  for rel, names in lists.items():
    write_list(tmp_path / rel, names)
  config = tiny_config
  config.data.source = f"folder:{folder}"
  config.evals = {"fewshot": evals.declare("fewshot", subsets=f"{tmp_path}/s1,{tmp_path}/s2")}
  graphdef, state = nnx.split(nnx.jit(lambda: build_backbone(config.model, rngs=nnx.Rngs(0)))())
  mesh = sharding.make_mesh(config.mesh)
  ctx = runner.Context(
    config,
    graphdef=graphdef,
    param_sharding=jax.tree.map(lambda _: sharding.replicated(mesh), state),
    mesh=mesh,
    train_source=sources.load_source(config.data.source, "train"),
    test_source=sources.load_source(config.data.source, "test"),
    out_dir=str(tmp_path / "eval"),
  )
  result = runner.run_round(ctx, evals.build(config), state)["fewshot"]
  settings = result["settings"]
  assert set(settings) == {"1shot", "2shot"} and result["headline"] == "1shot"
  assert settings["1shot"]["files"] == [f"{tmp_path}/s1/1imgs_class.txt", f"{tmp_path}/s2/1imgs_class.txt"]
  assert settings["1shot"]["num_train"] == [3, 3] and settings["2shot"]["num_train"] == [6]
  assert result["converged"] and result["features"].startswith("prenorm_cls")
  # The same splits scored by hand on the shared features of the whole training split, picked by file name.
  (train_f, train_y), (test_f, test_y) = [ctx.shared_features(state, (("prenorm_cls",),))[s] for s in ("train", "test")]
  names = [os.path.basename(ctx.train_source.file_name(i)) for i in range(len(ctx.train_source))]
  for rel, setting, split in (
    ("s1/1imgs_class.txt", "1shot", 0),
    ("s2/1imgs_class.txt", "1shot", 1),
    ("s1/2imgs_class.txt", "2shot", 0),
  ):
    rows = [names.index(n) for n in lists[rel]]
    want = fewshot.logistic_fit_accuracy(train_f["prenorm_cls"][rows], train_y[rows], test_f["prenorm_cls"], test_y)
    assert settings[setting]["per_split"][split] == want["accuracy"], rel


def test_tfds_imagenet_file_names_serve_the_split_lists():
  tfds = pytest.importorskip("tensorflow_datasets")
  from unittest import mock

  from test_tfds_source import _pil_encode_example  # encodes mock images without TensorFlow

  with (
    tfds.testing.mock_data(num_examples=6),
    mock.patch.object(tfds.features.Image, "encode_example", _pil_encode_example),
  ):
    imagenet = sources.load_source("tfds:imagenet2012", "train")  # has a file_name feature, as the real one
    names = [imagenet.file_name(i) for i in range(len(imagenet))]
    index = fewshot.file_name_index(imagenet, "evals.fewshot.subsets")
    idx = fewshot.list_indices([names[4], names[1]], index, path="L.txt", field="evals.fewshot.subsets")
    np.testing.assert_array_equal(idx, [4, 1])
    mnist = sources.load_source("tfds:mnist", "train")
    with pytest.raises(ConfigError, match=r"config\.evals\.fewshot\.subsets: tfds:mnist/train: .* no 'file_name'"):
      fewshot.file_name_index(mnist, "evals.fewshot.subsets")


def test_msn_split_lists_are_read_as_their_settings():
  """MSN's imagenet_subsets{1,2,3} (and SimCLR's 1percent.txt in subsets1) against a training split holding their
  files: every list maps, each is named by what it holds (subsets3's 3imgs_class.txt holds 5 per class)."""
  clones = os.environ.get("SIMDINO_OFFICIAL_DIR")
  msn = os.path.join(clones or "", "msn")
  if not clones or not os.path.isdir(os.path.join(msn, "imagenet_subsets1")):
    pytest.skip("needs SIMDINO_OFFICIAL_DIR holding the msn/ clone (its imagenet_subsets*/ lists)")
  spec = ",".join(os.path.join(msn, f"imagenet_subsets{k}") for k in (1, 2, 3))
  splits = fewshot.subset_paths(spec, "evals.fewshot.subsets")
  lists = [[fewshot.read_list(p) for p in files] for files in splits]
  names = sorted({n for files in lists for names in files for n in names})

  wnids = sorted({n.split("_")[0] for n in names})

  class Train:  # a training split holding exactly the listed files, labelled as MSN does (wnid prefix, sorted)
    name = "imagenet train"
    labels = np.array([wnids.index(n.split("_")[0]) for n in names])

    def __len__(self):
      return len(names)

    def file_name(self, i):
      return f"{names[i].split('_')[0]}/{names[i]}"

  index = fewshot.file_name_index(Train(), "evals.fewshot.subsets")
  got = []
  for files, lists_k in zip(splits, lists):
    settings = {}
    for path, listed in zip(files, lists_k):
      idx = fewshot.list_indices(listed, index, path=path, field="evals.fewshot.subsets")
      settings[fewshot.list_setting(path, Train.labels[idx])] = len(idx)
    got.append(settings)
  assert got[0] == {"1shot": 1000, "2shot": 2000, "5shot": 5000, "1pct": 12811}
  assert got[1] == got[2] == {"1shot": 1000, "2shot": 2000, "5shot": 5000}
