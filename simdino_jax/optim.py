"""The optax chain from a config: clipping -> the optimiser (``config.optim.name``) -> lr -> lr multipliers -> freezes.

``adamw`` (default): clipping -> Adam moments -> scheduled decoupled weight decay -> lr, AdamW as in PyTorch (decay
multiplied by the learning rate). ``sgd``: torch.optim.SGD as DINO's main_dino.py builds it (momentum 0.9, dampening
0, no Nesterov): the scheduled weight decay is added to the gradient, the momentum buffer accumulates that (its first
value is the first gradient), and the lr multiplies the buffer. ``lars``: DINO's ``utils.LARS`` (the barlowtwins
LARS): as ``sgd`` with each gradient-plus-decay rescaled by eta ||p|| / ||g + wd p|| before the momentum, except
the 1-D tensors (biases, norm and BatchNorm scales: ``lars_adapts``), which get neither decay nor rescaling. BYOL's
optax ``lars`` computes the same update (its exclusion is by name, bias and norm, the same set here). ``larc``:
apex's ``LARC(SGD)`` as SwAV's main_swav.py builds it (``scale_by_larc``): the gradient of EVERY tensor (1-D biases and
BatchNorm scales included; only DINO's LARS leaves those out) becomes (g + wd p) x eta ||p|| / (||g|| + wd ||p|| +
eps), the trust ratio from the raw gradient's norm (LARS: from ||g + wd p||), the decay and the ratio both skipped
when ||p|| or ||g|| is 0; ``optim.larc_clip`` takes min(ratio / lr, 1) (apex's clip=True) instead. SGD's momentum
and lr then act on that gradient (LARC sets the inner SGD's weight_decay to 0 during its step); wd is 0 on the leaves
outside ``weight_decay_mask`` (SwAV decays every one: ``optim.weight_decay_all``).
The same DINO-family details apply to every optimiser:
  * weight decay follows a cosine schedule (0.04 -> 0.4) and skips biases, norms and LayerScale gammas
    (DINO v1: names ending in bias or any 1-D tensor; DINOv2: names containing bias/norm/gamma; the union of
    both rules gives the same set on our ViT). Tokens, pos-embed and the mask token are decayed, as official.
  * clipping: "per_tensor" clips each gradient tensor's l2 norm independently (DINO v1 ``clip_gradients``),
    "global" clips the global norm (optax.clip_by_global_norm), 0 disables it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from simdino_jax import schedules
from simdino_jax.tree import map_with_name

OPTIMIZERS = ("adamw", "sgd", "lars", "larc")  # config.optim.name: main_dino.py's --optimizer choices + SwAV's LARC
CLIP_MODES = ("per_tensor", "global", "per_module")
LR_SCALINGS = ("linear_256", "sqrt_1024", "none")  # base lr x batch / 256, x sqrt(batch / 1024), or as given
# How a frozen leaf (DINO's last layer during the first epoch(s), the weight-norm g with norm_last_layer) is held:
#   "drop_grads": DINO v1 / iBOT set its gradients to None, so PyTorch's AdamW skips it entirely: no moment update,
#                 no weight decay, and its own Adam step count starts when it is first updated;
#   "zero_lr":    DINOv2 sets its lr to 0: the Adam moments keep accumulating, the weights (decay included) stay.
FREEZE_MODES = ("drop_grads", "zero_lr")


def decays(name: str, leaf: Any) -> bool:
  """Whether the parameter called ``name`` gets weight decay."""
  last = name.rsplit("/", 1)[-1]
  if last == "weight_g":  # the prototypes' weight-norm g is (K, 1) in PyTorch, so both official codes decay it
    return True
  if jnp.ndim(leaf) <= 1 or last == "bias" or "norm" in name or "gamma" in name:
    return False
  return True


def weight_decay_mask(params: Any, decay_all: bool = False) -> Any:
  """The decayed leaves: DINO's regularised group (``decays``), or with ``decay_all`` every leaf, as
  ``torch.optim.SGD(model.parameters(), weight_decay=wd)`` in MoCo's main_moco.py and SwAV's main_swav.py (biases
  and BatchNorm scales included; ``config.optim.weight_decay_all``)."""
  if decay_all:
    return jax.tree_util.tree_map(lambda _: True, params)
  return map_with_name(decays, params)


def lars_adapts(name: str, leaf: Any) -> bool:
  """Whether DINO's ``utils.LARS`` rescales (and decays) the parameter: every tensor that is not 1-D in PyTorch
  (``if p.ndim != 1``). Our weight-norm g is (K,), PyTorch's (K, 1), so it is adapted as there."""
  return name.rsplit("/", 1)[-1] == "weight_g" or jnp.ndim(leaf) != 1


def scale_by_lars_trust(eta: float, mask: Any) -> optax.GradientTransformation:
  """DINO ``utils.LARS``'s trust ratio on the (gradient + decay) of the masked leaves: x eta ||p|| / ||dp||, or x 1
  when either norm is 0 (``torch.where(param_norm > 0., torch.where(update_norm > 0, eta * param_norm /
  update_norm, one), one)``). Needs the parameters."""

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_lars_trust needs the parameters")

    def scale(g, p, m):
      if not m:
        return g
      p_norm = jnp.sqrt(jnp.sum(jnp.square(p.astype(jnp.float32))))
      g_norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      q = jnp.where(p_norm > 0.0, jnp.where(g_norm > 0.0, eta * p_norm / g_norm, 1.0), 1.0)
      return (g * q).astype(g.dtype)

    return jax.tree_util.tree_map(scale, updates, params, mask), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class LarcState(NamedTuple):
  count: jax.Array


def scale_by_larc(
  trust: float,
  wd: schedules.Schedule,
  decayed: Any,
  *,
  eps: float = 1e-8,
  clip: bool = False,
  lr: schedules.Schedule | None = None,
  lr_mults: Any = None,
) -> optax.GradientTransformation:
  """apex ``LARC.step`` (apex/parallel/LARC.py) in front of SGD's momentum: per leaf, with a = trust ||p|| / (||g|| +
  wd ||p|| + eps), the gradient becomes (g + wd p) a where ||p|| != 0 and ||g|| != 0, and stays g elsewhere (no
  decay either: LARC adds it inside that branch and zeroes the inner SGD's own ``weight_decay`` during the step).

  Every leaf is adapted, as apex does for every parameter with a ``.grad`` (1-D tensors included, unlike DINO's LARS,
  ``lars_adapts``); wd is the scheduled decay on the ``decayed`` leaves and 0 on the others (a torch param group
  with weight_decay 0). ``clip`` is apex's clip=True: a <- min(a / group lr, 1), the group lr being the scheduled
  ``lr`` times the leaf's ``lr_mults`` (an lr of 0 gives a = 1, as a / 0 = inf in torch). Norms in float32 (float64
  for float64 leaves), each over the whole leaf."""
  if clip and lr is None:
    raise ValueError("scale_by_larc with clip needs the lr schedule")

  def init_fn(params):
    del params
    return LarcState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_larc needs the parameters")
    w = wd(state.count)
    group_lr = lr(state.count) if clip else None
    mults = lr_mults if lr_mults is not None else jax.tree_util.tree_map(lambda _: 1.0, params)

    def leaf(g, p, m, mult):
      dt = jnp.promote_types(p.dtype, jnp.float32)
      p32, g32 = p.astype(dt), g.astype(dt)
      w_leaf = w.astype(dt) if m else jnp.zeros((), dt)
      p_norm = jnp.sqrt(jnp.sum(jnp.square(p32)))
      g_norm = jnp.sqrt(jnp.sum(jnp.square(g32)))
      a = trust * p_norm / (g_norm + p_norm * w_leaf + eps)
      if clip:
        a = jnp.minimum(a / (group_lr.astype(dt) * mult), 1.0)
      both = (p_norm != 0) & (g_norm != 0)
      return jnp.where(both, (g32 + w_leaf * p32) * a, g32).astype(g.dtype)

    return jax.tree_util.tree_map(leaf, updates, params, decayed, mults), LarcState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


class MomentumState(NamedTuple):
  count: jax.Array
  mu: Any


def momentum_skipping(momentum: float, starts: Any) -> optax.GradientTransformation:
  """Heavy-ball momentum mu <- momentum mu + g (torch.optim.SGD with dampening 0, DINO's LARS), output mu, where
  leaf i takes no part until update ``starts[i]`` (-1: never): a skipped update leaves its buffer untouched and
  outputs 0, as PyTorch's optimisers skip a parameter whose ``.grad`` is None (DINO's freeze_last_layer). A zero
  initial buffer makes the first active update mu = g, PyTorch's ``buf = torch.clone(d_p)``."""

  def init_fn(params):
    return MomentumState(count=jnp.zeros((), jnp.int32), mu=jax.tree_util.tree_map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params

    def leaf(g, mu, start):
      active = (state.count >= start) if start >= 0 else jnp.asarray(False)
      new_mu = jnp.where(active, momentum * mu + g, mu)
      return jnp.where(active, new_mu, jnp.zeros_like(g)).astype(g.dtype), new_mu

    flat_g, treedef = jax.tree_util.tree_flatten(updates)
    flat = [
      leaf(g, mu, st) for g, mu, st in zip(flat_g, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(starts))
    ]
    out, mu = (treedef.unflatten([f[i] for f in flat]) for i in range(2))
    return out, MomentumState(count=optax.safe_increment(state.count), mu=mu)

  return optax.GradientTransformation(init_fn, update_fn)


def freeze_starts(params: Any, freezes: tuple) -> Any:
  """Per leaf, the first update it takes part in under "drop_grads": 0, the largest ``until`` of the freezes that
  mask it, or -1 when one of them never ends."""
  starts = jax.tree_util.tree_map(lambda _: 0, params)
  for mask, until in freezes:
    starts = jax.tree_util.tree_map(
      lambda s, m, u=until: (-1 if u < 0 or s < 0 else max(s, u)) if m else s, starts, mask
    )
  return starts


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
  """Clip each leaf's l2 norm to max_norm separately (not a global norm), as DINO's utils.clip_gradients."""

  def update_fn(updates, state, params=None):
    del params

    def clip(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
      return (g * factor).astype(g.dtype)

    return jax.tree_util.tree_map(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def lr_schedule(optim_cfg, batch_size: int, total_steps: int, warmup_steps: int) -> schedules.Schedule:
  """Peak lr from the config's scaling rule: DINO ``linear_256`` (lr * B / 256), DINOv2 ``sqrt_1024``
  (lr * sqrt(B / 1024)) or ``none``; min_lr and warmup_start_lr are taken as given (not rescaled)."""
  rule = optim_cfg.lr_scaling
  if rule == "linear_256":
    peak = optim_cfg.lr * batch_size / 256.0
  elif rule == "sqrt_1024":
    peak = optim_cfg.lr * (batch_size / 1024.0) ** 0.5
  elif rule == "none":
    peak = optim_cfg.lr
  else:
    raise ValueError(f"config.optim.lr_scaling must be one of {LR_SCALINGS}, got {rule!r}")
  # The warm-up starts at min_lr (SimDINOv2), at warmup_start_lr (SwAV's --start_warmup, as given) or at 0.
  init = optim_cfg.min_lr if optim_cfg.get("warmup_from_min_lr", False) else optim_cfg.get("warmup_start_lr", 0.0)
  return schedules.warmup_cosine(
    peak,
    optim_cfg.min_lr,
    total_steps,
    warmup_steps,
    warmup_init=init,
    warmup_rule=optim_cfg.get("warmup_rule", "linspace"),
  )


def wd_schedule(optim_cfg, total_steps: int) -> schedules.Schedule:
  return schedules.cosine(optim_cfg.weight_decay, optim_cfg.weight_decay_end, total_steps)


def make_optimizer(
  optim_cfg,
  params: Any,
  lr: schedules.Schedule,
  wd: schedules.Schedule,
  *,
  lr_mults: Any = None,
  freezes: tuple = (),
  unit_norm: tuple = (),
) -> optax.GradientTransformation:
  """``optim_cfg.name`` (AdamW, SGD, LARS or LARC) with clipping, scheduled weight decay on the masked leaves and the
  scheduled learning rate. Clipping comes first for every optimiser, as DINO clips ``.grad`` before ``step()``.

  lr_mults: optional tree of per-leaf lr multipliers (layer-wise decay, patch-embed multiplier).
  freezes: (mask_tree, until_step) pairs whose leaves get no update while the step is < until_step (< 0: never);
    ``optim_cfg.freeze_mode`` (FREEZE_MODES) says whether their Adam moments meanwhile stay untouched
    ("drop_grads", DINO v1) or accumulate ("zero_lr", DINOv2). Either way the weights do not move, decay included.
    Under "drop_grads" an SGD / LARS momentum buffer is held too (PyTorch skips a parameter whose .grad is None).
  unit_norm: (mask_tree, axis) pairs whose leaves are kept unit-norm along ``axis`` (``project_unit_norm``, last in
    the chain: SwAV's prototypes).
  """
  parts = []
  if optim_cfg.clip_grad > 0:
    if optim_cfg.clip_mode == "per_tensor":
      parts.append(clip_per_tensor(optim_cfg.clip_grad))
    elif optim_cfg.clip_mode == "global":
      parts.append(optax.clip_by_global_norm(optim_cfg.clip_grad))
    elif optim_cfg.clip_mode == "per_module":
      parts.append(clip_per_module(optim_cfg.clip_grad))
    else:
      raise ValueError(f"config.optim.clip_mode must be one of {CLIP_MODES}, got {optim_cfg.clip_mode!r}")
  freeze_mode = optim_cfg.get("freeze_mode", "drop_grads")
  if freeze_mode not in FREEZE_MODES:
    raise ValueError(f"config.optim.freeze_mode must be one of {FREEZE_MODES}, got {freeze_mode!r}")
  starts = freeze_starts(params, freezes) if freezes and freeze_mode == "drop_grads" else None
  decay_all = optim_cfg.get("weight_decay_all", False)
  if not isinstance(decay_all, bool):
    raise ValueError(f"config.optim.weight_decay_all must be True or False, got {decay_all!r}")
  decayed = weight_decay_mask(params, decay_all)
  name = optim_cfg.get("name", "adamw")
  if name == "adamw":
    if starts is not None:
      adam = scale_by_adam_skipping(optim_cfg.b1, optim_cfg.b2, optim_cfg.adam_eps, starts)
    else:
      adam = optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.adam_eps)
    parts += [
      adam,
      optax.add_decayed_weights(wd, mask=decayed),
      optax.scale_by_learning_rate(lr),
    ]
  elif name == "larc":
    # LARC adds the decay itself (only where both norms are non-zero), so no add_decayed_weights before it.
    parts.append(
      scale_by_larc(
        optim_cfg.get("lars_eta", 0.001),
        wd,
        decayed,
        eps=optim_cfg.get("larc_eps", 1e-8),
        clip=optim_cfg.get("larc_clip", False),
        lr=lr,
        lr_mults=lr_mults,
      )
    )
    m = optim_cfg.get("momentum", 0.9)
    parts.append(momentum_skipping(m, starts) if starts is not None else optax.trace(decay=m, nesterov=False))
    parts.append(optax.scale_by_learning_rate(lr))
  elif name in ("sgd", "lars"):
    # Coupled decay (added to the gradient before the momentum), as torch.optim.SGD and DINO's LARS. For LARS the
    # decayed set is weight_decay_mask (DINO's regularised group: no bias, no 1-D tensor), which is also the set
    # LARS itself decays (p.ndim != 1), as every bias is 1-D.
    parts.append(optax.add_decayed_weights(wd, mask=decayed))
    if name == "lars":
      exclude = optim_cfg.get("lars_exclude_1d", True)
      adapts = map_with_name(lars_adapts if exclude else (lambda name, leaf: True), params)
      parts.append(scale_by_lars_trust(optim_cfg.get("lars_eta", 0.001), adapts))
    m = optim_cfg.get("momentum", 0.9)
    parts.append(momentum_skipping(m, starts) if starts is not None else optax.trace(decay=m, nesterov=False))
    parts.append(optax.scale_by_learning_rate(lr))
  else:
    raise ValueError(f"config.optim.name must be one of {OPTIMIZERS}, got {name!r}")
  if lr_mults is not None:
    parts.append(scale_by_tree(lr_mults))
  parts += [freeze(mask, until) for mask, until in freezes]
  # SwAV's prototypes: kept unit-norm after everything else (project_unit_norm's docstring: why this is exact).
  parts += [project_unit_norm(mask, axis) for mask, axis in unit_norm]
  return optax.chain(*parts)


def layer_id(name: str, depth: int) -> int:
  """DINOv2 layer id: 0 for the patch embedding and the tokens, i+1 for block i, depth+1 for the rest."""
  parts = name.split("/")
  if parts[0] == "backbone":
    if parts[1] in ("patch_embed", "pos_embed", "cls_token", "register_tokens", "mask_token"):
      return 0
    if parts[1] == "blocks":
      return int(parts[2]) + 1
  return depth + 1


def lr_multipliers(params: Any, *, depth: int, layer_decay: float = 1.0, patch_embed_mult: float = 1.0) -> Any:
  """Per-leaf lr multipliers: layer_decay^(depth + 1 - layer_id), times patch_embed_mult on the patch embedding.

  Applied to the whole update (Adam step and weight decay), as a PyTorch param group's lr is.
  """

  def mult(name, _):
    m = layer_decay ** (depth + 1 - layer_id(name, depth))
    if name.startswith("backbone/patch_embed/"):
      m *= patch_embed_mult
    return float(m)

  return map_with_name(mult, params)


def scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  """Multiply each update leaf by a constant from a tree of the same structure."""

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _tree_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def clip_per_module(max_norm: float) -> optax.GradientTransformation:
  """Clip the global norm within each top-level submodule (backbone, head, ...) separately (DINOv2, FSDP-wise)."""

  def update_fn(updates, state, params=None):
    del params
    factors = {k: jnp.minimum(1.0, max_norm / (_tree_norm(updates[k]) + 1e-6)) for k in updates.keys()}
    # tree_map keeps the container types (nnx.State) so the next transformations see the same structure.
    clipped = jax.tree_util.tree_map_with_path(lambda p, g: (g * factors[p[0].key]).astype(g.dtype), updates)
    return clipped, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_by_adam_skipping(b1: float, b2: float, eps: float, starts: Any) -> optax.GradientTransformation:
  """Adam (optax.scale_by_adam's update and state layout) where leaf i takes no part until update ``starts[i]``.

  ``starts``: a tree of ints like the params, 0 for ordinary leaves, k for a leaf whose gradients are dropped
  during the first k updates (-1: always). A skipped update leaves that leaf's moments untouched and outputs 0;
  its bias correction counts only the updates it took part in (count - k), as PyTorch's per-parameter Adam step.
  """

  def init_fn(params):
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return optax.ScaleByAdamState(
      count=jnp.zeros((), jnp.int32), mu=zeros, nu=jax.tree_util.tree_map(jnp.zeros_like, params)
    )

  def update_fn(updates, state, params=None):
    del params
    count = state.count

    def leaf(g, mu, nu, start):
      active = (count >= start) if start >= 0 else jnp.asarray(False)
      new_mu = jnp.where(active, b1 * mu + (1 - b1) * g, mu)
      new_nu = jnp.where(active, b2 * nu + (1 - b2) * jnp.square(g), nu)
      t = jnp.maximum(count - max(start, 0), 0).astype(jnp.float32) + 1.0  # this leaf's own step number
      mu_hat = new_mu / (1 - b1**t)
      nu_hat = new_nu / (1 - b2**t)
      out = jnp.where(active, mu_hat / (jnp.sqrt(nu_hat) + eps), jnp.zeros_like(g))
      return out.astype(g.dtype), new_mu, new_nu

    flat_g, treedef = jax.tree_util.tree_flatten(updates)
    flat = [
      leaf(g, mu, nu, st)
      for g, mu, nu, st in zip(
        flat_g, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu), treedef.flatten_up_to(starts)
      )
    ]
    out, mu, nu = (treedef.unflatten([f[i] for f in flat]) for i in range(3))
    return out, optax.ScaleByAdamState(count=optax.safe_increment(count), mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


class FreezeState(NamedTuple):
  count: jax.Array


def freeze(mask: Any, until_step: int) -> optax.GradientTransformation:
  """Zero the updates of the masked leaves while the update count is < until_step (DINO: the last layer during
  the first epoch; until_step < 0 freezes them for good, e.g. the weight-norm g with norm_last_layer)."""

  def init_fn(params):
    del params
    return FreezeState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    frozen = jnp.asarray(True) if until_step < 0 else state.count < until_step
    updates = jax.tree_util.tree_map(lambda u, m: jnp.where(frozen, jnp.zeros_like(u), u) if m else u, updates, mask)
    return updates, FreezeState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def project_unit_norm(mask: Any, axis: int = -1) -> optax.GradientTransformation:
  """Keep the masked leaves unit-norm along ``axis`` (``make_optimizer``'s ``unit_norm``): the update becomes
  normalize(p + u) - p, so that ``optax.apply_updates`` stores normalize(p + u) (to float32 rounding, ~1 ulp), with
  torch's ``F.normalize`` (norm bounded below by 1e-12). Last in the chain, after weight decay and freezes.

  SwAV (main_swav.py) renormalises its prototypes in place at the start of every iteration, before the forward: the
  forward, the gradients, the weight decay and the optimiser's state all see the unit-norm weights w_t, and the
  step stores w_t + u_t, which the next iteration renormalises. Storing normalize(w_t + u_t) at the end of step t
  gives every forward and every optimiser step the same weights, given unit-norm initial weights (the official
  normalisation of the first iteration, applied at init); only the value stored between iterations differs (an
  official checkpoint holds the unnormalised w_t + u_t). A frozen leaf (u = 0) stays where it is, bit for bit."""

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("project_unit_norm needs the parameters")

    def leaf(u, p, m):
      if not m:
        return u
      new = p.astype(jnp.float32) + u.astype(jnp.float32)
      new = new / jnp.maximum(jnp.sqrt(jnp.sum(new * new, axis=axis, keepdims=True)), 1e-12)
      # No update (a frozen leaf): leave the stored unit-norm value bit for bit instead of renormalising it anew.
      return jnp.where(jnp.any(u != 0), new - p, 0.0).astype(u.dtype)

    return jax.tree_util.tree_map(leaf, updates, params, mask), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
