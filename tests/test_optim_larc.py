"""optim.name "larc": apex's LARC around torch.optim.SGD (SwAV's main_swav.py) against a float64 NumPy transcription.

main_swav.py builds ``LARC(optimizer=torch.optim.SGD(model.parameters(), lr=args.base_lr, momentum=0.9,
weight_decay=args.wd), trust_coefficient=0.001, clip=False)`` and sets ``param_group["lr"] = lr_schedule[iteration]``
before each step. The reference below transcribes, for each step:

apex/parallel/LARC.py (NVIDIA/apex at 0bfb830085a31c6ed49502c52403c8d0f1fd3eb9), ``LARC.step``, lines 81-104:
    for group in self.optim.param_groups:
        weight_decay = group['weight_decay'] if 'weight_decay' in group else 0      # 83
        weight_decays.append(weight_decay)
        group['weight_decay'] = 0                                                   # 85
        for p in group['params']:
            if p.grad is None:                                                      # 87
                continue
            param_norm = torch.norm(p.data)                                         # 89
            grad_norm = torch.norm(p.grad.data)
            if param_norm != 0 and grad_norm != 0:                                  # 92
                adaptive_lr = self.trust_coefficient * (param_norm) / (grad_norm + param_norm * weight_decay + self.eps)
                if self.clip:                                                       # 97
                    adaptive_lr = min(adaptive_lr/group['lr'], 1)                   # 99
                p.grad.data += weight_decay * p.data                                # 101
                p.grad.data *= adaptive_lr                                          # 102
    self.optim.step()                                                               # 104

torch/optim/sgd.py (torch 2.13.0) ``_single_tensor_sgd``, lines 346-379 (weight_decay is 0 here, set by LARC):
    if weight_decay != 0: grad = grad.add(param, alpha=weight_decay)                # 346-355
    if momentum != 0:
        buf = momentum_buffer_list[i]
        if buf is None: buf = grad.detach().clone()                                 # 360-361
        else: buf.mul_(momentum).add_(grad, alpha=1 - dampening)                    # 364 (dampening 0)
        grad = buf                                                                  # 369 (nesterov off)
    param.add_(grad, alpha=-lr)                                                     # 379

and SGD skips a parameter whose grad is None (SwAV's prototypes during ``freeze_prototypes_niters``: ``p.grad = None``).
Two param groups when not every leaf is decayed (the second with weight_decay 0), one otherwise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_optimizers import flatten, nest  # the name-path helpers of the LARS / SGD tests

from simdino_jax import config as config_lib
from simdino_jax import optim
from simdino_jax.errors import ConfigError

STEPS, FROZEN, MOMENTUM = 5, 2, 0.9
LRS = np.array([0.0, 0.2, 0.15, 0.1, 0.05])  # step 0 at lr 0, as a linear warm-up from 0 starts
WDS = np.array([0.05, 0.1, 0.2, 0.3, 0.4])  # large, so that the decay and its place in the ratio show
SHAPES = {
  "backbone/conv/kernel": (3, 3, 2, 4),
  "backbone/bn/scale": (4,),  # 1-D: adapted by LARC (DINO's LARS leaves it out)
  "backbone/bn/bias": (4,),  # a zero gradient at step 1: the "grad_norm == 0" branch
  "backbone/zero/kernel": (4, 3),  # zero-initialised: the "param_norm == 0" branch, then adapted once it has moved
  "head/kernel": (4, 5),
  "head/prototypes": (6, 4),  # grad None for the first FROZEN steps, as main_swav.py's freeze_prototypes_niters
}
GRAD_SCALE = {"backbone/bn/scale": 0.05, "head/kernel": 5.0}  # spread the ratios: some clip, some do not


def make_inputs(seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  params["backbone/zero/kernel"][:] = 0.0
  grads = [
    {k: (GRAD_SCALE.get(k, 1.0) * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    for _ in range(STEPS)
  ]
  grads[1]["backbone/bn/bias"][:] = 0.0
  return params, grads


def np_larc_sgd(params, grads, *, trust, eps, clip, decayed):
  """The transcription above in float64; returns the parameters after every step and how often clip bound."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  bufs, history, clipped = {}, [], []
  for it in range(STEPS):
    for k in p:
      if k == "head/prototypes" and it < FROZEN:  # p.grad = None: LARC and SGD both skip it
        continue
      g = grads[it][k].astype(np.float64)
      weight_decay = WDS[it] if k in decayed else 0.0
      param_norm, grad_norm = np.linalg.norm(p[k]), np.linalg.norm(g)
      if param_norm != 0 and grad_norm != 0:
        adaptive_lr = trust * param_norm / (grad_norm + param_norm * weight_decay + eps)
        if clip:
          ratio = adaptive_lr / LRS[it] if LRS[it] != 0 else np.inf  # torch: tensor / 0.0 = inf
          clipped.append(ratio > 1)
          adaptive_lr = min(ratio, 1)
        g = (g + weight_decay * p[k]) * adaptive_lr
      bufs[k] = g.copy() if k not in bufs else MOMENTUM * bufs[k] + g
      p[k] = p[k] - LRS[it] * bufs[k]
    history.append({k: v.copy() for k, v in p.items()})
  return history, clipped


def run_ours(params, grads, *, trust, eps, clip, decay_all):
  cfg = config_lib.base_config().optim
  cfg.name, cfg.clip_grad, cfg.momentum, cfg.lars_eta = "larc", 0.0, MOMENTUM, trust
  cfg.larc_eps, cfg.larc_clip, cfg.weight_decay_all = eps, clip, decay_all
  tree = nest({k: jnp.asarray(v) for k, v in params.items()})
  freezes = ((nest({k: k == "head/prototypes" for k in SHAPES}), FROZEN),)
  lr_fn = lambda step: jnp.asarray(LRS, jnp.float32)[step]  # noqa: E731
  wd_fn = lambda step: jnp.asarray(WDS, jnp.float32)[step]  # noqa: E731
  tx = optim.make_optimizer(cfg, tree, lr_fn, wd_fn, freezes=freezes)
  state = tx.init(tree)

  @jax.jit
  def step(tree, state, grads):
    updates, state = tx.update(grads, state, tree)
    return jax.tree_util.tree_map(lambda a, u: a + u, tree, updates), state

  history = []
  for it in range(STEPS):
    tree, state = step(tree, state, nest({k: jnp.asarray(v) for k, v in grads[it].items()}))
    history.append(flatten(tree))
  return history


@pytest.mark.parametrize(
  "clip,decay_all,trust,eps",
  [
    (False, True, 0.02, 0.5),  # SwAV's form (clip=False, SGD(model.parameters()) decays every leaf); eps large to show
    (True, False, 0.1, 1e-8),  # clip=True, and the 1-D leaves in a second group without decay
  ],
)
def test_larc_matches_apex_larc_around_torch_sgd(clip, decay_all, trust, eps):
  params, grads = make_inputs()
  decayed = set(SHAPES) if decay_all else {k for k, s in SHAPES.items() if len(s) > 1}
  want, clipped = np_larc_sgd(params, grads, trust=trust, eps=eps, clip=clip, decayed=decayed)
  if clip:  # both sides of min(ratio, 1) are exercised
    assert any(clipped) and not all(clipped)
  got = run_ours(params, grads, trust=trust, eps=eps, clip=clip, decay_all=decay_all)
  for it in range(STEPS):
    for k in SHAPES:
      np.testing.assert_allclose(got[it][k], want[it][k], rtol=2e-5, atol=1e-7, err_msg=f"step {it} {k}")
  # The frozen leaf did not move while frozen; the zero leaf left zero (raw-gradient step) and was adapted after.
  np.testing.assert_array_equal(got[FROZEN - 1]["head/prototypes"], params["head/prototypes"])
  assert np.linalg.norm(got[1]["backbone/zero/kernel"]) > 0


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("larc_eps", -1e-8, "config.optim.larc_eps: must be a number >= 0"),
    ("larc_clip", "no", "config.optim.larc_clip: must be True or False"),
    ("name", "lamb", "config.optim.name: must be one of 'adamw', 'sgd', 'lars', 'larc'"),
    ("warmup_start_lr", -0.3, "config.optim.warmup_start_lr: must be >= 0"),
  ],
)
def test_bad_larc_fields_are_refused_in_one_line(field, value, message):
  c = config_lib.base_config()
  del c.optim[field]  # past ConfigDict's type check, as a config file that builds its own optim block could be
  c.optim[field] = value
  with pytest.raises(ConfigError) as err:
    config_lib.validate(c, num_devices=1)
  assert str(err.value).startswith(message) and "\n" not in str(err.value)


def swav_lr_schedule(base_lr, final_lr, epochs, warmup_epochs, niter, start_warmup):
  """main_swav.py lines 178-182 (facebookresearch/swav), names shortened:
  warmup_lr_schedule = np.linspace(args.start_warmup, args.base_lr, len(train_loader) * args.warmup_epochs)
  iters = np.arange(len(train_loader) * (args.epochs - args.warmup_epochs))
  cosine_lr_schedule = np.array([args.final_lr + 0.5 * (args.base_lr - args.final_lr) * (1 + \\
                       math.cos(math.pi * t / (len(train_loader) * (args.epochs - args.warmup_epochs)))) for t in iters])
  lr_schedule = np.concatenate((warmup_lr_schedule, cosine_lr_schedule))"""
  warmup = np.linspace(start_warmup, base_lr, niter * warmup_epochs)
  t = np.arange(niter * (epochs - warmup_epochs))
  cosine = final_lr + 0.5 * (base_lr - final_lr) * (1 + np.cos(np.pi * t / (niter * (epochs - warmup_epochs))))
  return np.concatenate((warmup, cosine))


@pytest.mark.parametrize("arg,epochs", [(None, 400), ("800ep", 800)])
def test_swav_resnet50_recipe_is_larc_with_the_scripts_schedule(arg, epochs):
  """configs/swav_resnet50_in1k.py: LARC(SGD(model.parameters(), momentum=0.9, weight_decay=1e-6),
  trust_coefficient=0.001, clip=False) and scripts/swav_{400,800}ep_pretrain.sh's lr schedule (--base_lr 4.8
  --final_lr 0.0048 --warmup_epochs 10 --start_warmup 0.3) at 1,281,167 images / batch 4096 (312 iterations an
  epoch), every iteration compared."""
  import runpy
  from pathlib import Path

  from simdino_jax.train import setup

  path = Path(__file__).resolve().parents[1] / "configs" / "swav_resnet50_in1k.py"
  c = runpy.run_path(str(path))["get_config"](arg)
  config_lib.validate(c, num_devices=1)
  o = c.optim
  assert (o.name, o.lars_eta, o.larc_clip, o.larc_eps, o.momentum, o.weight_decay_all) == (
    "larc",
    0.001,
    False,
    1e-8,
    0.9,
    True,
  )
  assert (o.weight_decay, o.weight_decay_end, o.clip_grad) == (1e-6, 1e-6, 0.0)
  d = setup.durations(c, 1_281_167)
  assert (d.steps_per_epoch, d.total_steps) == (312, 312 * epochs)
  ours = np.asarray(optim.lr_schedule(o, c.batch_size, d.total_steps, d.warmup_steps)(jnp.arange(d.total_steps)))
  want = swav_lr_schedule(4.8, 0.0048, epochs, 10, 312, 0.3)
  np.testing.assert_allclose(ours, want, rtol=2e-6, atol=1e-6)
  tree = {"kernel": jnp.ones((2, 3)), "scale": jnp.ones((3,))}
  tx = optim.make_optimizer(o, tree, lambda s: jnp.float32(4.8), lambda s: jnp.float32(1e-6))
  assert any(isinstance(s, optim.LarcState) for s in tx.init(tree))
