"""Weighted k-NN classification on frozen features (DINO protocol: cosine similarity, votes exp(sim / T)).

Reduces over the training set in one (test_chunk, N_train) similarity matmul per chunk of test rows, in
float32 with HIGHEST precision, so memory stays bounded for large train sets. ``knn_accuracy_multi_k`` reports
every k of DINO's protocol (10, 20, 100, 200) from one similarity matmul and one top-max(k) pass per chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from simdino_jax.errors import require
from simdino_jax.evals import runner

_HIGHEST = jax.lax.Precision.HIGHEST


def _l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _class_scores(train_features, train_labels, test_features, temperature, *, num_classes: int, k: int):
  sim = jnp.matmul(test_features, train_features.T, precision=_HIGHEST)  # (n_test, n_train) cosines
  top_sim, top_idx = jax.lax.top_k(sim, k)
  weights = jnp.exp(top_sim / temperature)
  onehot = jax.nn.one_hot(train_labels[top_idx], num_classes, dtype=jnp.float32)  # (n_test, k, C)
  return jnp.einsum("tk,tkc->tc", weights, onehot)


def knn_scores(
  train_features,
  train_labels,
  test_features,
  *,
  num_classes: int,
  k: int = 20,
  temperature: float = 0.07,
  chunk: int = 1024,
) -> np.ndarray:
  """Per-class vote scores (n_test, num_classes) as a NumPy array."""
  train_features = _l2_normalize(jnp.asarray(train_features))
  test_features = _l2_normalize(jnp.asarray(test_features))
  train_labels = jnp.asarray(train_labels, jnp.int32)
  k = min(k, train_features.shape[0])
  out = []
  for start in range(0, test_features.shape[0], chunk):
    out.append(
      np.asarray(
        _class_scores(
          train_features,
          train_labels,
          test_features[start : start + chunk],
          jnp.float32(temperature),
          num_classes=num_classes,
          k=k,
        )
      )
    )
  return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


def knn_predict(
  train_features, train_labels, test_features, *, num_classes: int, k: int = 20, temperature: float = 0.07
) -> np.ndarray:
  """Predicted labels (n_test,) by the weighted vote of the k nearest (cosine) training features."""
  scores = knn_scores(
    train_features, train_labels, test_features, num_classes=num_classes, k=k, temperature=temperature
  )
  return np.argmax(scores, axis=-1).astype(np.int32)


def knn_accuracy(
  train_features, train_labels, test_features, test_labels, *, num_classes: int, k: int = 20, temperature: float = 0.07
) -> dict:
  """Top-1 and top-5 accuracy (in percent) of the weighted k-NN classifier."""
  scores = knn_scores(
    train_features, train_labels, test_features, num_classes=num_classes, k=k, temperature=temperature
  )
  test_labels = np.asarray(test_labels)
  top1 = float(np.mean(np.argmax(scores, -1) == test_labels) * 100.0)
  top5_idx = np.argsort(-scores, axis=-1)[:, : min(5, num_classes)]
  top5 = float(np.mean(np.any(top5_idx == test_labels[:, None], axis=-1)) * 100.0)
  return {"top1": top1, "top5": top5}


@functools.partial(jax.jit, static_argnames=("num_classes", "ks"))
def _multi_k_hits(
  train_features, train_labels, test_features, test_labels, temperature, *, num_classes: int, ks: tuple[int, ...]
):
  """(len(ks), 2) counts of top-1 / top-5 hits of a chunk of test rows, from ONE similarity matmul and ONE
  top-max(ks) pass: the neighbours of a smaller k are the first k of the sorted top-max(ks) list."""
  sim = jnp.matmul(test_features, train_features.T, precision=_HIGHEST)
  top_sim, top_idx = jax.lax.top_k(sim, max(ks))  # sorted by decreasing similarity
  weights = jnp.exp(top_sim / temperature)
  neighbour_labels = train_labels[top_idx]
  rows = jnp.arange(test_features.shape[0])[:, None]
  valid = test_labels >= 0  # padding rows of the last chunk carry label -1
  out = []
  for k in ks:
    # Scatter-add (n, k) votes into (n, C) scores: memory O(n C), not the (n, k, C) of a one-hot.
    scores = jnp.zeros((test_features.shape[0], num_classes), jnp.float32)
    scores = scores.at[rows, neighbour_labels[:, :k]].add(weights[:, :k])
    top1 = jnp.argmax(scores, axis=-1) == test_labels
    _, top5_idx = jax.lax.top_k(scores, min(5, num_classes))
    top5 = jnp.any(top5_idx == test_labels[:, None], axis=-1)
    out.append(jnp.stack([jnp.sum(top1 & valid), jnp.sum(top5 & valid)]))
  return jnp.stack(out)


def knn_accuracy_multi_k(
  train_features,
  train_labels,
  test_features,
  test_labels,
  *,
  num_classes: int,
  ks=(10, 20, 100, 200),
  temperature: float = 0.07,
  chunk: int = 1024,
) -> dict:
  """Top-1 / top-5 accuracy (percent) of the weighted k-NN for every k in ``ks``, as DINO's eval_knn reports them.

  One similarity matmul and one top-max(ks) pass per chunk of test rows serve every k. A k larger than the
  training set uses every training example (the figure is reported under the requested k). Every test example
  is counted exactly once: the last chunk is padded to the chunk size (one compiled shape) and its padding
  masked. Returns ``{k: {"top1": ..., "top5": ...}}``.
  """
  ks = tuple(int(k) for k in ks)
  if not ks or min(ks) < 1:
    raise ValueError(f"ks must be a non-empty tuple of positive integers, got {ks}")
  train_features = _l2_normalize(jnp.asarray(train_features))
  test_features = np.asarray(_l2_normalize(jnp.asarray(test_features)))
  train_labels = jnp.asarray(train_labels, jnp.int32)
  test_labels = np.asarray(test_labels, np.int32)
  n_test, n_train = test_features.shape[0], train_features.shape[0]
  if n_test == 0 or n_train == 0:
    raise ValueError(f"k-NN needs training and test examples, got {n_train} and {n_test}")
  eff = tuple(sorted({min(k, n_train) for k in ks}))
  chunk = min(chunk, n_test)
  hits = np.zeros((len(eff), 2), np.int64)
  for start in range(0, n_test, chunk):
    f, y = test_features[start : start + chunk], test_labels[start : start + chunk]
    pad = chunk - f.shape[0]
    if pad:
      f = np.concatenate([f, np.zeros((pad, f.shape[1]), f.dtype)])
      y = np.concatenate([y, np.full((pad,), -1, np.int32)])
    hits += np.asarray(
      _multi_k_hits(
        train_features,
        train_labels,
        jnp.asarray(f),
        jnp.asarray(y),
        jnp.float32(temperature),
        num_classes=num_classes,
        ks=eff,
      ),
      np.int64,
    )
  pct = 100.0 * hits / n_test
  return {
    k: {"top1": float(pct[eff.index(min(k, n_train)), 0]), "top5": float(pct[eff.index(min(k, n_train)), 1])}
    for k in ks
  }


class KnnEvaluator(runner.Evaluator):
  """``type="knn"``: weighted k-NN of the cls features (DINO's protocol); DIR/eval/NAME.json holds ``accuracy``
  (top-1 at ``k``), ``top5`` and ``per_k`` (top-1 / top-5 for every k of ``ks``), all from one similarity pass."""

  DEFAULTS = dict(k=20, temperature=0.07, ks=(10, 20, 100, 200))
  init_keys = ("accuracy", "top5")

  def feature_specs(self) -> tuple:
    return (("cls",),)

  def run(self, ctx, params, feats) -> dict:
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    ks = tuple(sorted(set(self.cfg.ks) | {self.cfg.k}))
    per_k = knn_accuracy_multi_k(
      train_f["cls"],
      train_y,
      test_f["cls"],
      test_y,
      num_classes=ctx.num_classes,
      ks=ks,
      temperature=self.cfg.temperature,
    )
    at = per_k[self.cfg.k]
    return {
      "accuracy": at["top1"],
      "top5": at["top5"],
      "k": self.cfg.k,
      "temperature": self.cfg.temperature,
      "per_k": {str(k): v for k, v in per_k.items()},
      "num_train": int(len(train_y)),
      "num_test": int(len(test_y)),
    }

  def metrics(self, result: dict) -> dict:
    return {"top1": result["accuracy"], "top5": result["top5"]}

  def summary(self, r: dict) -> str:
    per_k = " ".join(f"k={k} {v['top1']:.2f}/{v['top5']:.2f}" for k, v in r["per_k"].items())
    at_init = f" vs {r['accuracy_at_init']:.2f}% at init" if "accuracy_at_init" in r else ""
    return f"top-1 {r['accuracy']:.2f}% (k={r['k']}, T={r['temperature']}){at_init}; top-1/top-5 {per_k}"

  @classmethod
  def validate(cls, cfg, field, *, config, patch, depth, num_devices) -> None:
    require(isinstance(cfg.k, int) and cfg.k >= 1, f"{field}.k", f"must be a positive integer, got {cfg.k!r}")
    require(
      len(cfg.ks) > 0 and runner.positive_ints(cfg.ks),
      f"{field}.ks",
      f"must be a non-empty tuple of positive integers, got {cfg.ks!r}",
    )
    require(cfg.temperature > 0, f"{field}.temperature", f"must be positive, got {cfg.temperature}")
