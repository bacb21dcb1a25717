"""Method registry: every method by name (``METHODS``, ``get_method``) and what the trainer builds from it (the
network, the masked-patch gather size).

A method is a ``Method`` (``base.py``): heads, loss, loss state, optimiser extras, progress-line metrics and the
checks of its own config fields, declared by its family module: ``simdino.py`` (simdino, simdinov2), ``dino.py``
(dino, dinov2), ``vmf.py`` (dino_vmf, ibot_vmf), ``moco.py`` (moco_v2), ``byol.py`` (byol) and ``swav.py`` (swav).
The trainer and the step are shared by every method; adding one means a ``losses/`` file, its ``Method`` in a family
module (listed in ``_FAMILIES`` below when the module is new) and configs.

The loss receives the step's forward outputs (see ``train.step.forward``):
  student: {"cls": head(cls) (B, M, ...), "backbone_cls": (B, Mg, D), ["patch": (B, Mg, P, ...), "patch_mask":
           (B, Mg, P)]} for the Mg global views (first) and the local views (P: ``mask_positions``);
  teacher: the same for the Mg global views (unmasked), already stop-gradient;
and returns (loss, metrics, new_loss_state). SimDINO heads output unit vectors, DINO-family heads {"z", "logits"}
(vMF heads add their "prototype_norms" (K,)).
"""

from __future__ import annotations

import math

from flax import nnx

from simdino_jax.data.masking import max_masked_tokens
from simdino_jax.methods import byol, dino, moco, simdino, swav, vmf
from simdino_jax.methods.base import Method, num_patches
from simdino_jax.models.network import Network, build_backbone

_FAMILIES = (simdino, dino, vmf, moco, byol, swav)

METHODS: dict[str, Method] = {m.name: m for family in _FAMILIES for m in family.METHODS}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"config.method={name!r} is not a known method; choose one of {sorted(METHODS)}")
  return METHODS[name]


def mask_positions(config) -> int:
  """Static number of patch positions gathered per global crop for masked methods (0 otherwise): the most a
  block mask can cover, floor(N * max ratio)."""
  if not get_method(config.method).uses_masks:
    return 0
  return max(1, int(math.floor(num_patches(config) * config.masking.ratio[1])))


def masked_token_budget(config, *, host_batch: int, shards: int) -> int:
  """Static number of masked patch tokens the step gathers per batch shard (0 for methods without masks): the most
  that ``batch_size / shards`` images of a mask batch (``host_batch`` images: the global batch, whose masks every
  process draws alike, as DINOv2's collate draws one batch's) can hold, so nothing is ever dropped (data/masking.py
  max_masked_tokens)."""
  if not get_method(config.method).uses_masks:
    return 0
  mg = config.data.num_global
  return max_masked_tokens(
    host_batch * mg,
    num_patches(config),
    (config.batch_size // shards) * mg,
    mask_probability=config.masking.probability,
    ratio_min_max=tuple(config.masking.ratio),
  )


def patch_head_needed(config) -> bool:
  """Whether the network has a separate patch head (masked methods with ``head.separate_patch_head``)."""
  return get_method(config.method).uses_masks and config.head.separate_patch_head


def build_patch_head(config, in_dim: int, rngs: nnx.Rngs) -> nnx.Module:
  return get_method(config.method).build_patch_head(config, in_dim, rngs)


def build_network(config, seed: int | None = None) -> Network:
  """The network of ``config``: backbone, the method's head and (masked methods with a separate patch head) the
  patch head, initialised from ``seed`` (default ``config.seed``)."""
  rngs = nnx.Rngs(params=config.seed if seed is None else seed)
  backbone = build_backbone(config.model, rngs=rngs)
  head = get_method(config.method).build_head(config, backbone.embed_dim, rngs)
  patch_head = build_patch_head(config, backbone.embed_dim, rngs) if patch_head_needed(config) else None
  return Network(backbone, head, patch_head)
