"""The trained network: a ViT backbone plus the method's head, built from the config's ``model`` block."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from simdino_jax.models.vit import VisionTransformer, parse_variant

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


def backbone_kwargs(model_cfg) -> dict:
  """VisionTransformer keyword arguments from ``config.model`` (variant "S/16" plus optional overrides: a non-zero
  embed_dim / depth / num_heads wins over the variant's; a command-line variant resets the recipe's, see
  ``config.apply_command_line``)."""
  kw = parse_variant(model_cfg.variant)
  for field in ("embed_dim", "depth", "num_heads"):  # 0 keeps the variant's value
    if model_cfg.get(field, 0):
      kw[field] = model_cfg[field]
  kw.update(
    img_size=model_cfg.img_size,
    num_registers=model_cfg.num_registers,
    layerscale_init=model_cfg.layerscale if model_cfg.layerscale > 0 else None,
    drop_path_rate=model_cfg.drop_path_rate,
    drop_path_uniform=model_cfg.drop_path_uniform,
    token_init=model_cfg.token_init,
    interpolate_offset=model_cfg.interpolate_offset,
    interpolate_antialias=model_cfg.interpolate_antialias,
    remat=bool(model_cfg.get("remat", False)),
    dtype=compute_dtype(model_cfg.dtype),
  )
  return kw


class Network(nnx.Module):
  """Backbone + head(s). The head maps backbone tokens to the features (or logits) the method's loss reads;
  ``patch_head`` (optional) is a separate head for patch tokens (DINOv2 ``separate_head``), else ``head`` is shared."""

  def __init__(self, backbone: nnx.Module, head: nnx.Module, patch_head: nnx.Module | None = None):
    self.backbone = backbone
    self.head = head
    self.patch_head = patch_head


def build_backbone(model_cfg, *, rngs: nnx.Rngs) -> VisionTransformer:
  return VisionTransformer(**backbone_kwargs(model_cfg), rngs=rngs)
