"""The pure train step (student + teacher update) and the feature-extraction step.

``make_train_step`` returns ``train_step(state, batch) -> (state, metrics)``; the trainer jits it once with
explicit shardings and donates the state. Batch arrays are batch-major, (B, views, H, W, 3), and stay so:
views are folded into the batch axis with a reshape that keeps the batch axis outermost, so a data-sharded
batch never needs an all-gather (docs/distributed.md#batch-major-layout).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from simdino_jax.train.state import TrainState


def _fold_views(x: jax.Array) -> jax.Array:
  """(B, V, ...) -> (B*V, ...), image-major (row b*V + v), keeping the sharded batch axis outermost."""
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _unfold_views(x: jax.Array, batch: int) -> jax.Array:
  return x.reshape((batch, x.shape[0] // batch) + x.shape[1:])


def masked_positions(mask: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """Static-size gather of each crop's masked patch positions.

  mask (B, Mg, N) bool -> (indices (B, Mg, size) int32, valid (B, Mg, size) bool): the masked positions first (in
  order), padded with unmasked ones marked invalid. ``size`` bounds the masked count of any crop (the block-mask
  generator never exceeds N * max ratio), so nothing is lost; per-crop gathers keep the batch axis local.
  """
  order = jnp.argsort(jnp.logical_not(mask), axis=-1, stable=True)[..., :size].astype(jnp.int32)
  return order, jnp.take_along_axis(mask, order, axis=-1)


def forward(
  network,
  batch: dict,
  *,
  key: jax.Array | None,
  student: bool,
  masks: jax.Array | None = None,
  positions: jax.Array | None = None,
) -> dict:
  """Backbone + head on the crops of a batch (views in global-then-local order, batch axis first).

  Returns {"cls": head(cls tokens) (B, views, ...), "backbone_cls": (B, Mg, D) global-crop cls tokens} and, when
  ``positions`` (B, Mg, U) is given, "patch": head(patch tokens at those positions) (B, Mg, U, ...). Head outputs
  are arrays or dicts of arrays (DINO heads: "z", "logits"; vMF heads also their "prototype_norms"): whatever the
  method's loss reads, the step adds nothing method-specific.
  The teacher (student=False) sees only the global crops, unmasked; the student also the local crops, with the
  global crops' masked patches replaced by the mask token. One backbone call per resolution: two static shapes.
  """
  glob = batch["global"]
  b, mg = glob.shape[:2]
  key_g = key_l = None
  if key is not None:
    key_g, key_l = jax.random.split(key)
  flat_masks = None if masks is None else _fold_views(masks)
  out_g = network.backbone(_fold_views(glob), masks=flat_masks, key=key_g)
  cls = [_unfold_views(out_g["cls"], b)]
  if student and batch["local"].shape[1] > 0:
    cls.append(_unfold_views(network.backbone(_fold_views(batch["local"]), key=key_l)["cls"], b))
  cls = jnp.concatenate(cls, axis=1) if len(cls) > 1 else cls[0]
  out = {"cls": network.head(cls), "backbone_cls": cls[:, :mg]}
  if positions is not None:
    patch = _unfold_views(out_g["patch"], b)  # (B, Mg, N, D)
    patch = jnp.take_along_axis(patch, positions[..., None], axis=2)  # (B, Mg, U, D)
    patch_head = network.patch_head if network.patch_head is not None else network.head
    out["patch"] = patch_head(patch)
  return out


def collapse_monitors(features: jax.Array) -> dict:
  """Feature std across the batch and effective rank (exp entropy of the normalised singular values) of
  l2-normalised features (B, D); 0 std / rank 1 means collapse. Reduces over the batch (one 2-D eigvalsh; never
  batched, see docs/distributed.md#simulated-cpu-devices)."""
  f = features.astype(jnp.float32)
  f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  std = jnp.mean(jnp.std(f, axis=0))
  c = f - f.mean(axis=0)
  # D x D covariance (a reduction over the batch: an all-reduce when the batch is sharded, never an all-gather).
  gram = jnp.matmul(c.T, c, precision=jax.lax.Precision.HIGHEST)
  ev = jnp.clip(jnp.linalg.eigvalsh(gram), 0.0, None)
  p = ev / jnp.maximum(jnp.sum(ev), 1e-12)
  rank = jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0)))
  return {"feature_std": std, "effective_rank": rank}


def global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


_AUGMENT_STREAM = 0x61756720  # fold_in constant of the on-device augmentation's key ("aug ")


def make_train_step(
  graphdef: nnx.GraphDef,
  loss_fn: Callable,
  tx: optax.GradientTransformation,
  *,
  lr_fn: Callable,
  wd_fn: Callable,
  momentum_fn: Callable,
  mask_positions: int = 0,
  augment: Callable | None = None,
  cast_params: Callable | None = None,
) -> Callable:
  """Build the pure step.

  Args:
    graphdef: the network's static structure (student and teacher share it).
    loss_fn: the method's loss(student_out, teacher_out, loss_state, step) -> (loss, metrics, loss_state).
    tx: the student's optax transformation.
    lr_fn, wd_fn: schedules, only evaluated for logging (tx carries its own copies).
    momentum_fn: teacher EMA momentum m(step); teacher <- m teacher + (1 - m) student after the update
      (a constant 0 is training without self-distillation: the teacher is the current student).
    mask_positions: > 0 for masked-patch methods: the static number of patch positions gathered per global crop
      (the batch then carries "mask" (B, Mg, N)).
    augment: ``augment(key, batch) -> batch``, applied first (config.data.augment_mode="device": uint8 crops in,
      augmented normalised crops out, data/device_augment.py); its key is derived from the step's key.
    cast_params: ``cast_params(which, params) -> params`` ("student" / "teacher") applied to the parameters before
      the network uses them (the trainer's bfloat16 cast of fsdp-sharded leaves, so that the all-gathers move
      bfloat16; ``sharding.cast_sharded``). The state, the gradients and the optimizer stay float32.
  """
  cast = cast_params if cast_params is not None else (lambda which, params: params)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.rng, state.step)
    if augment is not None:  # a stream of its own: the drop-path keys below stay those of host mode
      batch = augment(jax.random.fold_in(key, _AUGMENT_STREAM), batch)
    masks = positions = None
    if mask_positions:
      masks = batch["mask"]
      positions, valid = masked_positions(masks, mask_positions)

    teacher_net = nnx.merge(graphdef, cast("teacher", state.teacher))
    teacher_out = jax.lax.stop_gradient(forward(teacher_net, batch, key=None, student=False, positions=positions))

    def objective(params):
      student_net = nnx.merge(graphdef, cast("student", params))
      student_out = forward(student_net, batch, key=key, student=True, masks=masks, positions=positions)
      if mask_positions:
        student_out["patch_mask"] = valid
      loss, metrics, loss_state = loss_fn(student_out, teacher_out, state.loss_state, state.step)
      return loss, (metrics, loss_state)

    (loss, (metrics, loss_state)), grads = jax.value_and_grad(objective, has_aux=True)(state.student)
    updates, opt_state = tx.update(grads, state.opt_state, state.student)
    student = optax.apply_updates(state.student, updates)
    momentum = momentum_fn(state.step)
    teacher = optax.incremental_update(student, state.teacher, step_size=1.0 - momentum)

    new_state = state.replace(
      step=state.step + 1, student=student, teacher=teacher, opt_state=opt_state, loss_state=loss_state
    )
    # A non-finite loss leaves the state untouched (the trainer stops and names the step), so the last
    # checkpointable state is the last good one.
    finite = jnp.isfinite(loss)
    new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = dict(
      metrics,
      loss=loss,
      lr=lr_fn(state.step),
      wd=wd_fn(state.step),
      momentum=momentum,
      grad_norm=global_norm(grads),
      **collapse_monitors(teacher_out["backbone_cls"][:, 0]),
    )
    return new_state, metrics

  return train_step


def make_feature_fn(graphdef: nnx.GraphDef) -> Callable:
  """(params, images (B, H, W, 3)) -> backbone cls features (B, D) float32, deterministic (no drop path)."""

  def features(params, images):
    net = nnx.merge(graphdef, params)
    return net.backbone(images, key=None)["cls"].astype(jnp.float32)

  return features
