"""The pure train step (student + teacher update) and the feature-extraction step.

``make_train_step`` returns ``train_step(state, batch) -> (state, metrics)``; the trainer jits it once with
explicit shardings and donates the state. Batch arrays are batch-major, (B, views, H, W, 3), and stay so:
views are folded into the batch axis with a reshape that keeps the batch axis outermost, so a data-sharded
batch never needs an all-gather (PITFALLS.md).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from simdino_jax.state import TrainState


def _fold_views(x: jax.Array) -> jax.Array:
  """(B, V, ...) -> (B*V, ...), image-major (row b*V + v), keeping the sharded batch axis outermost."""
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _unfold_views(x: jax.Array, batch: int) -> jax.Array:
  return x.reshape((batch, x.shape[0] // batch) + x.shape[1:])


def forward(network, batch: dict, *, key: jax.Array | None, student: bool,
            masks: jax.Array | None = None) -> dict:
  """Backbone + head on the crops of a batch; returns {"cls": (B, views, d)} in global-then-local view order.

  The teacher (student=False) sees only the global crops; the student also the local crops. Each resolution
  is one backbone call (two static shapes: one compilation).
  """
  glob = batch["global"]
  b, mg = glob.shape[:2]
  key_g = key_l = None
  if key is not None:
    key_g, key_l = jax.random.split(key)
  flat_masks = None if masks is None else _fold_views(masks)
  cls = [_unfold_views(network.backbone(_fold_views(glob), masks=flat_masks, key=key_g)["cls"], b)]
  if student and batch["local"].shape[1] > 0:
    cls.append(_unfold_views(network.backbone(_fold_views(batch["local"]), key=key_l)["cls"], b))
  cls = jnp.concatenate(cls, axis=1) if len(cls) > 1 else cls[0]
  return {"cls": network.head(cls)}


def global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def make_train_step(graphdef: nnx.GraphDef, loss_fn: Callable, tx: optax.GradientTransformation, *,
                    lr_fn: Callable, wd_fn: Callable, momentum_fn: Callable) -> Callable:
  """Build the pure step.

  Args:
    graphdef: the network's static structure (student and teacher share it).
    loss_fn: the method's loss(student_out, teacher_out, loss_state, step) -> (loss, metrics, loss_state).
    tx: the student's optax transformation.
    lr_fn, wd_fn: schedules, only evaluated for logging (tx carries its own copies).
    momentum_fn: teacher EMA momentum m(step); teacher <- m teacher + (1 - m) student after the update.
  """

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.rng, state.step)

    teacher_net = nnx.merge(graphdef, state.teacher)
    teacher_out = jax.lax.stop_gradient(forward(teacher_net, batch, key=None, student=False))

    def objective(params):
      student_net = nnx.merge(graphdef, params)
      student_out = forward(student_net, batch, key=key, student=True, masks=batch.get("mask"))
      loss, metrics, loss_state = loss_fn(student_out, teacher_out, state.loss_state, state.step)
      return loss, (metrics, loss_state)

    (loss, (metrics, loss_state)), grads = jax.value_and_grad(objective, has_aux=True)(state.student)
    updates, opt_state = tx.update(grads, state.opt_state, state.student)
    student = optax.apply_updates(state.student, updates)
    momentum = momentum_fn(state.step)
    teacher = optax.incremental_update(student, state.teacher, step_size=1.0 - momentum)

    new_state = state.replace(step=state.step + 1, student=student, teacher=teacher, opt_state=opt_state,
                              loss_state=loss_state)
    # A non-finite loss leaves the state untouched (the trainer stops and names the step), so the last
    # checkpointable state is the last good one.
    finite = jnp.isfinite(loss)
    new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = dict(metrics, loss=loss, lr=lr_fn(state.step), wd=wd_fn(state.step), momentum=momentum,
                   grad_norm=global_norm(grads))
    return new_state, metrics

  return train_step


def make_feature_fn(graphdef: nnx.GraphDef) -> Callable:
  """(params, images (B, H, W, 3)) -> backbone cls features (B, D) float32, deterministic (no drop path)."""

  def features(params, images):
    net = nnx.merge(graphdef, params)
    return net.backbone(images, key=None)["cls"].astype(jnp.float32)

  return features
