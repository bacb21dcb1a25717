"""BYOL (``byol``): the online network is the student, the target network the teacher (deepmind-research/byol,
``byol_experiment.py``, ``utils/networks.py``, ``configs/byol.py``).

Head: BYOL's projector MLP (Linear 4096 -> BatchNorm -> ReLU -> Linear 256, no output bias) and the predictor MLP of
the same shape on the projection (``models.heads.BYOLHead``; ``head.hidden_dim``, ``head.out_dim``,
``head.predictor_hidden_dim``, ``head.use_bn``). The step runs one head for student and teacher, so the teacher
computes a prediction too, which the loss never reads: one predictor forward per teacher view (2 x 256 x 4096 x 2
multiply-adds per image, under 0.01% of a ResNet-50 forward), as the official target network, whose forward is the
online one's. Likewise the teacher's EMA averages the predictor's weights (``optax.incremental_update`` over the
whole state), as the official ``target_params = tree_map(..., target_params, online_params)`` does: harmless, unused.

Loss: ``losses.byol.byol_loss``, the symmetric regression of the student's predictions of each global view on the
teacher's projection of the other one (in [0, 8]: the two terms are summed). Teacher momentum: BYOL's
``target_ema`` is the cosine 1 - (1 - base)(cos(pi k / K) + 1) / 2, the step's schedule ``teacher.momentum`` ->
``teacher.momentum_end`` = 1 (base 0.996 at 1000 epochs, 0.99 at 300).
"""

from __future__ import annotations

import jax
from flax import nnx

from simdino_jax.errors import require
from simdino_jax.losses import byol as bl
from simdino_jax.methods.base import Method
from simdino_jax.models.heads import BYOLHead
from simdino_jax.models.network import compute_dtype


def byol_head(config, in_dim: int, rngs: nnx.Rngs) -> nnx.Module:
  h = config.head
  return BYOLHead(
    in_dim,
    hidden_dim=h.hidden_dim,
    out_dim=h.out_dim,
    predictor_hidden_dim=h.predictor_hidden_dim,
    use_bn=h.use_bn,
    dtype=compute_dtype(config.model.dtype),
    rngs=rngs,
  )


def make_byol_loss(config, steps_per_epoch: int):
  del config, steps_per_epoch

  def loss(student, teacher, loss_state, step):
    del step
    p, z = student["cls"]["p"], jax.lax.stop_gradient(teacher["cls"]["z"])
    value, metrics = bl.byol_loss(p[:, 0], p[:, 1], z[:, 0], z[:, 1])
    return value, metrics, loss_state

  return loss


def validate_mlp_head(config) -> None:
  """The BYOL-style MLP fields: the predictor width and the BatchNorm switch."""
  require(isinstance(config.head.use_bn, bool), "head.use_bn", f"must be True or False, got {config.head.use_bn!r}")
  require(
    isinstance(config.head.predictor_hidden_dim, int) and config.head.predictor_hidden_dim > 0,
    "head.predictor_hidden_dim",
    f"must be a positive integer, got {config.head.predictor_hidden_dim!r}",
  )


def validate(config, *, num_devices: int) -> None:
  """Two global crops and no local crops (BYOL's two views), the MLP fields."""
  del num_devices
  d = config.data
  require(d.num_global == 2, "data.num_global", f"byol needs two global crops (its two views), got {d.num_global}")
  require(d.num_local == 0, "data.num_local", f"byol uses the two global crops only; set it to 0, got {d.num_local}")
  validate_mlp_head(config)


BYOL = Method(
  "byol",
  build_head=byol_head,
  make_loss=make_byol_loss,
  validate=validate,
  evaluated="student",  # eval_experiment.py reads checkpoint_data["experiment_state"].online_params
  progress_keys=("byol", "cosine"),
  # byol_experiment.py's forward: apply_once_fn(view1), then apply_once_fn(view2), for the online and the target
  # network alike: per-view BatchNorm batches (backbone, projector, predictor), statistics updated twice.
  view_calls=lambda config: ((0, 1), (0, 1)),
)

METHODS = (BYOL,)
