"""optim.weight_decay_all: torch.optim.SGD(model.parameters(), weight_decay=wd) as MoCo's and SwAV's mains build it,
every parameter decayed (biases and BatchNorm scales included), against a NumPy transcription of torch's SGD."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simdino_jax import config as config_lib
from simdino_jax import optim


def torch_sgd(params, grads, lr, wd, momentum, decayed):
  """torch.optim.SGD's documented update (dampening 0, no Nesterov), transcribed:
      if weight_decay != 0: g = g + weight_decay * p
      if momentum != 0: buf = g if t == 1 else momentum * buf + g; g = buf
      p = p - lr * g
  over the steps of ``grads``; ``decayed``: the names in the decayed group."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  bufs = {}
  for g_step in grads:
    for k, g in g_step.items():
      d = g + (wd * params[k] if k in decayed else 0.0)
      bufs[k] = d if k not in bufs else momentum * bufs[k] + d
      params[k] = params[k] - lr * bufs[k]
  return params


@pytest.mark.parametrize("decay_all", [True, False])
def test_sgd_decays_every_parameter_with_weight_decay_all(decay_all):
  rng = np.random.default_rng(0)
  params = {
    "backbone": {"conv": {"kernel": rng.normal(size=(2, 3)).astype(np.float32)}},
    "head": {
      "bn": {"scale": rng.normal(size=(3,)).astype(np.float32), "bias": rng.normal(size=(3,)).astype(np.float32)}
    },
  }
  names = {"backbone/conv/kernel": ("backbone", "conv", "kernel"), "head/bn/scale": ("head", "bn", "scale"),
           "head/bn/bias": ("head", "bn", "bias")}  # fmt: skip
  grads = [{n: rng.normal(size=params[a][b][c].shape).astype(np.float32) for n, (a, b, c) in names.items()}
           for _ in range(3)]  # fmt: skip
  cfg = config_lib.base_config().optim
  cfg.name, cfg.clip_grad, cfg.weight_decay_all, cfg.momentum = "sgd", 0.0, decay_all, 0.9
  lr, wd = 0.5, 0.1  # a large decay, so that a skipped leaf is far off
  tx = optim.make_optimizer(cfg, params, lambda step: jnp.float32(lr), lambda step: jnp.float32(wd))
  state, p = tx.init(params), params
  for g in grads:
    tree = {"backbone": {"conv": {"kernel": g["backbone/conv/kernel"]}},
            "head": {"bn": {"scale": g["head/bn/scale"], "bias": g["head/bn/bias"]}}}  # fmt: skip
    updates, state = tx.update(tree, state, p)
    p = optax.apply_updates(p, updates)
  flat = {"backbone/conv/kernel": params["backbone"]["conv"]["kernel"], "head/bn/scale": params["head"]["bn"]["scale"],
          "head/bn/bias": params["head"]["bn"]["bias"]}  # fmt: skip
  decayed = set(names) if decay_all else {"backbone/conv/kernel"}  # default: DINO's regularised group (no 1-D)
  expected = torch_sgd(flat, grads, lr, wd, 0.9, decayed)
  for n, (a, b, c) in names.items():
    np.testing.assert_allclose(np.asarray(p[a][b][c]), expected[n], rtol=1e-5, atol=1e-6, err_msg=n)
