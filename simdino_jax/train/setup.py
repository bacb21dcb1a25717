"""The training assembly: everything derived from a config and the size of its training split, built once.

The one place the training pieces are put together (the trainer, the parity harnesses and the benchmarks all call
it, so none can drift from what training runs), as free functions in the style of flax's ``create_train_state``:

  setup = build(config, num_train)          # pure: no workdir, no data source, no evaluator, no FLOPs
  mesh = sharding.make_mesh(config.mesh)
  shardings = state_sharding(setup, mesh)   # one NamedSharding per TrainState leaf (config.sharding.rules)
  state = init_state(setup, shardings)      # = setup.init_fn() placed on the mesh; a pure function of config.seed
  step = make_step(setup, mesh)             # jitted train_step(state, batch) -> (state, metrics), state donated
  state, metrics = step(state, batch)       # batch: {"global", "local"[, "mask"]} batch-major, on the mesh

``Setup`` (frozen) holds:
  config, method                  the config as given and its ``methods.Method``
  durations                       total / warm-up steps and steps per epoch (``durations``)
  lr_fn, wd_fn, momentum_fn       the schedules, jittable functions of the step; the teacher momentum is the
                                  cosine m0 -> momentum_end, or 0 at every step without self-distillation
                                  (``config.teacher.self_distillation=False``: the teacher is the current student)
  graphdef, backbone_graphdef     the network's and its backbone's nnx graphs (shapes only)
  eval_graphdef                   the backbone's graph computing in ``config.eval.dtype`` (the evaluators')
  tx, loss_fn                     the student's optax chain (``make_optimizer``) and the method's loss
  init_fn                         () -> TrainState at initialisation, a pure function of config.seed (jit it)
  abstract_state                  the TrainState's shapes and dtypes (``jax.eval_shape(init_fn)``), no shardings
  multicrop                       the crops' ``MultiCropConfig``
  process_batch                   the rows of a global batch one process feeds (batch_size / process count)
  patch_size, num_patches         the ViT patch and the patch tokens N of a global crop ...
  num_local_patches               ... and of a local crop
  mask_positions                  the most masked patches of one global crop (P; 0 without masks)
  eval_batch                      config.eval.batch_size rounded to the devices (``evals.runner.device_batch``)
  distill_graphdef, distill_config  config.distill: the frozen teacher's graph and network config (None when off;
                                  its weights are filled into the state by ``train.distill.fill``)

Derived values are computed here and read from here: nothing else recomputes the per-process batch, the patch
size or the schedules of a run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from simdino_jax import methods, optim, schedules, sharding
from simdino_jax.data import device_augment
from simdino_jax.data.multicrop import MultiCropConfig
from simdino_jax.errors import ConfigError
from simdino_jax.evals import runner
from simdino_jax.models.network import backbone_kwargs, compute_dtype, eval_backbone_graphdef
from simdino_jax.train import accumulation
from simdino_jax.train import distill as distill_lib
from simdino_jax.train import gram as gram_lib
from simdino_jax.train.state import TrainState
from simdino_jax.train.step import make_train_step, split_params


# ---- durations ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Durations:
  total_steps: int
  warmup_steps: int
  steps_per_epoch: int


def durations(config, num_train: int) -> Durations:
  """Steps of the run: ``total_steps`` when > 0, else ``total_epochs`` x (num_train // batch_size); the warm-up
  in steps, or in epochs, capped below the total. A batch larger than the training split is refused whether or
  not total_steps is set: an "epoch" of one step that repeats most images in every batch is never what was meant
  (before, ``batch_size=1000000`` on 1,797 images ran on, "1 steps/epoch")."""
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise ConfigError(
      f"config.batch_size: {config.batch_size} exceeds the {num_train} examples of the training split "
      f"({config.data.source!r}); lower it to at most {num_train}"
    )
  total = config.total_steps if config.total_steps > 0 else config.total_epochs * steps_per_epoch
  warmup = config.warmup_steps if config.warmup_steps > 0 else round(config.warmup_epochs * steps_per_epoch)
  return Durations(total, min(warmup, total - 1), steps_per_epoch)


# ---- schedules ----------------------------------------------------------------------------------------------------
def momentum_schedule(config, total_steps: int) -> schedules.Schedule:
  """The teacher's EMA momentum m(step): cosine ``teacher.momentum`` -> ``teacher.momentum_end`` over the run; a
  constant 0 for the paper's ablation without self-distillation (the teacher is the current student) and for a
  method without a momentum encoder (``Method.momentum_teacher`` False: SwAV)."""
  if config.teacher.self_distillation and methods.get_method(config.method).momentum_teacher:
    return schedules.cosine(config.teacher.momentum, config.teacher.momentum_end, total_steps)
  return schedules.constant(0.0)


# ---- optimiser ----------------------------------------------------------------------------------------------------
def make_optimizer(config, params, lr_fn, wd_fn, steps_per_epoch: int) -> optax.GradientTransformation:
  """The student's optax chain: AdamW + the method's extras (layer-wise lr decay, prototype-layer freezing)."""
  o = config.optim
  lr_mults = None
  if o.layer_decay < 1.0 or o.patch_embed_lr_mult != 1.0:
    lr_mults = optim.lr_multipliers(
      params,
      depth=backbone_kwargs(config.model)["depth"],
      layer_decay=o.layer_decay,
      patch_embed_mult=o.patch_embed_lr_mult,
    )
  method = methods.get_method(config.method)
  freezes = method.optimizer_freezes(config, params, steps_per_epoch)
  unit_norm = method.optimizer_unit_norm(config, params)  # SwAV's prototypes
  return optim.make_optimizer(o, params, lr_fn, wd_fn, lr_mults=lr_mults, freezes=freezes, unit_norm=unit_norm)


# ---- data shapes --------------------------------------------------------------------------------------------------
def multicrop_config(config) -> MultiCropConfig:
  d = config.data
  return MultiCropConfig(
    global_size=d.global_size,
    local_size=d.local_size,
    num_global=d.num_global,
    num_local=d.num_local,
    global_scale=tuple(d.global_scale),
    local_scale=tuple(d.local_scale),
    augment_mode=d.augment_mode,
    gram_size=gram_lib.crop_size(config),  # config.gram.crop_size: the Gram teacher's crops (train/gram.py)
    **{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.augment.items()},
  )


# ---- the Setup ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
  """Everything derived from (config, num_train); see the module docstring. Build it with ``build``."""

  config: ml_collections.ConfigDict
  method: methods.Method
  durations: Durations
  lr_fn: Callable
  wd_fn: Callable
  momentum_fn: Callable
  graphdef: nnx.GraphDef
  backbone_graphdef: nnx.GraphDef
  eval_graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  loss_fn: Callable
  init_fn: Callable[[], TrainState]
  abstract_state: Any
  multicrop: MultiCropConfig
  process_batch: int
  patch_size: int
  num_patches: int
  num_local_patches: int
  mask_positions: int
  eval_batch: int
  gram: Any = None  # config.gram's train.gram.GramAnchor (its row groups set on the mesh by make_step); None: off
  distill_graphdef: nnx.GraphDef | None = None  # config.distill: the frozen teacher's graph; None: off
  distill_config: Any = None  # config.distill: the frozen teacher's network config (train/distill.teacher_config)


def build(config: ml_collections.ConfigDict, num_train: int, *, distill_source: dict | None = None) -> Setup:
  """The Setup of ``config`` for a training split of ``num_train`` examples. Shapes only: no parameter is
  initialised (``init_fn`` does that when called), nothing is compiled, no file or data source is touched (but for
  config.distill, the frozen teacher's stored config, unless ``distill_source`` gives it: its shapes are part of the
  state)."""
  method = methods.get_method(config.method)
  d = durations(config, num_train)
  lr_fn = optim.lr_schedule(config.optim, config.batch_size, d.total_steps, d.warmup_steps)
  wd_fn = optim.wd_schedule(config.optim, d.total_steps)
  momentum_fn = momentum_schedule(config, d.total_steps)

  # The network's shapes (no FLOPs): its graph, and the optimiser built on the abstract parameters.
  abstract = nnx.eval_shape(lambda: methods.build_network(config))
  # The optimiser sees the parameters only; BN running statistics (ResNet, BN heads) ride in the state beside them
  # (train/step.py's module docstring: "BatchNorm statistics").
  graphdef, abstract_variables = nnx.split(abstract)
  abstract_params = split_params(abstract_variables)[0]
  tx = make_optimizer(config, abstract_params, lr_fn, wd_fn, d.steps_per_epoch)
  backbone_graphdef = nnx.split(abstract.backbone)[0]
  gram = gram_lib.make(config, backbone_graphdef, d.total_steps)
  distill_config = distill_graphdef = distill_variables = None
  if config.get("distill") is not None and config.distill.enabled:  # the frozen teacher's network (train/distill.py)
    distill_config = distill_lib.teacher_config(config, distill_source)
    distill_graphdef, distill_variables = nnx.split(nnx.eval_shape(lambda: methods.build_network(distill_config)))

  def init_fn() -> TrainState:
    variables = nnx.split(methods.build_network(config))[1]  # parameters and (BN) statistics
    extra = {} if gram is None else {"gram_teacher": gram.init(variables)}  # the initial teacher's backbone
    if distill_variables is not None:  # zeros here; distill.fill loads the teacher on a fresh start
      extra["distill_teacher"] = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), distill_variables)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      student=variables,
      teacher=variables,
      opt_state=tx.init(split_params(variables)[0]),
      loss_state=method.init_loss_state(config),
      rng=jax.random.key_data(jax.random.key(config.seed + 1)),
      **extra,
    )

  vit = backbone_kwargs(config.model)
  patch = vit["patch_size"]
  return Setup(
    config=config,
    method=method,
    durations=d,
    lr_fn=lr_fn,
    wd_fn=wd_fn,
    momentum_fn=momentum_fn,
    graphdef=graphdef,
    backbone_graphdef=backbone_graphdef,
    # The evaluators' graph: the same backbone (same float32 parameters) computing in config.eval.dtype.
    eval_graphdef=eval_backbone_graphdef(config.model, config.eval.dtype),  # BN: evaluation mode
    tx=tx,
    loss_fn=method.make_loss(config, d.steps_per_epoch),
    init_fn=init_fn,
    abstract_state=jax.eval_shape(init_fn),
    multicrop=multicrop_config(config),
    process_batch=config.batch_size // jax.process_count(),
    patch_size=patch,
    num_patches=methods.num_patches(config),
    num_local_patches=(config.data.local_size // patch) ** 2,
    mask_positions=methods.mask_positions(config),
    eval_batch=runner.device_batch(config.eval.batch_size),
    gram=gram,
    distill_graphdef=distill_graphdef,
    distill_config=distill_config,
  )


# ---- on a mesh ----------------------------------------------------------------------------------------------------
def state_sharding(setup: Setup, mesh) -> TrainState:
  """One NamedSharding per TrainState leaf from ``config.sharding.rules``: all replicated on a data-only mesh; big
  leaves split over the "fsdp" mesh axis when it has one (sharding.state_shardings)."""
  shardings = sharding.state_shardings(setup.abstract_state, mesh, setup.config)
  if setup.gram is not None:  # the Gram teacher is laid out as the teacher's backbone, whatever the rules name
    shardings = shardings.replace(gram_teacher=shardings.teacher["backbone"])
  return shardings


def init_state(setup: Setup, shardings: TrainState) -> TrainState:
  """The state at initialisation, created directly with its ``shardings``; a pure function of ``config.seed``."""
  return jax.jit(setup.init_fn, out_shardings=shardings)()


def param_cast(setup: Setup, mesh, shardings: TrainState) -> Callable | None:
  """With a 16-bit model.dtype and an "fsdp" mesh axis: the step's ``cast_params``, casting the fsdp-sharded
  parameters to the compute dtype before they are all-gathered (sharding.cast_sharded); else None."""
  dtype = compute_dtype(setup.config.model.dtype)
  if dtype == jnp.float32 or dict(mesh.shape).get(sharding.FSDP_AXIS, 1) <= 1:
    return None
  by_role = {"student": shardings.student, "teacher": shardings.teacher, "gram_teacher": shardings.gram_teacher}
  by_role["distill_teacher"] = shardings.distill_teacher
  return lambda which, params: sharding.cast_sharded(params, by_role[which], dtype)


def make_step(
  setup: Setup, mesh, *, donate: bool = True, pack_masks: bool = True, shardings: TrainState | None = None
) -> Callable:
  """The trainer's step, jitted on ``mesh``: (state, batch) -> (state, metrics), the state laid out with
  ``shardings`` (default ``state_sharding(setup, mesh)``), the batch split over every mesh axis, the metrics
  replicated; the input state is donated unless ``donate=False`` (a caller that reuses it, e.g. a comparison).
  pack_masks=False gathers floor(N x max ratio) patch positions for every global crop instead of each shard's
  masked tokens (benchmarks/masked_gather.py times the two)."""
  config = setup.config
  shardings = state_sharding(setup, mesh) if shardings is None else shardings
  views = None if setup.method.view_calls is None else setup.method.view_calls(config)  # MoCo-v2, BYOL: per view
  step = make_train_step(
    setup.graphdef,
    setup.loss_fn,
    setup.tx,
    lr_fn=setup.lr_fn,
    wd_fn=setup.wd_fn,
    momentum_fn=setup.momentum_fn,
    mask_positions=setup.mask_positions,
    mask_groups=mesh.size,  # the batch's data-parallel shards (sharding.batch_sharding)
    # Masks are drawn per global batch (data/pipeline.py), whatever the process count.
    mask_tokens=methods.masked_token_budget(config, host_batch=config.batch_size, shards=mesh.size)
    if pack_masks
    else None,
    augment=device_augment.make_batch_augment(setup.multicrop) if config.data.augment_mode == "device" else None,
    cast_params=param_cast(setup, mesh, shardings),
    gram=None if setup.gram is None else dataclasses.replace(setup.gram, groups=mesh.size),  # per-device Grams
    distill_graphdef=setup.distill_graphdef,
    distill_masks=setup.distill_graphdef is not None and config.distill.mask_student,
    view_calls=views,
    teacher_is_student=not setup.method.momentum_teacher,
  )
  k = config.get("accumulation_steps", 1)
  if k > 1:  # gradient accumulation (train/accumulation.py); config.py refuses it with distill / gram
    step = accumulation.make_accumulated_train_step(
      setup.graphdef,
      setup.loss_fn,
      setup.tx,
      steps=k,
      mode=config.accumulation_mode,
      lr_fn=setup.lr_fn,
      wd_fn=setup.wd_fn,
      momentum_fn=setup.momentum_fn,
      mask_positions=setup.mask_positions,
      mask_groups=mesh.size,
      # One micro-batch holds batch_size / (shards x K) rows of each shard: the budget of mesh.size x K shards.
      mask_tokens=methods.masked_token_budget(config, host_batch=config.batch_size, shards=mesh.size * k)
      if pack_masks
      else None,
      augment=device_augment.make_batch_augment(setup.multicrop) if config.data.augment_mode == "device" else None,
      cast_params=param_cast(setup, mesh, shardings),
      view_calls=views,  # config.py refuses accumulation for SwAV (teacher_is_student)
    )
  return jax.jit(
    step,
    in_shardings=(shardings, sharding.batch_sharding(mesh)),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0 if donate else (),
  )
