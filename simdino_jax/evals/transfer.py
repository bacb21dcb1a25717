"""Transfer linear classification on small datasets (DINO-vMF Table 5, DINO Table 10's linear rows), the protocol of
Ericsson et al. 2021, "How well do self-supervised models transfer?" (linusericsson/ssl-transfer ``linear.py``).

Per dataset: frozen features of its training and test images, an l2-regularised multinomial logistic regression
whose strength is chosen among Ericsson's grid ``torch.logspace(-6, 5, 45)`` of weight decays ``wd`` (their
``C = 1. / wd.item()`` for scikit-learn's ``LogisticRegression(solver='lbfgs', multi_class='multinomial')``, with
its default intercept), then a refit on the whole training set at the chosen strength and the test score: top-1, or
the mean per-class accuracy for Aircraft, Caltech101, Flowers and Pets (``LINEAR_DATASETS`` of ``linear.py``).

The objective (scikit-learn's at ``C = 1 / wd``, divided by ``C n``): ``(1/n) sum_i [logsumexp(W^T x_i + b) -
(W^T x_i + b)_{y_i}] + wd / (2 n) ||W||_F^2``, the intercept ``b`` unpenalised. It is ``fewshot.objective`` (MSN's
cyanure objective with ``lambd = wd``) plus an intercept, and without fewshot's row centring and normalisation
(Ericsson's features are used as extracted): ``fewshot.fit_logistic`` does not fit it, so it is solved here in JAX.

Selection (``selection``): ``"kfold"`` (default), as the DINO-vMF paper states it ("strength chosen per dataset by
5-fold cross-validation among 45 values spaced linearly in [-6, 5] in log space, following Ericsson et al."):
scikit-learn's ``StratifiedKFold(folds, shuffle=True, random_state=config.seed)`` over the training set (train +
val where the dataset has a val split), mean of the folds' scores; ``"holdout"``, what ``linear.py`` runs: the
dataset's own val split when it has one (Aircraft, DTD, Flowers), else the first 20% of the training indices after
``np.random.seed(0); np.random.shuffle(indices)``, scored once. Either way the largest score wins, the first in grid
order (``wd`` ascending) on ties, as ``linear.py``'s ``if test_score > best_score``.

Solver: L-BFGS (optax, zoom line search) on the full-batch objective in float32 with matmuls at ``HIGHEST``
precision, until the largest absolute gradient entry is at most ``tol`` (scikit-learn's lbfgs test, its ``gtol``) or
``max_iter`` iterations; every (fold, strength) records whether it converged. Folds and the refit run as one
vmapped batch (row weights 0/1 on one feature matrix); the strengths run from the strongest to the weakest, each
started from the previous solution (a regularisation path: the result does not depend on the start, the time does).
``linear.py`` instead warm-starts scikit-learn from the weakest strength upwards and stops each fit at scikit-learn's
default ``max_iter=100`` with ConvergenceWarnings ignored, so its weak-strength fits are not converged.

Datasets (``datasets``, names of ``DATASETS``; ``sources`` adds or replaces ``NAME=SPEC``): labelled ``tfds:`` /
``folder:`` / ``npz:`` / ``digits`` sources, each with its training parts and test split. A dataset whose data is
absent is reported in one line and skipped; a dataset that fails is reported and the others still run. Each writes
DIR/eval/transfer_<NAME>.json as it finishes (``NAME`` of the evaluator entry replaces ``transfer`` for another
entry); the evaluator's own JSON holds the table over datasets.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from etils import epath

from simdino_jax.data import sources
from simdino_jax.data.sources import tfds as tfds_family
from simdino_jax.errors import ConfigError, DataError, require
from simdino_jax.evals import linear_dino, runner

METRICS = ("top1", "mean_per_class")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A transfer dataset: its source ``spec`` ("" when no TFDS builder exists: give it with ``sources``), the splits
  whose union is the training set (the second, when given, is the val split ``selection="holdout"`` uses), the test
  split, the metric (Ericsson's ``LINEAR_DATASETS``) and what the split choice follows."""

  spec: str
  train: tuple[str, ...]
  test: str
  metric: str
  note: str = ""


# DINO-vMF Table 5's nine datasets, with Ericsson et al.'s metric. TFDS split names are read as is (tfds 4.9.10).
DATASETS = {
  "aircraft": Dataset(
    "", ("train", "val"), "test", "mean_per_class", "FGVC-Aircraft (variants, 100 classes): no TFDS builder"
  ),
  "caltech101": Dataset("tfds:caltech101", ("train",), "test", "mean_per_class", "30 images per class for training"),
  "cifar10": Dataset("tfds:cifar10", ("train",), "test", "top1"),
  "cifar100": Dataset("tfds:cifar100", ("train",), "test", "top1"),
  "dtd": Dataset("tfds:dtd", ("train", "validation"), "test", "top1", "split 1"),
  "flowers": Dataset("tfds:oxford_flowers102", ("train", "validation"), "test", "mean_per_class"),
  "food": Dataset("tfds:food101", ("train",), "validation", "top1", "TFDS's validation = the official test split"),
  "pets": Dataset("tfds:oxford_iiit_pet", ("train",), "test", "mean_per_class", "trainval / test"),
  "sun397": Dataset(
    "tfds:sun397/standard-part1-120k", ("train",), "test", "top1", "partition 01, as Ericsson's Training_01.txt"
  ),
}
FEATURES = {
  "cls": "the cls token after the final norm (k-NN's feature)",
  "prenorm_cls": "the last block's cls token before the final norm",
}
VIEWS = {
  "ericsson": "Resize(S, bicubic) of the shorter side + CenterCrop(S) (linear.py's transform, S = 224 there)",
  "eval": "the run's eval view: Resize(round(S x 256 / 224), bicubic) + CenterCrop(S)",
}
PREPROCESS = ("none", "standardize", "l2")


# -- the classifier -----------------------------------------------------------------------------------------------
def weight_decays(lo: float = -6.0, hi: float = 5.0, num: int = 45) -> np.ndarray:
  """Ericsson's grid ``torch.logspace(-6, 5, 45)`` (float32 in torch, as here), ascending; C = 1 / wd."""
  return np.logspace(lo, hi, num).astype(np.float32)


def kfold_weights(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
  """(folds, n) 0/1 training-row weights of scikit-learn's ``StratifiedKFold(folds, shuffle=True, random_state=
  seed)``: row f is 0 on fold f's held-out rows."""
  from sklearn.model_selection import StratifiedKFold

  w = np.ones((folds, len(labels)), np.float32)
  try:
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))
  except ValueError as e:  # every class smaller than the fold count
    raise DataError(f"transfer: {folds}-fold cross-validation: {e}") from None
  for f, (_, held_out) in enumerate(splits):
    w[f, held_out] = 0.0
  return w


def holdout_weights(num_train: int, num_val: int = 0) -> np.ndarray:
  """(1, n) training-row weights of ``linear.py``'s validation split: the last ``num_val`` rows (the dataset's own
  val split, concatenated after train) when given, else the first 20% of ``np.random.seed(0);
  np.random.shuffle(indices)`` (``get_train_valid_loader``, valid_size 0.2, random_seed 0)."""
  w = np.ones((1, num_train), np.float32)
  if num_val:
    w[0, num_train - num_val :] = 0.0
    return w
  indices = list(range(num_train))
  split = int(np.floor(0.2 * num_train))
  np.random.seed(0)  # linear.py's global seeding, on the legacy global generator
  np.random.shuffle(indices)
  w[0, indices[:split]] = 0.0
  return w


def mean_per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """Mean over the classes present in ``y_true`` of their recall, in percent (Ericsson's confusion-matrix lines when
  no class is predicted that is absent from ``y_true``; there, theirs gives NaN)."""
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  classes = np.unique(y_true)
  return float(100.0 * np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


def _objective(params, x, onehot, weights, wd, center):
  """Mean weighted softmax loss + wd / (2 n) ||W||^2, n the weighted row count; ``params`` = (W (d, k), c (k,)) with
  the intercept b = c - center W: the same problem in better-conditioned variables (``center``: the weighted mean
  row, so the intercept no longer moves with W)."""
  w, c = params
  z = jnp.dot(x - center, w, precision=jax.lax.Precision.HIGHEST) + c
  loss = jax.nn.logsumexp(z, axis=1) - jnp.sum(z * onehot, axis=1)
  n = jnp.sum(weights)
  return jnp.sum(weights * loss) / n + 0.5 * wd / n * jnp.sum(w * w)


def _solve(x, onehot, weights, wd, init, *, max_iter: int, tol: float):
  """L-BFGS from ``init`` until max |grad| <= tol, ``max_iter`` iterations or no decrease; (params, n_iter, gmax)."""
  center = jnp.dot(weights, x, precision=jax.lax.Precision.HIGHEST) / jnp.sum(weights)
  w0, b0 = init
  init = (w0, b0 + jnp.dot(center, w0, precision=jax.lax.Precision.HIGHEST))
  fun = functools.partial(_objective, x=x, onehot=onehot, weights=weights, wd=wd, center=center)
  opt = optax.lbfgs(memory_size=10, linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=30))
  value_and_grad = optax.value_and_grad_from_state(fun)

  def gmax(grad):
    return jnp.maximum(jnp.max(jnp.abs(grad[0])), jnp.max(jnp.abs(grad[1])))

  def body(carry):
    params, state, _, _, it = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
    params = optax.apply_updates(params, updates)
    return params, state, value, otu.tree_get(state, "value"), it + 1

  def cond(carry):
    _, state, before, after, it = carry
    g = gmax(otu.tree_get(state, "grad"))
    return (it == 0) | ((it < max_iter) & (g > tol) & (after < before))

  state = opt.init(init)
  inf = jnp.asarray(jnp.inf, jnp.float32)
  (w, c), state, _, _, it = jax.lax.while_loop(cond, body, (init, state, inf, inf, jnp.asarray(0)))
  return (w, c - jnp.dot(center, w, precision=jax.lax.Precision.HIGHEST)), it, gmax(otu.tree_get(state, "grad"))


def _scores(params, x, onehot, mask):
  """(top-1, mean per-class accuracy) in percent of the rows where ``mask`` is 1 (classes present there)."""
  w, b = params
  z = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST) + b
  correct = jnp.sum(onehot * jax.nn.one_hot(jnp.argmax(z, axis=1), onehot.shape[1]), axis=1) * mask
  top1 = 100.0 * jnp.sum(correct) / jnp.sum(mask)
  per_class_n = jnp.sum(onehot * mask[:, None], axis=0)
  per_class_ok = jnp.sum(onehot * correct[:, None], axis=0)
  present = per_class_n > 0
  mpc = 100.0 * jnp.sum(jnp.where(present, per_class_ok / jnp.maximum(per_class_n, 1), 0.0)) / jnp.sum(present)
  return top1, mpc


@functools.partial(jax.jit, static_argnames=("max_iter", "tol"))
def _path(x, onehot, x_test, onehot_test, weights, wds, *, max_iter: int, tol: float):
  """Every strength of ``wds`` (strongest first) on every row of ``weights`` (a batch of problems, one per row):
  held-out scores (rows weighted 0), test scores, iterations and final max |grad|, each (len(wds), rows, ...)."""
  d, k = x.shape[1], onehot.shape[1]
  rows = weights.shape[0]
  solve = jax.vmap(
    functools.partial(_solve, max_iter=max_iter, tol=tol), in_axes=(None, None, 0, None, 0), out_axes=(0, 0, 0)
  )
  score_held = jax.vmap(_scores, in_axes=(0, None, None, 0))
  score_test = jax.vmap(_scores, in_axes=(0, None, None, None))

  def step(params, wd):
    params, n_iter, gmax = solve(x, onehot, weights, wd, params)
    held = score_held(params, x, onehot, 1.0 - weights)
    test = score_test(params, x_test, onehot_test, jnp.ones(x_test.shape[0], jnp.float32))
    return params, (jnp.stack(held, -1), jnp.stack(test, -1), n_iter, gmax)

  # Start of the path (the strongest strength, W ~ 0): W = 0 and the intercept at its optimum for W = 0, the log
  # class frequencies of each problem's rows.
  counts = jnp.dot(weights, onehot, precision=jax.lax.Precision.HIGHEST)
  init = (jnp.zeros((rows, d, k), jnp.float32), jnp.log(jnp.maximum(counts, 0.5) / jnp.sum(weights, 1, keepdims=True)))
  _, out = jax.lax.scan(step, init, wds)
  return out


def preprocess(train_x: np.ndarray, test_x: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
  """``"none"`` (Ericsson: features as extracted), ``"standardize"`` (per dimension, the training set's mean and
  std) or ``"l2"`` (each row to unit norm)."""
  train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
  if how == "standardize":
    mean, std = train_x.mean(0), train_x.std(0)
    std = np.where(std > 0, std, 1.0)
    return (train_x - mean) / std, (test_x - mean) / std
  if how == "l2":
    norm = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
    return norm(train_x), norm(test_x)
  return train_x, test_x


def select_and_fit(
  train_x,
  train_y,
  test_x,
  test_y,
  *,
  num_classes: int,
  metric: str = "top1",
  selection: str = "kfold",
  folds: int = 5,
  num_val: int = 0,
  seed: int = 0,
  wds=None,
  max_iter: int = 1000,
  tol: float = 1e-4,
) -> dict:
  """The strength chosen on the training set (``selection``), its refit's test score and every figure of the sweep.

  Returns {"accuracy" (the chosen strength's test score, ``metric``), "metric", "wd", "C" (= 1 / wd), "wds",
  "cv_scores" (per strength: mean held-out score), "cv_fold_scores", "test_scores" (per strength: the refit's test
  score, for reference; never used to choose), "converged" (per strength: every fold and the refit), "n_iter",
  "max_grad", "selection", "folds"}."""
  require(metric in METRICS, "evals.transfer.metric", f"must be one of {METRICS}, got {metric!r}")
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  wds = weight_decays() if wds is None else np.asarray(wds, np.float32)
  if selection == "kfold":
    w = kfold_weights(train_y, folds, seed)
  elif selection == "holdout":
    w = holdout_weights(len(train_y), num_val)
  else:
    raise ConfigError(f"config.evals.transfer.selection: must be 'kfold' or 'holdout', got {selection!r}")
  w = np.concatenate([w, np.ones((1, len(train_y)), np.float32)])  # the last row: the refit on all training rows
  order = np.argsort(-wds, kind="stable")  # strongest first: each solve starts from the previous solution
  onehot = np.eye(num_classes, dtype=np.float32)
  held, test, n_iter, gmax = jax.device_get(
    _path(
      jnp.asarray(train_x, jnp.float32),
      jnp.asarray(onehot[train_y]),
      jnp.asarray(test_x, jnp.float32),
      jnp.asarray(onehot[test_y]),
      jnp.asarray(w),
      jnp.asarray(wds[order]),
      max_iter=int(max_iter),
      tol=float(tol),
    )
  )
  back = np.argsort(order)  # to grid order (wd ascending)
  m = METRICS.index(metric)
  fold_scores = np.asarray(held)[back, :-1, m]  # (strengths, folds)
  cv = fold_scores.mean(axis=1)
  test_scores = np.asarray(test)[back, -1, m]
  best = int(np.argmax(cv))  # the first maximum in grid order: linear.py's strict ">"
  converged = np.all(np.asarray(gmax)[back] <= tol, axis=1)
  return {
    "accuracy": float(test_scores[best]),
    "metric": metric,
    "wd": float(wds[best]),
    "C": float(1.0 / wds[best]),
    "wds": [float(v) for v in wds],
    "cv_scores": [float(v) for v in cv],
    "cv_fold_scores": fold_scores.round(4).tolist(),
    "test_scores": [float(v) for v in test_scores],
    "converged": [bool(v) for v in converged],
    "n_iter": np.asarray(n_iter)[back].tolist(),
    "max_grad": [float(v) for v in np.asarray(gmax)[back].max(axis=1)],
    "selection": selection,
    "folds": int(w.shape[0] - 1),
  }


# -- data ---------------------------------------------------------------------------------------------------------
def parse_pairs(text: str, field: str) -> dict[str, str]:
  """``"a=x,b=y"`` -> {"a": "x", "b": "y"}; ConfigError naming ``field`` for an entry without ``=``."""
  out = {}
  for item in (t.strip() for t in text.split(",")):
    if not item:
      continue
    name, eq, value = item.partition("=")
    if not eq or not name.strip() or not value.strip():
      raise ConfigError(f"config.{field}: entries are NAME=VALUE, got {item!r}")
    out[name.strip()] = value.strip()
  return out


def dataset_table(cfg, field: str) -> dict[str, Dataset]:
  """{name: Dataset} of ``cfg.datasets`` in order, with ``cfg.sources`` / ``cfg.metrics`` applied."""
  specs = parse_pairs(cfg.sources, f"{field}.sources")
  metrics = parse_pairs(cfg.metrics, f"{field}.metrics")
  names = [n.strip() for n in cfg.datasets.split(",") if n.strip()]
  require(names, f"{field}.datasets", "names no dataset")
  for name in names:
    require(
      name in DATASETS or name in specs,
      f"{field}.datasets",
      f"{name!r} is none of {sorted(DATASETS)}: give its source as {field}.sources='{name}=SPEC'",
    )
  for name, metric in metrics.items():
    require(metric in METRICS, f"{field}.metrics", f"{name}: must be one of {METRICS}, got {metric!r}")
  table = {}
  for name in names:
    base = DATASETS.get(name, Dataset("", ("train",), "test", "top1"))
    table[name] = dataclasses.replace(base, spec=specs.get(name, base.spec), metric=metrics.get(name, base.metric))
  return table


def load_split(spec: str, split: str, tfds_data_dir: str | None):
  """One split of ``spec``; a ``tfds:`` split is TFDS's own split name (``test`` is ``test``, not ``validation``)."""
  if spec.startswith("tfds:"):
    return tfds_family.load_tfds(spec[len("tfds:") :], split, tfds_data_dir, exact=True)
  return sources.load_source(spec, split, tfds_data_dir=tfds_data_dir)


def load_dataset(ds: Dataset, tfds_data_dir: str | None):
  """(training parts: train[, val], test source); MissingDataError / DataError when absent or unusable."""
  if not ds.spec:
    raise sources.MissingDataError(ds.note or "no source given")
  parts = [load_split(ds.spec, split, tfds_data_dir) for split in ds.train]
  test = load_split(ds.spec, ds.test, tfds_data_dir)
  names = [getattr(s, "name", None) for s in parts + [test]]
  if len(set(names)) != len(names):  # a folder without val/ reads test/ for "val": never train on the test split
    raise DataError(f"{ds.spec}: the splits {ds.train} and {ds.test!r} are not distinct ({names})")
  return parts, test


def markdown_table(rows: dict[str, dict], absent: dict[str, str], failed: dict[str, str]) -> str:
  """One line per dataset: score, metric, chosen C, sizes; absent and failed datasets named with the reason."""
  lines = [
    "| dataset | accuracy | metric | C (= 1 / wd) | train / test | classes | features |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, r in rows.items():
    lines.append(
      f"| {name} | {r['accuracy']:.2f} | {r['metric']} | {r['C']:.3g} | {r['num_train']} / {r['num_test']} | "
      f"{r['num_classes']} | {r['feature_dim']} |"
    )
  for name, why in {**absent, **failed}.items():
    lines.append(f"| {name} | - | {'absent' if name in absent else 'FAILED'}: {why} | | | | |")
  return "\n".join(lines)


class TransferEvaluator(runner.Evaluator):
  """``type="transfer"``: the nine transfer datasets (module doc); DIR/eval/NAME_<dataset>.json per dataset and
  NAME.json with ``accuracy`` (the mean over the datasets evaluated) and the table."""

  DEFAULTS = dict(
    datasets=",".join(DATASETS),
    sources="",
    metrics="",
    features="cls",
    view="ericsson",
    image_size=0,
    preprocess="none",
    selection="kfold",
    folds=5,
    num_wds=45,
    wd_range=(-6.0, 5.0),
    max_iter=1000,
    tol=1e-4,
  )
  needs_labels = False  # its own datasets, not the run's

  def run(self, ctx, params, feats) -> dict:
    c, field = self.cfg, f"evals.{self.name}"
    table = dataset_table(c, field)
    size = c.image_size or ctx.image_size
    spec = (c.features,)
    fn = ctx.backbone_fn(("features", (spec,)), runner.make_feature_fn(ctx.graphdef, (spec,)))
    transform = None if c.view == "eval" else functools.partial(linear_dino.eval_view, crop=size, resize_to=size)
    tfds_dir = ctx.config.data.get("tfds_data_dir") or None
    rows, absent, failed = {}, {}, {}
    for name, ds in table.items():
      try:
        parts, test_src = load_dataset(ds, tfds_dir)
        rows[name] = self._one(ctx, params, fn, transform, size, name, ds, parts, test_src)
      except sources.MissingDataError as e:
        absent[name] = " ".join(str(e).split())
        ctx.log(f"{self.name}: {name}: absent, skipped ({absent[name]})")
      except Exception as e:  # pylint: disable=broad-except  (one dataset must not discard the others)
        failed[name] = runner.failure_line(e)
        ctx.log(f"{self.name}: {name}: FAILED: {failed[name]}")
    text = markdown_table(rows, absent, failed)
    ctx.log(f"{self.name}:\n{text}")
    return {
      "accuracy": float(np.mean([r["accuracy"] for r in rows.values()])) if rows else None,
      "per_dataset": {n: r["accuracy"] for n, r in rows.items()},
      "absent": absent,
      "failed": failed,
      "table": text,
      "features": f"{c.features}: {FEATURES[c.features]}; view {c.view} at {size}px; preprocess {c.preprocess}",
    }

  def _one(self, ctx, params, fn, transform, size, name, ds, parts, test_src) -> dict:
    """Extracts, selects, refits and writes DIR/eval/NAME_<name>.json; the val part (if any) is last."""
    c = self.cfg
    key = runner.spec_key((c.features,))
    extracted = [ctx.extract(params, src, fn, image_size=size, transform=transform) for src in parts]
    train_f = np.concatenate([f[key] for f, _ in extracted])
    train_y = np.concatenate([y for _, y in extracted])
    num_val = len(extracted[-1][1]) if len(parts) > 1 else 0
    test_f, test_y = ctx.extract(params, test_src, fn, image_size=size, transform=transform)
    test_f = test_f[key]
    num_classes = max([int(s.num_classes) for s in parts + [test_src]] + [int(max(train_y.max(), test_y.max())) + 1])
    x, xt = preprocess(train_f, test_f, c.preprocess)
    fit = select_and_fit(
      x,
      train_y,
      xt,
      test_y,
      num_classes=num_classes,
      metric=ds.metric,
      selection=c.selection,
      folds=c.folds,
      num_val=num_val,
      seed=self.config.seed,
      wds=weight_decays(c.wd_range[0], c.wd_range[1], c.num_wds),
      max_iter=c.max_iter,
      tol=c.tol,
    )
    result = {
      "dataset": name,
      "spec": ds.spec,
      "train_splits": list(ds.train),
      "test_split": ds.test,
      "note": ds.note,
      **fit,
      "num_train": int(len(train_y)),
      "num_test": int(len(test_y)),
      "num_classes": num_classes,
      "feature_dim": int(x.shape[1]),
      "features": f"{c.features}: {FEATURES[c.features]}",
      "view": f"{c.view}: {VIEWS[c.view]}, S = {size}",
      "preprocess": c.preprocess,
      "solver": f"L-BFGS (optax, float32, HIGHEST) to max |grad| <= {c.tol:g} within {c.max_iter} iterations",
    }
    bad = sum(not v for v in fit["converged"])
    ctx.log(
      f"{self.name}: {name}: {fit['accuracy']:.2f}% ({ds.metric}) at C = {fit['C']:.3g} "
      f"(cv {max(fit['cv_scores']):.2f}%; {len(train_y)} / {len(test_y)} images)"
      + (f"; {bad} of {len(fit['wds'])} strengths not converged (see the JSON)" if bad else "")
    )
    if ctx.is_main:
      path = epath.Path(ctx.out_dir) / f"{self.name}_{name}{ctx.suffix}.json"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(result, indent=2))
    return result

  def metrics(self, result: dict) -> dict:
    return {f"{self.name}_{n}": v for n, v in result["per_dataset"].items()}

  def summary(self, r: dict) -> str:
    parts = [f"{n} {v:.2f}%" for n, v in r["per_dataset"].items()]
    parts += [f"{n} absent" for n in r["absent"]] + [f"{n} FAILED" for n in r["failed"]]
    return ", ".join(parts) or "no dataset"

  @classmethod
  def validate(cls, cfg, field, *, config, patch, depth, num_devices) -> None:
    dataset_table(cfg, field)
    require(cfg.features in FEATURES, f"{field}.features", f"must be one of {sorted(FEATURES)}, got {cfg.features!r}")
    require(cfg.view in VIEWS, f"{field}.view", f"must be one of {sorted(VIEWS)}, got {cfg.view!r}")
    require(cfg.preprocess in PREPROCESS, f"{field}.preprocess", f"must be one of {PREPROCESS}, got {cfg.preprocess!r}")
    require(
      cfg.selection in ("kfold", "holdout"), f"{field}.selection", f"must be kfold or holdout, got {cfg.selection!r}"
    )
    require(cfg.folds >= 2, f"{field}.folds", f"must be >= 2, got {cfg.folds}")
    require(cfg.num_wds >= 1, f"{field}.num_wds", f"must be >= 1, got {cfg.num_wds}")
    require(
      len(cfg.wd_range) == 2 and cfg.wd_range[0] <= cfg.wd_range[1],
      f"{field}.wd_range",
      f"must be (low, high) log10 exponents, got {cfg.wd_range!r}",
    )
    require(cfg.image_size >= 0, f"{field}.image_size", f"must be >= 0 (0: the run's eval size), got {cfg.image_size}")
    require(cfg.max_iter >= 1, f"{field}.max_iter", f"must be >= 1, got {cfg.max_iter}")
    require(cfg.tol > 0, f"{field}.tol", f"must be positive, got {cfg.tol}")
