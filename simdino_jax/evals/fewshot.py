"""Few-shot (low-shot) evaluation on frozen cls features, the MSN / DINO-vMF protocol.

For each setting -- n labelled images per class (n in ``shots``, default 1, 2, 5) and 1% of the training set --
and each of ``num_splits`` seeded splits, a multinomial logistic regression (scikit-learn, L-BFGS, no intercept)
is fitted on the split's features and scored on the whole test set; the mean and std over the splits are reported.

Features are preprocessed as MSN does (cyanure's ``preprocess(centering=True, normalize=True, columns=False)``):
each feature vector minus its own mean over dimensions, then L2-normalised. The l2 penalty follows MSN's
cyanure call (``lambd / n`` on the averaged loss), which is scikit-learn's ``C = 1 / lambd`` on the summed loss.
The default ``lambd = 0.0025`` is MSN's value; the DINO-vMF paper's few-shot protocol states 0.075, which the vMF
recipes (configs/dino_vmf_vitb16_in1k.py, configs/ibot_vmf_vitb16_in1k.py) set as evals.fewshot.lambd.

Splits: ``n``-shot draws n distinct examples of every class without replacement; the 1% split draws
max(1, round(1% of the class's examples)) per class (class-balanced, as ImageNet's 1% subset is about 13 per
class). Each split is a pure function of (labels, setting, seed); seeds are ``seed, seed + 1, ...``.
"""

from __future__ import annotations

import warnings

import numpy as np

from simdino_jax.evals import runner


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


def preprocess(x: np.ndarray) -> np.ndarray:
  """Per-row centring then L2 normalisation (cyanure's preprocess as MSN calls it)."""
  x = np.asarray(x, np.float64)
  x = x - x.mean(axis=1, keepdims=True)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def logistic_accuracy(train_x, train_y, test_x, test_y, *, lambd: float = 0.0025, max_iter: int = 300) -> float:
  """Test top-1 accuracy (percent) of an l2 multinomial logistic regression fitted on (train_x, train_y)."""
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression

  train_y = np.asarray(train_y)
  classes = np.unique(train_y)
  if len(classes) == 1:  # scikit-learn refuses one class; the classifier would predict it everywhere
    return float(100.0 * np.mean(np.asarray(test_y) == classes[0]))
  clf = LogisticRegression(C=1.0 / lambd, fit_intercept=False, max_iter=max_iter, tol=1e-4)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter bounds the cost, as in MSN (300 epochs)
    clf.fit(preprocess(train_x), train_y)
  return float(100.0 * np.mean(clf.predict(preprocess(test_x)) == np.asarray(test_y)))


def setting_name(shots: int | None = None, fraction: float | None = None) -> str:
  return f"{shots}shot" if shots is not None else f"{100 * fraction:g}pct"


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
) -> dict:
  """Mean and std (over ``num_splits`` seeded splits) of the test accuracy for each setting.

  Returns {"accuracy": mean of the 5-shot setting (else the first setting), "settings": {name: {"mean", "std",
  "per_split", "num_train" (per split)}}, "num_splits", "num_test", "lambd"}; names are "1shot", "2shot", "5shot",
  "1pct"."""
  if num_splits < 1:
    raise ValueError(f"num_splits must be >= 1, got {num_splits}")
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  settings = [(s, None) for s in shots] + [(None, f) for f in fractions]
  if not settings:
    raise ValueError("few-shot needs at least one setting (shots or fractions)")
  test_p = np.asarray(test_x)
  results = {}
  for shot, frac in settings:
    accs, sizes = [], []
    for split in range(num_splits):
      idx = split_indices(train_y, num_classes=num_classes, shots=shot, fraction=frac, seed=seed + split)
      accs.append(logistic_accuracy(np.asarray(train_x)[idx], train_y[idx], test_p, test_y, lambd=lambd))
      sizes.append(int(len(idx)))
    results[setting_name(shot, frac)] = {
      "mean": float(np.mean(accs)),
      "std": float(np.std(accs)),
      "per_split": accs,
      "num_train": sizes,
    }
  headline = "5shot" if "5shot" in results else next(iter(results))
  return {
    "accuracy": results[headline]["mean"],
    "headline": headline,
    "settings": results,
    "num_splits": num_splits,
    "num_test": int(len(test_y)),
    "lambd": lambd,
  }


class FewshotEvaluator(runner.Evaluator):
  """``type="fewshot"``: few-shot logistic regression on the cls features (``fewshot_eval``); DIR/eval/NAME.json
  holds ``accuracy`` (the 5-shot mean) and every setting's mean / std / per-split accuracies."""

  DEFAULTS = dict(shots=(1, 2, 5), fractions=(0.01,), num_splits=3, lambd=0.0025)
  init_keys = ("accuracy",)

  def feature_specs(self) -> tuple:
    return (("cls",),)

  def run(self, ctx, params, feats) -> dict:
    c = self.cfg
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    return fewshot_eval(
      train_f["cls"],
      train_y,
      test_f["cls"],
      test_y,
      num_classes=ctx.num_classes,
      shots=tuple(c.shots),
      fractions=tuple(c.fractions),
      num_splits=c.num_splits,
      seed=self.config.seed,
      lambd=c.lambd,
    )

  def metrics(self, result: dict) -> dict:
    return {k: v["mean"] for k, v in result["settings"].items()}

  def summary(self, r: dict) -> str:
    return " ".join(f"{k} {v['mean']:.2f}+-{v['std']:.2f}%" for k, v in r["settings"].items())

  @classmethod
  def validate(cls, cfg, field, *, config, patch, depth, num_devices) -> None:
    runner.require(runner.positive_ints(cfg.shots), f"{field}.shots", f"must be positive integers, got {cfg.shots!r}")
    runner.require(
      all(0 < f <= 1 for f in cfg.fractions),
      f"{field}.fractions",
      f"must be fractions in (0, 1], got {cfg.fractions!r}",
    )
    runner.require(len(cfg.shots) + len(cfg.fractions) > 0, field, "shots and fractions are both empty")
    runner.require(cfg.num_splits >= 1, f"{field}.num_splits", f"must be >= 1, got {cfg.num_splits}")
    runner.require(cfg.lambd > 0, f"{field}.lambd", f"must be positive, got {cfg.lambd}")
