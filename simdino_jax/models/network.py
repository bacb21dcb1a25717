"""The trained network: a backbone (a ViT, or with ``config.model.arch`` a torchvision ResNet) plus the method's head,
built from the config's ``model`` block."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from simdino_jax.models.resnet import VARIANTS as RESNET_VARIANTS
from simdino_jax.models.resnet import ResNet, resnet_kwargs
from simdino_jax.models.vit import VisionTransformer, parse_variant

ARCHS = ("vit",) + tuple(RESNET_VARIANTS)  # config.model.arch

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


def is_resnet(model_cfg) -> bool:
  return model_cfg.get("arch", "vit") != "vit"


class ResNetBackbone(ResNet):
  """models/resnet.py's ResNet with the backbone interface the step and the evaluators call: images -> {"cls":
  pooled feature (B, C)} (no "patch": no dense evaluator runs on it), ``embed_dim`` = C. A subclass, not a wrapper,
  so the variable names stay torchvision's (io/torchvision_resnet.py). Training or evaluation mode is the modules'
  ``use_running_average`` (``.train()`` / ``.eval()``): the trained network computes with batch statistics and
  updates its running ones (train/step.py "BatchNorm statistics"), the evaluators' graph uses the running ones."""

  def __call__(self, images, masks=None, key=None, *, use_running_average=None):
    del key  # no stochastic depth in torchvision's ResNet
    if masks is not None:
      raise ValueError("a ResNet backbone has no patch tokens to mask (the masked methods refuse config.model.arch)")
    return {"cls": super().__call__(images, use_running_average=use_running_average)}

  def get_intermediate_layers(self, images, n: int = 1):
    """The evaluators' entry (evals/runner.py make_feature_fn): one "layer", the pooled feature; a ResNet has no
    per-block cls tokens, so linear features of the last n blocks read this one (DINO's eval_linear.py on a ResNet
    reads ``model(inp)``, the pooled feature, whatever n_last_blocks)."""
    del n
    return [self(images)]


def resnet_backbone_kwargs(model_cfg) -> dict:
  """ResNet keyword arguments from ``config.model`` (arch, and resnet_width > 0 overriding the variant's width)."""
  kw = resnet_kwargs(model_cfg.arch)
  if model_cfg.get("resnet_width", 0):
    kw["width"] = model_cfg.resnet_width
  kw.update(zero_init_residual=bool(model_cfg.get("zero_init_residual", False)), dtype=compute_dtype(model_cfg.dtype))
  return kw


def build_backbone(model_cfg, *, rngs: nnx.Rngs, dtype: str | None = None) -> VisionTransformer | ResNetBackbone:
  """The backbone of ``config.model`` (``dtype``: another compute dtype, e.g. the evaluators' config.eval.dtype)."""
  if is_resnet(model_cfg):
    kw = resnet_backbone_kwargs(model_cfg)
    if dtype is not None:
      kw["dtype"] = DTYPES[dtype]
    return ResNetBackbone(**kw, rngs=rngs)
  kw = backbone_kwargs(model_cfg)
  if dtype is not None:
    kw["dtype"] = DTYPES[dtype]
  return VisionTransformer(**kw, rngs=rngs)


def eval_backbone_graphdef(model_cfg, dtype: str) -> nnx.GraphDef:
  """The evaluators' graph of the backbone: evaluation mode (BN with its running statistics, as DINO's evaluation
  scripts call ``model.eval()``), computing in ``dtype``; the trained float32 variables plug into it. Shapes only."""
  model = nnx.eval_shape(lambda: build_backbone(model_cfg, rngs=nnx.Rngs(0), dtype=dtype))
  if is_resnet(model_cfg):
    model.eval()
  return nnx.split(model)[0]
