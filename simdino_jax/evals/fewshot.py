"""Few-shot (low-shot) evaluation on frozen cls features, the protocol of MSN's ``logistic_eval.py`` (also DINO-vMF's).

MSN (facebookresearch/msn, ``logistic_eval.py``):

* features: ``encoder.forward_blocks(imgs, blocks=1)``, the cls token of the last block BEFORE the final norm
  (``src/deit.py``: ``x = self.blocks[i](x); cls_x.append(x[:, 0])``, ``self.norm`` is never applied), of the
  ``Resize(256) + CenterCrop(224)`` view. ``evals.fewshot.features = "prenorm_cls"`` (default) is that feature;
  ``"cls"`` is the backbone's output after the final norm (k-NN's feature), a named option.
* preprocessing: ``cyan.preprocess(embs, normalize=True, columns=False, centering=True)`` -- cyanure (before 1.0,
  ``Matrix<T>::center`` / ``normalize`` on the transposed matrix) subtracts from each feature vector its own mean
  over the dimensions, then L2-normalises it (``preprocess`` below).
* classifier: ``cyan.MultiClassifier(loss='multiclass-logistic', penalty='l2', fit_intercept=False)`` fitted with
  ``lambd /= len(embs)``, i.e. cyanure's documented objective
  ``min_W (1/n) sum_i L(y_i, W^T x_i) + (lambd / n) / 2 ||W||_F^2`` with the softmax loss
  ``L(y, z) = logsumexp(z) - z_y`` (cyanure's ``MultiClassLogisticLoss::eval``), no intercept (``objective``
  below). scikit-learn's ``LogisticRegression(C=1/lambd, fit_intercept=False)`` minimises exactly this function
  (its lbfgs path minimises ``mean loss + 1/(2 C n) ||W||^2``); tests/test_fewshot.py checks the solution against
  a scipy minimisation of the transcribed objective and against cyanure itself (weights to 1.5e-6 of the largest). ``lambd`` = 0.0025 is MSN's README command (its argparse
  default is 0.00025); the DINO-vMF recipes set the paper's 0.075.
* solver: cyanure stops at a relative duality gap of 1e-3 (``tol=1e-3``) or after 300 epochs. Here L-BFGS runs
  until the relative Fenchel duality gap of the objective (``duality_gap``, the quantity cyanure's tol bounds) is at
  most ``tol`` (1e-6), within ``max_iter`` (10000) iterations: each split reports ``converged``, ``n_iter`` and the
  gap; a ConvergenceWarning is recorded in the result (``warnings``), never hidden.
* splits: MSN's fixed lists (``imagenet_subsets{1,2,3}/{1,2,5}imgs_class.txt``) and SimCLR's 1% list
  (``imagenet_subsets1/1percent.txt``): one file name per line (``n04235860_14959.JPEG``; MSN reads
  ``root/<prefix before "_">/<line>``). ``evals.fewshot.subsets`` takes such files, or folders of them,
  comma-separated: each folder (or file) is one split; a list is matched to the training split by file name and
  named by what it holds (``<n>shot`` when every listed class has n images, ``<p>pct`` for ``<p>percent.txt``).
  MSN's ``imagenet_subsets3/3imgs_class.txt`` holds 5 images per class and is reported as ``5shot``.
  Without lists: ``num_splits`` seeded random splits per setting (``shots`` per class, or ``fractions`` of each
  class: max(1, round(f x class size)), class-balanced as ImageNet's 1% list is about 13 per class).

DINO's Table 12 (1% and 10% of ImageNet labels, ViT-S/16 64.5 / 72.2) is this classifier with other settings: its
authors' answer in facebookresearch/dino issue #121 (mathildecaron31: "I extracted features exactly in the same way
as in the eval_knn.py code and then I run a logistic with cyanure on the l2 normalized features",
``MultiClassifier(loss="multiclass-logistic", penalty="l2", fit_intercept=False)``, ``lambd`` among 0.01, 0.1, 1,
tol 1e-3, 100 epochs; jmairal reproduces the 64.5% with ``lambd = 0.1 / n``, i.e. MSN's ``lambd`` = 0.1) on
SimCLR's 1% / 10% lists (iBOT's README, whose ``eval_logistic_regression.py`` copies the call): ``features="cls"``,
``preprocess="l2"`` (eval_knn's ``nn.functional.normalize(x, dim=1, p=2)``, no centring), ``lambd=0.1``,
``subsets=.../1percent.txt,.../10percent.txt`` (docs/evaluation.md).

Results: per setting the mean and std over its splits and each split's accuracy, size, convergence and file. The
remaining differences from MSN's script (eval view, float64 preprocessing, ...) are tabled in docs/evaluation.md.
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np

from simdino_jax.data import sources
from simdino_jax.errors import ConfigError, require
from simdino_jax.evals import runner

# evals.fewshot.features: name -> what it is (stated in the result JSON).
FEATURES = {
  "prenorm_cls": "the last block's cls token before the final norm (MSN's forward_blocks)",
  "cls": "the cls token after the final norm (the backbone's output, as k-NN)",
}


# -- splits -------------------------------------------------------------------------------------------------------
def split_indices(
  labels: np.ndarray, *, num_classes: int, shots: int | None = None, fraction: float | None = None, seed: int = 0
) -> np.ndarray:
  """Sorted training indices of one split: ``shots`` per class, or ``fraction`` of each class (at least one).

  Raises ValueError naming the class when a class has fewer than ``shots`` examples (the split would not hold
  n per class)."""
  if (shots is None) == (fraction is None):
    raise ValueError("give exactly one of shots or fraction")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  out = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) == 0:
      continue  # a class absent from the training split has nothing to sample
    if shots is not None:
      if len(members) < shots:
        raise ValueError(f"few-shot: class {c} has {len(members)} training examples, fewer than {shots} shots")
      take = shots
    else:
      take = max(1, int(round(fraction * len(members))))
    out.append(rng.choice(members, size=take, replace=False))
  if not out:
    raise ValueError("few-shot: the training split has no labelled example")
  return np.sort(np.concatenate(out))


def setting_name(shots: int | None = None, fraction: float | None = None) -> str:
  return f"{shots}shot" if shots is not None else f"{100 * fraction:g}pct"


def subset_paths(spec: str, field: str) -> list[list[str]]:
  """The list files of each split of ``spec`` (comma-separated files or folders; a folder's ``*.txt`` files, sorted)."""
  splits = []
  for path in (p.strip() for p in spec.split(",")):
    if not path:
      continue
    if os.path.isdir(path):
      files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".txt"))
      if not files:
        raise ConfigError(f"config.{field}: folder {path!r} holds no .txt split list")
      splits.append(files)
    elif os.path.isfile(path):
      splits.append([path])
    else:
      raise ConfigError(f"config.{field}: {path!r} is neither a split list file nor a folder of them")
  if not splits:
    raise ConfigError(f"config.{field}: no split list given in {spec!r}")
  return splits


def read_list(path: str) -> list[str]:
  """The file names of a split list, one per line as MSN's ``ImageNetSubset`` reads them (blank lines skipped)."""
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def file_name_index(source, field: str) -> dict[str, int]:
  """{base file name: example index} of ``source``; -1 for a name several examples share. ConfigError naming
  ``field`` when the source has no file names (an npz / digits source, a TFDS dataset without ``file_name``)."""
  getter = getattr(source, "file_name", None)
  if getter is None:
    raise ConfigError(
      f"config.{field}: the training source {getattr(source, 'name', source)!r} has no file names to match the "
      "split lists against (folder: sources and TFDS datasets with a file_name feature have them)"
    )
  index: dict[str, int] = {}
  try:
    for i in range(len(source)):
      name = os.path.basename(getter(i))
      index[name] = -1 if name in index else i
  except sources.DataError as e:
    raise ConfigError(f"config.{field}: {e}") from None
  return index


def list_indices(names: list[str], index: dict[str, int], *, path: str, field: str) -> np.ndarray:
  """Training indices of the listed file names (in list order); ConfigError naming ``field`` and ``path`` when a
  name is not in the training split or names several of its files."""
  out = np.array([index.get(os.path.basename(n), -2) for n in names], np.int64)
  for code, what in ((-2, "is not in the training split"), (-1, "names several files of the training split")):
    bad = [n for n, i in zip(names, out) if i == code]
    if bad:
      first = f"{bad[0]!r} (line {names.index(bad[0]) + 1})"
      raise ConfigError(f"config.{field}: {len(bad)} file(s) of {path} {what}, e.g. {first}")
  return out


def list_setting(path: str, labels: np.ndarray) -> str:
  """The setting a list holds: ``<p>pct`` for a file ``<p>percent.txt`` (SimCLR's 1% list), else ``<n>shot`` when
  every listed class has n images, else the file's stem."""
  stem = os.path.splitext(os.path.basename(path))[0]
  m = re.fullmatch(r"(\d+(?:\.\d+)?)percent", stem)
  if m:
    return f"{float(m.group(1)):g}pct"
  counts = np.bincount(labels)
  counts = counts[counts > 0]
  return f"{counts[0]}shot" if len(counts) and np.all(counts == counts[0]) else stem


class ListedImages:
  """The examples ``indices`` of ``source``, each labelled with its position in ``indices``: extracting it
  (``Context.extract``) tells which feature row is which listed image, whatever the gather order, and which
  images were left out (undecodable)."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, np.int64)
    self.name = f"{getattr(source, 'name', 'source')} (few-shot lists)"

  def __len__(self) -> int:
    return len(self.indices)

  def try_example(self, position: int) -> dict | None:
    ex = sources.eval_example(self.source, int(self.indices[position]))
    return None if ex is None else {**ex, "label": np.int32(position)}


# -- classifier ---------------------------------------------------------------------------------------------------
# evals.fewshot.preprocess: name -> what it is (stated in the result JSON).
PREPROCESS = {
  "center_l2": "each row minus its mean, then unit L2 norm (cyanure's preprocess as MSN's logistic_eval.py calls it)",
  "l2": "each row to unit L2 norm (DINO's eval_knn.py features, which DINO's Table 12 logistic regression reads)",
}


def preprocess(x: np.ndarray, how: str = "center_l2") -> np.ndarray:
  """Per-row centring (``"center_l2"``, MSN's; ``"l2"``: none, DINO's) then L2 normalisation, in float64."""
  x = np.asarray(x, np.float64)
  if how == "center_l2":
    x = x - x.mean(axis=1, keepdims=True)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _softmax_terms(x: np.ndarray, y_index: np.ndarray, w: np.ndarray):
  """(per-example loss logsumexp(z) - z_y, softmax probabilities) of the logits z = x w (n, k)."""
  z = x @ w
  m = z.max(axis=1, keepdims=True)
  lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
  return lse - z[np.arange(len(z)), y_index], np.exp(z - lse[:, None])


def objective(x: np.ndarray, y_index: np.ndarray, w: np.ndarray, lambd: float) -> float:
  """MSN's cyanure objective: (1/n) sum_i [logsumexp(w^T x_i) - w_{y_i}^T x_i] + (lambd / n) / 2 ||w||^2;
  ``w`` (d, k), ``y_index`` the class column of each row."""
  n = len(x)
  loss, _ = _softmax_terms(x, y_index, w)
  return float(loss.mean() + 0.5 * (lambd / n) * np.sum(w * w))


def duality_gap(x: np.ndarray, y_index: np.ndarray, w: np.ndarray, lambd: float, *, binary: bool = False) -> float:
  """Relative Fenchel duality gap (P(w) - D(a)) / P(w) of ``objective`` at ``w``, with the dual point
  a_i = softmax(w^T x_i) - e_{y_i}: D = (1/n) sum_i H(softmax_i) - (mu / 2) ||X^T (P - Y) / (mu n)||^2,
  mu = lambd / n. It bounds the relative suboptimality (f - f*) / f that cyanure's ``tol`` (1e-3 in MSN) bounds.
  ``binary``: the two-class problem scikit-learn solves (one weight vector: ``w = [0, c]``, only c is free)."""
  n, k = len(x), w.shape[1]
  mu = lambd / n
  loss, p = _softmax_terms(x, y_index, w)
  primal = loss.mean() + 0.5 * mu * np.sum(w * w)
  resid = (p - np.eye(k)[y_index])[:, 1:] if binary else p - np.eye(k)[y_index]
  v = -(x.T @ resid) / (mu * n)
  entropy = -np.sum(p * np.log(np.maximum(p, 1e-300)), axis=1)
  dual = entropy.mean() - 0.5 * mu * np.sum(v * v)
  return float((primal - dual) / primal)


def fit_logistic(
  train_x, train_y, *, lambd: float = 0.0025, max_iter: int = 10000, tol: float = 1e-6, preprocessing: str = "center_l2"
) -> dict:
  """l2 multinomial logistic regression without intercept (``objective``) on preprocessed ``train_x``, solved until
  its relative duality gap (``duality_gap``, cyanure's stopping quantity; MSN stops at 1e-3) is at most ``tol``.

  scikit-learn's L-BFGS (``C = 1 / lambd``) stops on the max-norm of the gradient of the mean-loss objective, which
  says little about the objective (features are unit vectors: a gradient test of 1e-4, its default, stops after 2
  iterations at a relative gap of 0.6 on a 100-class 5-shot synthetic problem), so it is resumed from its solution (``warm_start``) with a
  gradient test 100 times smaller until the gap is reached, ``max_iter`` iterations are spent, or L-BFGS makes no
  more progress (float64 precision).

  Returns {"model": the fitted LogisticRegression (None for one class), "classes", "converged" (gap <= tol),
  "n_iter" (L-BFGS iterations, all rounds), "objective", "duality_gap", "warnings" (messages of the warnings the fits
  raised, e.g. scikit-learn's ConvergenceWarning when a round hit its iteration cap)}."""
  from sklearn.linear_model import LogisticRegression

  x, train_y = preprocess(train_x, preprocessing), np.asarray(train_y)
  classes = np.unique(train_y)
  if len(classes) == 1:  # scikit-learn refuses one class; the classifier predicts it everywhere
    return dict(model=None, classes=classes, converged=True, n_iter=0, objective=0.0, duality_gap=0.0, warnings=[])
  y_index = np.searchsorted(classes, train_y)
  # Two classes: scikit-learn fits one vector c (logit difference), the objective with w = [0, c] (cyanure's
  # BinaryClassifier; its MultiClassifier refuses two classes).
  binary = len(classes) == 2
  clf = LogisticRegression(C=1.0 / lambd, fit_intercept=False, warm_start=True)
  n_iter, gtol, gap, messages = 0, 1e-6, np.inf, set()
  while n_iter < max_iter:
    clf.set_params(tol=gtol, max_iter=max_iter - n_iter)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")  # recorded in the result, not hidden
      clf.fit(x, train_y)
    messages |= {" ".join(str(c.message).split())[:300] for c in caught}
    steps = int(np.max(clf.n_iter_))
    n_iter += steps
    w = np.stack([np.zeros_like(clf.coef_[0]), clf.coef_[0]], axis=1) if binary else clf.coef_.T
    gap = duality_gap(x, y_index, w, lambd, binary=binary)
    if gap <= tol or steps <= 1 or gtol < 1e-15:  # reached, or no progress left at float64 precision
      break
    gtol /= 100.0
  return dict(
    model=clf,
    classes=classes,
    converged=bool(gap <= tol),
    n_iter=n_iter,
    objective=objective(x, y_index, w, lambd),
    duality_gap=gap,
    warnings=sorted(messages),
  )


def logistic_fit_accuracy(train_x, train_y, test_x, test_y, **solver) -> dict:
  """``fit_logistic`` on the train split plus ``accuracy``: the test top-1 in percent."""
  fit = fit_logistic(train_x, train_y, **solver)
  test_y = np.asarray(test_y)
  how = solver.get("preprocessing", "center_l2")
  pred = fit["classes"][0] if fit["model"] is None else fit["model"].predict(preprocess(test_x, how))
  return {**fit, "accuracy": float(100.0 * np.mean(pred == test_y))}


# -- evaluation ---------------------------------------------------------------------------------------------------
def _score_splits(splits, train_x, train_y, test_x, test_y, solver: dict) -> dict:
  """{setting: summary} over ``splits``: [(setting, row indices into train_x, file or None)]."""
  results: dict[str, dict] = {}
  for setting, rows, file in splits:
    fit = logistic_fit_accuracy(train_x[rows], train_y[rows], test_x, test_y, **solver)
    r = results.setdefault(
      setting,
      {"per_split": [], "num_train": [], "converged": [], "n_iter": [], "duality_gap": [], "warnings": []},
    )
    r["per_split"].append(fit["accuracy"])
    r["num_train"].append(int(len(rows)))
    r["converged"].append(fit["converged"])
    r["n_iter"].append(fit["n_iter"])
    r["duality_gap"].append(fit["duality_gap"])
    r["warnings"].append(fit["warnings"])
    if file is not None:
      r.setdefault("files", []).append(file)
  for r in results.values():
    r["mean"], r["std"] = float(np.mean(r["per_split"])), float(np.std(r["per_split"]))
  return results


def _summary(results: dict, **extra) -> dict:
  headline = "5shot" if "5shot" in results else next(iter(results))
  return {
    "accuracy": results[headline]["mean"],
    "headline": headline,
    "settings": results,
    "converged": all(all(r["converged"]) for r in results.values()),
    **extra,
  }


def fewshot_eval(
  train_x,
  train_y,
  test_x,
  test_y,
  *,
  num_classes: int,
  shots=(1, 2, 5),
  fractions=(0.01,),
  num_splits: int = 3,
  seed: int = 0,
  lambd: float = 0.0025,
  max_iter: int = 10000,
  tol: float = 1e-6,
  preprocessing: str = "center_l2",
) -> dict:
  """Mean and std (over ``num_splits`` seeded splits) of the test accuracy for each setting.

  Returns {"accuracy": mean of the 5-shot setting (else the first setting), "headline", "converged" (every fit),
  "settings": {name: {"mean", "std", "per_split", "num_train", "converged", "n_iter", "duality_gap", "warnings"
  (each per split)}}, "splits", "num_splits", "num_test", "lambd", "solver"}; names are "1shot", "2shot", "5shot",
  "1pct"."""
  if num_splits < 1:
    raise ValueError(f"num_splits must be >= 1, got {num_splits}")
  train_x, train_y, test_x, test_y = map(np.asarray, (train_x, train_y, test_x, test_y))
  settings = [(s, None) for s in shots] + [(None, f) for f in fractions]
  if not settings:
    raise ValueError("few-shot needs at least one setting (shots or fractions)")
  splits = [
    (setting_name(shot, frac), split_indices(train_y, num_classes=num_classes, shots=shot, fraction=frac, seed=s), None)
    for shot, frac in settings
    for s in range(seed, seed + num_splits)
  ]
  solver = dict(lambd=lambd, max_iter=max_iter, tol=tol, preprocessing=preprocessing)
  results = _score_splits(splits, train_x, train_y, test_x, test_y, solver)
  return _summary(
    results,
    splits=f"random: {num_splits} seeded splits per setting (seeds {seed}..{seed + num_splits - 1})",
    num_splits=num_splits,
    num_test=int(len(test_y)),
    lambd=lambd,
    preprocess=preprocessing,
    solver=_solver_line(max_iter, tol),
  )


def _solver_line(max_iter: int, tol: float) -> str:
  return (
    f"scikit-learn LogisticRegression(lbfgs, C=1/lambd, no intercept) until a relative duality gap <= {tol:g} "
    f"(at most {max_iter} iterations)"
  )


class FewshotEvaluator(runner.Evaluator):
  """``type="fewshot"``: few-shot logistic regression on MSN's features (module doc); DIR/eval/NAME.json holds
  ``accuracy`` (the 5-shot mean) and every setting's mean / std / per-split accuracies and convergence."""

  DEFAULTS = dict(
    shots=(1, 2, 5),
    fractions=(0.01,),
    num_splits=3,
    lambd=0.0025,
    features="prenorm_cls",
    preprocess="center_l2",
    subsets="",
    max_iter=10000,
    tol=1e-6,
  )
  init_keys = ("accuracy",)

  def feature_specs(self) -> tuple:
    return ((self.cfg.features,),)

  def run(self, ctx, params, feats) -> dict:
    c = self.cfg
    key = runner.spec_key((c.features,))
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    described = f"{c.features}: {FEATURES[c.features]}"
    if not c.subsets:
      return {
        **fewshot_eval(
          train_f[key],
          train_y,
          test_f[key],
          test_y,
          num_classes=ctx.num_classes,
          shots=tuple(c.shots),
          fractions=tuple(c.fractions),
          num_splits=c.num_splits,
          seed=self.config.seed,
          lambd=c.lambd,
          max_iter=c.max_iter,
          tol=c.tol,
          preprocessing=c.preprocess,
        ),
        "features": described,
      }
    return {**self.run_lists(ctx, params, test_f[key], test_y), "features": described}

  def run_lists(self, ctx, params, test_x, test_y) -> dict:
    """The split lists of ``subsets``: their images' features extracted here (a few thousand images), each list
    scored as one split of its setting."""
    c, field = self.cfg, f"evals.{self.name}.subsets"
    source = ctx.train_source
    index = file_name_index(source, field)
    lists = []  # (split number, file, training indices)
    for k, files in enumerate(subset_paths(c.subsets, field)):
      for path in files:
        lists.append((k, path, list_indices(read_list(path), index, path=path, field=field)))
    wanted = np.unique(np.concatenate([idx for _, _, idx in lists]))
    spec = (c.features,)
    fn = ctx.backbone_fn(("features", (spec,)), runner.make_feature_fn(ctx.graphdef, (spec,)))
    f, position = ctx.extract(params, ListedImages(source, wanted), fn)
    feats = np.zeros((len(wanted), f[runner.spec_key(spec)].shape[1]), np.float32)
    feats[position] = f[runner.spec_key(spec)]
    decoded = np.zeros(len(wanted), bool)
    decoded[position] = True  # undecodable images are left out, as by every evaluator
    labels = np.asarray(source.labels)[wanted]
    splits, seen = [], set()
    for k, path, idx in lists:
      rows = np.searchsorted(wanted, idx)
      rows = rows[decoded[rows]]
      setting = list_setting(path, labels[rows])
      if (k, setting) in seen:
        raise ConfigError(f"config.{field}: two lists of one split hold the setting {setting!r} ({path})")
      seen.add((k, setting))
      splits.append((setting, rows, path))
    solver = dict(lambd=c.lambd, max_iter=c.max_iter, tol=c.tol, preprocessing=c.preprocess)
    results = _score_splits(splits, feats, labels, np.asarray(test_x), np.asarray(test_y), solver)
    return _summary(
      results,
      splits=f"lists: {c.subsets}",
      num_splits=max(len(r["per_split"]) for r in results.values()),
      num_left_out=int(np.sum(~decoded)),
      num_test=int(len(test_y)),
      lambd=c.lambd,
      preprocess=c.preprocess,
      solver=_solver_line(c.max_iter, c.tol),
    )

  def metrics(self, result: dict) -> dict:
    return {k: v["mean"] for k, v in result["settings"].items()}

  def summary(self, r: dict) -> str:
    line = " ".join(f"{k} {v['mean']:.2f}+-{v['std']:.2f}%" for k, v in r["settings"].items())
    bad = sum(not ok for v in r["settings"].values() for ok in v["converged"])
    return line + (f" (solver did not converge on {bad} split(s): see the JSON's warnings)" if bad else "")

  @classmethod
  def validate(cls, cfg, field, *, config, patch, depth, num_devices) -> None:
    require(runner.positive_ints(cfg.shots), f"{field}.shots", f"must be positive integers, got {cfg.shots!r}")
    require(
      all(0 < f <= 1 for f in cfg.fractions),
      f"{field}.fractions",
      f"must be fractions in (0, 1], got {cfg.fractions!r}",
    )
    require(len(cfg.shots) + len(cfg.fractions) > 0, field, "shots and fractions are both empty")
    require(cfg.num_splits >= 1, f"{field}.num_splits", f"must be >= 1, got {cfg.num_splits}")
    require(cfg.lambd > 0, f"{field}.lambd", f"must be positive, got {cfg.lambd}")
    require(cfg.features in FEATURES, f"{field}.features", f"must be one of {sorted(FEATURES)}, got {cfg.features!r}")
    require(
      cfg.preprocess in PREPROCESS,
      f"{field}.preprocess",
      f"must be one of {sorted(PREPROCESS)}, got {cfg.preprocess!r}",
    )
    require(cfg.max_iter >= 1, f"{field}.max_iter", f"must be >= 1, got {cfg.max_iter}")
    require(cfg.tol > 0, f"{field}.tol", f"must be positive, got {cfg.tol}")
    if cfg.subsets:
      subset_paths(cfg.subsets, f"{field}.subsets")  # the files exist (their names are matched at evaluation)
