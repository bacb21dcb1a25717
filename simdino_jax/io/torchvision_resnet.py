"""torchvision ResNet interop: our ResNet (models/resnet.py) <-> torchvision's ``resnet18/34/50/101`` state dicts.

  ours (Flax, slash names)                 torchvision (PyTorch)                         layout change
  conv1/kernel (kh, kw, I, O)              conv1.weight (O, I, kh, kw)                   HWIO -> OIHW
  bn1/scale, bias                          bn1.weight, bn1.bias                          -
  bn1/mean, var                            bn1.running_mean, bn1.running_var             -
  bn1/num_batches_tracked () int32         bn1.num_batches_tracked () int64              dtype
  layer<s>/<i>/conv<k>/kernel, bn<k>/*     layer<s>.<i>.conv<k>.weight, bn<k>.*          as above
  layer<s>/<i>/downsample/0/kernel         layer<s>.<i>.downsample.0.weight              HWIO -> OIHW
  layer<s>/<i>/downsample/1/*              layer<s>.<i>.downsample.1.*                   as bn

``fc``: our ResNet has no classifier (DINO replaces ``fc`` by ``nn.Identity()``), so an export has no ``fc.*`` keys and
loads with ``strict=True`` into ``torchvision.models.resnet50()`` after ``model.fc = torch.nn.Identity()``; a full
torchvision state dict's ``fc.weight`` / ``fc.bias`` are ignored on import (listed; ``strict=True`` refuses them).

Importing accepts torchvision's own state dicts and DINO's ResNet-50 files: the released
``dino_resnet50_pretrain.pth`` (the teacher backbone: bare torchvision names without ``fc``) and training checkpoints
(``teacher`` / ``student`` entries with ``module.`` and ``backbone.`` prefixes), stripped as the ViT loader does
(io/torch_interop.py). The block type, depth, width and stem are read from the shapes.

Python API: ``to_torchvision(params)`` / ``from_torchvision(state_dict)``, ``infer_resnet_kwargs(state_dict)``,
``load_resnet_state_dict(source, ...)`` -> ``ImportedResNet`` (``.params``, ``.kwargs``, ``.build()``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from simdino_jax.errors import InteropError
from simdino_jax.io.torch_interop import _normalise_keys, _select_state_dict, _to_numpy, read_source
from simdino_jax.models.resnet import ResNet
from simdino_jax.tree import map_with_name, named_leaves

_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_BN_LEAVES_BACK = {v: k for k, v in _BN_LEAVES.items()}


def torchvision_name(name: str) -> str:
  """torchvision's key of one of our ResNet names ('layer1/0/downsample/1/mean' -> 'layer1.0.downsample.1.running_mean')."""
  parts = name.split("/")
  leaf = parts[-1]
  if leaf == "kernel":
    leaf = "weight"
  elif leaf in _BN_LEAVES:
    leaf = _BN_LEAVES[leaf]
  elif leaf != "num_batches_tracked":
    raise InteropError(f"{name!r} is not a parameter or statistic of our ResNet")
  return ".".join(parts[:-1] + [leaf])


def our_name(key: str, ndim: int) -> str:
  """Our name of a bare torchvision key (a ``.weight`` is a conv kernel when 4-D, a BN gamma when 1-D)."""
  parts = key.split(".")
  leaf = parts[-1]
  if leaf == "weight":
    leaf = "kernel" if ndim == 4 else "scale"
  elif leaf in _BN_LEAVES_BACK:
    leaf = _BN_LEAVES_BACK[leaf]
  return "/".join(parts[:-1] + [leaf])


def _strip_backbone(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  has_prefix = any(k.startswith("backbone/") for k in params)
  return {
    (k[len("backbone/") :] if has_prefix else k): np.asarray(v)
    for k, v in params.items()
    if not has_prefix or k.startswith("backbone/")
  }


def to_torchvision(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our ResNet's parameters AND batch statistics {name: array} (slash names, with or without 'backbone/'; e.g.
  ``named_leaves(nnx.state(model))``) -> torchvision's state dict without ``fc``: conv kernels OIHW, running
  statistics under torchvision's names, ``num_batches_tracked`` int64. Refuses a tree without the statistics (a
  strict load into torchvision would fail on the missing ``running_mean`` keys)."""
  params = _strip_backbone(params)
  if "conv1/kernel" not in params or "layer1/0/conv1/kernel" not in params:
    raise InteropError(
      f"not the state of our ResNet: no conv1/kernel or layer1/0/conv1/kernel (got {sorted(params)[:8]})"
    )
  if "bn1/mean" not in params:
    raise InteropError(
      "our ResNet's batch statistics (bn1/mean, ...) are missing: export nnx.state(model), not only its nnx.Param"
    )
  out = {}
  for name, a in params.items():
    key = torchvision_name(name)
    if a.ndim == 4:
      a = np.ascontiguousarray(a.transpose(3, 2, 0, 1))  # K[h, w, i, o] -> W[o, i, h, w]
    elif name.endswith("num_batches_tracked"):
      a = a.astype(np.int64)
    out[key] = a
  return out


def from_torchvision(state: Mapping[str, Any], *, which: str = "teacher", where: str = "state dict") -> dict:
  """A torchvision ResNet state dict (any prefixes/containers ``load_resnet_state_dict`` accepts) -> our names and
  layout, every key converted (fc.* included, as fc/kernel...: the caller decides what to keep)."""
  bare, _ = _normalise_keys(_select_state_dict(state, which, where), which, where)
  out = {}
  for key, value in bare.items():
    a = _to_numpy(value)
    if a.ndim == 4:
      a = np.ascontiguousarray(a.transpose(2, 3, 1, 0))  # W[o, i, h, w] -> K[h, w, i, o]
    out[our_name(key, a.ndim)] = a
  return out


def infer_resnet_kwargs(state: Mapping[str, Any], *, where: str = "state dict") -> dict:
  """ResNet keyword arguments from a bare torchvision state dict's shapes: block type (a ``conv3`` means
  Bottleneck), block counts per stage, width (the stem's output channels), stem (a 3x3 stem is our cifar_stem)."""
  if "conv1.weight" not in state:
    raise InteropError(f"{where}: missing key 'conv1.weight' (not a torchvision ResNet state dict)")
  stem = tuple(state["conv1.weight"].shape)
  if len(stem) != 4 or stem[2] != stem[3] or stem[2] not in (3, 7):
    raise InteropError(f"{where}: 'conv1.weight' has shape {list(stem)}, expected [width, 3, 7, 7] (or 3x3)")
  layers = []
  for s in range(1, 5):
    idx = {int(m.group(1)) for k in state if (m := re.match(rf"layer{s}\.(\d+)\.", k))}
    if not idx:
      raise InteropError(f"{where}: no 'layer{s}.<i>.*' keys")
    if idx != set(range(max(idx) + 1)):
      raise InteropError(f"{where}: blocks {sorted(set(range(max(idx) + 1)) - idx)} of layer{s} are missing")
    layers.append(max(idx) + 1)
  return {
    "block": "bottleneck" if "layer1.0.conv3.weight" in state else "basic",
    "layers": tuple(layers),
    "width": int(stem[0]),
    "cifar_stem": stem[2] == 3,
    "in_chans": int(stem[1]),
  }


@dataclasses.dataclass
class ImportedResNet:
  """An imported ResNet: ``params`` {our name: array} (weights and batch statistics) for ``ResNet(**kwargs)``."""

  kwargs: dict
  params: dict[str, np.ndarray]
  ignored: list[str]
  source: str

  def build(self, **overrides) -> ResNet:
    """The ResNet (Flax NNX) holding these weights and running statistics (overrides: dtype, zero_init_residual)."""
    abstract = nnx.eval_shape(lambda: ResNet(**self.kwargs, **overrides, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, map_with_name(lambda name, _: jnp.asarray(self.params[name]), state))


def load_resnet_state_dict(source: Any, *, which: str = "teacher", strict: bool = False, where: str | None = None):
  """A torchvision / DINO ResNet state dict (a path: .pth with torch installed, .safetensors, .npz; or a mapping of
  arrays / tensors) -> ImportedResNet. Missing keys and misshaped arrays raise InteropError naming the torchvision
  key (a missing ``num_batches_tracked`` is 0); keys that are not backbone entries (``fc.*``, heads) are ignored and listed, or refused with ``strict``."""
  obj, _, where = read_source(source, where)
  state, ignored = _normalise_keys(_select_state_dict(obj, which, where), which, where)
  kwargs = infer_resnet_kwargs(state, where=where)
  abstract = nnx.eval_shape(lambda: ResNet(**kwargs, rngs=nnx.Rngs(0)))
  params, used = {}, set()
  for name, leaf in named_leaves(nnx.state(abstract)).items():
    key = torchvision_name(name)
    shape = tuple(leaf.shape)
    want = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
    if key not in state and name.endswith("num_batches_tracked"):
      # Only counts steps (BN uses momentum 0.1, never this count); older torch files and DINO's released
      # weights, which DINO's hubconf loads with strict=False, may lack it.
      params[name] = np.zeros(shape, leaf.dtype)
      continue
    if key not in state:
      raise InteropError(f"{where}: missing key {key!r} (expected shape {list(want)})")
    a = _to_numpy(state[key])
    if tuple(a.shape) != want:
      raise InteropError(f"{where}: {key!r} has shape {list(a.shape)}, expected {list(want)}")
    if a.ndim == 4:
      a = a.transpose(2, 3, 1, 0)
    params[name] = np.array(a, dtype=leaf.dtype, order="C")  # not ascontiguousarray: it makes a 0-d count 1-d
    used.add(key)
  ignored = sorted(ignored + [k for k in state if k not in used])
  if ignored and strict:
    raise InteropError(
      f"{where}: {len(ignored)} unexpected keys (strict=True): {ignored[:20]}{' ...' if len(ignored) > 20 else ''}"
    )
  return ImportedResNet(kwargs=kwargs, params=params, ignored=ignored, source=where)
