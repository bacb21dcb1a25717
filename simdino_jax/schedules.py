"""Schedules as jittable functions of the step (lr, weight decay, teacher momentum).

They follow the official DINO ``cosine_scheduler``: a linear warm-up over W steps, then a half cosine from
the base value to the final value over the remaining T - W steps. The step is a traced int; the functions
return float32 scalars so they can be logged as metrics and fed to optax.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


WARMUP_RULES = ("linspace", "step_over_warmup")


def warmup_cosine(
  base: float,
  final: float,
  total_steps: int,
  warmup_steps: int = 0,
  warmup_init: float = 0.0,
  warmup_rule: str = "linspace",
) -> Schedule:
  """Linear warm-up warmup_init -> base over warmup_steps, then cosine base -> final until total_steps.

  DINO / DINOv2 warm up from 0; SimDINOv2 from min_lr (``warmup_init``). Past total_steps it stays at final.
  warmup_rule "linspace": np.linspace(warmup_init, base, W) as DINO's / DINOv2's cosine_scheduler (step W-1 reaches
  base); "step_over_warmup": warmup_init + (base - warmup_init) * step / W as the SimDINOv2 fork's CosineScheduler
  (simdinov2/utils/utils.py), which reaches base only at step W.
  """
  if warmup_rule not in WARMUP_RULES:
    raise ValueError(f"warmup_rule must be one of {WARMUP_RULES}, got {warmup_rule!r}")
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps})")
  decay_steps = total_steps - warmup_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    span = max(warmup_steps - 1, 1) if warmup_rule == "linspace" else max(warmup_steps, 1)
    warm = warmup_init + (base - warmup_init) * step / span
    t = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    cos = final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * t))
    return jnp.where(step < warmup_steps, warm, cos).astype(jnp.float32)

  return schedule


def cosine(base: float, final: float, total_steps: int) -> Schedule:
  """Half cosine from base (step 0) to final (step total_steps): weight decay 0.04 -> 0.4, momentum m0 -> 1."""
  return warmup_cosine(base, final, total_steps, warmup_steps=0)


def constant(value: float) -> Schedule:
  return lambda step: jnp.full((), value, jnp.float32)


def teacher_temperature(
  warmup_temp: float, temp: float, warmup_epochs: int, steps_per_epoch: int, per: str = "epoch"
) -> Schedule:
  """The teacher temperature warm-up, then constant ``temp``.

  per="epoch" (DINO, iBOT): indexed by EPOCH, linspace(warmup_temp, temp, warmup_epochs)[epoch].
  per="iteration" (DINOv2's CosineScheduler warm-up): linspace(warmup_temp, temp, W)[step] with
  W = warmup_epochs * steps_per_epoch iterations, so the temperature rises within each epoch too.
  """
  if per not in ("epoch", "iteration"):
    raise ValueError(f"per must be 'epoch' or 'iteration', got {per!r}")
  steps_per_epoch = max(steps_per_epoch, 1)
  length = warmup_epochs if per == "epoch" else warmup_epochs * steps_per_epoch

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    index = step // steps_per_epoch if per == "epoch" else step
    if length <= 1:
      return jnp.where(index < length, warmup_temp, temp).astype(jnp.float32)
    frac = jnp.clip(index / (length - 1), 0.0, 1.0)
    warm = warmup_temp + (temp - warmup_temp) * frac
    return jnp.where(index < length, warm, temp).astype(jnp.float32)

  return schedule


def linear_warmup_cosine_constant(
  start: float, peak: float, end: float, warmup_steps: int, total_steps: int, cosine_steps: int | None = None
) -> Schedule:
  """DINOv3's ``linear_warmup_cosine_decay`` (dinov3/train/cosine_lr_scheduler.py): np.linspace(start, peak, W,
  endpoint=False), then a half cosine peak -> end over C steps (np.linspace(0, pi, C): step W + C - 1 reaches end),
  then ``end`` (C defaults to total - W). DINOv3's Gram loss weight (ViT-7B: start 0, peak 0, end 2, W = 1000
  epochs, C = 1 epoch) and its other schedules use it."""
  cosine_steps = total_steps - warmup_steps if cosine_steps is None else cosine_steps
  if warmup_steps < 0 or cosine_steps < 1 or warmup_steps + cosine_steps > total_steps:
    raise ValueError(
      f"need 0 <= warmup ({warmup_steps}) and 1 <= cosine ({cosine_steps}), sum <= total ({total_steps})"
    )

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = start + (peak - start) * step / max(warmup_steps, 1)
    frac = jnp.clip((step - warmup_steps) / max(cosine_steps - 1, 1), 0.0, 1.0)
    cos = (peak - end) * (jnp.cos(jnp.pi * frac) + 1.0) / 2.0 + end
    return jnp.where(step < warmup_steps, warm, cos).astype(jnp.float32)

  return schedule
