"""Feature extraction with a trained (or imported) backbone: ``load_backbone(path)`` -> a jitted callable.

  features = simdino_jax.load_backbone("runs/demo")          # a training workdir: its newest checkpoint
  out = features(images)                                      # images (B, H, W, 3) float, ImageNet-normalised
  out["cls"], out["patch"]                                    # (B, D), (B, N, D) float32, after the final norm

``path`` is a training workdir (the newest committed checkpoint and the config stored with it, read by
``io.restore.restore_params``) or a file: our export (.safetensors / .npz, either layout) or an official
PyTorch state dict (.pth with PyTorch installed, or its .safetensors / .npz), read by
``io.torch_interop.load_state_dict``. Any image size that is a multiple of the patch size works (the positional
embedding is interpolated as in training); each new shape compiles once.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from simdino_jax import workdir as workdir_lib
from simdino_jax.errors import InteropError
from simdino_jax.io import restore, torch_interop, torchvision_resnet
from simdino_jax.models.network import ResNetBackbone
from simdino_jax.tree import map_with_name


class Backbone:
  """A loaded ViT backbone; call it on images (B, H, W, 3) -> {"cls": (B, D), "patch": (B, N, D)} float32.

  Attributes: ``model`` (the Flax NNX VisionTransformer), ``kwargs`` (its constructor arguments), ``embed_dim``,
  ``patch_size``, ``num_registers``, ``source`` (where the weights came from), ``step`` (None for official weights).
  """

  def __init__(self, model, kwargs: dict, source: str, step: int | None = None):
    self.model = model
    self.kwargs = kwargs
    self.source = source
    self.step = step
    self.embed_dim = model.embed_dim
    self.patch_size = getattr(model, "patch_size", 1)  # a ResNet takes any image size
    self.num_registers = getattr(model, "num_registers", 0)
    if isinstance(model, ResNetBackbone):
      model.eval()  # BN with its running statistics, as DINO's evaluation scripts
    graphdef, params = nnx.split(model)
    self._params = params

    def features(params, images):
      out = nnx.merge(graphdef, params)(images, key=None)  # deterministic: no drop path
      return {k: out[k].astype(jnp.float32) for k in ("cls", "patch") if k in out}  # a ResNet: "cls" only

    self._features = jax.jit(features)

  def __call__(self, images: Any) -> dict:
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[-1] != 3:
      raise ValueError(f"images must be (B, H, W, 3) channels-last RGB, got shape {shape}")
    if shape[1] % self.patch_size or shape[2] % self.patch_size:
      raise ValueError(f"image size {shape[1]}x{shape[2]} is not a multiple of the patch size {self.patch_size}")
    return self._features(self._params, images)

  def __repr__(self) -> str:
    k = self.kwargs
    if "block" in k:  # a ResNet
      return f"Backbone(resnet {k['block']} {list(k['layers'])}, width={k['width']}, source={self.source!r})"
    return (
      f"Backbone(width={k['embed_dim']}, depth={k['depth']}, heads={k['num_heads']}, patch={k['patch_size']}, "
      f"registers={k['num_registers']}, layerscale={k['layerscale_init'] is not None}, source={self.source!r})"
    )


def load_backbone(
  path: str, *, which: str = "teacher", num_heads: int | None = None, step: int | None = None, **overrides
) -> Backbone:
  """A Backbone from a training workdir (newest checkpoint, or ``step``) or an exported / official weights file.

  which: the teacher (default; what the papers evaluate) or the student. num_heads: only needed for official
  weights whose width is not 64 x heads (our exports carry their config). overrides: VisionTransformer arguments
  such as ``dtype=jnp.bfloat16`` or the pos-embed interpolation of an official model (``interpolate_offset=0.0,
  interpolate_antialias=True`` for SimDINOv2)."""
  path = workdir_lib.resolve(os.fspath(path))  # relative and ~ paths work (orbax needs absolute ones)
  if os.path.isdir(path):
    arrays, restored_step, config = restore.restore_params(path, which=which, step=step)
    if (config.get("model") or {}).get("arch", "vit") != "vit":  # a ResNet run: weights and running statistics
      imported = torchvision_resnet.load_resnet_state_dict(torchvision_resnet.to_torchvision(arrays), where=path)
      source = f"{path} (step {restored_step}, {which})"
      return Backbone(_resnet(imported, overrides), imported.kwargs, source, restored_step)
    imported = torch_interop.load_state_dict(arrays, num_heads=num_heads, config=config, **overrides)
    imported.source = f"{path} (step {restored_step}, {which})"
    return Backbone(imported.build(), imported.kwargs, imported.source, restored_step)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such training workdir or weights file")
  if step is not None:
    raise ValueError(f"step={step} selects a checkpoint of a workdir; {path} is a file")
  try:
    imported = torch_interop.load_state_dict(path, which=which, num_heads=num_heads, **overrides)
  except InteropError as error:  # not a ViT: a torchvision / DINO ResNet state dict?
    try:
      resnet = torchvision_resnet.load_resnet_state_dict(path, which=which)
    except InteropError:
      raise error from None
    return Backbone(_resnet(resnet, overrides), resnet.kwargs, resnet.source)
  saved_step = imported.metadata.get("step")
  return Backbone(
    imported.build(), imported.kwargs, imported.source, int(saved_step) if str(saved_step).isdigit() else None
  )


def _resnet(imported, overrides: dict) -> ResNetBackbone:
  """The imported ResNet's weights and running statistics in a ResNetBackbone (the backbone interface)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: ResNetBackbone(**imported.kwargs, **overrides, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, map_with_name(lambda name, _: jnp.asarray(imported.params[name]), state))
