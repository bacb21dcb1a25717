"""Method registry: a method is a head to build, a loss over student/teacher features, and a loss state.

The trainer and the step are shared by every method; adding one means a ``losses/`` file, an entry here and
configs. The loss receives the step's forward outputs:
  student: {"cls": (B, M, d)} head outputs for the Mg global views (first) and the local views;
  teacher: {"cls": (B, Mg, d)} head outputs of the teacher on the global views (already stop-gradient);
and returns (loss, metrics, new_loss_state).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from simdino_jax.losses import coding_rate as cr
from simdino_jax.losses.simdino import simdino_loss
from simdino_jax.models.heads import ProjectionHead
from simdino_jax.models.network import compute_dtype

GAMMA_RULES = ("official", "paper", "fixed")


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  build_head: Callable[[Any, int, nnx.Rngs], nnx.Module]  # (config, backbone width, rngs) -> head
  make_loss: Callable[[Any], Callable]  # config -> loss(student, teacher, loss_state, step)
  init_loss_state: Callable[[Any], Any] = lambda config: {}
  uses_masks: bool = False  # whether the batch carries block masks for the student's global crops


def _projection_head(config, in_dim: int, rngs: nnx.Rngs) -> nnx.Module:
  h = config.head
  return ProjectionHead(in_dim, hidden_dim=h.hidden_dim, out_dim=h.out_dim, num_layers=h.num_layers,
                        dtype=compute_dtype(config.model.dtype), rngs=rngs)


def simdino_gamma(config) -> float:
  """gamma from ``config.loss.gamma_rule``.

  official: the official code's 1/p + 1/(global batch) (its coeff = 1; N*B even with per-device covariances);
  paper: Remark C.3's 2 eps sqrt(m / (d M min(d, m)));
  fixed: ``config.loss.gamma`` as given.
  """
  loss_cfg = config.loss
  rows = config.batch_size // loss_cfg.groups  # rows per covariance
  dim = config.head.out_dim
  views = config.data.num_global + config.data.num_local
  rule = loss_cfg.gamma_rule
  if rule == "official":
    return 1.0 / dim + 1.0 / config.batch_size
  if rule == "paper":
    return cr.gamma_simdino(loss_cfg.eps, rows, dim, views)
  if rule == "fixed":
    return float(loss_cfg.gamma)
  raise ValueError(f"config.loss.gamma_rule must be one of {GAMMA_RULES}, got {rule!r}")


def _make_simdino_loss(config):
  loss_cfg = config.loss
  gamma = simdino_gamma(config)

  def loss(student, teacher, loss_state, step):
    del step
    value, metrics = simdino_loss(student["cls"], teacher["cls"], eps=loss_cfg.eps, gamma=gamma,
                                  exclude_same_view=loss_cfg.exclude_same_view,
                                  expansion=loss_cfg.expansion, groups=loss_cfg.groups)
    metrics["gamma"] = jnp.asarray(gamma, jnp.float32)
    return value, metrics, loss_state

  return loss


METHODS: dict[str, Method] = {
    "simdino": Method("simdino", build_head=_projection_head, make_loss=_make_simdino_loss),
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"config.method={name!r} is not a known method; choose one of {sorted(METHODS)}")
  return METHODS[name]
