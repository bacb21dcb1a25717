"""Linear probe on frozen features (DINO's eval_linear, with the learning-rate sweep run as one program).

Features (``runner.make_feature_fn``, spec ("linear", n, avgpool)): the cls tokens of the last ``n_last_blocks`` blocks, each after the final
LayerNorm, concatenated (oldest block first), optionally followed by the average of the last block's patch tokens
(registers excluded). DINO v1 interleaves [cls, avgpool] element-wise; we concatenate as DINOv2 does (the same
information, a permuted layout). They are extracted once per split, without augmentation (DINO trains the probe on
RandomResizedCrop + flip views; frozen features make the sweep cheap instead, as DINOv2's linear eval does).

Preprocessing (our choice, documented): every feature dimension is standardised with the training set's mean and
standard deviation, so one lr grid suits every backbone width and feature scale.

Classifier: a linear layer (weights N(0, 0.01), bias 0, as DINO) trained with cross-entropy by SGD with momentum
0.9 (PyTorch's form: buf = 0.9 buf + g; w -= lr_t buf), no weight decay, lr_t cosine from lr to 0 over all steps
(DINO anneals per epoch; we anneal per step), mini-batches of a fresh permutation of the training set each epoch
(the last batch of an epoch is padded and its padding carries weight 0, so every example is seen once per epoch).
The lrs are used as given (DINO scales its lr by batch/256; sweep instead). All lrs train in ONE jitted program:
``jax.vmap`` over the lrs around a ``lax.scan`` over epochs and steps; the batches are shared by every lr.

Reported: the test accuracy of every lr and the best one with its lr. DINO reports the best accuracy on its
validation set, which is the ImageNet val set it also calls test; with no separate validation split this is the
test accuracy of the best lr, i.e. the same protocol (and the same optimism).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

_HIGHEST = jax.lax.Precision.HIGHEST


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both splits standardised per dimension with the training split's mean and std (a constant dim stays 0)."""
  train, test = np.asarray(train, np.float32), np.asarray(test, np.float32)
  # float64 statistics accumulated over row chunks: no float64 copy of a large (ImageNet-size) feature matrix.
  chunks = range(0, len(train), 65536)
  mean = sum(train[i : i + 65536].sum(0, dtype=np.float64) for i in chunks) / len(train)
  var = sum(((train[i : i + 65536] - mean) ** 2).sum(0) for i in chunks) / len(train)
  std = np.where(np.sqrt(var) > 1e-8, np.sqrt(var), 1.0)
  mean32, inv32 = mean.astype(np.float32), (1.0 / std).astype(np.float32)
  return (train - mean32) * inv32, (test - mean32) * inv32


def steps_per_epoch(num_train: int, batch_size: int) -> int:
  return math.ceil(num_train / batch_size)


def epoch_batches(key: jax.Array, epoch, num_train: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """(indices, weights), each (steps_per_epoch, batch_size): a permutation of the training set for ``epoch`` cut
  into batches; the slots past the end of the last batch hold index 0 with weight 0."""
  s = steps_per_epoch(num_train, batch_size)
  perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_train)
  pad = s * batch_size - num_train
  idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]).reshape(s, batch_size)
  w = jnp.concatenate([jnp.ones((num_train,), jnp.float32), jnp.zeros((pad,), jnp.float32)]).reshape(s, batch_size)
  return idx, w


def init_params(key: jax.Array, dim: int, num_classes: int) -> dict:
  """DINO's LinearClassifier init: weight N(0, 0.01), bias 0 (the same start for every lr of the sweep)."""
  return {
    "w": 0.01 * jax.random.normal(key, (dim, num_classes), jnp.float32),
    "b": jnp.zeros((num_classes,), jnp.float32),
  }


def _loss(params, x, y, w):
  logits = jnp.matmul(x, params["w"], precision=_HIGHEST) + params["b"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(ce * w) / jnp.sum(w)


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size", "momentum"))
def train_sweep(
  train_x, train_y, lrs, key, *, num_classes: int, epochs: int, batch_size: int, momentum: float = 0.9
) -> dict:
  """Linear classifiers trained for every lr of ``lrs`` (L,) at once: {"w": (L, D, C), "b": (L, C)}.

  ``key`` drives the init (split 0) and the batch order (split 1, see ``epoch_batches``)."""
  n, d = train_x.shape
  s = steps_per_epoch(n, batch_size)
  total = epochs * s
  init_key, order_key = jax.random.split(key)
  params0 = init_params(init_key, d, num_classes)

  def train_one(lr):
    # optax.sgd = trace(momentum) then scale by -lr_t: PyTorch's SGD with momentum and dampening 0.
    tx = optax.sgd(optax.cosine_decay_schedule(lr, total), momentum=momentum)

    def step(carry, batch):
      params, opt_state = carry
      idx, w = batch
      grads = jax.grad(_loss)(params, train_x[idx], train_y[idx], w)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    def epoch(carry, e):
      idx, w = epoch_batches(order_key, e, n, batch_size)
      return jax.lax.scan(step, carry, (idx, w))[0], None

    (params, _), _ = jax.lax.scan(epoch, (params0, tx.init(params0)), jnp.arange(epochs))
    return params

  return jax.vmap(train_one)(jnp.asarray(lrs, jnp.float32))


@functools.partial(jax.jit, static_argnames=("chunk",))
def _hits(params, x, y, chunk: int):
  """(L, 2) counts of top-1 / top-5 hits per lr; test rows in chunks (lax.map) to bound the (L, n, C) logits."""
  n = x.shape[0]
  pad = (-n) % chunk
  xs = jnp.concatenate([x, jnp.zeros((pad, x.shape[1]), x.dtype)]).reshape(-1, chunk, x.shape[1])
  ys = jnp.concatenate([y, jnp.full((pad,), -1, y.dtype)]).reshape(-1, chunk)
  num_classes = params["b"].shape[-1]

  def one(batch):
    xb, yb = batch
    logits = jnp.einsum("nd,ldc->lnc", xb, params["w"], precision=_HIGHEST) + params["b"][:, None]
    top1 = jnp.argmax(logits, -1) == yb
    _, top5_idx = jax.lax.top_k(logits, min(5, num_classes))
    top5 = jnp.any(top5_idx == yb[None, :, None], -1)
    return jnp.stack([jnp.sum(top1, -1), jnp.sum(top5, -1)], -1)  # padding rows (label -1) never hit

  return jnp.sum(jax.lax.map(one, (xs, ys)), axis=0)


def accuracies(params: dict, test_x, test_y, *, chunk: int = 4096) -> np.ndarray:
  """(L, 2) top-1 / top-5 accuracy in percent of each classifier of the sweep on (test_x, test_y)."""
  test_x = jnp.asarray(test_x, jnp.float32)
  chunk = max(1, min(chunk, test_x.shape[0]))
  hits = np.asarray(_hits(params, test_x, jnp.asarray(test_y, jnp.int32), chunk), np.float64)
  return 100.0 * hits / test_x.shape[0]


def linear_probe(
  train_x,
  train_y,
  test_x,
  test_y,
  *,
  num_classes: int,
  lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
  epochs: int = 100,
  batch_size: int = 256,
  seed: int = 0,
) -> dict:
  """Sweep of linear classifiers on frozen features; summary with the best lr's test accuracy (see module doc).

  Returns {"accuracy" (best top-1, percent), "top5" (of that lr), "lr" (the best), "per_lr": {lr: {"top1", "top5"}},
  "epochs", "batch_size", "num_train", "num_test", "feature_dim"}.
  """
  lrs = tuple(float(lr) for lr in lrs)
  if not lrs or min(lrs) <= 0:
    raise ValueError(f"lrs must be a non-empty list of positive learning rates, got {lrs}")
  train_x, test_x = standardize(train_x, test_x)
  train_y, test_y = np.asarray(train_y, np.int32), np.asarray(test_y, np.int32)
  if len(train_y) == 0 or len(test_y) == 0:
    raise ValueError(f"the linear probe needs training and test examples, got {len(train_y)} and {len(test_y)}")
  batch_size = min(batch_size, len(train_y))
  params = train_sweep(
    jnp.asarray(train_x),
    jnp.asarray(train_y),
    jnp.asarray(lrs, jnp.float32),
    jax.random.key(seed),
    num_classes=num_classes,
    epochs=epochs,
    batch_size=batch_size,
  )
  acc = accuracies(params, test_x, test_y)
  best = int(np.argmax(acc[:, 0]))  # the first of equal accuracies: the smallest such lr
  return {
    "accuracy": float(acc[best, 0]),
    "top5": float(acc[best, 1]),
    "lr": lrs[best],
    "per_lr": {f"{lr:g}": {"top1": float(a[0]), "top5": float(a[1])} for lr, a in zip(lrs, acc)},
    "epochs": epochs,
    "batch_size": batch_size,
    "num_train": int(len(train_y)),
    "num_test": int(len(test_y)),
    "feature_dim": int(train_x.shape[1]),
  }
