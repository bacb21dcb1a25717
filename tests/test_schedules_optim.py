"""Schedules against the official DINO cosine_scheduler (NumPy), weight-decay mask, clipping, lr scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simdino_jax import config as config_lib
from simdino_jax import optim, schedules


def official_cosine_scheduler(base, final, total, warmup, start_warmup=0.0):
  """The official DINO utils.cosine_scheduler, per iteration, written in NumPy."""
  warm = np.linspace(start_warmup, base, warmup) if warmup > 0 else np.array([])
  iters = np.arange(total - warmup)
  sched = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate((warm, sched))


@pytest.mark.parametrize("warmup,init", [(0, 0.0), (10, 0.0), (10, 1e-6)])
def test_warmup_cosine_matches_official_scheduler(warmup, init):
  total = 57
  fn = jax.jit(schedules.warmup_cosine(1e-3, 1e-6, total, warmup, warmup_init=init))
  got = np.array([fn(i) for i in range(total)])
  np.testing.assert_allclose(got, official_cosine_scheduler(1e-3, 1e-6, total, warmup, init), rtol=1e-5, atol=1e-10)


def test_momentum_and_weight_decay_schedules():
  m = schedules.cosine(0.996, 1.0, 100)
  np.testing.assert_allclose(m(0), 0.996, rtol=1e-7)
  # docs/methods.md#optimisation: m(it) = 1 - 1/2 (1 - m0)(1 + cos(pi it / T))
  for it in (1, 37, 99):
    np.testing.assert_allclose(m(it), 1 - 0.5 * 0.004 * (1 + np.cos(np.pi * it / 100)), rtol=1e-6)
  wd = schedules.cosine(0.04, 0.4, 100)
  np.testing.assert_allclose([wd(0), wd(50)], [0.04, 0.22], rtol=1e-5)


def test_schedule_rejects_bad_warmup():
  with pytest.raises(ValueError, match="warmup_steps"):
    schedules.warmup_cosine(1.0, 0.0, 10, 10)


def test_weight_decay_mask_skips_biases_norms_layerscale_only():
  params = {
    "cls_token": jnp.zeros((1, 1, 4)),
    "pos_embed": jnp.zeros((1, 5, 4)),
    "mask_token": jnp.zeros((1, 4)),
    "patch_embed": {"kernel": jnp.zeros((2, 2, 3, 4)), "bias": jnp.zeros((4,))},
    "blocks": {
      "0": {
        "norm1": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
        "attn": {"qkv": {"kernel": jnp.zeros((4, 12)), "bias": jnp.zeros(12)}},
        "ls1": {"gamma": jnp.ones(4)},
      }
    },
  }
  mask = optim.weight_decay_mask(params)
  assert mask["cls_token"] and mask["pos_embed"] and mask["mask_token"]
  assert mask["patch_embed"]["kernel"] and mask["blocks"]["0"]["attn"]["qkv"]["kernel"]
  assert not mask["patch_embed"]["bias"] and not mask["blocks"]["0"]["attn"]["qkv"]["bias"]
  assert not mask["blocks"]["0"]["norm1"]["scale"] and not mask["blocks"]["0"]["norm1"]["bias"]
  assert not mask["blocks"]["0"]["ls1"]["gamma"]


def test_clip_per_tensor_clips_each_leaf_independently():
  grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}  # norms 5 and 0.5
  out, _ = optim.clip_per_tensor(1.0).update(grads, optax.EmptyState())
  np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-5)
  np.testing.assert_allclose(out["b"], [0.3, 0.4], rtol=1e-6)  # below the threshold: untouched


def _optim_cfg(**kw):
  c = config_lib.base_config().optim
  c.update(kw)
  return c


def test_lr_scaling_rules():
  for rule, want in [("linear_256", 5e-4 * 512 / 256), ("sqrt_1024", 5e-4 * (512 / 1024) ** 0.5), ("none", 5e-4)]:
    fn = optim.lr_schedule(_optim_cfg(lr_scaling=rule), 512, 100, 10)
    np.testing.assert_allclose(fn(9), want, rtol=1e-6)  # end of warm-up = peak
  with pytest.raises(ValueError, match="lr_scaling"):
    optim.lr_schedule(_optim_cfg(lr_scaling="cubic"), 512, 100, 10)


def test_adamw_update_matches_hand_computation_with_decay_mask():
  # One AdamW step from zero moments: update = -lr (g/(|g|+eps) + wd p) on decayed leaves, -lr sign(g) else.
  cfg = _optim_cfg(clip_grad=0.0)
  params = {"w": jnp.array([[1.0, -2.0]]), "bias": jnp.array([0.5])}
  grads = {"w": jnp.array([[0.1, 0.2]]), "bias": jnp.array([-0.3])}
  lr, wd = schedules.constant(0.01), schedules.constant(0.1)
  tx = optim.make_optimizer(cfg, params, lr, wd)
  updates, _ = tx.update(grads, tx.init(params), params)
  # optax's bias correction 1 - b2**t runs in float32: 1 - float32(0.999) is 1.3e-5 off 1e-3, so g / sqrt(nu_hat)
  # is 6.4e-6 short of sign(g) (8e-6 relative on the -0.008 entry): 3e-5, not 1e-5.
  np.testing.assert_allclose(updates["w"], -0.01 * (np.sign([[0.1, 0.2]]) + 0.1 * np.array([[1.0, -2.0]])), rtol=3e-5)
  np.testing.assert_allclose(updates["bias"], [0.01], rtol=3e-5)


def test_per_module_clipping_clips_each_submodule_and_keeps_nnx_state():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.backbone = nnx.Linear(3, 3, rngs=rngs)
      self.head = nnx.Linear(3, 3, rngs=rngs)

  _, params = nnx.split(Net(nnx.Rngs(0)))
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 10.0), params)
  clipped, _ = optim.clip_per_module(1.0).update(grads, optax.EmptyState())
  for key in ("backbone", "head"):
    np.testing.assert_allclose(
      np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree_util.tree_leaves(clipped[key]))), 1.0, rtol=1e-5
    )
  tx = optim.make_optimizer(
    _optim_cfg(clip_mode="per_module"), params, schedules.constant(0.1), schedules.constant(0.0)
  )
  updates, _ = tx.update(grads, tx.init(params), params)  # the whole chain accepts the clipped State
  assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)


def test_prototype_norms_get_weight_decay():
  assert optim.decays("head/last_layer/weight_g", jnp.ones(4))
  assert not optim.decays("head/proj/mlp/0/bias", jnp.ones(4))


def test_teacher_temperature_per_epoch_matches_dino_linspace():
  """DINO: np.concatenate((linspace(0.04, 0.07, W), ones(E - W) * 0.07)) indexed by epoch = step // steps_per_epoch."""
  spe, warm_epochs, epochs = 5, 4, 7
  per_epoch = np.concatenate((np.linspace(0.04, 0.07, warm_epochs), np.full(epochs - warm_epochs, 0.07)))
  fn = schedules.teacher_temperature(0.04, 0.07, warm_epochs, spe, per="epoch")
  got = np.array([float(fn(s)) for s in range(epochs * spe)])
  np.testing.assert_allclose(got, np.repeat(per_epoch, spe), rtol=1e-6)


def test_teacher_temperature_per_iteration_matches_dinov2_cosine_scheduler_warmup():
  """DINOv2: CosineScheduler(base=final=0.07, warmup_iters=W*spe, start_warmup_value=0.04), per iteration."""
  spe, warm_epochs = 5, 3
  iters = warm_epochs * spe
  expected = np.concatenate((np.linspace(0.04, 0.07, iters), np.full(10, 0.07)))
  fn = schedules.teacher_temperature(0.04, 0.07, warm_epochs, spe, per="iteration")
  got = np.array([float(fn(s)) for s in range(iters + 10)])
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert len(set(np.round(got[:spe], 8))) == spe  # rises within the first epoch, unlike the per-epoch rule


def test_teacher_temperature_rejects_unknown_indexing():
  with pytest.raises(ValueError, match="per"):
    schedules.teacher_temperature(0.04, 0.07, 3, 5, per="batch")
  c = config_lib.base_config()
  c.method = "dino"
  c.dino.teacher_temp_per = "batch"
  with pytest.raises(config_lib.ConfigError, match="dino.teacher_temp_per"):
    config_lib.validate(c, num_devices=1)


def simdinov2_cosine_scheduler(base, final, total, warmup, start):
  """SimDINOv2 fork, simdinov2/utils/utils.py CosineScheduler.__getitem__ (no freeze / peak iterations):
  it < W: start + (base - start) * it / W; else final + 0.5 (base - final) (1 + cos(pi (it - W) / (total - W)))."""
  out = []
  for it in range(total):
    if it < warmup:
      out.append(start + (base - start) * it / warmup)
    else:
      out.append(final + 0.5 * (base - final) * (1 + np.cos(np.pi * (it - warmup) / (total - warmup))))
  return np.array(out)


def test_step_over_warmup_rule_matches_the_simdinov2_fork_scheduler():
  got = np.asarray(
    jax.vmap(schedules.warmup_cosine(4e-3, 1e-6, 30, 10, warmup_init=1e-6, warmup_rule="step_over_warmup"))(
      jnp.arange(30)
    )
  )
  np.testing.assert_allclose(got, simdinov2_cosine_scheduler(4e-3, 1e-6, 30, 10, 1e-6), rtol=1e-5, atol=1e-9)
  linspace = np.asarray(jax.vmap(schedules.warmup_cosine(4e-3, 1e-6, 30, 10, warmup_init=1e-6))(jnp.arange(30)))
  assert abs(linspace[9] - 4e-3) < 1e-9 and got[9] < 3.7e-3  # linspace reaches base one step earlier
  with pytest.raises(ValueError, match="warmup_rule"):
    schedules.warmup_cosine(1.0, 0.0, 10, 2, warmup_rule="fork")
