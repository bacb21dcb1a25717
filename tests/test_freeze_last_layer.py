"""Frozen prototype layers against a NumPy transcription of PyTorch's AdamW (torch.optim.AdamW's documented
algorithm, per parameter: step t += 1 only when the parameter has a gradient; p *= 1 - lr * wd;
m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)).

DINO v1 (dino/main_dino.py -> utils.cancel_gradients_last_layer) sets the last layer's gradients to None during the
first epoch, so AdamW skips it: no moments, no decay, and its step count starts later. DINOv2 (train/train.py
apply_optim_scheduler) gives it lr 0: its moments accumulate, the weights (decay included) do not move.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from simdino_jax import optim, schedules

B1, B2, EPS, LR, WD, FROZEN = 0.9, 0.999, 1e-8, 0.05, 0.1, 2


def np_adamw(params, grads, lr_of, skip):
  """params: {name: array}; grads: per step {name: array}; lr_of(name, step); skip(name, step) -> grad is None."""
  p = {k: v.astype(np.float64).copy() for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  t = {k: 0 for k in p}
  history = []
  for step, g in enumerate(grads):
    for k in p:
      if skip(k, step):
        continue
      lr = lr_of(k, step)
      t[k] += 1
      p[k] *= 1 - lr * WD
      m[k] = B1 * m[k] + (1 - B1) * g[k]
      v2[k] = B2 * v2[k] + (1 - B2) * g[k] ** 2
      p[k] -= lr / (1 - B1 ** t[k]) * m[k] / (np.sqrt(v2[k]) / np.sqrt(1 - B2 ** t[k]) + EPS)
    history.append({k: (p[k].copy(), m[k].copy(), v2[k].copy()) for k in p})
  return history


def run_ours(mode, params, grads):
  cfg = ml_collections.ConfigDict(
    dict(clip_grad=0.0, clip_mode="per_tensor", b1=B1, b2=B2, adam_eps=EPS, freeze_mode=mode)
  )
  mask = {"backbone": False, "last_layer": True}
  tx = optim.make_optimizer(cfg, params, schedules.constant(LR), schedules.constant(WD), freezes=((mask, FROZEN),))
  state = tx.init(params)
  p = dict(params)
  out = []
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = jax.tree_util.tree_map(lambda a, u: a + u, p, updates)
    adam = state[0]  # the chain's first part: the Adam moments
    out.append({k: (np.asarray(p[k]), np.asarray(adam.mu[k]), np.asarray(adam.nu[k])) for k in p})
  return out


@pytest.mark.parametrize("mode", ["drop_grads", "zero_lr"])
def test_frozen_last_layer_follows_the_official_adamw(mode):
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal((3, 4)), jnp.float32) for k in ("backbone", "last_layer")}
  grads = [{k: jnp.asarray(rng.standard_normal((3, 4)), jnp.float32) for k in params} for _ in range(5)]
  np_params = {k: np.asarray(v) for k, v in params.items()}
  np_grads = [{k: np.asarray(v, np.float64) for k, v in g.items()} for g in grads]
  frozen = lambda k, s: k == "last_layer" and s < FROZEN  # noqa: E731
  if mode == "drop_grads":  # DINO v1: grads None while frozen
    want = np_adamw(np_params, np_grads, lambda k, s: LR, frozen)
  else:  # DINOv2: lr 0 while frozen
    want = np_adamw(np_params, np_grads, lambda k, s: 0.0 if frozen(k, s) else LR, lambda k, s: False)
  got = run_ours(mode, params, grads)
  for step, (g, w) in enumerate(zip(got, want)):
    for k in params:
      for what, a, b in zip(("param", "mu", "nu"), g[k], w[k]):
        # float32 against float64 over <= 5 steps of elementwise updates: 1e-5 relative.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{mode} step {step} {k} {what}")
  # The frozen steps leave the weights exactly as they were (no decay either), in both modes.
  for step in range(FROZEN):
    np.testing.assert_array_equal(got[step]["last_layer"][0], np_params["last_layer"])
  moments = float(np.abs(got[FROZEN - 1]["last_layer"][1]).max())
  assert (moments == 0.0) == (mode == "drop_grads"), moments


def test_an_unknown_freeze_mode_is_refused():
  cfg = ml_collections.ConfigDict(
    dict(clip_grad=0.0, clip_mode="per_tensor", b1=B1, b2=B2, adam_eps=EPS, freeze_mode="grads_none")
  )
  with pytest.raises(ValueError, match="optim.freeze_mode"):
    optim.make_optimizer(
      cfg, {"w": jnp.zeros(2)}, schedules.constant(LR), schedules.constant(WD), freezes=(({"w": True}, 1),)
    )
