"""SGD and LARS (config.optim.name) against NumPy transcriptions of the official code, over 5 steps on a small tree.

The reference replays what DINO's main_dino.py does around ``optimizer.step()`` on each iteration:

  for i, param_group in enumerate(optimizer.param_groups):       # main_dino.py train_one_epoch
      param_group["lr"] = lr_schedule[it]
      if i == 0:  # only the first group is regularized
          param_group["weight_decay"] = wd_schedule[it]
  ... utils.clip_gradients(student, args.clip_grad)                 # per tensor: clip / (norm + 1e-6) when < 1
  utils.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)   # p.grad = None for "last_layer"
  optimizer.step()

with the param groups of ``utils.get_params_groups`` (no decay on ``name.endswith(".bias") or len(param.shape) ==
1``; ``requires_grad=False`` parameters, the weight-norm g under norm_last_layer, left out), and either
torch.optim.SGD(params_groups, lr=0, momentum=0.9) (torch/optim/sgd.py ``_single_tensor_sgd``: skip a parameter
whose grad is None; ``d_p = d_p.add(param, alpha=weight_decay)``; ``buf = torch.clone(d_p)`` on its first step,
else ``buf.mul_(momentum).add_(d_p, alpha=1 - dampening)`` with dampening 0; nesterov off; ``param.add_(buf,
alpha=-lr)``) or DINO's utils.LARS(params_groups):

  if dp is None: continue
  if p.ndim != 1: dp = dp.add(p, alpha=g['weight_decay'])
  if p.ndim != 1:
      param_norm = torch.norm(p); update_norm = torch.norm(dp); one = torch.ones_like(param_norm)
      q = torch.where(param_norm > 0., torch.where(update_norm > 0, (g['eta'] * param_norm / update_norm), one), one)
      dp = dp.mul(q)
  if 'mu' not in param_state: param_state['mu'] = torch.zeros_like(p)
  mu.mul_(g['momentum']).add_(dp)
  p.add_(mu, alpha=-g['lr'])

PyTorch shapes: the prototypes' weight-norm g is (K, 1) there (2-D, so decayed and LARS-adapted), (K,) here.
DINOv2's "zero_lr" freeze (the frozen group's lr is 0 while its momentum keeps accumulating) is covered too.
With SIMDINO_TORCH_PYTHON and SIMDINO_OFFICIAL_DIR the official functions themselves run the same steps
(tests/official_optim_driver.py).
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simdino_jax import config as config_lib
from simdino_jax import optim
from simdino_jax.errors import ConfigError

STEPS, FROZEN, CLIP, MOMENTUM, ETA = 5, 2, 1.5, 0.9, 1e-3
LRS = np.array([0.05, 0.2, 0.15, 0.1, 0.05])  # any per-step values: each step reads its own
WDS = np.array([0.04, 0.1, 0.2, 0.3, 0.4])
# Our leaves (name -> shape); a zero-initialised kernel exercises LARS's "norm 0 -> ratio 1" branch.
SHAPES = {
  "backbone/conv1/kernel": (3, 3, 2, 4),
  "backbone/bn1/scale": (4,),
  "backbone/bn1/bias": (4,),
  "backbone/zero/kernel": (4, 3),
  "head/mlp/0/kernel": (4, 5),
  "head/mlp/0/bias": (5,),
  "head/last_layer/weight_v": (5, 6),
  "head/last_layer/weight_g": (6,),
}


def torch_shape(name, shape):
  return shape + (1,) if name.endswith("weight_g") else shape  # torch.nn.utils.weight_norm's g is (K, 1)


def regularized(name, shape):
  """utils.get_params_groups: the first (decayed) group."""
  return not (name.endswith("bias") or len(torch_shape(name, shape)) == 1)


def make_inputs(seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  params["backbone/zero/kernel"][:] = 0.0
  grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(STEPS)]
  for g in grads[:2]:
    g["head/mlp/0/bias"][:] = 0.0  # a zero gradient: LARS's "update norm 0" branch (not adapted: 1-D anyway)
    g["backbone/conv1/kernel"] *= 4.0  # over the clip threshold, so clipping acts
  return params, grads


def np_dino(params, grads, *, optimizer, freeze_mode, g_frozen, clip=CLIP):
  """The official loop above in float64: ``freeze_mode`` "drop_grads" (DINO: grad None for the last layer during the
  first FROZEN steps) or "zero_lr" (DINOv2: lr 0 for it); g_frozen: the weight-norm g never trained."""
  p = {k: v.astype(np.float64) for k, v in params.items() if not (g_frozen and k.endswith("weight_g"))}
  state = {}
  history = []
  for it in range(STEPS):
    g = {k: grads[it][k].astype(np.float64) for k in p}
    if clip:
      for k in g:
        coef = clip / (np.sqrt(np.sum(g[k] ** 2)) + 1e-6)
        if coef < 1:
          g[k] = g[k] * coef
    frozen = {k for k in g if "last_layer" in k and it < FROZEN}
    for k in p:
      lr = LRS[it]
      if k in frozen:
        if freeze_mode == "drop_grads":
          continue
        lr = 0.0
      wd = WDS[it] if regularized(k, p[k].shape) else 0.0
      ndim = len(torch_shape(k, p[k].shape))
      if optimizer == "sgd":
        d_p = g[k] + wd * p[k] if wd != 0 else g[k]
        state[k] = d_p.copy() if k not in state else state[k] * MOMENTUM + d_p
        p[k] = p[k] - lr * state[k]
      else:
        dp = g[k]
        if ndim != 1:
          dp = dp + wd * p[k]
          pn, un = np.sqrt(np.sum(p[k] ** 2)), np.sqrt(np.sum(dp**2))
          dp = dp * ((ETA * pn / un if un > 0 else 1.0) if pn > 0 else 1.0)
        state[k] = state.get(k, np.zeros_like(p[k])) * MOMENTUM + dp
        p[k] = p[k] - lr * state[k]
    history.append({k: v.copy() for k, v in p.items()})
  return history


def nest(flat):
  out = {}
  for name, value in flat.items():
    node = out
    *parents, last = name.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = value
  return out


def flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def run_ours(params, grads, *, optimizer, freeze_mode, g_frozen, clip=CLIP):
  cfg = config_lib.base_config().optim
  cfg.name, cfg.freeze_mode, cfg.clip_grad, cfg.clip_mode = optimizer, freeze_mode, clip, "per_tensor"
  cfg.momentum, cfg.lars_eta = MOMENTUM, ETA
  tree = nest({k: jnp.asarray(v) for k, v in params.items()})
  last_layer = nest({k: "last_layer" in k for k in SHAPES})
  freezes = [(last_layer, FROZEN)]
  if g_frozen:
    freezes.append((nest({k: k.endswith("weight_g") for k in SHAPES}), -1))
  lr_fn = lambda step: jnp.asarray(LRS, jnp.float32)[step]  # noqa: E731
  wd_fn = lambda step: jnp.asarray(WDS, jnp.float32)[step]  # noqa: E731
  tx = optim.make_optimizer(cfg, tree, lr_fn, wd_fn, freezes=tuple(freezes))
  state = tx.init(tree)
  history = []
  for it in range(STEPS):
    updates, state = tx.update(nest({k: jnp.asarray(v) for k, v in grads[it].items()}), state, tree)
    tree = jax.tree_util.tree_map(lambda a, u: a + u, tree, updates)
    history.append(flatten(tree))
  return history


CASES = [
  ("sgd", "drop_grads", True),
  ("sgd", "drop_grads", False),
  ("sgd", "zero_lr", True),
  ("lars", "drop_grads", True),
  ("lars", "drop_grads", False),
  ("lars", "zero_lr", False),
]


@pytest.mark.parametrize("optimizer,freeze_mode,g_frozen", CASES)
def test_sgd_and_lars_follow_the_official_step(optimizer, freeze_mode, g_frozen):
  params, grads = make_inputs()
  want = np_dino(params, grads, optimizer=optimizer, freeze_mode=freeze_mode, g_frozen=g_frozen)
  got = run_ours(params, grads, optimizer=optimizer, freeze_mode=freeze_mode, g_frozen=g_frozen)
  for it in range(STEPS):
    for k in SHAPES:
      if g_frozen and k.endswith("weight_g"):
        np.testing.assert_array_equal(got[it][k], params[k])  # never trained, never decayed
        continue
      # float32 against float64 over 5 steps: 1e-5 relative.
      np.testing.assert_allclose(got[it][k], want[it][k], rtol=1e-5, atol=1e-7, err_msg=f"step {it} {k}")
  for it in range(FROZEN):  # the frozen steps leave the last layer exactly as it was, decay included
    np.testing.assert_array_equal(got[it]["head/last_layer/weight_v"], params["head/last_layer/weight_v"])
  # LARS moves a weight by about lr x eta x ||p|| per step, SGD by lr x ||g||: the two references differ a lot.
  assert not np.allclose(got[-1]["backbone/conv1/kernel"], params["backbone/conv1/kernel"], rtol=1e-6, atol=0)


def test_sgd_momentum_buffer_is_held_while_frozen_and_starts_at_the_first_gradient():
  """DINO's frozen last layer: no momentum during the frozen steps; its first real step is lr x (g + wd p), not
  (1 + momentum) x ..., as torch.optim.SGD starts the buffer at the first gradient it sees."""
  params, grads = make_inputs(1)
  got = run_ours(params, grads, optimizer="sgd", freeze_mode="drop_grads", g_frozen=True, clip=0.0)
  k = "head/last_layer/weight_v"
  want = params[k].astype(np.float64) - LRS[FROZEN] * (grads[FROZEN][k] + WDS[FROZEN] * params[k])
  np.testing.assert_allclose(got[FROZEN][k], want, rtol=1e-6, atol=1e-7)


def test_lars_exclusions():
  """utils.LARS's p.ndim != 1 with PyTorch shapes: biases and norm scales are not adapted, g (K, 1 there) is."""
  params = nest({k: jnp.ones(s) for k, s in SHAPES.items()})
  adapts = flatten(jax.tree_util.tree_map(np.asarray, optim.map_with_name(optim.lars_adapts, params)))
  assert {k for k, v in adapts.items() if v} == {
    "backbone/conv1/kernel",
    "backbone/zero/kernel",
    "head/mlp/0/kernel",
    "head/last_layer/weight_v",
    "head/last_layer/weight_g",
  }
  # DINO's regularised group (get_params_groups) is our weight-decay mask on these leaves.
  decays = flatten(jax.tree_util.tree_map(np.asarray, optim.weight_decay_mask(params)))
  assert {k for k, v in decays.items() if v} == {k for k, s in SHAPES.items() if regularized(k, s)}


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("name", "adam", "config.optim.name: must be one of 'adamw', 'sgd', 'lars'"),
    ("momentum", 1.0, "config.optim.momentum: must be in [0, 1)"),
    ("lars_eta", 0.0, "config.optim.lars_eta: must be positive"),
  ],
)
def test_bad_optimizer_fields_are_refused_in_one_line(field, value, message):
  c = config_lib.base_config()
  c.optim[field] = value
  with pytest.raises(ConfigError) as err:
    config_lib.validate(c, num_devices=1)
  assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_official_optimizers_themselves(tmp_path):
  """torch.optim.SGD and DINO's utils.LARS / get_params_groups / clip_gradients / cancel_gradients_last_layer run
  by PyTorch on the same parameters and gradients (optional: needs SIMDINO_TORCH_PYTHON and SIMDINO_OFFICIAL_DIR)."""
  python, official = os.environ.get("SIMDINO_TORCH_PYTHON"), os.environ.get("SIMDINO_OFFICIAL_DIR")
  if not python or not official or not Path(official, "dino", "utils.py").exists():
    pytest.skip("needs SIMDINO_TORCH_PYTHON (a Python with torch) and SIMDINO_OFFICIAL_DIR (with dino/)")
  params, grads = make_inputs()
  arrays = {f"param:{k}": v.reshape(torch_shape(k, v.shape)) for k, v in params.items()}
  for it, g in enumerate(grads):
    arrays.update({f"grad{it}:{k}": v.reshape(torch_shape(k, v.shape)) for k, v in g.items()})
  np.savez(tmp_path / "in.npz", lrs=LRS, wds=WDS, **arrays)
  driver = Path(__file__).with_name("official_optim_driver.py")
  cmd = [python, str(driver), str(tmp_path / "in.npz"), str(tmp_path), str(FROZEN), str(CLIP)]
  subprocess.run(cmd, check=True, env={**os.environ, "SIMDINO_OFFICIAL_DIR": official}, stdout=sys.stderr)
  for optimizer in ("sgd", "lars"):
    theirs = np.load(tmp_path / f"{optimizer}.npz")
    got = run_ours(params, grads, optimizer=optimizer, freeze_mode="drop_grads", g_frozen=True)
    for it in range(STEPS):
      for k in SHAPES:
        np.testing.assert_allclose(
          got[it][k], theirs[f"{it}:{k}"].reshape(SHAPES[k]), rtol=2e-6, atol=1e-7, err_msg=f"{optimizer} {it} {k}"
        )


def test_lars_exclude_1d_false_rescales_the_1d_tensors_too():
  """optim.lars_exclude_1d=False: every tensor gets the trust ratio (the biases still get no decay)."""
  params, grads = make_inputs()
  cfg = config_lib.base_config().optim
  cfg.name, cfg.clip_grad, cfg.lars_exclude_1d = "lars", 0.0, False
  tree = nest({k: jnp.asarray(v) for k, v in params.items()})
  tx = optim.make_optimizer(cfg, tree, lambda step: 0.1, lambda step: 0.05)
  updates, _ = tx.update(nest({k: jnp.asarray(v) for k, v in grads[2].items()}), tx.init(tree), tree)
  k = "backbone/bn1/scale"
  p, g = params[k].astype(np.float64), grads[2][k].astype(np.float64)
  want = -0.1 * cfg.lars_eta * np.linalg.norm(p) / np.linalg.norm(g) * g
  np.testing.assert_allclose(flatten(updates)[k], want, rtol=1e-5)
