"""MoCo-v2's contrastive loss and its queue of negatives, as pure functions (DINO appendix, Tables 14-15: "INCE").

Transcribed from facebookresearch/moco ``moco/builder.py`` (commit a419ef2), ``MoCo.forward`` and
``MoCo._dequeue_and_enqueue``; ``main_moco.py`` applies ``nn.CrossEntropyLoss()`` to the returned logits and labels.

Layout: the official queue is a (dim, K) buffer of l2-normalised keys (``self.queue[:, ptr:ptr + batch_size] =
keys.T``); here it is kept as its transpose (K, dim), one key per row, so that every array has its sample axis first.
A state dict exchange with the official code transposes it.

Reductions: the loss is a mean over the whole batch passed in and the queue update writes the whole batch of keys.
Under a batch-sharded ``jax.jit`` both are therefore the global quantities of the official DDP code: DDP averages the
per-GPU mean cross-entropies' gradients (= the gradient of the global mean, every GPU holding the same number of
rows) and ``concat_all_gather(keys)`` enqueues every GPU's keys, in device order, which is the global batch order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from simdino_jax.errors import require

_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``torch.nn.functional.normalize(x, dim=-1)``: x / max(||x||, eps), float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), eps)


def info_nce_loss(
  queries: jax.Array, keys: jax.Array, queue: jax.Array, *, temperature: float = 0.2
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MoCo's InfoNCE: cross-entropy of [l_pos, l_neg] / T against label 0 (the positive key), mean over the batch.

  The official lines (builder.py, forward):
      q = nn.functional.normalize(q, dim=1)                       # queries: NxC
      k = nn.functional.normalize(k, dim=1)                       # keys: NxC (no gradient)
      l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)      # Nx1
      l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])  # NxK
      logits = torch.cat([l_pos, l_neg], dim=1); logits /= self.T; labels = zeros(N)
  and main_moco.py: ``loss = nn.CrossEntropyLoss()(output, target)`` (mean over the N rows).

  MoCo-v2's recipe uses T = 0.2 (``--moco-t 0.2``; builder.py's default is v1's 0.07). Queries and keys are
  normalised here (pass raw head outputs); the queue holds already-normalised keys. Keys and queue get no gradient.
  Reduces over the feature axis, the 1 + K candidates and the batch.

  Args:
    queries: (N, C) query-encoder outputs (gradient flows).
    keys: (N, C) momentum-encoder outputs of the other view, row n the positive of query n.
    queue: (K, C) negatives (the official (C, K) buffer transposed).
    temperature: T.

  Returns:
    (loss, metrics): "info_nce" (= loss), "top1" (fraction of rows whose positive logit is the largest, the
    ``acc1`` main_moco.py logs), "pos_logit" / "neg_logit" (mean cosine of the positive pairs / of the negatives).
  """
  if queries.ndim != 2 or keys.shape != queries.shape or queue.ndim != 2 or queue.shape[1] != queries.shape[1]:
    raise ValueError(
      f"info_nce_loss expects queries and keys (N, C) and a queue (K, C), got {queries.shape}, {keys.shape} and "
      f"{queue.shape}"
    )
  q = l2_normalize(queries)
  k = jax.lax.stop_gradient(l2_normalize(keys))
  negatives = jax.lax.stop_gradient(queue.astype(jnp.float32))
  l_pos = jnp.sum(q * k, axis=-1, keepdims=True)  # (N, 1)
  l_neg = jnp.matmul(q, negatives.T, precision=_HIGHEST)  # (N, K)
  logits = jnp.concatenate([l_pos, l_neg], axis=1) / temperature
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(log_probs[:, 0])
  metrics = {
    "info_nce": loss,
    "top1": jnp.mean((jnp.argmax(logits, axis=-1) == 0).astype(jnp.float32)),
    "pos_logit": jnp.mean(l_pos),
    "neg_logit": jnp.mean(l_neg),
  }
  return loss, metrics


def check_queue_size(queue_size: int, global_batch: int, field: str = "moco.queue_size") -> None:
  """The official ``assert self.K % batch_size == 0`` (batch_size = the gathered, global batch), as a ConfigError
  naming ``config.<field>``: with it the pointer always lands on a multiple of the batch and a write never wraps."""
  require(queue_size > 0, field, f"must be positive, got {queue_size}")
  require(
    global_batch > 0 and queue_size % global_batch == 0,
    field,
    f"must be a multiple of the global batch size {global_batch} (MoCo writes whole batches of keys), got {queue_size}",
  )


def dequeue_and_enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """MoCo's queue update: the batch's keys replace rows [ptr, ptr + N) and the pointer advances by N modulo K.

  The official lines (builder.py, _dequeue_and_enqueue):
      keys = concat_all_gather(keys); batch_size = keys.shape[0]; ptr = int(self.queue_ptr)
      assert self.K % batch_size == 0  # for simplicity
      self.queue[:, ptr : ptr + batch_size] = keys.T
      ptr = (ptr + batch_size) % self.K

  ``keys`` are the whole (global) batch of normalised keys (call ``l2_normalize`` first, as forward does before it
  enqueues); the caller checks K % N == 0 once with ``check_queue_size`` (a traced ``ptr`` cannot be asserted on).
  No gradient. Returns (new queue (K, C) float32, new ptr int32 scalar).
  """
  k_size, n = queue.shape[0], keys.shape[0]
  if keys.ndim != 2 or keys.shape[1] != queue.shape[1] or k_size % n:
    raise ValueError(f"dequeue_and_enqueue: keys {keys.shape} do not fit whole into the queue {queue.shape}")
  ptr = jnp.asarray(ptr, jnp.int32)
  new = jax.lax.dynamic_update_slice(
    jax.lax.stop_gradient(queue.astype(jnp.float32)),
    jax.lax.stop_gradient(keys.astype(jnp.float32)),
    (ptr, jnp.zeros((), jnp.int32)),
  )
  return new, (ptr + n) % k_size
