"""PyTorch interop: our ViT backbone parameters <-> the official DINO / DINOv2 (SimDINO / SimDINOv2) state dicts.

Names and layouts (facebookresearch/dino ``vision_transformer.py``, facebookresearch/dinov2
``dinov2/models/vision_transformer.py`` and ``dinov2/layers/*``, the same in RobinWu218/SimDINO):

  ours (Flax, slash names)              official (PyTorch)                 layout change
  cls_token (1, 1, D)                   cls_token (1, 1, D)                -
  pos_embed (1, 1 + N, D)               pos_embed (1, 1 + N, D)            -
  register_tokens (1, R, D)             register_tokens (1, R, D)          - (DINOv2 with registers only)
  mask_token (1, D)                     mask_token (1, D)                  - (DINOv2 only; zeros when absent)
  patch_embed/kernel (p, p, 3, D)       patch_embed.proj.weight (D, 3, p, p)  HWIO -> OIHW (Conv2d)
  patch_embed/bias (D,)                 patch_embed.proj.bias (D,)         -
  blocks/i/norm1/scale, bias            blocks.i.norm1.weight, bias        -
  blocks/i/attn/qkv/kernel (D, 3D)      blocks.i.attn.qkv.weight (3D, D)   (in, out) -> (out, in)
  blocks/i/attn/proj/*                  blocks.i.attn.proj.*               (in, out) -> (out, in)
  blocks/i/ls1/gamma, ls2/gamma (D,)    blocks.i.ls1.gamma, ls2.gamma      - (LayerScale, DINOv2 only)
  blocks/i/mlp/fc1/*, fc2/*             blocks.i.mlp.fc1.*, fc2.*          (in, out) -> (out, in)
  blocks/i/mlp/w12/*, w3/*              blocks.i.mlp.w12.*, w3.*           (in, out) -> (out, in) (SwiGLU, ViT-g)
  norm/scale, bias                      norm.weight, norm.bias             -

The qkv output is split (3, heads, head_dim) in both codes, so its kernel only needs the transpose; the tokens
are [cls, registers, patches] in both, the registers after the positional embedding is added.

Importing accepts what the official repositories save: DINOv2's chunked blocks ``blocks.<chunk>.<i>.*`` (``i`` is
the global block index), prefixes ``module.`` (DDP), ``_orig_mod.`` (torch.compile), ``teacher.`` / ``student.``
(``which`` picks one) and ``backbone.``, and checkpoint files whose state dict sits under ``teacher``,
``student``, ``model``, ``state_dict`` or ``module``. Other keys (``head.*``, ``dino_head.*``, ``ibot_head.*``,
centres ...) are ignored and listed (``strict=True`` refuses them). Our own exports (slash names, Flax layout)
load too.

Python API: ``to_torch(params)`` / ``from_torch(state_dict)``, ``named_arrays(path)`` (a file in either layout ->
our names), ``official_constructor(kwargs, flavor)``, ``network_to_torch(params)`` / ``network_from_torch(state, like)`` (backbone
and heads: ``head.mlp.<2i>.*``, ``head.last_layer.weight_g`` (K, 1) / ``weight_v`` (K, in)),
``load_state_dict(source, ...)`` -> ``ImportedViT`` (``.params``, ``.kwargs``, ``.build()``),
``read_state_dict(path)`` (.pth through PyTorch, imported only then; .safetensors / .npz through ``io.formats``),
``infer_vit_kwargs(state_dict)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import zipfile
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from simdino_jax.errors import ExportError, InteropError
from simdino_jax.io import formats
from simdino_jax.models.vit import VisionTransformer, parse_variant
from simdino_jax.tree import map_with_name, named_leaves

FLAVORS = ("auto", "dino", "dinov2")
WHICH = ("teacher", "student")
# Wrappers stripped from the front of every key, in any order and number.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Entry of a .pth state dict's `_metadata` (PyTorch's per-module versions) where our exporter stores the config.
PTH_METADATA_KEY = "simdino_jax"
# Top-level entries of a checkpoint file that hold the state dict (the `which` network first).
_CONTAINER_KEYS = ("model", "state_dict", "module", "params")

logger = logging.getLogger(__name__)


# ---- names and layouts --------------------------------------------------------------------------------------
def torch_name(name: str) -> tuple[str, str]:
  """(official name, layout) of one of our backbone parameter names ('blocks/0/attn/qkv/kernel', no prefix).

  layout: "conv" (HWIO <-> OIHW), "linear" ((in, out) <-> (out, in)) or "same"."""
  if name == "patch_embed/kernel":
    return "patch_embed.proj.weight", "conv"
  if name == "patch_embed/bias":
    return "patch_embed.proj.bias", "same"
  parts = name.split("/")
  if parts[-1] == "kernel":
    return ".".join(parts[:-1] + ["weight"]), "linear"
  if parts[-1] == "scale":  # LayerNorm
    return ".".join(parts[:-1] + ["weight"]), "same"
  return ".".join(parts), "same"


def _to_torch_layout(a: np.ndarray, layout: str) -> np.ndarray:
  if layout == "conv":  # K[h, w, c, o] -> W[o, c, h, w]
    return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
  if layout == "linear":
    return np.ascontiguousarray(a.T)
  return a


def _from_torch_layout(a: np.ndarray, layout: str) -> np.ndarray:
  if layout == "conv":  # W[o, c, h, w] -> K[h, w, c, o]
    return np.ascontiguousarray(a.transpose(2, 3, 1, 0))
  if layout == "linear":
    return np.ascontiguousarray(a.T)
  return a


def _torch_shape(shape: tuple, layout: str) -> tuple:
  if layout == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if layout == "linear":
    return tuple(reversed(shape))
  return tuple(shape)


def _strip_backbone(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our flat names without the leading 'backbone/' (an export of the backbone, or of the whole network)."""
  has_prefix = any(k.startswith("backbone/") for k in params)
  out = {}
  for k, v in params.items():
    if has_prefix:
      if not k.startswith("backbone/"):
        continue  # head/..., patch_head/...: not part of the backbone
      k = k[len("backbone/") :]
    out[k] = np.asarray(v)
  return out


def to_torch(params: Mapping[str, Any], *, flavor: str = "auto") -> dict[str, np.ndarray]:
  """Our backbone parameters {name: array} (slash names, with or without 'backbone/') -> the official state dict.

  flavor "dino" follows facebookresearch/dino's VisionTransformer (no mask_token: its strict load would refuse
  it), "dinov2" facebookresearch/dinov2's (keeps mask_token); "auto" picks dinov2 when the model has LayerScale,
  registers or SwiGLU or a trained (non-zero) mask token, else dino. LayerScale / registers / SwiGLU always keep
  their DINOv2 names (the DINO v1 code has no such parameters)."""
  if flavor not in FLAVORS:
    raise InteropError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
  params = _strip_backbone(params)
  for required in ("cls_token", "pos_embed", "patch_embed/kernel"):
    if required not in params:
      raise InteropError(
        f"not the parameters of our ViT backbone: {required!r} is missing "
        f"(got {sorted(params)[:8]}{' ...' if len(params) > 8 else ''})"
      )
  if flavor == "auto":
    v2 = any(re.search(r"(^|/)(ls1|ls2|w12|w3)/", k) for k in params) or "register_tokens" in params
    mask = params.get("mask_token")
    v2 = v2 or (mask is not None and bool(np.any(np.asarray(mask, np.float32) != 0)))
    flavor = "dinov2" if v2 else "dino"
  out = {}
  for name, a in params.items():
    if name == "mask_token" and flavor == "dino":
      continue
    tname, layout = torch_name(name)
    out[tname] = _to_torch_layout(a, layout)
  return out


def from_torch_name(key: str, ndim: int) -> tuple[str, str]:
  """(our name, layout) of a bare official backbone key ('blocks.0.attn.qkv.weight') holding an array of ``ndim``
  dimensions: the inverse of ``torch_name`` (a ``.weight`` is a Linear kernel when 2-D, a LayerNorm scale when 1-D)."""
  if key == "patch_embed.proj.weight":
    return "patch_embed/kernel", "conv"
  if key == "patch_embed.proj.bias":
    return "patch_embed/bias", "same"
  parts = key.split(".")
  if parts[-1] == "weight":
    return "/".join(parts[:-1] + ["kernel" if ndim == 2 else "scale"]), "linear" if ndim == 2 else "same"
  return "/".join(parts), "same"


def from_torch(state: Mapping[str, Any], *, which: str = "teacher", where: str = "state dict") -> dict[str, np.ndarray]:
  """An official backbone state dict (any of the prefixes and containers ``load_state_dict`` accepts) -> our
  backbone parameters {name: array} (slash names without 'backbone/', our layout), the inverse of ``to_torch``.
  Nothing is inferred or checked against a model; in a state dict with ``backbone.`` keys the others (heads ...)
  are dropped."""
  state, _ = _normalise_keys(_select_state_dict(state, which, where), which, where)
  out = {}
  for key, value in state.items():
    value = _to_numpy(value)
    name, layout = from_torch_name(key, value.ndim)
    out[name] = _from_torch_layout(value, layout)
  return out


def named_arrays(path: str, *, which: str = "teacher") -> tuple[dict[str, np.ndarray], str]:
  """({our name: array}, layout) of a weights file in either layout (.pth with PyTorch installed, .safetensors,
  .npz): our export's names as they are ('flax': backbone/..., head/...), an official state dict's backbone mapped
  to ours ('torch': backbone/blocks/0/attn/qkv/kernel ...). What ``config.init_from`` reads from a file."""
  obj, _ = read_state_dict(path)
  arrays = _select_state_dict(obj, which, path)
  if any("/" in k for k in arrays):  # our own names and layout
    return {k: _to_numpy(v) for k, v in arrays.items()}, "flax"
  backbone = from_torch(arrays, which=which, where=path)
  known = {"cls_token", "pos_embed", "patch_embed/kernel"}
  if not known <= set(backbone):
    raise InteropError(
      f"{path}: neither our export (slash names) nor an official ViT state dict (missing "
      f"{sorted(known - set(backbone))}; keys: {sorted(arrays)[:8]}{' ...' if len(arrays) > 8 else ''})"
    )
  if "mask_token" not in backbone:  # DINO v1 has none (to_torch drops an untrained one): zeros, as load_state_dict
    backbone["mask_token"] = np.zeros((1, backbone["cls_token"].shape[-1]), backbone["cls_token"].dtype)
  return {f"backbone/{k}": v for k, v in backbone.items()}, "torch"


def official_constructor(kwargs: Mapping[str, Any], flavor: str) -> str:
  """The official PyTorch module, with its arguments, whose ``load_state_dict(strict=True)`` takes ``to_torch``'s
  state dict of ``VisionTransformer(**kwargs)`` and computes the same features (flavor "dino" or "dinov2", as
  ``to_torch`` chose: a "mask_token" key means dinov2).

  The arguments that differ from the official defaults matter: DINO's ViT defaults to qkv_bias=False (the strict
  load then fails on ``qkv.bias``) and nn.LayerNorm's eps 1e-5 (it loads, and the features differ by ~5e-3); DINOv2's
  block_chunks=1 names the blocks ``blocks.0.<i>``; the image size fixes the positional embedding's shape."""
  ratio = f"{float(kwargs.get('mlp_ratio', 4.0)):g}"
  common = (
    f"patch_size={kwargs['patch_size']}, embed_dim={kwargs['embed_dim']}, depth={kwargs['depth']}, "
    f"num_heads={kwargs['num_heads']}, mlp_ratio={ratio}"
  )
  if flavor == "dino":
    if kwargs.get("ffn", "mlp") != "mlp" or kwargs.get("num_registers") or kwargs.get("layerscale_init") is not None:
      raise InteropError("flavor 'dino' has no SwiGLU, registers or LayerScale: use 'dinov2'")
    return (
      f"vision_transformer.VisionTransformer(img_size=[{kwargs['img_size']}], {common}, qkv_bias=True, "
      "norm_layer=partial(nn.LayerNorm, eps=1e-6)) of facebookresearch/dino (vision_transformer.py; "
      "SimDINO's simdino/vision_transformer.py is the same)"
    )
  if flavor != "dinov2":
    raise InteropError(f"flavor must be 'dino' or 'dinov2', got {flavor!r}")
  init = kwargs.get("layerscale_init")
  return (
    f"dinov2.models.vision_transformer.DinoVisionTransformer(img_size={kwargs['img_size']}, {common}, "
    f"block_chunks=0, num_register_tokens={kwargs.get('num_registers', 0)}, "
    f"init_values={init if init is not None else None}, "
    f"ffn_layer={'swiglufused' if kwargs.get('ffn') == 'swiglu' else 'mlp'!r}, "
    f"interpolate_antialias={bool(kwargs.get('interpolate_antialias', False))}, "
    f"interpolate_offset={float(kwargs.get('interpolate_offset', 0.1)):g}) of facebookresearch/dinov2 "
    "(qkv_bias, ffn_bias, proj_bias True and LayerNorm eps 1e-6 are its defaults; SimDINO's "
    "simdinov2/models/vision_transformer.py is the same)"
  )


# ---- whole networks (backbone + heads), for running the official trainers from our weights --------------------
def head_torch_name(name: str, num_layers: int) -> tuple[str, str]:
  """(official name, layout) of one of our head parameter names, relative to the head ('mlp/1/kernel',
  'proj/mlp/0/bias', 'last_layer/weight_v').

  Our ProjectionHead's Linear i is the official ``mlp.<2i>`` (the GELUs take the odd indices of the official
  nn.Sequential), or ``mlp`` itself when the head has one layer (the official head is then a bare nn.Linear); the
  DINO head's MLP sits under ``proj/`` here and directly under the head there. The weight-normalised last layer:
  ``weight_v`` (in, K) -> (K, in) and ``weight_g`` (K,) -> (K, 1), torch.nn.utils.weight_norm's shapes (dim 0)."""
  parts = name.split("/")
  if parts[0] == "proj":
    parts = parts[1:]
  if parts[0] == "last_layer":
    if parts[1] == "weight_v":
      return "last_layer.weight_v", "linear"
    if parts[1] == "weight_g":
      return "last_layer.weight_g", "column"
    raise InteropError(f"head parameter {name!r}: unknown last-layer leaf")
  if parts[0] != "mlp" or len(parts) != 3 or parts[2] not in ("kernel", "bias"):
    raise InteropError(f"head parameter {name!r}: expected mlp/<i>/kernel|bias or last_layer/weight_v|weight_g")
  module = "mlp" if num_layers == 1 else f"mlp.{2 * int(parts[1])}"
  if parts[2] == "kernel":
    return f"{module}.weight", "linear"
  return f"{module}.bias", "same"


def _head_layers(params: Mapping[str, Any], prefix: str) -> int:
  return len({k.split("/")[-2] for k in params if re.match(rf"{prefix}/(proj/)?mlp/\d+/kernel$", k)})


def network_to_torch(
  params: Mapping[str, Any], *, flavor: str = "auto", head: str = "head", patch_head: str = "ibot_head"
) -> dict[str, np.ndarray]:
  """Our whole network {name: array} (slash names: backbone/..., head/..., patch_head/...) -> one official state
  dict with ``backbone.``, ``<head>.`` and ``<patch_head>.`` prefixes: DINO's / SimDINO's MultiCropWrapper is
  ``head="head"``; DINOv2's / SimDINOv2's SSLMetaArch student and teacher are ``head="dino_head"`` (and
  ``patch_head="ibot_head"`` with a separate patch head)."""
  params = {k: np.asarray(v) for k, v in params.items()}
  out = {f"backbone.{k}": v for k, v in to_torch(params, flavor=flavor).items()}
  for ours, theirs in (("head", head), ("patch_head", patch_head)):
    layers = _head_layers(params, ours)
    for name, a in params.items():
      if not name.startswith(ours + "/"):
        continue
      tname, layout = head_torch_name(name[len(ours) + 1 :], layers)
      out[f"{theirs}.{tname}"] = a.reshape(-1, 1) if layout == "column" else _to_torch_layout(a, layout)
  return out


def network_from_torch(
  state: Mapping[str, Any], like: Mapping[str, Any], *, head: str = "head", patch_head: str = "ibot_head"
) -> dict[str, np.ndarray]:
  """The inverse of ``network_to_torch`` for the names in ``like`` (our flat parameter names -> arrays, for their
  names and shapes): {our name: array in our layout}. Raises InteropError naming the first missing key."""
  out = {}
  layers = {p: _head_layers(like, p) for p in ("head", "patch_head")}
  for name, ref in like.items():
    ref = np.asarray(ref)
    top, rest = name.split("/", 1)
    if top == "backbone":
      tname, layout = torch_name(rest)
      tname = f"backbone.{tname}"
    else:
      tname, layout = head_torch_name(rest, layers[top])
      tname = f"{head if top == 'head' else patch_head}.{tname}"
    if tname not in state:
      if rest == "mask_token":  # DINO v1's ViT has none: ours stays as it is
        out[name] = ref
        continue
      raise InteropError(f"network_from_torch: {tname!r} (ours {name!r}) is not in the state dict")
    a = _to_numpy(state[tname])
    out[name] = a.reshape(ref.shape) if layout == "column" else _from_torch_layout(a, layout)
  return out


# ---- reading files ------------------------------------------------------------------------------------------
def _to_numpy(value: Any) -> np.ndarray:
  """A NumPy array from a NumPy/JAX array or a torch tensor (bfloat16 tensors go through float32)."""
  if type(value).__module__.startswith("torch"):
    t = value.detach().cpu()
    if not t.is_floating_point() or t.dtype in (_torch().float32, _torch().float64, _torch().float16):
      return t.numpy()
    return t.float().numpy()
  return np.asarray(value)


def _torch():
  import torch  # pylint: disable=g-import-not-at-top  (optional, never a dependency: only for .pth files and tensors)

  return torch


def _is_array(value: Any) -> bool:
  return hasattr(value, "shape") and hasattr(value, "dtype")


def _file_kind(path: str) -> str:
  """'npz', 'pth' (torch.save's zip or legacy pickle) or 'safetensors', by content."""
  with open(path, "rb") as f:
    head = f.read(8)
  if head[:4] == b"PK\x03\x04":
    with zipfile.ZipFile(path) as z:
      names = z.namelist()
    if any(n.endswith("data.pkl") for n in names):
      return "pth"
    return "npz"
  # torch.save's legacy (non-zip) format: pickle protocol 2 of the magic number 0x1950a86a20f9469cfc6c (LONG1 of
  # 10 bytes). As a safetensors header length these bytes would mean > 100 MB of JSON, which that format refuses.
  if head[:4] == b"\x80\x02\x8a\x0a":
    return "pth"
  return "safetensors"


def read_source(source: Any, where: str | None) -> tuple[Any, dict[str, str], str]:
  """(state dict object, file metadata, name for errors) of a loader's ``source``: a path (read_state_dict) or a
  mapping of names to arrays / tensors (no metadata; named ``where`` or "state dict")."""
  if isinstance(source, (str, os.PathLike)):
    return (*read_state_dict(os.fspath(source)), where or os.fspath(source))
  if isinstance(source, Mapping):
    return source, {}, where or "state dict"
  raise InteropError(f"source must be a path or a mapping of names to arrays, got {type(source).__name__}")


def read_state_dict(path: str) -> tuple[dict[str, Any], dict[str, str]]:
  """({key: array or nested dict}, metadata) of a .pth (needs torch), .safetensors or .npz file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise InteropError(f"{path}: no such file")
  kind = _file_kind(path)
  if kind != "pth":
    try:
      return formats.read_arrays(path)
    except (ExportError, ValueError, OSError) as e:
      raise InteropError(f"{path}: not a readable {kind} file ({e})") from None
  try:
    torch = _torch()
  except ImportError:
    raise InteropError(
      f"{path}: reading a PyTorch .pth file needs PyTorch (pip install torch); or export it "
      "as .safetensors (python -m simdino_jax.export --format=torch --output=FILE.safetensors "
      "writes one without PyTorch)"
    ) from None
  try:
    # DINO's and SimDINO's training checkpoints (main_dino.py's checkpoint.pth, the "full ckpt" downloads) pickle
    # their argparse ``args`` next to the weights: a Namespace holds only plain values, so it is allowed through.
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (re-raised with the path)
    raise InteropError(
      f"{path}: torch.load(weights_only=True) failed ({type(e).__name__}: "
      f"{(str(e).strip().splitlines() or [''])[0][:200]}). A training checkpoint "
      "that also pickles other Python objects is not read here: if you trust the file, "
      "load it with torch.load(path, weights_only=False) and pass the resulting dict"
    ) from None
  if not isinstance(obj, Mapping):
    raise InteropError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
  metadata = (getattr(obj, "_metadata", None) or {}).get(PTH_METADATA_KEY) or {}
  return dict(obj), {str(k): str(v) for k, v in metadata.items()}


def _select_state_dict(obj: Mapping[str, Any], which: str, where: str) -> dict[str, Any]:
  """The flat {key: array} of a (possibly nested) checkpoint: obj[which], obj["model"], ... or obj itself."""
  for _ in range(4):  # e.g. {"teacher": {...}} or {"model": {"teacher.backbone.x": ...}}
    nested = {k for k, v in obj.items() if isinstance(v, Mapping)}
    if not nested:
      break
    for key in (which, *_CONTAINER_KEYS):
      if key in nested:
        obj = obj[key]
        break
    else:
      other = "student" if which == "teacher" else "teacher"
      if other in nested:
        raise InteropError(f"{where}: holds '{other}' but no '{which}' network (pass which='{other}')")
      obj = {k: v for k, v in obj.items() if _is_array(v)}  # e.g. {"optimizer": {...}} next to the weights
      break
  arrays = {k: v for k, v in obj.items() if _is_array(v)}
  if not arrays:
    raise InteropError(f"{where}: no arrays found (top-level keys: {sorted(obj)[:10]})")
  return arrays


def _normalise_keys(arrays: Mapping[str, Any], which: str, where: str) -> tuple[dict[str, Any], list[str]]:
  """Official keys -> bare backbone keys (blocks.i.*, cls_token ...): strips wrappers, picks `which`, drops the
  `backbone.` prefix and un-chunks DINOv2's `blocks.<chunk>.<i>.`. Returns (backbone arrays, ignored keys); the
  other network's keys (student.* when importing the teacher) are neither."""
  if which not in WHICH:
    raise InteropError(f"which must be one of {WHICH}, got {which!r}")
  other = "student" if which == "teacher" else "teacher"
  bare = {}
  for k in arrays:
    b = k
    while b.startswith(_WRAPPER_PREFIXES):
      b = b.split(".", 1)[1]
    bare[k] = b
  ignored = []
  if any(b.startswith((f"{which}.", f"{other}.")) for b in bare.values()):
    if not any(b.startswith(f"{which}.") for b in bare.values()):
      raise InteropError(f"{where}: no '{which}.' keys to import (it holds '{other}.' ones; pass which='{other}')")
    ignored = [k for k, b in bare.items() if not b.startswith((f"{which}.", f"{other}."))]
    bare = {k: b[len(which) + 1 :] for k, b in bare.items() if b.startswith(f"{which}.")}
  if any(b.startswith("backbone.") for b in bare.values()):
    ignored += [k for k, b in bare.items() if not b.startswith("backbone.")]
    bare = {k: b[len("backbone.") :] for k, b in bare.items() if b.startswith("backbone.")}
  chunked = any(re.match(r"blocks\.\d+\.\d+\.", b) for b in bare.values())
  out = {}
  for k, b in bare.items():
    if chunked:  # DINOv2 BlockChunk: blocks.<chunk>.<global index>.*
      b = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", b)
    if b in out:
      raise InteropError(f"{where}: two keys map to {b!r} (one of them {k!r})")
    out[b] = arrays[k]
  return out, ignored


def _shape(state: Mapping[str, Any], key: str, where: str, ndim: int) -> tuple:
  if key not in state:
    raise InteropError(f"{where}: missing key {key!r} (needed to infer the ViT's shape)")
  shape = tuple(state[key].shape)
  if len(shape) != ndim:
    raise InteropError(f"{where}: {key!r} has shape {list(shape)}, expected {ndim} dimensions")
  return shape


def _swiglu_ratio(dim: int, hidden: int) -> float | None:
  """An mlp_ratio whose SwiGLU hidden width ((int(dim * r) * 2/3) + 7) // 8 * 8 equals `hidden`."""
  for r in (4.0, hidden * 1.5 / dim, (hidden * 1.5 + 0.5) / dim, *[h / dim for h in range(hidden, 2 * hidden)]):
    if (int(int(dim * r) * 2 / 3) + 7) // 8 * 8 == hidden:
      return r
  return None


def infer_vit_kwargs(state: Mapping[str, Any], *, num_heads: int | None = None, where: str = "state dict") -> dict:
  """VisionTransformer keyword arguments (shapes only) from a bare official state dict (see _normalise_keys).

  embed_dim, depth, patch size, image size (pos-embed grid x patch), registers, LayerScale, FFN type and mlp
  ratio come from the shapes; the head count is not in the weights: `num_heads`, default embed_dim // 64 (ViT-Ti
  /S/B/L/g)."""
  if "cls_token" not in state and "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
    raise InteropError(
      f"{where}: a torchvision ResNet state dict, not a ViT: import it with "
      "simdino_jax.io.torchvision_resnet.load_resnet_state_dict"
    )
  _, _, dim = _shape(state, "cls_token", where, 3)
  d, c, ph, pw = _shape(state, "patch_embed.proj.weight", where, 4)
  if ph != pw or c != 3 or d != dim:
    raise InteropError(
      f"{where}: 'patch_embed.proj.weight' has shape {[d, c, ph, pw]}, expected "
      f"[{dim}, 3, p, p] (a square patch over RGB)"
    )
  _, tokens, pdim = _shape(state, "pos_embed", where, 3)
  grid = math.isqrt(tokens - 1)
  if grid * grid != tokens - 1 or pdim != dim:
    raise InteropError(
      f"{where}: 'pos_embed' has shape {[1, tokens, pdim]}, expected [1, 1 + g*g, {dim}] "
      "(a cls entry and a square patch grid)"
    )
  indices = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
  if not indices:
    raise InteropError(f"{where}: no 'blocks.<i>.*' keys")
  depth = max(indices) + 1
  missing = sorted(set(range(depth)) - indices)
  if missing:
    raise InteropError(f"{where}: missing key 'blocks.{missing[0]}.*' (blocks {missing} of 0..{depth - 1} absent)")
  registers = _shape(state, "register_tokens", where, 3)[1] if "register_tokens" in state else 0
  if "blocks.0.mlp.w12.weight" in state:
    hidden = _shape(state, "blocks.0.mlp.w12.weight", where, 2)[0] // 2
    ffn, ratio = "swiglu", _swiglu_ratio(dim, hidden)
    if ratio is None:
      raise InteropError(f"{where}: no mlp ratio gives a SwiGLU hidden width of {hidden} for width {dim}")
  else:
    hidden = _shape(state, "blocks.0.mlp.fc1.weight", where, 2)[0]
    ffn, ratio = "mlp", hidden / dim
    if int(dim * ratio) != hidden:  # float rounding, e.g. 1000 / 384 * 384 = 999.99...
      ratio = (hidden + 0.5) / dim
  if num_heads is None:
    num_heads = dim // 64
    if num_heads < 1 or dim % num_heads:
      raise InteropError(
        f"{where}: the number of attention heads is not stored in the weights and width {dim} "
        "has no default (embed_dim // 64); pass num_heads"
      )
  elif num_heads < 1 or dim % num_heads:
    raise InteropError(f"num_heads={num_heads} does not divide the width {dim} of {where}")
  return dict(
    patch_size=ph,
    embed_dim=dim,
    depth=depth,
    num_heads=int(num_heads),
    mlp_ratio=ratio,
    ffn=ffn,
    img_size=grid * ph,
    num_registers=registers,
    layerscale_init=1.0 if "blocks.0.ls1.gamma" in state else None,
  )


# ---- importing ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ImportedViT:
  """An imported backbone: `params` {our name: float32 array} for `VisionTransformer(**kwargs)`."""

  kwargs: dict
  params: dict[str, np.ndarray]
  ignored: list[str]  # keys of the state dict that are not backbone parameters (heads, optimizer ...)
  source: str
  metadata: dict = dataclasses.field(default_factory=dict)  # of the file: our exports' config, step, which

  def build(self):
    """The VisionTransformer (Flax NNX) holding these parameters."""
    abstract = nnx.eval_shape(lambda: VisionTransformer(**self.kwargs, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    state = map_with_name(lambda name, _: jnp.asarray(self.params[name]), state)
    return nnx.merge(graphdef, state)


def _expected(kwargs: dict) -> dict[str, tuple]:
  """{our name: shape} of VisionTransformer(**kwargs), without computing anything."""
  abstract = nnx.eval_shape(lambda: VisionTransformer(**kwargs, rngs=nnx.Rngs(0)))
  return {k: tuple(v.shape) for k, v in named_leaves(nnx.split(abstract)[1]).items()}


def _config_kwargs(config: Mapping[str, Any] | None) -> dict:
  """num_heads and the pos-embed interpolation settings of a run's config (what the weights do not say)."""
  model = dict((config or {}).get("model") or {})
  out = {}
  heads = model.get("num_heads") or 0
  if not heads and model.get("variant"):
    try:
      heads = parse_variant(model["variant"])["num_heads"]
    except ValueError:
      heads = 0
  if heads:
    out["num_heads"] = int(heads)
  for key in ("interpolate_offset", "interpolate_antialias", "token_init"):
    if key in model:
      out[key] = model[key]
  return out


def load_state_dict(
  source: Any,
  *,
  which: str = "teacher",
  num_heads: int | None = None,
  strict: bool = False,
  config: Mapping[str, Any] | None = None,
  where: str | None = None,
  **overrides,
) -> ImportedViT:
  """An official (or our own exported) backbone state dict -> ImportedViT for our VisionTransformer.

  source: a path (.pth with torch installed, .safetensors, .npz) or a dict of arrays / torch tensors, with official
  names (any of the prefixes in the module docstring) or our slash names (an export of ours, Flax layout).
  which: the network of a checkpoint holding both. num_heads: not inferable from the weights; default from the
  file's run config (our exports carry it) or `config`, else embed_dim // 64. strict: refuse keys that are not
  backbone parameters (by default they are ignored and listed at DEBUG level). where: how errors name the source
  (default its path, or "state dict"; e.g. the file a mapping was read from). overrides: more VisionTransformer
  arguments (interpolate_offset, interpolate_antialias, dtype ...).

  Missing keys and misshaped arrays raise InteropError naming the official key and the expected vs got shape; a
  missing mask_token (DINO v1 has none) is zeros."""
  obj, metadata, where = read_source(source, where)
  if config is None and metadata.get("config"):
    try:
      config = json.loads(metadata["config"])
    except ValueError:
      config = None
  arrays = _select_state_dict(obj, which, where)
  if any("/" in k for k in arrays):  # our own names and layout (a file holds one network): convert, then import
    arrays = to_torch({k: _to_numpy(v) for k, v in arrays.items()}, flavor="dinov2")
  state, ignored = _normalise_keys(arrays, which, where)

  defaults = _config_kwargs(config)
  heads = num_heads if num_heads is not None else defaults.pop("num_heads", None)
  defaults.pop("num_heads", None)
  kwargs = infer_vit_kwargs(state, num_heads=heads, where=where)
  kwargs.update(defaults)
  kwargs.update(overrides)

  params, used = {}, set()
  for name, shape in _expected(kwargs).items():
    tname, layout = torch_name(name)
    want = _torch_shape(shape, layout)
    if tname not in state:
      if name == "mask_token":  # DINO v1 / SimDINO v1 backbones have none; only used with masked inputs
        params[name] = np.zeros(shape, np.float32)
        continue
      raise InteropError(f"{where}: missing key {tname!r} (expected shape {list(want)})")
    value = _to_numpy(state[tname])
    if tuple(value.shape) != want:
      raise InteropError(f"{where}: {tname!r} has shape {list(value.shape)}, expected {list(want)}")
    params[name] = _from_torch_layout(value, layout).astype(np.float32)
    used.add(tname)
  ignored = sorted(ignored + [k for k in state if k not in used])
  if ignored:
    if strict:
      raise InteropError(
        f"{where}: {len(ignored)} unexpected keys (strict=True): {ignored[:20]}{' ...' if len(ignored) > 20 else ''}"
      )
    logger.debug("%s: ignored %d keys that are not backbone parameters: %s", where, len(ignored), ignored)
  return ImportedViT(kwargs=kwargs, params=params, ignored=ignored, source=where, metadata=metadata)
