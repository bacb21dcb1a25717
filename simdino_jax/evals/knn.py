"""Weighted k-NN classification on frozen features (DINO protocol: cosine similarity, votes exp(sim / T)).

Reduces over the training set in one (test_chunk, N_train) similarity matmul per chunk of test rows, in
float32 with HIGHEST precision, so memory stays bounded for large train sets.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

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


def knn_scores(train_features, train_labels, test_features, *, num_classes: int, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
  """Per-class vote scores (n_test, num_classes) as a NumPy array."""
  train_features = _l2_normalize(jnp.asarray(train_features))
  test_features = _l2_normalize(jnp.asarray(test_features))
  train_labels = jnp.asarray(train_labels, jnp.int32)
  k = min(k, train_features.shape[0])
  out = []
  for start in range(0, test_features.shape[0], chunk):
    out.append(np.asarray(_class_scores(train_features, train_labels, test_features[start:start + chunk],
                                        jnp.float32(temperature), num_classes=num_classes, k=k)))
  return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


def knn_predict(train_features, train_labels, test_features, *, num_classes: int, k: int = 20,
                temperature: float = 0.07) -> np.ndarray:
  """Predicted labels (n_test,) by the weighted vote of the k nearest (cosine) training features."""
  scores = knn_scores(train_features, train_labels, test_features, num_classes=num_classes, k=k,
                      temperature=temperature)
  return np.argmax(scores, axis=-1).astype(np.int32)


def knn_accuracy(train_features, train_labels, test_features, test_labels, *, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> dict:
  """Top-1 and top-5 accuracy (in percent) of the weighted k-NN classifier."""
  scores = knn_scores(train_features, train_labels, test_features, num_classes=num_classes, k=k,
                      temperature=temperature)
  test_labels = np.asarray(test_labels)
  top1 = float(np.mean(np.argmax(scores, -1) == test_labels) * 100.0)
  top5_idx = np.argsort(-scores, axis=-1)[:, :min(5, num_classes)]
  top5 = float(np.mean(np.any(top5_idx == test_labels[:, None], axis=-1)) * 100.0)
  return {"top1": top1, "top5": top5}
