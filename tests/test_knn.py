"""Weighted k-NN against a NumPy loop written from the DINO protocol."""

import numpy as np

from simdino_jax.evals.knn import knn_accuracy, knn_predict


def np_knn(train_f, train_y, test_f, num_classes, k, t):
  train_f = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
  test_f = test_f / np.linalg.norm(test_f, axis=1, keepdims=True)
  preds = []
  for x in test_f:
    sims = train_f @ x
    idx = np.argsort(-sims)[:k]
    scores = np.zeros(num_classes)
    for i in idx:
      scores[train_y[i]] += np.exp(sims[i] / t)
    preds.append(np.argmax(scores))
  return np.array(preds)


def test_knn_predict_matches_numpy_reference():
  rng = np.random.default_rng(0)
  centers = rng.standard_normal((5, 16))
  train_y = rng.integers(0, 5, 300)
  test_y = rng.integers(0, 5, 77)
  train_f = centers[train_y] + 0.8 * rng.standard_normal((300, 16))
  test_f = centers[test_y] + 0.8 * rng.standard_normal((77, 16))
  for k, t in [(20, 0.07), (5, 0.5), (1, 0.07)]:
    got = knn_predict(train_f, train_y, test_f, num_classes=5, k=k, temperature=t)
    np.testing.assert_array_equal(got, np_knn(train_f, train_y, test_f, 5, k, t))
  acc = knn_accuracy(train_f, train_y, test_f, test_y, num_classes=5)
  want = 100 * np.mean(np_knn(train_f, train_y, test_f, 5, 20, 0.07) == test_y)
  assert abs(acc["top1"] - want) < 1e-9 and acc["top5"] == 100.0  # 5 classes: top-5 always right


def test_knn_is_scale_invariant_cosine():
  rng = np.random.default_rng(1)
  train_f, test_f = rng.standard_normal((50, 8)), rng.standard_normal((10, 8))
  train_y = rng.integers(0, 3, 50)
  a = knn_predict(train_f, train_y, test_f, num_classes=3, k=7)
  b = knn_predict(train_f * 10.0, train_y, test_f * 0.1, num_classes=3, k=7)
  np.testing.assert_array_equal(a, b)
