"""SwAV's swapped prediction with Sinkhorn-Knopp codes, its queue and its prototype freezing, as pure functions.

Transcribed from facebookresearch/swav ``main_swav.py`` (``train``, ``distributed_sinkhorn``, the ``--temperature
0.1 --epsilon 0.05 --sinkhorn_iterations 3 --crops_for_assign 0 1 --freeze_prototypes_niters 313`` defaults) and
``src/resnet50.py`` (projection head -> l2-normalise -> ``prototypes = nn.Linear(output_dim, nmb_prototypes,
bias=False)``). DINO's appendix (Tables 14-15) uses this Sinkhorn-Knopp as a teacher output operation.

Layout is batch-major: scores (B, V, K) for V crops (the official code concatenates the crops along the batch,
``output[bs * v: bs * (v + 1)]``), queues (A, L, D) for the A = len(crops_for_assign) assigned crops.

Reductions: Sinkhorn-Knopp sums over every sample of the global batch (and of the queue), as ``dist.all_reduce`` does
in the official code, so under a batch-sharded ``jax.jit`` the rows passed in are the global batch; the loss is a mean
over the batch (DDP averages the per-GPU means' gradients = the global mean's gradient), the crops and the assigned
crops. The queue is global here: the official code keeps one queue of ``queue_length // world_size`` rows per GPU, and
the union of those per-GPU FIFOs is, at every step, exactly the set of rows of one global FIFO of ``queue_length``
rows; Sinkhorn-Knopp is equivariant to the order of its samples and only the batch's codes are kept, so the codes are
identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from simdino_jax.losses.dino import sinkhorn_knopp

_HIGHEST = jax.lax.Precision.HIGHEST


def distributed_sinkhorn(
  scores: jax.Array, epsilon: float = 0.05, n_iters: int = 3, *, mask: jax.Array | None = None
) -> jax.Array:
  """SwAV's ``distributed_sinkhorn``: soft codes of the n samples (rows) over K prototypes, rows summing to 1.

  The official lines (main_swav.py):
      Q = torch.exp(out / args.epsilon).t()  # K-by-B
      B = Q.shape[1] * args.world_size; K = Q.shape[0]
      sum_Q = torch.sum(Q); dist.all_reduce(sum_Q); Q /= sum_Q
      for it in range(args.sinkhorn_iterations):
          sum_of_rows = torch.sum(Q, dim=1, keepdim=True); dist.all_reduce(sum_of_rows); Q /= sum_of_rows; Q /= K
          Q /= torch.sum(Q, dim=0, keepdim=True); Q /= B
      Q *= B; return Q.t()

  This is the same algorithm as DINOv2's Sinkhorn-Knopp teacher (``losses.dino.sinkhorn_knopp``, temperature =
  epsilon), which this calls: the per-prototype sums and the total run over all n rows (the all-reduces; the global
  batch under a batch-sharded jit), the per-sample normalisation over K. The official code runs in the scores' dtype
  (float32; no max shift: exp(1 / 0.05) = 4.9e8 fits, since scores are cosines of normalised features and
  prototypes); here float32 with a per-prototype max shift, which the first per-prototype normalisation cancels
  exactly, so logits outside [-1, 1] cannot overflow. Against a float64 transcription it agrees to ~1e-6.

  Args:
    scores: (n, K) prototype scores (no gradient). mask: optional (n,) bool; rows with False are left out (their
      codes are 0) and n counts the selected rows (used for a queue that is not full yet).

  Returns:
    (n, K) float32 codes, stop-gradient.
  """
  if scores.ndim != 2:
    raise ValueError(f"distributed_sinkhorn expects (n, K) scores, got {scores.shape}")
  return sinkhorn_knopp(scores, epsilon, n_iters, mask=mask)


def queue_scores(queue: jax.Array, prototypes: jax.Array) -> jax.Array:
  """Scores of the queued embeddings against the current prototypes: ``torch.mm(queue[i],
  model.module.prototypes.weight.t())`` for each assigned crop i. queue (A, L, D), prototypes (K, D) as the torch
  weight (a flax Dense kernel is its transpose). Returns (A, L, K) float32, stop-gradient."""
  q = jax.lax.stop_gradient(queue.astype(jnp.float32))
  w = jax.lax.stop_gradient(prototypes.astype(jnp.float32))
  return jnp.einsum("ald,kd->alk", q, w, precision=_HIGHEST)


def queue_in_use(queue: jax.Array) -> jax.Array:
  """Whether the queue enters Sinkhorn-Knopp: official ``use_the_queue or not torch.all(queue[i, -1, :] == 0)``, i.e.
  once its last row has been written (the queue is full; rows are l2-normalised embeddings, never all zero). Every
  assigned crop's queue fills at the same pace, so one flag for all. queue (A, L, D); returns a bool scalar."""
  return jnp.any(queue[:, -1, :] != 0)


def codes(
  scores: jax.Array,
  *,
  epsilon: float = 0.05,
  n_iters: int = 3,
  queue_scores: jax.Array | None = None,
  use_queue: jax.Array | bool = True,
) -> jax.Array:
  """Codes of one assigned crop, the queue's scores prepended before Sinkhorn-Knopp and only the batch's rows kept:

      out = torch.cat((torch.mm(queue[i], model.module.prototypes.weight.t()), out))   # when the queue is in use
      q = distributed_sinkhorn(out)[-bs:]

  scores (B, K); queue_scores (L, K) or None; use_queue a (traced) bool: when False the queue rows are masked out
  of Sinkhorn-Knopp (their count leaves n), which equals the official call without the concatenation.
  Returns (B, K) float32 codes, stop-gradient.
  """
  if queue_scores is None:
    return distributed_sinkhorn(scores, epsilon, n_iters)
  b, length = scores.shape[0], queue_scores.shape[0]
  rows = jnp.concatenate([queue_scores.astype(jnp.float32), scores.astype(jnp.float32)], axis=0)
  mask = jnp.concatenate([jnp.broadcast_to(jnp.asarray(use_queue, jnp.bool_), (length,)), jnp.ones((b,), jnp.bool_)])
  return distributed_sinkhorn(rows, epsilon, n_iters, mask=mask)[length:]


def swapped_prediction_loss(
  scores: jax.Array, assigned_codes: jax.Array, crops_for_assign: Sequence[int], *, temperature: float = 0.1
) -> jax.Array:
  """SwAV's loss: each assigned crop's codes predicted from every other crop's scores.

  The official lines (main_swav.py, train):
      for i, crop_id in enumerate(args.crops_for_assign):
          ...  q = distributed_sinkhorn(out)[-bs:]
          subloss = 0
          for v in np.delete(np.arange(np.sum(args.nmb_crops)), crop_id):
              x = output[bs * v: bs * (v + 1)] / args.temperature
              subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
          loss += subloss / (np.sum(args.nmb_crops) - 1)
      loss /= len(args.crops_for_assign)

  Reduces over K, the batch, the V - 1 other crops and the assigned crops.

  Args:
    scores: (B, V, K) prototype scores of all V crops (gradient flows), the crops in the official order.
    assigned_codes: (B, A, K) codes of the crops ``crops_for_assign`` (A of them, in that order). No gradient.
    crops_for_assign: crop indices whose codes are targets.
    temperature: the student softmax temperature.
  """
  b, v, k = scores.shape
  a = len(crops_for_assign)
  if assigned_codes.shape != (b, a, k) or v < 2 or any(not 0 <= c < v for c in crops_for_assign):
    raise ValueError(
      f"swapped_prediction_loss: scores {scores.shape}, codes {assigned_codes.shape} and crops_for_assign "
      f"{tuple(crops_for_assign)} do not fit"
    )
  q = jax.lax.stop_gradient(assigned_codes.astype(jnp.float32))
  logp = jax.nn.log_softmax(scores.astype(jnp.float32) / temperature, axis=-1)
  ce = -jnp.einsum("bak,bvk->av", q, logp, precision=_HIGHEST) / b  # (A, V): mean over the batch
  keep = jnp.ones((a, v), jnp.float32).at[jnp.arange(a), jnp.asarray(crops_for_assign)].set(0.0)
  return jnp.sum(ce * keep) / ((v - 1) * a)


def swav_loss(
  scores: jax.Array,
  *,
  crops_for_assign: Sequence[int] = (0, 1),
  temperature: float = 0.1,
  epsilon: float = 0.05,
  n_iters: int = 3,
  queue: jax.Array | None = None,
  prototypes: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The whole SwAV loss of one step: codes of each crop in ``crops_for_assign`` (with the queue's scores prepended
  when the queue is full), then ``swapped_prediction_loss``.

  Args:
    scores: (B, V, K) scores of the l2-normalised projections against the (normalised) prototypes.
    queue: optional (A, L, D) queue of past embeddings (before this step's ``update_queue``, as in the official
      loop, which reads the queue and then fills it). prototypes: (K, D), needed with a queue.

  Returns:
    (loss, metrics): "swav" (= loss), "queue_in_use" (0/1), "teacher_entropy" (mean entropy of the codes, the
    targets: as DINO's metric of its teacher's targets), "prototypes_used" (distinct argmax of the codes).
  """
  used = jnp.bool_(False)
  q_scores = None
  if queue is not None:
    if prototypes is None:
      raise ValueError("swav_loss: a queue needs the prototypes to score it")
    used = queue_in_use(queue)
    q_scores = queue_scores(queue, prototypes)
  assigned = []
  for i, crop in enumerate(crops_for_assign):
    qs = None if q_scores is None else q_scores[i]
    assigned.append(codes(scores[:, crop], epsilon=epsilon, n_iters=n_iters, queue_scores=qs, use_queue=used))
  assigned = jnp.stack(assigned, axis=1)  # (B, A, K)
  loss = swapped_prediction_loss(scores, assigned, crops_for_assign, temperature=temperature)
  k = scores.shape[-1]
  hit = jnp.zeros((k,), jnp.bool_).at[jnp.argmax(assigned, axis=-1).reshape(-1)].set(True)
  entropy = -jnp.sum(jnp.where(assigned > 0, assigned * jnp.log(jnp.where(assigned > 0, assigned, 1.0)), 0.0), -1)
  return loss, {
    "swav": loss,
    "queue_in_use": used.astype(jnp.float32),
    "teacher_entropy": jnp.mean(entropy),
    "prototypes_used": jnp.sum(hit).astype(jnp.float32),
  }


def effective_queue_length(queue_length: int, global_batch: int) -> int:
  """``args.queue_length -= args.queue_length % (args.batch_size * args.world_size)``: the official code silently
  shortens the queue to a multiple of the global batch (0 disables the queue)."""
  return queue_length - queue_length % global_batch


def update_queue(queue: jax.Array, embeddings: jax.Array, crops_for_assign: Sequence[int]) -> jax.Array:
  """The FIFO fill after the codes are computed (official, per assigned crop i):

      queue[i, bs:] = queue[i, :-bs].clone()
      queue[i, :bs] = embedding[crop_id * bs: (crop_id + 1) * bs]

  queue (A, L, D); embeddings (B, V, D) the detached, l2-normalised projections of this step (the global batch).
  Returns the new (A, L, D) queue, float32, stop-gradient (see the module docstring on per-GPU vs global queues).
  """
  a, length, _ = queue.shape
  b = embeddings.shape[0]
  if a != len(crops_for_assign) or length % b:
    raise ValueError(f"update_queue: queue {queue.shape} does not take whole batches of {embeddings.shape}")
  new = jnp.stack([embeddings[:, c] for c in crops_for_assign], axis=0).astype(jnp.float32)
  out = jnp.concatenate([new, queue.astype(jnp.float32)[:, : length - b]], axis=1)
  return jax.lax.stop_gradient(out)


def normalize_prototypes(prototypes: jax.Array, axis: int = -1) -> jax.Array:
  """The start of every iteration: ``w = nn.functional.normalize(w, dim=1, p=2)`` on the (K, D) torch weight, i.e.
  each prototype to unit norm (eps 1e-12); ``axis`` is the feature axis (0 for a flax (D, K) kernel)."""
  w = prototypes.astype(jnp.float32)
  return w / jnp.maximum(jnp.sqrt(jnp.sum(w * w, axis=axis, keepdims=True)), 1e-12)


def freeze_prototypes(tree, step: jax.Array | int, freeze_iters: int = 313, name: str = "prototypes"):
  """Zero the leaves whose path contains ``name`` while step < freeze_iters (a pytree of gradients or updates).

  Official: ``if iteration < args.freeze_prototypes_niters: for name, p in model.named_parameters(): if
  "prototypes" in name: p.grad = None``. A ``None`` gradient makes torch's SGD (wrapped by LARC) skip the parameter:
  no weight decay (1e-6) and no momentum update either. Zeroing the gradients is therefore exact only for an
  optimizer without weight decay or momentum; the trainer must apply this to the final optax updates and leave those
  parameters' optimizer state untouched (e.g. optax.masked) to be exact. ``step`` may be traced.
  """
  frozen = jnp.asarray(step) < freeze_iters

  def leaf(path, x):
    if name in jax.tree_util.keystr(path):
      return jnp.where(frozen, jnp.zeros_like(x), x)
    return x

  return jax.tree_util.tree_map_with_path(leaf, tree)
