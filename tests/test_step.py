"""The pure train step: one compilation, EMA teacher, loss decreases on a fixed batch, NaN guard, bfloat16 compute."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from simdino_jax import methods, optim, schedules
from simdino_jax.methods import build_network
from simdino_jax.train.state import TrainState
from simdino_jax.train.step import make_train_step


def build(config, momentum=0.9):
  method = methods.get_method(config.method)
  graphdef, params = nnx.split(build_network(config))
  lr = schedules.constant(config.optim.lr)
  wd = schedules.constant(0.04)
  tx = optim.make_optimizer(config.optim, params, lr, wd)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    student=params,
    teacher=jax.tree_util.tree_map(jnp.copy, params),
    opt_state=tx.init(params),
    loss_state={},
    rng=jax.random.key_data(jax.random.key(1)),
  )
  step = make_train_step(
    graphdef, method.make_loss(config, 100), tx, lr_fn=lr, wd_fn=wd, momentum_fn=schedules.constant(momentum)
  )
  return state, step


def fixed_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  d = config.data
  return {
    "global": jnp.asarray(
      rng.standard_normal((config.batch_size, d.num_global, d.global_size, d.global_size, 3)), jnp.float32
    ),
    "local": jnp.asarray(
      rng.standard_normal((config.batch_size, d.num_local, d.local_size, d.local_size, 3)), jnp.float32
    ),
  }


def test_step_compiles_once_and_reduces_loss_on_a_fixed_batch(tiny_config):
  # A frozen teacher (momentum 1) and no drop path make the objective on a fixed batch stationary.
  tiny_config.model.drop_path_rate = 0.0
  tiny_config.optim.lr = 1e-4
  state, step = build(tiny_config, momentum=1.0)
  traced = jax.jit(chex.assert_max_traces(step, n=1), donate_argnums=0)
  batch = fixed_batch(tiny_config)
  losses = []
  for _ in range(8):
    state, metrics = traced(state, batch)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 8
  assert losses[-1] < losses[0], losses
  for key in ("loss", "align", "rate", "lr", "wd", "momentum", "grad_norm"):
    assert np.isfinite(float(metrics[key])), key


def test_teacher_is_ema_of_updated_student(tiny_config):
  state, step = build(tiny_config, momentum=0.9)
  old_teacher = jax.tree_util.tree_map(np.asarray, state.teacher)
  new, _ = jax.jit(step)(state, fixed_batch(tiny_config))
  want = jax.tree_util.tree_map(lambda t, s: 0.9 * t + 0.1 * np.asarray(s), old_teacher, new.student)
  chex.assert_trees_all_close(new.teacher, want, rtol=1e-5, atol=1e-7)
  # The student moved, and the teacher did not get a gradient step of its own.
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), new.student, old_teacher)
  assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_drop_path_noise_depends_on_step_not_on_call(tiny_config):
  state, step = build(tiny_config)
  jstep = jax.jit(step)
  batch = fixed_batch(tiny_config)
  _, m1 = jstep(state, batch)
  _, m2 = jstep(state, batch)
  assert float(m1["loss"]) == float(m2["loss"])  # same state and step: same keys, same result


def test_non_finite_loss_leaves_state_untouched(tiny_config):
  state, step = build(tiny_config)
  batch = fixed_batch(tiny_config)
  batch["global"] = batch["global"].at[0].set(jnp.nan)
  new, metrics = jax.jit(step)(state, batch)
  assert not np.isfinite(float(metrics["loss"]))
  assert int(new.step) == 0
  chex.assert_trees_all_equal(new.student, state.student)


def test_bfloat16_step_tracks_float32_step_and_keeps_a_float32_state(tiny_config):
  # Mixed precision (config.model.dtype): only the matmuls and activations drop to bfloat16; parameters, teacher,
  # optimizer state, gradients and the loss's reductions stay float32, so one step lands next to the float32 one.
  batch = fixed_batch(tiny_config)
  results = {}
  for dtype in ("float32", "bfloat16"):
    tiny_config.model.dtype = dtype
    state, step = build(tiny_config)
    start = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(state.student)]  # float32, same for both dtypes
    results[dtype] = jax.jit(step)(state, batch)
  new32, m32 = results["float32"]
  new16, m16 = results["bfloat16"]
  for tree in (new16.student, new16.teacher, new16.opt_state):
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
  for key in ("loss", "align", "rate", "grad_norm"):
    assert m16[key].dtype == jnp.float32, key
    np.testing.assert_allclose(float(m16[key]), float(m32[key]), rtol=3e-2, err_msg=key)

  # The update itself (lr 1e-3 Adam: ~1e-3 per weight) agrees in direction: bf16 noise does not flip it.
  def update(new_state):
    return np.concatenate(
      [np.ravel(np.asarray(a) - b) for a, b in zip(jax.tree_util.tree_leaves(new_state.student), start)]
    )

  d32, d16 = update(new32), update(new16)
  cosine = float(d32 @ d16 / (np.linalg.norm(d32) * np.linalg.norm(d16)))
  assert cosine > 0.9, cosine
