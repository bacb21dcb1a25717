"""The pure train step (student + teacher update).

``make_train_step`` returns ``train_step(state, batch) -> (state, metrics)``; ``train/setup.py make_step`` jits it
once with explicit shardings and donates the state. Batch arrays are batch-major, (B, views, H, W, 3), and stay so:
views are folded into the batch axis with a reshape that keeps the batch axis outermost, so a data-sharded
batch never needs an all-gather (docs/distributed.md#batch-major-layout).

BatchNorm statistics (the contract every network with ``nnx.BatchStat`` variables follows; docs/methods.md
"BatchNorm in training"):
  - ``state.student`` / ``state.teacher`` are the network's WHOLE nnx.State: its ``nnx.Param`` leaves and its
    ``nnx.BatchStat`` leaves (BN running mean / var / num_batches_tracked; anything not an ``nnx.Param`` counts as a
    statistic). A ViT has none, so its TrainState, checkpoints and numbers are those of a params-only state.
  - ``split_params(tree) -> (params, stats)`` and ``nnx.merge_state(params, stats)`` go between the two. Gradients,
    the optimizer (its state is built on the params alone: ``setup.build``), weight-decay masks, freezes and the
    teacher's EMA see ONLY the params, as PyTorch's ``model.parameters()`` (DINO's EMA zips the parameters, so the
    teacher's running statistics are never averaged from the student's).
  - Both networks run in training mode (the batch statistics, as DINO converts student and teacher to SyncBN and
    calls both in train mode): a BN layer normalises with the statistics of the whole global batch (a ``jnp.mean``
    over the sharded batch axis: an all-reduce, i.e. SyncBN) and updates its running statistics in place. The
    student's new statistics come from its own forward (one update per resolution: the global crops, then the
    local crops, as DINO's MultiCropWrapper runs one backbone call per resolution), the teacher's from ITS forward
    on the global crops; each network keeps its own. A head with BN (BYOL, SwAV) updates the same way, once per
    head call. A method with ``view_calls`` (MoCo-v2, BYOL) runs backbone + head once per global view instead, each
    view a BN batch of its own, and keeps the statistics updates of the official calls only (``forward``'s
    ``views``). With ``momentum_fn`` = 0 (no self-distillation) the teacher's parameters are the student's, its
    statistics still its own.
  - The non-finite rollback restores the statistics with the rest of the state; checkpoints and resumes carry them
    (they are TrainState leaves); the evaluators run the backbone in evaluation mode (running statistics).
  A network module reads its mode from its own attributes (``use_running_average`` of models/resnet.py's
  BatchNorm, default training mode), so the step needs no flag; nothing here names a method.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

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


class MaskedGather(NamedTuple):
  """Where the masked patch tokens of a batch go: packed per batch shard for the head, then back per crop.

  tokens (G, U) int32: each shard's masked token indices into its (B/G * Mg * N) patch tokens, in crop order,
    padded with unmasked ones (U is a static bound on a shard's masked count);
  slots (G, B/G * Mg * P) int32: for slot j of each crop, its index into the shard's U packed tokens;
  valid (B, Mg, P) bool: slot j holds one of the crop's masked tokens (its first P masked ones, in order).
  """

  tokens: jax.Array
  slots: jax.Array
  valid: jax.Array


def masked_gather(mask: jax.Array, per_crop: int, groups: int = 1, tokens: int | None = None) -> MaskedGather:
  """Static-size gather of the masked patch tokens, packed per batch shard.

  mask (B, Mg, N) bool. ``per_crop`` (P) bounds any crop's masked count and ``tokens`` (U) any shard's, ``groups``
  (G) being the number of equal batch shards (data-parallel devices): each shard is gathered on its own, so a
  sharded batch never moves between devices. The head then runs on G * U tokens instead of B * Mg * P (a third as
  many at DINOv2's mask ratios, data/masking.py max_masked_tokens), and its outputs are laid out per crop again
  (B, Mg, P, ...) for the losses. Default U: B/G * Mg * P (no saving, nothing can be dropped).
  """
  b, mg, n = mask.shape
  if b % groups:
    raise ValueError(f"masked_gather: batch {b} does not split into {groups} shards")
  flat = mask.reshape(groups, (b // groups) * mg * n)
  u = max(1, min(flat.shape[1], (b // groups) * mg * per_crop if tokens is None else tokens))
  order = jnp.argsort(jnp.logical_not(flat), axis=-1, stable=True)[:, :u].astype(jnp.int32)
  count = jnp.sum(mask, axis=-1, dtype=jnp.int32).reshape(groups, -1)  # (G, B/G * Mg) masked tokens per crop
  offset = jnp.cumsum(count, axis=-1) - count  # where each crop's tokens start in its shard's packed order
  slot = jnp.arange(per_crop, dtype=jnp.int32)
  pos = offset[..., None] + slot  # (G, B/G * Mg, P)
  valid = (slot < count[..., None]) & (pos < u)
  return MaskedGather(order, jnp.minimum(pos, u - 1).reshape(groups, -1), valid.reshape(b, mg, per_crop))


def forward(
  network,
  batch: dict,
  *,
  key: jax.Array | None,
  student: bool,
  masks: jax.Array | None = None,
  gather: MaskedGather | None = None,
  keep_patches: bool = False,
  views: tuple[int, ...] | None = None,
) -> dict:
  """Backbone + head on the crops of a batch (views in global-then-local order, batch axis first).

  Returns {"cls": head(cls tokens) (B, views, ...), "backbone_cls": (B, Mg, D) global-crop cls tokens} and, when
  ``gather`` is given, "patch": the head on the masked patch tokens, laid out per crop (B, Mg, P, ...). Head outputs
  are arrays or dicts of arrays (DINO heads: "z", "logits"; vMF heads also their "prototype_norms"): whatever the
  method's loss reads, the step adds nothing method-specific.
  The teacher (student=False) sees only the global crops, unmasked; the student also the local crops, with the
  global crops' masked patches replaced by the mask token. One backbone call per resolution: two static shapes.
  ``keep_patches`` adds "global_patch_tokens" (B*Mg, N, D), the global crops' normed patch tokens (Gram anchoring).
  ``views`` (a method's ``view_calls``): one backbone + head call per global view, in view order, each normalising
  its view over the batch alone; the BN statistics updates of the views not named are undone (the official code
  does not make those calls: their outputs exist for the layout, a loss that does not read them lets XLA drop them).
  """
  if views is not None:
    return _forward_per_view(
      network, batch, key=key, student=student, dense=gather is not None or keep_patches, views=views
    )
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
  if keep_patches:
    out["global_patch_tokens"] = out_g["patch"]
  if gather is not None:
    g, u = gather.tokens.shape
    patch = out_g["patch"].reshape(g, -1, out_g["patch"].shape[-1])  # (G, B/G * Mg * N, D), shard-major
    patch = jnp.take_along_axis(patch, gather.tokens[..., None], axis=1)  # (G, U, D)
    patch_head = network.patch_head if network.patch_head is not None else network.head
    per_crop = gather.valid.shape[-1]

    def per_crop_layout(a):  # (G, U, ...) -> (B, Mg, P, ...); leaves without the token axes (vMF norms) as they are
      if a.ndim < 2 or a.shape[:2] != (g, u):
        return a
      index = gather.slots.reshape(gather.slots.shape + (1,) * (a.ndim - 2))
      a = jnp.take_along_axis(a, index, axis=1)
      return a.reshape((b, mg, per_crop) + a.shape[2:])

    out["patch"] = jax.tree_util.tree_map(per_crop_layout, patch_head(patch))
  return out


def _forward_per_view(network, batch, *, key, student, dense, views) -> dict:
  glob = batch["global"]
  if dense or (student and batch["local"].shape[1] > 0):  # MoCo-v2 / BYOL: neither masks, patches nor local crops
    raise ValueError("forward(views=...): per-view calls take the global crops only, unmasked, without patches")
  outs = []
  for v in range(glob.shape[1]):
    # A snapshot of the statistics' values (nnx.state holds the live Variables, which the BN call rewrites).
    undo = None if v in views else jax.tree_util.tree_map(lambda x: x, split_params(nnx.state(network))[1])
    out = network.backbone(glob[:, v], key=None if key is None else jax.random.fold_in(key, v))
    cls = out["cls"][:, None]  # (B, 1, D): the head sees one view, its BN batch those B rows
    outs.append({"cls": network.head(cls), "backbone_cls": cls})
    if undo is not None:
      nnx.update(network, undo)
  return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=1), *outs)


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


def split_params(tree: nnx.State) -> tuple[nnx.State, nnx.State]:
  """(the ``nnx.Param`` leaves, every other leaf: BN running statistics) of a network's nnx.State; the second is an
  empty State for a ViT. ``nnx.merge_state(params, stats)`` puts them back together."""
  return nnx.split_state(tree, nnx.Param, ...)


def network_stats(network: nnx.Module, like: nnx.State) -> nnx.State:
  """The non-parameter variables of ``network`` after its forward (the updated running statistics), in the dtypes
  of ``like`` (the state's: a 16-bit ``cast_params`` must not change the stored statistics' dtype)."""
  stats = split_params(nnx.state(network))[1]
  return jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), stats, like)


def global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def apply_update(
  state: TrainState,
  grads: Any,
  *,
  loss: jax.Array,
  metrics: dict,
  loss_state: Any,
  student_params: Any,
  teacher_params: Any,
  student_stats: Any,
  teacher_stats: Any,
  tx: optax.GradientTransformation,
  momentum_fn: Callable,
  lr_fn: Callable,
  wd_fn: Callable,
  monitored: jax.Array,
  teacher_is_student: bool = False,
  **fields,
) -> tuple[TrainState, dict]:
  """The end of every train step (plain and accumulated): one optimizer update of the student's parameters, the
  teacher's EMA, the BN statistics put back, ``fields`` (other TrainState fields) replaced; a non-finite loss leaves
  the whole state untouched; the step's metrics with the schedules, the gradient norm and the collapse monitors of
  ``monitored`` (B, D)."""
  updates, opt_state = tx.update(grads, state.opt_state, student_params)
  student = optax.apply_updates(student_params, updates)
  momentum = momentum_fn(state.step)
  teacher = optax.incremental_update(student, teacher_params, step_size=1.0 - momentum)
  student = nnx.merge_state(student, jax.lax.stop_gradient(student_stats))
  teacher = nnx.merge_state(teacher, teacher_stats)
  new_state = state.replace(
    step=state.step + 1, student=student, teacher=teacher, opt_state=opt_state, loss_state=loss_state, **fields
  )
  # A non-finite loss leaves the state untouched, BN statistics included (the trainer stops and names the step),
  # so the last checkpointable state is the last good one.
  finite = jnp.isfinite(loss)
  new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  if teacher_is_student:  # the student's very arrays: XLA may round two computations of one value apart
    new_state = new_state.replace(teacher=new_state.student)
  metrics = dict(
    metrics,
    loss=loss,
    lr=lr_fn(state.step),
    wd=wd_fn(state.step),
    momentum=momentum,
    grad_norm=global_norm(grads),
    **collapse_monitors(monitored),
  )
  return new_state, metrics


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
  mask_groups: int = 1,
  mask_tokens: int | None = None,
  augment: Callable | None = None,
  cast_params: Callable | None = None,
  distill_graphdef: nnx.GraphDef | None = None,
  distill_masks: bool = False,
  gram=None,
  view_calls: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
  teacher_is_student: bool = False,
) -> Callable:
  """Build the pure step.

  Args:
    graphdef: the network's static structure (student and teacher share it).
    loss_fn: the method's loss(student_out, teacher_out, loss_state, step) -> (loss, metrics, loss_state).
    tx: the student's optax transformation.
    lr_fn, wd_fn: schedules, only evaluated for logging (tx carries its own copies).
    momentum_fn: teacher EMA momentum m(step); teacher <- m teacher + (1 - m) student after the update
      (a constant 0 is training without self-distillation: the teacher is the current student).
    mask_positions: > 0 for masked-patch methods: the most masked patches of one global crop (P; the batch then
      carries "mask" (B, Mg, N)); the losses see the patch head's outputs laid out (B, Mg, P, ...).
    mask_groups, mask_tokens: the batch's data-parallel shards (G) and the most masked patches one shard holds (U):
      the patch head runs on G * U gathered tokens (``masked_gather``); None: B/G * Mg * P.
    augment: ``augment(key, batch) -> batch``, applied first (config.data.augment_mode="device": uint8 crops in,
      augmented normalised crops out, data/device_augment.py); its key is derived from the step's key.
    cast_params: ``cast_params(which, params) -> params`` ("student" / "teacher") applied to the parameters before
      the network uses them (the trainer's bfloat16 cast of fsdp-sharded leaves, so that the all-gathers move
      bfloat16; ``sharding.cast_sharded``). The state, the gradients and the optimizer stay float32.
    distill_graphdef: config.distill (train/distill.py): the frozen teacher's own network structure. The targets
      (``teacher_out``) then come from it on ``state.distill_teacher``, which is never updated; ``state.teacher``
      stays the EMA of the student and is not run (DINOv2/v3 distillation); the collapse monitors read the student.
    distill_masks: with distill_graphdef, whether the student's global crops are masked (False: DINOv3's
      distillation, unmasked crops, the patch loss still on the masked positions).
    gram: a ``train.gram.GramAnchor`` (config.gram): its term on the global crops' patch tokens is added to the loss
      and ``state.gram_teacher`` refreshed on its steps; None (default): neither, the step as without it.
    view_calls: the method's ``view_calls(config)``, (student views, teacher views): per-view backbone + head calls
      (``forward``'s ``views``); None: one call per resolution.
    teacher_is_student: a method without a momentum encoder (``Method.momentum_teacher`` False: SwAV, whose codes
      come from the student's own scores): no teacher forward (the loss gets ``teacher_out=None``), and the teacher
      becomes the updated student, BN statistics included, as the official single model (``momentum_fn`` is 0);
      the collapse monitors read the student's global crops.
  """
  student_views, teacher_views = (None, None) if view_calls is None else view_calls
  cast = cast_params if cast_params is not None else (lambda which, params: params)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.rng, state.step)
    if augment is not None:  # a stream of its own: the drop-path keys below stay those of host mode
      batch = augment(jax.random.fold_in(key, _AUGMENT_STREAM), batch)
    masks = gather = None
    if mask_positions:
      masks = batch["mask"]
      gather = masked_gather(masks, mask_positions, mask_groups, mask_tokens)

    # Parameters and BN statistics apart (split_params): gradients, optimizer and EMA see the parameters only.
    student_params, student_stats = split_params(state.student)
    teacher_params, teacher_stats = split_params(state.teacher)
    student_masks = masks
    if distill_graphdef is None and not teacher_is_student:
      # copy=True: merge would otherwise put the state's own Variables in the network, and a BN layer's in-place
      # update of its statistics would rewrite ``state`` (which the non-finite rollback below returns).
      teacher_net = nnx.merge(graphdef, cast("teacher", state.teacher), copy=True)
      teacher_out = jax.lax.stop_gradient(
        forward(teacher_net, batch, key=None, student=False, gather=gather, views=teacher_views)
      )
      teacher_stats = jax.lax.stop_gradient(network_stats(teacher_net, teacher_stats))  # from its own forward
    elif distill_graphdef is None:  # teacher_is_student (SwAV): nothing reads a teacher forward
      teacher_out = None
    else:  # the frozen teacher's targets; the EMA (a ViT: no statistics) is not run
      frozen = nnx.merge(distill_graphdef, cast("distill_teacher", state.distill_teacher), copy=True)
      teacher_out = jax.lax.stop_gradient(
        forward(frozen, batch, key=None, student=False, gather=gather, views=teacher_views)
      )
      student_masks = masks if distill_masks else None
    if gram is not None:  # the snapshot this iteration uses (a refresh due after the previous one taken now)
      gram_params = gram.current(state.step, state.teacher, state.gram_teacher)
      gram_crops = batch["gram_global"] if gram.crop_size else batch["global"]  # config.gram.crop_size: its own
      gram_target = gram.teacher_patches(cast("gram_teacher", gram_params), gram_crops)

    def objective(params):
      # copy=True: fresh Variables of this (grad) trace, which a BN layer may update in place (nnx refuses to
      # mutate Variables of another trace level; without the copy, merge reuses the statistics' own Variables).
      student_net = nnx.merge(graphdef, cast("student", nnx.merge_state(params, student_stats)), copy=True)
      student_out = forward(
        student_net,
        batch,
        key=key,
        student=True,
        masks=student_masks,
        gather=gather,
        keep_patches=gram is not None,
        views=student_views,
      )
      if mask_positions:
        student_out["patch_mask"] = gather.valid
      patches = student_out.pop("global_patch_tokens", None)
      loss, metrics, loss_state = loss_fn(student_out, teacher_out, state.loss_state, state.step)
      if gram is not None:  # DINOv3: the weighted Gram loss joins the total, its value is logged
        term, gram_metrics = gram.term(patches, gram_target, masks, state.step)
        loss, metrics = loss + term, dict(metrics, **gram_metrics)
      # Distilling or without a teacher forward: the monitors read the student's global crops.
      monitored = None if distill_graphdef is None and not teacher_is_student else student_out["backbone_cls"]
      return loss, (metrics, loss_state, network_stats(student_net, student_stats), monitored)

    (loss, (metrics, loss_state, new_student_stats, monitored)), grads = jax.value_and_grad(objective, has_aux=True)(
      student_params
    )
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
      teacher_is_student=teacher_is_student,
      tx=tx,
      momentum_fn=momentum_fn,
      lr_fn=lr_fn,
      wd_fn=wd_fn,
      monitored=(teacher_out["backbone_cls"] if monitored is None else monitored)[:, 0],
      **({} if gram is None else {"gram_teacher": gram_params}),
    )

  return train_step
