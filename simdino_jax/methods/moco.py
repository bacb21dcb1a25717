"""MoCo-v2 (``moco_v2``): the query encoder is the student, the momentum (key) encoder the teacher, the queue of
negatives and its pointer the loss state (facebookresearch/moco @ a419ef2, ``moco/builder.py`` with ``--mlp
--moco-t 0.2 --aug-plus --cos``).

Head: MoCo-v2's ``--mlp`` head, Linear(D, D) ReLU Linear(D, ``head.out_dim``) (``models.heads.MoCoHead``; D the
backbone width, builder.py's ``dim_mlp``). The loss (``losses/moco.py``) reads two global crops: by default, as
``MoCo.forward(im_q, im_k)``, the student's view 1 is the query and the teacher's view 2 its key, and the teacher's
view-2 keys of the whole global batch enter the queue (``concat_all_gather``); ``moco.symmetric=True`` averages the
two directions (q1 k2, q2 k1) and enqueues both views' keys (view-2 keys first). The step lays out the student's
outputs of both views either way; in the asymmetric default the loss never reads the student's view 2 (nor the
teacher's view 1 but for the collapse monitors), so XLA drops that forward.

Teacher: the step's EMA after the student's update; builder.py updates the key encoder at the start of the next
forward from the same student weights, so every key is computed by the same weights as in the official order. The
recipe's momentum 0.999 is constant: ``teacher.momentum = teacher.momentum_end = 0.999``.

BatchNorm (ResNet backbones): the student runs on the query view and the teacher on the key view in calls of their
own (``view_calls``), as builder.py's two encoders, so each view is normalised over its own batch and each encoder's
running statistics come from its own view only. Shuffle-BN: builder.py computes the keys on a batch shuffled over the
GPUs, so that a key's per-GPU statistics come from other images than its query's (otherwise the statistics themselves
tell the positive pair apart, a shortcut). It is not reproduced: each view's BatchNorm here normalises over the whole
global batch (SyncBN), and the key batch holds the same images as the query batch, so that leak is present in kind,
diluted over the B images of the global batch instead of one GPU's B / GPUs (SimCLR and MoCo v3 use SyncBN this way,
without a shuffle). Not measured against shuffle-BN here. The ViT backbones and the MoCo head have no BatchNorm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from simdino_jax.errors import require
from simdino_jax.losses import moco as ml
from simdino_jax.methods.base import Method
from simdino_jax.models.heads import MoCoHead
from simdino_jax.models.network import compute_dtype

_QUEUE_STREAM = 0x6D6F636F  # fold_in constant of the queue's initial key ("moco")


def moco_head(config, in_dim: int, rngs: nnx.Rngs) -> nnx.Module:
  return MoCoHead(in_dim, out_dim=config.head.out_dim, dtype=compute_dtype(config.model.dtype), rngs=rngs)


def keys_per_step(config) -> int:
  """Keys enqueued per step: the global batch, twice with ``moco.symmetric``."""
  return config.batch_size * (2 if config.moco.symmetric else 1)


def queue_state(config) -> dict:
  """The queue (K, dim) of random unit vectors (builder.py: ``torch.randn(dim, K)`` normalised over dim, here the
  transpose) from a key of its own derived from ``config.seed``, and the pointer 0."""
  key = jax.random.fold_in(jax.random.key(config.seed), _QUEUE_STREAM)
  queue = ml.l2_normalize(jax.random.normal(key, (config.moco.queue_size, config.head.out_dim), jnp.float32))
  return {"queue": queue, "queue_ptr": jnp.zeros((), jnp.int32)}


def make_moco_loss(config, steps_per_epoch: int):
  del steps_per_epoch
  m = config.moco

  def loss(student, teacher, loss_state, step):
    del step
    q, k = student["cls"], jax.lax.stop_gradient(teacher["cls"])
    queue = loss_state["queue"]
    value, metrics = ml.info_nce_loss(q[:, 0], k[:, 1], queue, temperature=m.temperature)
    keys = k[:, 1]
    if m.symmetric:
      value2, metrics2 = ml.info_nce_loss(q[:, 1], k[:, 0], queue, temperature=m.temperature)
      value = 0.5 * (value + value2)
      metrics = {name: 0.5 * (metrics[name] + metrics2[name]) for name in metrics}
      keys = jnp.concatenate([keys, k[:, 0]], axis=0)
    new_queue, new_ptr = ml.dequeue_and_enqueue(queue, loss_state["queue_ptr"], ml.l2_normalize(keys))
    return value, metrics, {"queue": new_queue, "queue_ptr": new_ptr}

  return loss


def view_calls(config) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """builder.py runs ``encoder_q(im_q)`` and ``encoder_k(im_k)``: the student on view 1, the teacher on view 2, each
  a BatchNorm batch of its own; symmetric (MoCo v3's ``forward(x1, x2)``): both encoders on view 1, then view 2."""
  return ((0, 1), (0, 1)) if config.moco.symmetric else ((0,), (1,))


def validate(config, *, num_devices: int) -> None:
  """Two global crops and no local crops (MoCo-v2 pairs one query with one key), the queue size, the temperature."""
  del num_devices
  d = config.data
  require(d.num_global == 2, "data.num_global", f"moco_v2 needs two global crops (query and key), got {d.num_global}")
  require(d.num_local == 0, "data.num_local", f"moco_v2 uses the two global crops only; set it to 0, got {d.num_local}")
  require(config.moco.temperature > 0, "moco.temperature", f"must be positive, got {config.moco.temperature}")
  require(
    isinstance(config.moco.symmetric, bool), "moco.symmetric", f"must be True or False, got {config.moco.symmetric!r}"
  )
  ml.check_queue_size(config.moco.queue_size, config.batch_size)
  require(
    config.moco.queue_size % keys_per_step(config) == 0,
    "moco.queue_size",
    f"must be a multiple of 2 x batch_size = {keys_per_step(config)} (moco.symmetric enqueues both views' keys), "
    f"got {config.moco.queue_size}",
  )


MOCO_V2 = Method(
  "moco_v2",
  build_head=moco_head,
  make_loss=make_moco_loss,
  init_loss_state=queue_state,
  validate=validate,
  evaluated="student",  # main_lincls.py keeps "module.encoder_q" only: the query encoder
  progress_keys=("info_nce", "top1"),
  view_calls=view_calls,
)

METHODS = (MOCO_V2,)
