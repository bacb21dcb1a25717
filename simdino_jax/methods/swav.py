"""SwAV (Caron et al., NeurIPS 2020; facebookresearch/swav ``main_swav.py``): swapped prediction of Sinkhorn-Knopp
codes, with unit-norm prototypes, a queue and prototype freezing, as a method of the shared trainer.

What each official piece becomes here:

  * head (``src/resnet50.py``): Linear(D -> ``head.hidden_dim``) -> BN (``head.use_bn``) -> ReLU -> Linear(->
    ``head.out_dim``) -> l2-normalise -> scores against ``head.num_prototypes`` prototypes without bias
    (``models.heads.SwAVHead``; every official script uses this 2-layer head, ``head.num_layers`` is not read).
  * prototype normalisation at the start of every iteration: unit-norm prototypes at init and
    normalize(w + update) after every update (``optim.project_unit_norm``, last in the optax chain; its docstring
    shows that every forward and every optimiser step see the same weights as the official loop).
  * ``freeze_prototypes_niters``: ``p.grad = None`` for the prototypes during the first iterations. PyTorch's SGD
    (and LARC) then skip them entirely: no update, no weight decay, no momentum. Here the prototypes are a freeze of
    ``optim.make_optimizer`` under ``optim.freeze_mode="drop_grads"`` (required): AdamW's moments and an SGD/LARS
    momentum buffer stay untouched and output 0, the final freeze zeroes the update, decay included.
  * codes: ``distributed_sinkhorn`` (epsilon, iterations) over the global batch, on the scores of the crops
    ``swav.crops_for_assign`` (with the queue's scores prepended once the queue is full); the loss: each assigned
    crop's codes predicted from every other crop's scores at ``swav.temperature`` (``losses/swav.py``).
  * queue: ``swav.queue_length`` rows per assigned crop in the loss state (one global FIFO: the union of the official
    per-GPU queues, see losses/swav.py), filled from step round(``queue_start_epoch`` x steps per epoch) on (the
    official creates it at ``epoch_queue_starts``), in use once full.
  * no momentum teacher: the codes come from the student's own scores of this step, without gradient, exactly as
    the official (same forward, same drop path, same BN batch statistics). ``Method.momentum_teacher`` is False, so
    the state's teacher is the current student at every step (momentum 0, whatever ``config.teacher`` says; the
    recipes set ``teacher.self_distillation=False`` to say so) and the evaluators, which read the teacher, see the
    trained network. The step runs no teacher forward (``make_train_step``'s ``teacher_is_student``: this loss gets
    ``teacher=None``), and the teacher's BN running statistics are the student's, updated by its forward on the
    global then the local crops, as the official single model's (which its evaluation reads).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from simdino_jax.errors import require
from simdino_jax.losses import swav as sl
from simdino_jax.methods.base import Method
from simdino_jax.models.heads import SwAVHead
from simdino_jax.models.network import compute_dtype
from simdino_jax.tree import map_with_name

PROTOTYPES = "head/prototypes"  # the prototype leaf's name in the network's state


def swav_head(config, in_dim: int, rngs: nnx.Rngs) -> nnx.Module:
  h = config.head
  return SwAVHead(
    in_dim,
    hidden_dim=h.hidden_dim,
    out_dim=h.out_dim,
    num_prototypes=h.num_prototypes,
    use_bn=h.use_bn,
    dtype=compute_dtype(config.model.dtype),
    rngs=rngs,
  )


def _prototype_mask(params):
  return map_with_name(lambda name, _: name == PROTOTYPES, params)


def prototype_freezes(config, params, steps_per_epoch: int) -> tuple:
  """The prototypes held for the first ``swav.freeze_prototypes_iters`` updates (iterations, not epochs)."""
  del steps_per_epoch
  iters = config.swav.freeze_prototypes_iters
  return ((_prototype_mask(params), iters),) if iters > 0 else ()


def prototype_unit_norm(config, params) -> tuple:
  """The prototypes (K, D) kept unit-norm along D (each prototype a unit vector) after every update."""
  del config
  return ((_prototype_mask(params), -1),)


def queue_length(config) -> int:
  return config.swav.queue_length


def queue_start_step(config, steps_per_epoch: int) -> int:
  return int(round(config.swav.queue_start_epoch * steps_per_epoch))


def make_swav_loss(config, steps_per_epoch: int):
  s = config.swav
  crops = tuple(int(c) for c in s.crops_for_assign)
  start = queue_start_step(config, steps_per_epoch)

  def loss(student, teacher, loss_state, step):
    del teacher  # codes from the student's own scores (no momentum encoder)
    out = student["cls"]
    queue = loss_state.get("queue")
    value, metrics = sl.swav_loss(
      out["logits"],
      crops_for_assign=crops,
      temperature=s.temperature,
      epsilon=s.epsilon,
      n_iters=s.sinkhorn_iterations,
      queue=queue,
      prototypes=jax.lax.stop_gradient(out["prototypes"]),
    )
    new_state = dict(loss_state)
    if queue is not None:  # read above, then filled with this step's embeddings, as the official loop
      filled = sl.update_queue(queue, jax.lax.stop_gradient(out["z"]), crops)
      new_state["queue"] = jnp.where(step >= start, filled, queue)
    return value, metrics, new_state

  return loss


def swav_state(config) -> dict:
  """The queue (A, L, out_dim) of A = len(crops_for_assign) assigned crops, zeros; {} without a queue."""
  if queue_length(config) <= 0:
    return {}
  a = len(config.swav.crops_for_assign)
  return {"queue": jnp.zeros((a, queue_length(config), config.head.out_dim), jnp.float32)}


def validate(config, *, num_devices: int) -> None:
  del num_devices
  s, h, d = config.swav, config.head, config.data
  views = d.num_global + d.num_local
  require(h.num_prototypes > 0, "head.num_prototypes", f"must be positive, got {h.num_prototypes}")
  require(s.temperature > 0, "swav.temperature", f"must be positive, got {s.temperature}")
  require(s.epsilon > 0, "swav.epsilon", f"must be positive, got {s.epsilon}")
  require(
    isinstance(s.sinkhorn_iterations, int) and s.sinkhorn_iterations >= 1,
    "swav.sinkhorn_iterations",
    f"must be an integer >= 1, got {s.sinkhorn_iterations!r}",
  )
  crops = tuple(s.crops_for_assign)
  require(
    len(crops) >= 1
    and len(set(crops)) == len(crops)
    and all(isinstance(c, int) and 0 <= c < views for c in crops)
    and views >= 2,
    "swav.crops_for_assign",
    f"need distinct crop indices in [0, {views}) (num_global + num_local = {views} crops, at least 2), got {crops}",
  )
  length = s.queue_length
  require(
    isinstance(length, int) and length >= 0 and length % config.batch_size == 0,
    "swav.queue_length",
    f"must be 0 or a multiple of batch_size={config.batch_size}, got {length!r} (the official code silently "
    f"shortens it to {sl.effective_queue_length(length, config.batch_size) if isinstance(length, int) else 0})",
  )
  require(s.queue_start_epoch >= 0, "swav.queue_start_epoch", f"must be >= 0, got {s.queue_start_epoch}")
  require(
    isinstance(s.freeze_prototypes_iters, int) and s.freeze_prototypes_iters >= 0,
    "swav.freeze_prototypes_iters",
    f"must be an integer >= 0, got {s.freeze_prototypes_iters!r}",
  )
  require(
    config.optim.get("freeze_mode", "drop_grads") == "drop_grads",
    "optim.freeze_mode",
    "swav's frozen prototypes get no gradient at all (the official p.grad = None): use 'drop_grads'",
  )


SWAV = Method(
  "swav",
  build_head=swav_head,
  make_loss=make_swav_loss,
  init_loss_state=swav_state,
  validate=validate,
  prototypes=True,
  optimizer_freezes=prototype_freezes,
  optimizer_unit_norm=prototype_unit_norm,
  momentum_teacher=False,
  progress_keys=("swav", "queue_in_use", "teacher_entropy", "prototypes_used"),
)

METHODS = (SWAV,)
