"""Vision Transformer backbone for the DINO / DINOv2 / SimDINO family, in Flax NNX.

One module covers DINO v1 / SimDINO v1 (no LayerScale, linear drop-path schedule, cls trunc_normal) and
DINOv2 / SimDINOv2 (LayerScale, registers, uniform drop path, cls normal(1e-6), mask token, SwiGLU for ViT-g).
See docs/methods.md#vision-transformer for the official behaviour this reproduces.

Layout notes (CPU speed, see docs/performance.md#vit-layout-on-cpu): tokens stay batch-major and the residual stream is kept as a 2-D
(B*T, D) matrix so every Dense / LayerNorm is a plain matrix op; attention uses `jax.nn.dot_product_attention`
unless the attention weights are requested.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

# width, depth, heads. "g" is DINOv2's "giant2" (SwiGLU FFN).
VARIANTS = {
  "mu": (144, 6, 3),
  "Ti": (192, 12, 3),
  "S": (384, 12, 6),
  "B": (768, 12, 12),
  "L": (1024, 24, 16),
  "g": (1536, 40, 24),
}

_LN_EPS = 1e-6
_SQRT_HALF = float(np.sqrt(0.5))


TOKEN_INITS = ("dino", "dinov2")  # cls / register token init: trunc-normal 0.02 (DINO) or normal 1e-6 (DINOv2)


def parse_variant(name: str) -> dict:
  """ "S/16" -> dict(embed_dim=384, depth=12, num_heads=6, patch_size=16, ffn="mlp")."""
  match = re.fullmatch(r"\s*([A-Za-z]+)/(\d+)\s*", name) if isinstance(name, str) else None
  if match is None or match.group(1) not in VARIANTS or int(match.group(2)) <= 0:
    raise ValueError(
      f"unknown ViT variant {name!r}: expected '<size>/<patch>' with size in "
      f"{sorted(VARIANTS)} and a positive integer patch size, e.g. 'S/16'"
    )
  size = match.group(1)
  embed_dim, depth, num_heads = VARIANTS[size]
  return dict(
    embed_dim=embed_dim,
    depth=depth,
    num_heads=num_heads,
    patch_size=int(match.group(2)),
    ffn="swiglu" if size == "g" else "mlp",
  )


# --------------------------------------------------------------------------------------------- initialisers


def trunc_normal_init(std: float = 0.02, lower: float = -2.0, upper: float = 2.0):
  """PyTorch `trunc_normal_(std=std, a=lower, b=upper)`: the bounds are ABSOLUTE values (the official repos
  keep the default +-2, i.e. +-100 sigma for std 0.02), unlike jax's initializer which cuts at +-2 sigma."""

  def init(key, shape, dtype=jnp.float32):
    z = jax.random.truncated_normal(key, lower / std, upper / std, shape, jnp.float32)
    return (std * z).astype(dtype)

  return init


def uniform_init(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

  return init


def normal_init(std: float):
  def init(key, shape, dtype=jnp.float32):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

  return init


def gelu_exact(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, the official ViT's `nn.GELU()`, in PyTorch's form x/2 * (1 + erf(x/sqrt 2)).

  Agrees with `jax.nn.gelu(approximate=False)` (an erfc form) to <1e-6 absolute and was ~15% faster than it
  forward+backward on XLA CPU (erfc lowers to a costlier polynomial)."""
  return 0.5 * x * (1.0 + lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


def _dense(in_dim: int, out_dim: int, *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  # Every Linear of the official models is re-initialised trunc_normal(0.02) with zero bias.
  return nnx.Linear(
    in_dim,
    out_dim,
    kernel_init=trunc_normal_init(0.02),
    bias_init=nnx.initializers.zeros_init(),
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
  )


def _layer_norm(dim: int, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # flax computes the mean/variance in at least float32 whatever `dtype` is.
  return nnx.LayerNorm(dim, epsilon=_LN_EPS, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


# ------------------------------------------------------------------- positional-embedding interpolation


def _cubic_conv1(x: float, a: float) -> float:  # |x| <= 1 branch of the Keys kernel
  return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0


def _cubic_conv2(x: float, a: float) -> float:  # 1 < |x| < 2 branch of the Keys kernel
  return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a


def _bicubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
  """PyTorch `upsample_bicubic2d`, align_corners=False, no antialias, as an (out, in) matrix.

  `scale` is input pixels per output pixel (1/scale_factor when a scale_factor is passed). Keys kernel
  a = -0.75, four taps whose indices are clamped to the border (so border weights accumulate)."""
  a = -0.75
  mat = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = scale * (i + 0.5) - 0.5  # no clamp at 0 for cubic
    # guard_index_and_lambda: the base index never passes the last pixel and t stays in [0, 1].
    idx = min(int(math.floor(src)), in_size - 1)
    t = min(max(src - idx, 0.0), 1.0)
    coeffs = (_cubic_conv2(t + 1.0, a), _cubic_conv1(t, a), _cubic_conv1(1.0 - t, a), _cubic_conv2(2.0 - t, a))
    for j, c in enumerate(coeffs):
      mat[i, min(max(idx - 1 + j, 0), in_size - 1)] += c
  return mat


def _bicubic_aa_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
  """PyTorch `_upsample_bicubic2d_aa` (antialias=True), align_corners=False, as an (out, in) matrix.

  PIL-style: Keys kernel a = -0.5, stretched by the downscale factor when shrinking, taps outside the
  image dropped (not clamped) and the remaining weights renormalised to sum to one."""
  a = -0.5

  def kernel(x: float) -> float:
    x = abs(x)
    if x < 1.0:
      return _cubic_conv1(x, a)
    if x < 2.0:
      return _cubic_conv2(x, a)
    return 0.0

  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  mat = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    # int() truncates toward zero like the C++ static_cast.
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size)
    w = np.array([kernel((j - center + 0.5) * invscale) for j in range(xmin, xmax)])
    total = w.sum()
    if total != 0.0:
      w = w / total
    mat[i, xmin:xmax] = w
  return mat


@functools.lru_cache(maxsize=None)
def pos_embed_interpolation_matrix(in_size: int, out_size: int, offset: float, antialias: bool) -> np.ndarray:
  """(out_size, in_size) float32 matrix resizing one axis of the stored pos-embed grid as the official code.

  offset != 0: `F.interpolate(scale_factor=(out_size + offset) / in_size)` (DINO's "+0.1" kludge): the
  output has out_size samples but the sampling grid uses the offset scale.
  offset == 0: `F.interpolate(size=out_size)` (SimDINOv2 uses this with antialias=True)."""
  if offset:
    # PyTorch inverts the double scale_factor it is given.
    scale = 1.0 / ((out_size + offset) / in_size)
  else:
    scale = in_size / out_size
  if antialias and out_size == in_size:
    # PyTorch's separable antialiased kernel skips an axis whose size is unchanged, whatever the scale
    # factor (only matters with offset != 0 and a non-square grid with one side at the stored size).
    mat = np.eye(in_size, dtype=np.float64)
  else:
    build = _bicubic_aa_matrix if antialias else _bicubic_matrix
    mat = build(in_size, out_size, scale)
  mat = mat.astype(np.float32)
  mat.setflags(write=False)  # cached and shared
  return mat


# ------------------------------------------------------------------------------------------------ layers


class PatchEmbed(nnx.Module):
  """Conv(kernel = stride = patch) written as patchify + one matmul; kernel stored HWIO (P, P, C, D)."""

  def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, dtype, rngs: nnx.Rngs):
    # Not re-initialised in the official code: PyTorch's default Conv2d init, U(+-1/sqrt(fan_in)) for both.
    init = uniform_init(1.0 / math.sqrt(in_chans * patch_size * patch_size))
    self.kernel = nnx.Param(init(rngs.params(), (patch_size, patch_size, in_chans, embed_dim)))
    self.bias = nnx.Param(init(rngs.params(), (embed_dim,)))
    self.patch_size = patch_size
    self.dtype = dtype

  def __call__(self, images: jax.Array) -> jax.Array:
    b, h, w, c = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    gh, gw = h // p, w // p
    x = images.astype(self.dtype).reshape(b, gh, p, gw, p, c)
    # (B, gh, gw, p, p, C): the patch's (row, col, channel) order matches the HWIO kernel flattening.
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b * gh * gw, p * p * c)
    kernel = self.kernel[...].astype(self.dtype).reshape(p * p * c, -1)
    y = x @ kernel + self.bias[...].astype(self.dtype)
    return y.reshape(b, gh * gw, -1)


class Attention(nnx.Module):
  def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.scale = self.head_dim**-0.5
    self.qkv = _dense(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = _dense(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, batch: int, return_attention: bool = False, return_keys: bool = False):
    """x: (B*T, D). Returns ((B*T, D), attention (B, heads, T, T) float32 or None, keys (B, T, D) or None); the keys
    are the key projection of every token, heads concatenated (the official qkv output's key third)."""
    bt, dim = x.shape
    t = bt // batch
    # Same (3, heads, head_dim) split of the qkv output as the official reshape, so weights port directly.
    qkv = self.qkv(x).reshape(batch, t, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if return_attention:
      logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * self.scale
      attn = jax.nn.softmax(logits, axis=-1)
      out = jnp.einsum("bnts,bsnh->btnh", attn.astype(v.dtype), v)
    else:
      attn = None
      # Softmax statistics are float32 inside dot_product_attention for any input dtype.
      out = jax.nn.dot_product_attention(q, k, v, scale=self.scale)
    return self.proj(out.reshape(bt, dim)), attn, (k.reshape(batch, t, dim) if return_keys else None)


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden_dim: int, *, dtype, rngs: nnx.Rngs):
    self.fc1 = _dense(dim, hidden_dim, dtype=dtype, rngs=rngs)
    self.fc2 = _dense(hidden_dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(gelu_exact(self.fc1(x)))


class SwiGLU(nnx.Module):
  """DINOv2's SwiGLUFFNFused: w12 gives both halves at once, hidden = silu(first) * second."""

  def __init__(self, dim: int, hidden_dim: int, *, dtype, rngs: nnx.Rngs):
    hidden = (int(hidden_dim * 2 / 3) + 7) // 8 * 8
    self.hidden_dim = hidden
    self.w12 = _dense(dim, 2 * hidden, dtype=dtype, rngs=rngs)
    self.w3 = _dense(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x12 = self.w12(x)
    x1, x2 = x12[:, : self.hidden_dim], x12[:, self.hidden_dim :]
    return self.w3(jax.nn.silu(x1) * x2)


class LayerScale(nnx.Module):
  def __init__(self, dim: int, init_value: float):
    self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gamma[...].astype(x.dtype)


def drop_path_factors(key: jax.Array, keep_prob: float, batch: int) -> jax.Array:
  """Stochastic depth's per-sample residual factors (batch,) float32: keep / keep_prob, keep ~ Bernoulli(keep_prob).
  Looked up at call time so that benchmarks/official_parity.py can feed both implementations the same draws."""
  keep = jax.random.bernoulli(key, keep_prob, (batch,))
  return keep.astype(jnp.float32) / keep_prob


class Block(nnx.Module):
  """Pre-norm transformer block: x += DP(ls1 * Attn(LN(x))); x += DP(ls2 * FFN(LN(x)))."""

  def __init__(
    self,
    dim: int,
    num_heads: int,
    *,
    mlp_ratio: float,
    ffn: str,
    layerscale_init: float | None,
    drop_path: float,
    dtype,
    rngs: nnx.Rngs,
  ):
    self.norm1 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else None
    self.norm2 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    hidden = int(dim * mlp_ratio)
    self.mlp = (SwiGLU if ffn == "swiglu" else Mlp)(dim, hidden, dtype=dtype, rngs=rngs)
    self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else None
    self.drop_path = float(drop_path)

  def _branch(self, y: jax.Array, ls: LayerScale | None, key: jax.Array | None, batch: int) -> jax.Array:
    if ls is not None:
      y = ls(y)
    if key is not None and self.drop_path > 0.0:
      factor = drop_path_factors(key, 1.0 - self.drop_path, batch).astype(y.dtype)
      # Per-sample: every token of a dropped sample loses this residual branch.
      y = (y.reshape(batch, -1, y.shape[-1]) * factor[:, None, None]).reshape(y.shape)
    return y

  def __call__(
    self,
    x: jax.Array,
    batch: int,
    *,
    key: jax.Array | None = None,
    return_attention: bool = False,
    return_keys: bool = False,
  ):
    """Returns (x, attention or None, keys (B, T, D) of this block's attention or None)."""
    k_attn = k_mlp = None
    if key is not None and self.drop_path > 0.0:
      k_attn, k_mlp = jax.random.split(key)
    y, attn, keys = self.attn(self.norm1(x), batch, return_attention, return_keys)
    x = x + self._branch(y, self.ls1, k_attn, batch)
    x = x + self._branch(self.mlp(self.norm2(x)), self.ls2, k_mlp, batch)
    return x, attn, keys


def _block_call(
  block: Block, x: jax.Array, key: jax.Array | None, batch: int, return_attention: bool, return_keys: bool = False
):
  return block(x, batch, key=key, return_attention=return_attention, return_keys=return_keys)


# model.remat: the block's activations are recomputed in the backward pass instead of stored (jax.checkpoint); the
# values and gradients are the same. batch, return_attention and return_keys are static (Python values).
_remat_block_call = nnx.remat(_block_call, static_argnums=(3, 4, 5))


# ------------------------------------------------------------------------------------------------ model


class VisionTransformer(nnx.Module):
  """ViT backbone; see the module docstring and docs/methods.md#vision-transformer. Parameters are float32, activations
  in `dtype`; randomness (stochastic depth) only through the `key` argument of `__call__`."""

  def __init__(
    self,
    *,
    patch_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    ffn: str = "mlp",
    img_size: int = 224,
    num_registers: int = 0,
    layerscale_init: float | None = None,
    drop_path_rate: float = 0.0,
    drop_path_uniform: bool = False,
    token_init: str = "dino",
    interpolate_offset: float = 0.1,
    interpolate_antialias: bool = False,
    remat: bool = False,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if ffn not in ("mlp", "swiglu"):
      raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
    if token_init not in TOKEN_INITS:
      raise ValueError(f"token_init must be 'dino' or 'dinov2', got {token_init!r}")
    if not 0.0 <= drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if img_size % patch_size:
      raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    self.patch_size = patch_size
    self.embed_dim = embed_dim
    self.depth = depth
    self.num_heads = num_heads
    self.num_registers = num_registers
    self.img_size = img_size
    self.grid_size = img_size // patch_size  # stored pos-embed grid is grid_size x grid_size
    self.interpolate_offset = float(interpolate_offset)
    self.interpolate_antialias = bool(interpolate_antialias)
    self.remat = bool(remat)
    self.dtype = dtype

    self.patch_embed = PatchEmbed(patch_size, 3, embed_dim, dtype=dtype, rngs=rngs)
    cls_init = trunc_normal_init(0.02) if token_init == "dino" else normal_init(1e-6)
    self.cls_token = nnx.Param(cls_init(rngs.params(), (1, 1, embed_dim)))
    self.pos_embed = nnx.Param(trunc_normal_init(0.02)(rngs.params(), (1, self.grid_size**2 + 1, embed_dim)))
    self.register_tokens = (
      nnx.Param(normal_init(1e-6)(rngs.params(), (1, num_registers, embed_dim))) if num_registers else None
    )
    # Always present (DINOv2 has it; unused without masks) so every variant shares one parameter layout.
    self.mask_token = nnx.Param(jnp.zeros((1, embed_dim), jnp.float32))

    if drop_path_uniform:
      rates = [drop_path_rate] * depth
    else:
      rates = np.linspace(0.0, drop_path_rate, depth).tolist()  # torch.linspace: depth 1 -> [0]
    self.blocks = nnx.List(
      [
        Block(
          embed_dim,
          num_heads,
          mlp_ratio=mlp_ratio,
          ffn=ffn,
          layerscale_init=layerscale_init,
          drop_path=rates[i],
          dtype=dtype,
          rngs=rngs,
        )
        for i in range(depth)
      ]
    )
    self.norm = _layer_norm(embed_dim, dtype=dtype, rngs=rngs)

  # -- pieces

  def interpolate_pos_encoding(self, grid_h: int, grid_w: int) -> jax.Array:
    """Pos-embed (1, 1 + grid_h*grid_w, D) float32 for a grid_h x grid_w patch grid (cls entry unchanged)."""
    pos = self.pos_embed[...]
    m = self.grid_size
    if (grid_h, grid_w) == (m, m):
      return pos
    # Built in NumPy at trace time (static shapes); enters the program as a small constant.
    matrix = functools.partial(
      pos_embed_interpolation_matrix, offset=self.interpolate_offset, antialias=self.interpolate_antialias
    )
    rows, cols = jnp.asarray(matrix(m, grid_h)), jnp.asarray(matrix(m, grid_w))
    grid = pos[0, 1:].reshape(m, m, -1)
    # Separable resize: rows then columns, full float32 accuracy (default TPU/GPU precision is bf16-ish).
    grid = jnp.einsum("ia,abd->ibd", rows, grid, precision=lax.Precision.HIGHEST)
    grid = jnp.einsum("jb,ibd->ijd", cols, grid, precision=lax.Precision.HIGHEST)
    return jnp.concatenate([pos[:, :1], grid.reshape(1, grid_h * grid_w, -1)], axis=1)

  def prepare_tokens(self, images: jax.Array, masks: jax.Array | None = None) -> jax.Array:
    """images (B, H, W, 3) -> tokens (B, 1 + R + N, D) in the compute dtype: [cls, registers, patches]."""
    b, h, w, _ = images.shape
    gh, gw = h // self.patch_size, w // self.patch_size
    if masks is not None and masks.shape != (b, gh * gw):
      raise ValueError(f"masks must have shape {(b, gh * gw)}, got {masks.shape}")
    x = self.patch_embed(images)  # (B, N, D)
    if masks is not None:
      # DINOv2: the mask token replaces the patch embedding and still receives the pos-embed below.
      x = jnp.where(masks.astype(bool)[..., None], self.mask_token[...].astype(x.dtype)[None], x)
    pos = self.interpolate_pos_encoding(gh, gw)
    x = x + pos[:, 1:].astype(x.dtype)
    cls = (self.cls_token[...] + pos[:, :1]).astype(x.dtype)
    parts = [jnp.broadcast_to(cls, (b, 1, self.embed_dim))]
    if self.register_tokens is not None:
      # Registers come after the pos-embed add, so they never get a positional embedding.
      registers = self.register_tokens[...].astype(x.dtype)
      parts.append(jnp.broadcast_to(registers, (b, self.num_registers, self.embed_dim)))
    parts.append(x)
    return jnp.concatenate(parts, axis=1)

  def _blocks(self, x: jax.Array, *, key, return_attention: bool, keep_last: int = 0, return_keys: bool = False):
    """Runs the blocks on (B, T, D); returns (output, last-block attention or None, last `keep_last` outputs), plus
    the last block's attention keys (B, T, D) as a fourth element when `return_keys`."""
    b, t, d = x.shape
    x = x.reshape(b * t, d)
    keys = jax.random.split(key, self.depth) if key is not None else [None] * self.depth
    attn = last_keys = None
    kept = []
    call = _remat_block_call if self.remat else _block_call
    for i, block in enumerate(self.blocks):
      last = i == self.depth - 1
      x, a, k = call(block, x, keys[i], b, return_attention and last, return_keys and last)
      if a is not None:
        attn = a
      if k is not None:
        last_keys = k
      if i >= self.depth - keep_last:
        kept.append(x)
    return (x, attn, kept, last_keys) if return_keys else (x, attn, kept)

  def _split(self, x: jax.Array, batch: int) -> dict:
    x = self.norm(x).reshape(batch, -1, self.embed_dim)
    r = self.num_registers
    return {"cls": x[:, 0], "registers": x[:, 1 : 1 + r], "patch": x[:, 1 + r :]}

  # -- public

  def __call__(
    self,
    images: jax.Array,
    *,
    masks: jax.Array | None = None,
    key: jax.Array | None = None,
    return_attention: bool = False,
    return_keys: bool = False,
  ) -> dict:
    """images (B, H, W, 3) -> {"cls" (B, D), "patch" (B, N, D), "registers" (B, R, D)} after the final
    LayerNorm, in the compute dtype; plus "attention" (B, heads, T, T) float32 of the last block on request, and
    "keys" (B, N, D): the last block's attention keys of the patch tokens (cls and registers dropped; heads
    concatenated, not scaled; MaskCut's features), from the same forward pass, on request.

    `key` drives stochastic depth only; None means deterministic (teacher / eval)."""
    x = self.prepare_tokens(images, masks)
    x, attn, _, *last_keys = self._blocks(x, key=key, return_attention=return_attention, return_keys=return_keys)
    out = self._split(x, images.shape[0])
    if return_attention:
      out["attention"] = attn
    if return_keys:
      out["keys"] = last_keys[0][:, 1 + self.num_registers :]
    return out

  def get_intermediate_layers(self, images: jax.Array, n: int = 1, *, masks: jax.Array | None = None) -> list[dict]:
    """Final-normed outputs of the last `n` blocks (oldest first), deterministic, for DINO-style linear eval
    (ViT-S concatenates the cls tokens of the last 4 blocks); each also holds "prenorm_cls" (B, D), the block's cls
    token before the final norm (MSN's forward_blocks, its few-shot feature)."""
    if not 1 <= n <= self.depth:
      raise ValueError(f"n must be in [1, {self.depth}], got {n}")
    x = self.prepare_tokens(images, masks)
    _, _, kept = self._blocks(x, key=None, return_attention=False, keep_last=n)
    b = images.shape[0]
    return [{**self._split(k, b), "prenorm_cls": k.reshape(b, -1, self.embed_dim)[:, 0]} for k in kept]
