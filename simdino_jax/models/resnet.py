"""torchvision's ResNet (v1.5) in Flax NNX, channels-last, without the classifier: the backbone DINO trains with
``--arch resnet50`` (``torchvision_models.__dict__[arch]()`` with ``fc`` replaced by ``nn.Identity``).

Architecture (torchvision ``models/resnet.py``): a 7x7 stride-2 stem conv, BN, ReLU and a 3x3 stride-2 max-pool;
four stages of BasicBlocks (resnet18/34) or Bottlenecks (resnet50/101) with ``width * 2**i`` planes, the first
block of stages 2-4 striding by 2 on its 3x3 conv (v1.5; v1 strode on the first 1x1) and projecting the shortcut
with a 1x1 conv + BN; global average pooling gives ``width * 8 * expansion`` features (2048 for resnet50). Convs have
no bias; init as torchvision: kaiming-normal fan_out conv kernels, BN gamma 1 and beta 0, and with
``zero_init_residual`` the gamma of each block's LAST BN is 0 (each block starts as the identity).

Small variants (for CPU tests and the CIFAR miniature): ``width`` (torchvision's 64) scales every stage, ``layers``
sets the depth (e.g. [1, 1, 1, 1]), and ``cifar_stem`` swaps the stem for a 3x3 stride-1 conv without the max-pool
(the common CIFAR ResNet-18 change: 32 px images keep a 4x4 last map instead of 1x1). ``VARIANTS["resnet18_cifar"]``
is torchvision's resnet18 with that stem. Only the stem's kernel shape differs from torchvision, so the state-dict
names stay the same (the interop refuses to build a torchvision model from a cifar-stem export; it imports it back).

BatchNorm (torch's ``BatchNorm2d`` numerics): training mode normalises with the batch mean and the biased batch
variance over (batch, height, width), eps 1e-5, and updates the running statistics with torch's momentum
convention, ``running = (1 - 0.1) * running + 0.1 * batch_statistic`` using the UNBIASED variance (n / (n - 1))
for ``running_var``, and counts ``num_batches_tracked``; evaluation mode normalises with the running statistics.
The batch statistics are a ``jnp.mean`` over the whole batch axis: under ``jit`` with the batch sharded over a mesh,
XLA computes them with an all-reduce over the devices, i.e. exactly SyncBN (``nn.SyncBatchNorm``), the BN DINO's
recipe converts to; there is no per-device BN here.

Running statistics live in ``nnx.BatchStat`` variables (``mean``, ``var``, ``num_batches_tracked``), apart from the
``nnx.Param`` weights. A pure step carries them as a second state: ``graphdef, params, stats =
nnx.split(model, nnx.Param, nnx.BatchStat)``; inside the step ``m = nnx.merge(graphdef, params, stats)``, run
``m(x)`` in training mode (differentiate only with respect to ``params``, e.g. ``nnx.grad(..., argnums=nnx.DiffState(0,
nnx.Param))``), and return ``nnx.state(m, nnx.BatchStat)`` as the new statistics; an optimiser built with
``wrt=nnx.Param`` never touches them. Mode: ``model.train()`` / ``model.eval()`` (nnx's ``use_running_average``
attribute, as ``nnx.BatchNorm``), or ``use_running_average=`` per call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # torch's convention: the weight of the NEW batch statistic

# name: (block, layers, width, cifar_stem)
VARIANTS = {
  "resnet18": ("basic", (2, 2, 2, 2), 64, False),
  "resnet34": ("basic", (3, 4, 6, 3), 64, False),
  "resnet50": ("bottleneck", (3, 4, 6, 3), 64, False),
  "resnet101": ("bottleneck", (3, 4, 23, 3), 64, False),
  "resnet18_cifar": ("basic", (2, 2, 2, 2), 64, True),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


def resnet_kwargs(name: str) -> dict:
  """ResNet keyword arguments of a named variant ("resnet50" -> block="bottleneck", layers=(3, 4, 6, 3), ...)."""
  if name not in VARIANTS:
    raise ValueError(f"unknown ResNet variant {name!r}: expected one of {sorted(VARIANTS)}")
  block, layers, width, cifar_stem = VARIANTS[name]
  return {"block": block, "layers": layers, "width": width, "cifar_stem": cifar_stem}


def kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
  """torch ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` of an HWIO kernel: N(0, 2 / (kh * kw * O))."""
  kh, kw, _, out = shape
  std = math.sqrt(2.0 / (kh * kw * out))
  return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class Conv(nnx.Module):
  """Conv2d without bias, NHWC images and an HWIO kernel, torch's symmetric zero padding."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, *, dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(kaiming_normal_fan_out(rngs.params(), (kernel, kernel, in_ch, out_ch)))
    self.stride = stride
    self.padding = kernel // 2  # torchvision: 7x7 pad 3, 3x3 pad 1, 1x1 pad 0
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.padding
    return lax.conv_general_dilated(
      x.astype(self.dtype),
      self.kernel[...].astype(self.dtype),
      window_strides=(self.stride, self.stride),
      padding=((p, p), (p, p)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


class BatchNorm(nnx.Module):
  """torch ``BatchNorm2d`` (eps 1e-5, momentum 0.1, unbiased running variance) on NHWC; statistics in float32 over
  the whole (possibly sharded) batch: SyncBN under a mesh. See the module docstring."""

  def __init__(self, ch: int, *, zero_init: bool = False, use_running_average: bool = False, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.zeros((ch,), jnp.float32) if zero_init else jnp.ones((ch,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((ch,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((ch,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((ch,), jnp.float32))
    self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
    self.use_running_average = use_running_average
    self.dtype = dtype

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    running = self.use_running_average if use_running_average is None else use_running_average
    xf = x.astype(jnp.float32)
    if running:
      mean, var = self.mean[...], self.var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)  # biased: what torch normalises with
      n = math.prod(x.shape[:-1])
      unbiased = var * (n / max(n - 1, 1))
      self.mean[...] = (1.0 - BN_MOMENTUM) * self.mean[...] + BN_MOMENTUM * lax.stop_gradient(mean)
      self.var[...] = (1.0 - BN_MOMENTUM) * self.var[...] + BN_MOMENTUM * lax.stop_gradient(unbiased)
      self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
    mul = self.scale[...] * lax.rsqrt(var + BN_EPS)
    return (xf * mul + (self.bias[...] - mean * mul)).astype(self.dtype)


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, in_ch: int, planes: int, stride: int, *, zero_init_residual: bool, dtype, rngs: nnx.Rngs):
    self.conv1 = Conv(in_ch, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(planes, dtype=dtype)
    self.conv2 = Conv(planes, planes, 3, dtype=dtype, rngs=rngs)
    self.bn2 = BatchNorm(planes, zero_init=zero_init_residual, dtype=dtype)
    self.downsample = _downsample(in_ch, planes, stride, dtype=dtype, rngs=rngs)

  def __call__(self, x, use_running_average=None):
    out = jax.nn.relu(self.bn1(self.conv1(x), use_running_average))
    out = self.bn2(self.conv2(out), use_running_average)
    return jax.nn.relu(out + _shortcut(self.downsample, x, use_running_average))


class Bottleneck(nnx.Module):
  expansion = 4

  def __init__(self, in_ch: int, planes: int, stride: int, *, zero_init_residual: bool, dtype, rngs: nnx.Rngs):
    self.conv1 = Conv(in_ch, planes, 1, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(planes, dtype=dtype)
    self.conv2 = Conv(planes, planes, 3, stride, dtype=dtype, rngs=rngs)  # v1.5: the stride on the 3x3
    self.bn2 = BatchNorm(planes, dtype=dtype)
    self.conv3 = Conv(planes, planes * 4, 1, dtype=dtype, rngs=rngs)
    self.bn3 = BatchNorm(planes * 4, zero_init=zero_init_residual, dtype=dtype)
    self.downsample = _downsample(in_ch, planes * 4, stride, dtype=dtype, rngs=rngs)

  def __call__(self, x, use_running_average=None):
    out = jax.nn.relu(self.bn1(self.conv1(x), use_running_average))
    out = jax.nn.relu(self.bn2(self.conv2(out), use_running_average))
    out = self.bn3(self.conv3(out), use_running_average)
    return jax.nn.relu(out + _shortcut(self.downsample, x, use_running_average))


def _downsample(in_ch: int, out_ch: int, stride: int, *, dtype, rngs: nnx.Rngs) -> nnx.List | None:
  # torchvision's nn.Sequential(conv1x1, BN): items 0 and 1, so the state-dict names are downsample.0 / .1.
  if stride == 1 and in_ch == out_ch:
    return None
  return nnx.List([Conv(in_ch, out_ch, 1, stride, dtype=dtype, rngs=rngs), BatchNorm(out_ch, dtype=dtype)])


def _shortcut(downsample, x, use_running_average):
  if downsample is None:
    return x
  return downsample[1](downsample[0](x), use_running_average)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch ``MaxPool2d(3, stride=2, padding=1)``: the padding never wins (-inf)."""
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))).astype(
    x.dtype
  )


class ResNet(nnx.Module):
  """torchvision's ResNet without ``fc``: images (B, H, W, 3) -> pooled features (B, width * 8 * expansion), and
  with ``return_feature_map`` also the last stage's map (B, H/32, W/32, C) (H/8 with ``cifar_stem``)."""

  def __init__(
    self,
    block: str = "bottleneck",
    layers: Sequence[int] = (3, 4, 6, 3),
    *,
    width: int = 64,
    cifar_stem: bool = False,
    zero_init_residual: bool = False,
    in_chans: int = 3,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if block not in EXPANSION:
      raise ValueError(f"block must be one of {sorted(EXPANSION)}, got {block!r}")
    if len(layers) != 4 or any(int(n) < 1 for n in layers):
      raise ValueError(f"layers must be four positive block counts, got {list(layers)}")
    if width < 1:
      raise ValueError(f"width must be positive, got {width}")
    cls = BasicBlock if block == "basic" else Bottleneck
    self.block, self.layers, self.width, self.cifar_stem = block, tuple(int(n) for n in layers), width, cifar_stem
    self.conv1 = Conv(in_chans, width, 3 if cifar_stem else 7, 1 if cifar_stem else 2, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(width, dtype=dtype)
    in_ch = width
    for i, n in enumerate(self.layers):
      planes = width * 2**i
      blocks = []
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(cls(in_ch, planes, stride, zero_init_residual=zero_init_residual, dtype=dtype, rngs=rngs))
        in_ch = planes * cls.expansion
      setattr(self, f"layer{i + 1}", nnx.List(blocks))
    self.num_features = self.embed_dim = in_ch

  def __call__(self, images: jax.Array, *, use_running_average: bool | None = None, return_feature_map: bool = False):
    x = jax.nn.relu(self.bn1(self.conv1(images), use_running_average))
    if not self.cifar_stem:
      x = max_pool_3x3_s2(x)
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for blk in stage:
        x = blk(x, use_running_average)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # AdaptiveAvgPool2d(1) + flatten
    return (pooled, x) if return_feature_map else pooled


def resnet(name: str, **kwargs) -> ResNet:
  """A named variant (see VARIANTS); kwargs override it (rngs required)."""
  return ResNet(**{**resnet_kwargs(name), **kwargs})
