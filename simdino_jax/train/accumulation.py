"""Gradient accumulation inside the jitted step: a batch of B as K micro-batches of B/K, ONE optimizer update and ONE
teacher EMA update per step (``config.accumulation_steps`` K > 1; K = 1 is ``step.make_train_step`` itself).

Why inside the step: the papers' batches (512 to 1024 images of 2 x 224 + 10 x 96 crops) do not fit one GPU's memory,
and a ``lax.scan`` over the micro-batches keeps one micro-batch's activations alive at a time while the program, the
optimizer and the EMA stay the step's own (one compilation, one donated state, the non-finite rollback unchanged).

Slicing is batch-major per data shard: the batch (B, ...) sharded over G devices is viewed as (G, K, B/(GK), ...) and
micro-batch k is every device's k-th piece, so no row ever moves between devices (docs/distributed.md#batch-major-
layout); ``split_micro`` / ``merge_micro`` go between the two layouts, ``merge_micro`` restores the batch's row order.

Two modes for the terms that reduce over the batch (``config.accumulation_mode``; docs/training.md#gradient-
accumulation):
  "micro": the method's loss on each micro-batch alone (the coding rate's covariance, DINO's softmax / Sinkhorn-Knopp
    statistics, KoLeo: per micro-batch), the gradients AVERAGED: a K-device data-parallel run whose batch statistics
    are per device (SimDINO ``loss.groups`` = K: the official ``reduce_cov=0`` when B/K is the per-GPU batch). The
    loss state (DINO's centres) is the mean of the K micro-batch updates, each from the step's old state: for DINO's
    cls centre m c + (1 - m) mean_k(mean of micro-batch k) = the update from the whole batch's teacher outputs, once
    per step as the official code does; for a masked (iBOT) patch centre it is the mean of the micro-batches' masked
    means. BatchNorm layers normalise with each micro-batch's statistics and update their running statistics once
    per micro-batch, in order (what PyTorch's accumulation loop does).
  "exact": the loss of the whole batch of B, to float tolerance, whatever reduces over the batch. Two passes:
    pass 1 runs teacher and student on every micro-batch without gradient and keeps the (small) head outputs;
    pass 2, per micro-batch k, recomputes k's student outputs WITH gradient, puts them in place of k's stored rows,
    and differentiates the method's loss on all B rows. Every loss here is a function of the per-row outputs
    (a covariance is a sum over rows), so dL/dparams = sum_k dL/d(rows of k) d(rows of k)/dparams: the K gradients are
    SUMMED, and the loss state comes from the loss on the whole batch. Costs one more student forward (about 4/3 of
    the student's compute), the stored outputs (B x views x head width) and K evaluations of the loss on B rows.
    It needs per-row network outputs: no BatchNorm (config.py refuses other combinations).
Drop path draws its masks per micro-batch (key fold_in(step key, k); the two exact passes draw the same ones), so with
drop path > 0 the masks differ from the one-batch step's in value, not in distribution.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from simdino_jax.train.state import TrainState
from simdino_jax.train.step import (
  _AUGMENT_STREAM,
  apply_update,
  forward,
  masked_gather,
  network_stats,
  split_params,
)

MODES = ("micro", "exact")


def split_micro(x: jax.Array, steps: int, groups: int = 1) -> jax.Array:
  """(B, ...) -> (K, B/K, ...): micro-batch k holds each of the ``groups`` batch shards' k-th piece, shard-major."""
  b = x.shape[0]
  if b % (groups * steps):
    raise ValueError(f"split_micro: batch {b} does not split into {groups} shards x {steps} micro-batches")
  per = b // (groups * steps)
  x = jnp.swapaxes(x.reshape((groups, steps, per) + x.shape[1:]), 0, 1)  # (K, G, per, ...): shard axis kept
  return x.reshape((steps, groups * per) + x.shape[3:])


def merge_micro(x: jax.Array, groups: int = 1) -> jax.Array:
  """The inverse of ``split_micro``: (K, B/K, ...) -> (B, ...) in the batch's own row order."""
  steps, rows = x.shape[:2]
  per = rows // groups
  x = jnp.swapaxes(x.reshape((steps, groups, per) + x.shape[2:]), 0, 1)  # (G, K, per, ...)
  return x.reshape((groups * steps * per,) + x.shape[3:])


def make_accumulated_train_step(
  graphdef: nnx.GraphDef,
  loss_fn: Callable,
  tx: optax.GradientTransformation,
  *,
  steps: int,
  mode: str,
  lr_fn: Callable,
  wd_fn: Callable,
  momentum_fn: Callable,
  mask_positions: int = 0,
  mask_groups: int = 1,
  mask_tokens: int | None = None,
  augment: Callable | None = None,
  cast_params: Callable | None = None,
  view_calls: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
) -> Callable:
  """``step.make_train_step``'s step over ``steps`` (K >= 2) micro-batches in ``mode`` ("micro" / "exact").

  The arguments are ``make_train_step``'s; ``mask_groups`` (G, the batch's data-parallel shards) is also the shard
  count of the micro-batch slicing, and ``mask_tokens`` bounds one shard's masked tokens in ONE micro-batch.
  """
  if steps < 2:
    raise ValueError(f"make_accumulated_train_step: steps must be >= 2 (1 is make_train_step), got {steps}")
  if mode not in MODES:
    raise ValueError(f"make_accumulated_train_step: mode must be one of {MODES}, got {mode!r}")
  cast = cast_params if cast_params is not None else (lambda which, params: params)
  groups = mask_groups
  student_views, teacher_views = (None, None) if view_calls is None else view_calls

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.rng, state.step)
    if augment is not None:  # on the whole batch, as the one-batch step does
      batch = augment(jax.random.fold_in(key, _AUGMENT_STREAM), batch)
    micro = jax.tree_util.tree_map(lambda x: split_micro(x, steps, groups), batch)
    student_params, student_stats = split_params(state.student)
    teacher_params, teacher_stats = split_params(state.teacher)
    index = jnp.arange(steps, dtype=jnp.int32)

    def gather_of(mb):
      if not mask_positions:
        return None, None
      return mb["mask"], masked_gather(mb["mask"], mask_positions, groups, mask_tokens)

    def teacher_forward(stats, mb):
      _, gather = gather_of(mb)
      net = nnx.merge(graphdef, cast("teacher", nnx.merge_state(teacher_params, stats)), copy=True)
      out = jax.lax.stop_gradient(forward(net, mb, key=None, student=False, gather=gather, views=teacher_views))
      return jax.lax.stop_gradient(network_stats(net, stats)), out

    def student_forward(params, stats, mb, k):
      masks, gather = gather_of(mb)
      net = nnx.merge(graphdef, cast("student", nnx.merge_state(params, stats)), copy=True)
      out = forward(
        net, mb, key=jax.random.fold_in(key, k), student=True, masks=masks, gather=gather, views=student_views
      )
      if mask_positions:
        out["patch_mask"] = gather.valid
      return out, network_stats(net, stats)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, student_params)
    add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)  # noqa: E731
    mean0 = lambda tree: jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), tree)  # noqa: E731

    if mode == "micro":

      def micro_step(carry, xs):
        grads, s_stats, t_stats = carry
        mb, k = xs
        t_stats, teacher_out = teacher_forward(t_stats, mb)

        def objective(params):
          student_out, new_stats = student_forward(params, s_stats, mb, k)
          loss, metrics, loss_state = loss_fn(student_out, teacher_out, state.loss_state, state.step)
          return loss, (metrics, loss_state, new_stats)

        (loss, (metrics, loss_state, s_stats)), g = jax.value_and_grad(objective, has_aux=True)(student_params)
        carry = (add(grads, g), jax.lax.stop_gradient(s_stats), t_stats)
        return carry, (loss, metrics, loss_state, teacher_out["backbone_cls"][:, 0])

      (grads, new_student_stats, teacher_stats), (losses, metrics, loss_states, monitor) = jax.lax.scan(
        micro_step, (zeros, student_stats, teacher_stats), (micro, index)
      )
      # The mean of the K micro-batch gradients: each micro-batch's loss is already a mean over its rows.
      grads = jax.tree_util.tree_map(lambda g: g / steps, grads)
      # Each micro-batch's loss-state update starts from the step's old state; their mean (floating leaves) is the
      # one update per step (module docstring); other leaves (counters) from the last micro-batch.
      loss_state = jax.tree_util.tree_map(
        lambda x: jnp.mean(x, axis=0) if jnp.issubdtype(x.dtype, jnp.floating) else x[-1], loss_states
      )
    else:

      def first_pass(_, xs):  # no gradient: the teacher's and the student's outputs of every micro-batch
        mb, k = xs
        _, teacher_out = teacher_forward(teacher_stats, mb)
        student_out, _ = student_forward(student_params, student_stats, mb, k)
        return None, (teacher_out, jax.lax.stop_gradient(student_out))

      _, (teacher_outs, student_outs) = jax.lax.scan(first_pass, None, (micro, index))
      teacher_full = jax.tree_util.tree_map(lambda x: merge_micro(x, groups), teacher_outs)

      def second_pass(grads, xs):
        mb, k = xs

        def objective(params):
          live, _ = student_forward(params, student_stats, mb, k)
          # Micro-batch k's rows live (with gradient), every other row the first pass's constant: the loss is the
          # whole batch's, its gradient the part that flows through k's rows.
          rows = jax.tree_util.tree_map(
            lambda stored, new: jax.lax.dynamic_update_index_in_dim(stored, new, k, 0), student_outs, live
          )
          student_full = jax.tree_util.tree_map(lambda x: merge_micro(x, groups), rows)
          loss, metrics, loss_state = loss_fn(student_full, teacher_full, state.loss_state, state.step)
          return loss, (metrics, loss_state)

        (loss, (metrics, loss_state)), g = jax.value_and_grad(objective, has_aux=True)(student_params)
        return add(grads, g), (loss, metrics, loss_state)

      # The SUM of the K partial gradients is the whole batch's gradient (module docstring).
      grads, (losses, metrics, loss_states) = jax.lax.scan(second_pass, zeros, (micro, index))
      loss_state = jax.tree_util.tree_map(lambda x: x[-1], loss_states)  # the same in every pass: the whole batch's
      new_student_stats = student_stats  # no BatchNorm in this mode (config.py)
      monitor = teacher_outs["backbone_cls"][:, :, 0]

    loss = jnp.mean(losses)
    metrics = mean0(metrics)  # averages over the micro-batches (exact: K equal values)
    return apply_update(
      state,
      grads,
      loss=loss,
      metrics=metrics,
      loss_state=loss_state,
      student_params=student_params,
      teacher_params=teacher_params,
      student_stats=new_student_stats,
      teacher_stats=teacher_stats,
      tx=tx,
      momentum_fn=momentum_fn,
      lr_fn=lr_fn,
      wd_fn=wd_fn,
      monitored=merge_micro(monitor, groups),  # over the whole batch's teacher features
    )

  return train_step
