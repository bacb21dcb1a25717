"""config.distill (train/distill.py): the targets come from a frozen teacher, the teacher never changes, the EMA of
the student is updated as usual, the teacher is read from each kind of source, a wrong head is refused in one line,
and a resumed distillation run ends as an uninterrupted one."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import make_tiny_config
from flax import nnx

from simdino_jax import methods, schedules
from simdino_jax.errors import ConfigError
from simdino_jax.io import checkpointing, formats, torch_interop
from simdino_jax.train import distill, trainer
from simdino_jax.train import step as step_lib
from simdino_jax.train.state import TrainState
from simdino_jax.tree import map_with_name, named_leaves

MOMENTUM = 0.9


def close(actual, desired, name):
  """Float tolerance relative to the array's scale (SGD at lr 1 moves some leaves by hundreds)."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(
    np.asarray(actual), desired, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(desired).max()), err_msg=name
  )


def teacher_of(config, width=48, depth=1, seed=7):
  """A larger network of the student's method: the frozen teacher's config."""
  t = ml_collections.ConfigDict(config.to_dict())
  t.model.embed_dim, t.model.depth, t.seed = width, depth, seed
  return t


def student_config(method):
  c = make_tiny_config()
  # One block and a one-layer head: the step and its reference compile in a few seconds.
  c.method, c.model.depth, c.head.num_layers = method, 1, 1
  if method == "dinov2":
    c.head.num_prototypes, c.head.separate_patch_head = 32, True
  return c


def batch_of(config, masked, seed=0):
  rng = np.random.default_rng(seed)
  d = config.data
  b = {
    "global": jnp.asarray(rng.standard_normal((config.batch_size, 2, d.global_size, d.global_size, 3)), jnp.float32),
    "local": jnp.asarray(rng.standard_normal((config.batch_size, 2, d.local_size, d.local_size, 3)), jnp.float32),
  }
  if masked:
    b["mask"] = jnp.asarray(rng.random((config.batch_size, 2, methods.num_patches(config))) < 0.3)
  return b


def network(config, seed):
  """(graphdef, variables) of ``config``'s network with random values drawn on the host (norm scales near 1): no
  initialiser program to compile (each would cost seconds in a test); the values only need to be generic."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: methods.build_network(config)))
  rng = np.random.default_rng(seed)

  def draw(name, leaf):
    value = rng.normal(0.0, 0.1, leaf.shape) + (1.0 if name.endswith("scale") else 0.0)
    return jnp.asarray(value, leaf.dtype)

  return graphdef, map_with_name(draw, abstract)


def build(config):
  """(state, step, pieces) of a distilling step built directly (no file): the frozen teacher is a random network of
  another width and depth."""
  method = methods.get_method(config.method)
  graphdef, params = network(config, 0)
  tgraph, tvars = network(teacher_of(config), 7)
  lr, wd = schedules.constant(config.optim.lr), schedules.constant(0.04)
  tx = optax.sgd(1.0)  # updates linear in the gradients, so that the reference compares at float tolerance
  loss_fn = method.make_loss(config, 100)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    student=params,
    teacher=network(config, 1)[1],  # an EMA unlike the student
    opt_state=tx.init(params),
    loss_state=method.init_loss_state(config),
    rng=jnp.asarray(np.array([0, 1], np.uint32)),
    distill_teacher=tvars,
  )
  positions = methods.mask_positions(config)
  step = step_lib.make_train_step(
    graphdef,
    loss_fn,
    tx,
    lr_fn=lr,
    wd_fn=wd,
    momentum_fn=schedules.constant(MOMENTUM),
    mask_positions=positions,
    distill_graphdef=tgraph,
  )
  return state, step, dict(graphdef=graphdef, tgraph=tgraph, tx=tx, loss_fn=loss_fn, positions=positions)


def test_targets_come_from_the_frozen_teacher_and_only_the_ema_moves():
  """dinov2: the DINO family's targets (centred, with a patch head on the masked positions) and DINOv3's unmasked
  student crops; a SimDINO student takes the same branch of the step (the resume test below trains one)."""
  config = student_config("dinov2")
  state, step, p = build(config)
  masked = p["positions"] > 0
  batch = batch_of(config, masked)
  first = jax.tree_util.tree_map(np.asarray, state)

  # The reference: the frozen network's outputs as targets, the method's loss called directly, one SGD update.
  def reference_loss(params, graphdef, variables):
    gather = step_lib.masked_gather(batch["mask"], p["positions"]) if masked else None
    targets = step_lib.forward(nnx.merge(graphdef, variables), batch, key=None, student=False, gather=gather)
    net = nnx.merge(p["graphdef"], params)
    key = jax.random.fold_in(state.rng, 0)
    # DINOv3's distillation: the student's global crops unmasked, the patch loss on the masked positions.
    out = step_lib.forward(net, batch, key=key, student=True, masks=None, gather=gather)
    if masked:
      out["patch_mask"] = gather.valid
    return p["loss_fn"](out, jax.lax.stop_gradient(targets), state.loss_state, state.step)[0]

  reference = jax.jit(jax.value_and_grad(reference_loss), static_argnums=1)
  ref_loss, grads = reference(state.student, p["tgraph"], state.distill_teacher)
  # SGD at lr 1; on the host from here (eager jax ops would each compile a program)
  ref_student = jax.tree_util.tree_map(lambda a, g: a - g, first.student, jax.device_get(grads))

  jitted = jax.jit(step)
  new, metrics = jitted(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-5)
  for name, leaf in named_leaves(new.student).items():
    close(leaf, named_leaves(ref_student)[name], name)
  new, _ = jitted(new, batch_of(config, masked, seed=1))  # a second step: the teacher still has not moved

  for name, leaf in named_leaves(new.distill_teacher).items():
    np.testing.assert_array_equal(np.asarray(leaf), named_leaves(first.distill_teacher)[name], err_msg=name)
  # The EMA of the student as without distillation: after step 1 teacher = m t0 + (1 - m) s1, after step 2 again.
  t1 = jax.tree_util.tree_map(lambda t, s: MOMENTUM * t + (1 - MOMENTUM) * s, first.teacher, ref_student)
  expected = jax.tree_util.tree_map(lambda t, s: MOMENTUM * t + (1 - MOMENTUM) * s, t1, jax.device_get(new.student))
  for name, leaf in named_leaves(new.teacher).items():
    close(leaf, named_leaves(expected)[name], name)


def write_export(config, path, **metadata):
  """The teacher network of ``config`` as an export of ours with its head (names, Flax layout, config metadata)."""
  arrays = {k: np.asarray(v) for k, v in named_leaves(network(config, 7)[1]).items()}
  formats.save_npz(arrays, str(path), metadata={"config": config.to_json_best_effort(), **metadata})
  return arrays


def test_a_teacher_whose_head_differs_is_refused_in_one_line(tmp_path):
  config = student_config("simdino")
  config.distill.update(enabled=True, teacher=str(tmp_path / "t.npz"))
  other = teacher_of(config)
  other.head.out_dim = 32
  write_export(other, tmp_path / "t.npz")
  with pytest.raises(ConfigError) as e:
    distill.teacher_config(config)
  assert str(e.value).startswith("config.head.out_dim: 16 differs from the frozen teacher's 32") and "\n" not in str(
    e.value
  )
  masked = student_config("dinov2")
  masked.distill.update(enabled=True, teacher=str(tmp_path / "m.npz"))
  coarse = teacher_of(masked)
  coarse.model.variant, coarse.data.global_size, coarse.model.img_size = "mu/8", 16, 16
  write_export(coarse, tmp_path / "m.npz")
  with pytest.raises(ConfigError, match=r"^config.model.variant: patch size 4 differs from the frozen teacher's 8"):
    distill.teacher_config(masked)
  config.distill.teacher = str(tmp_path / "absent")
  with pytest.raises(ConfigError, match="^config.distill.teacher: .*absent does not exist"):
    distill.teacher_config(config)


def test_official_checkpoint_layout_is_read_with_its_head(tmp_path):
  """A DINOv2-style teacher checkpoint (teacher.backbone.*, teacher.dino_head.*) with its recipe as a JSON file."""
  config = student_config("simdino")
  tcfg = teacher_of(config)
  ours = write_export(tcfg, tmp_path / "ours.npz")
  official = {f"teacher.{k}": v for k, v in torch_interop.network_to_torch(ours, head="dino_head").items()}
  formats.save_npz(official, str(tmp_path / "official.npz"))
  (tmp_path / "recipe.json").write_text(json.dumps(json.loads(tcfg.to_json_best_effort())))
  config.distill.update(enabled=True, teacher=str(tmp_path / "official.npz"))
  with pytest.raises(ConfigError, match="^config.distill.teacher_config: .* carries no config"):
    distill.teacher_config(config)
  config.distill.teacher_config = str(tmp_path / "recipe.json")
  like = named_leaves(nnx.split(nnx.eval_shape(lambda: methods.build_network(distill.teacher_config(config))))[1])
  arrays, _ = distill.load_arrays(config, like)
  assert set(arrays) == set(ours)
  for name, a in ours.items():
    np.testing.assert_array_equal(arrays[name], a, err_msg=name)


def test_resumed_distillation_run_equals_the_uninterrupted_one(tmp_path):
  """The teacher is a workdir of ours (its EMA teacher); the resumed run restores the frozen teacher from its own
  checkpoint: the source is gone by then."""
  source = tmp_path / "teacher_run"
  tcfg = teacher_of(student_config("simdino"))
  tstate = {"step": jnp.asarray(5, jnp.int32), "teacher": network(tcfg, 7)[1]}  # what restore_params reads
  with checkpointing.Checkpointer(source / "checkpoints") as ckpt:
    ckpt.save(5, tstate, checkpointing.config_dict(tcfg))
  config = student_config("simdino")
  config.update(total_steps=2, checkpoint_every=1, tensorboard=False)
  config.evals.knn.update(every=0, final=False, at_init=False)
  config.distill.update(enabled=True, teacher=str(source))

  run = tmp_path / "run"
  tr = trainer.Trainer(config, str(run))
  tr.run()
  whole = jax.device_get(tr.state)
  for name, leaf in named_leaves(whole.distill_teacher).items():  # the source's EMA teacher, loaded whole
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(named_leaves(tstate['teacher'])[name]), err_msg=name)
  # As if stopped after step 1: its last checkpoint and the source gone, the same command again.
  shutil.rmtree(run / "checkpoints" / "2")
  shutil.rmtree(source)
  tr = trainer.Trainer(config, str(run))
  tr.run()
  resumed = jax.device_get(tr.state)
  assert int(resumed.step) == 2 and os.path.isdir(run / "checkpoints" / "2")
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(whole)[0], jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
