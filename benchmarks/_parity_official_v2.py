r"""The OFFICIAL side of the parity benchmark for SimDINOv2 / DINOv2 (``official_parity.py --method simdinov2|dinov2``,
``dinov2_fork``).

``run_official`` builds the official objects from a clone and runs N training steps as the official ``train.py``
loop runs them, single process, float32, on CPU:

  simdinov2  RobinWu218/SimDINO ``simdinov2/``: ``configs/simdino_config.yaml`` merged over
             ``configs/ssl_default_config.yaml`` (``configs.load_and_merge_config``), ``train/ssl_meta_arch_sim.py``
             ``SimSSLMetaArch`` (MCRLoss on the cls tokens, CosinePatchLoss on the masked patch tokens, one shared
             head without prototype layer), ``train/train.py``'s ``build_optimizer`` (timm AdamW over
             ``get_params_groups`` with layer decay and the patch-embed multiplier), ``build_schedulers`` (its
             CosineScheduler: warm-up from min_lr, last-layer freeze cut, MCR coeff / eps schedules),
             ``apply_optim_scheduler``, per-submodule gradient clipping, ``update_teacher`` (``_foreach_lerp_``).
  dinov2_fork  our dinov2 against RobinWu218/SimDINO ``simdinov2/`` with ``configs/ssl_default_config.yaml`` alone
             (``SimSSLMetaArch`` with ``use_mcr: false``: DINOLoss, iBOTPatchLoss, KoLeo; the fork's train.py and
             CosineScheduler), the code configs/dinov2_vitb16_in1k.py follows (OUR_OVERRIDES["dinov2_fork"]).
  dinov2     facebookresearch/dinov2: ``dinov2/configs/ssl_default_config.yaml``, ``train/ssl_meta_arch.py``
             ``SSLMetaArch`` (DINOLoss with the teacher chunk swap, iBOTPatchLoss, KoLeoLoss per global-crop chunk,
             centering or Sinkhorn-Knopp), ``train/train.py``'s ``build_optimizer`` (torch AdamW), ``build_schedulers``
             (linspace warm-up, last-layer lr 0 during the freeze), ``apply_optim_scheduler``, per-submodule clipping,
             ``update_teacher`` (``_foreach_mul_`` / ``_foreach_add_``).

The loop body is ``do_train``'s (schedules at the iteration -> apply_optim_scheduler -> zero_grad ->
forward_backward -> clip each ``model.student`` submodule -> optimizer.step -> update_teacher), called with the
official functions; ``do_train`` itself is not called because it builds the ImageNet dataset, the data loader and
the FSDP checkpointer. The batches are ours, converted to the official collate layout (crop-major
``collated_global_crops`` (Mg*B, 3, H, W), ``collated_masks`` (Mg*B, N), ``mask_indices_list``, ``masks_weight``,
``n_masked_patches`` and ``upperbound`` computed as ``data/collate.py`` does).

Durations: one official "epoch" is one iteration (``train.OFFICIAL_EPOCH_LENGTH = 1``) and every duration in epochs
is set to our step count (total, warm-up, last-layer freeze, teacher-temperature warm-up), so the official
schedules see the same iteration counts as ours.

Patches (everything that is changed to run on one CPU process; no official file is edited, nothing is copied):
  P1  ``sys.modules["torchvision._meta_registrations"]``: an empty module (the CPU torchvision 0.28 wheel's meta
      registrations fail to import against this torch build; only the data transforms import torchvision).
  P2  dinov2 only: a fake ``xformers.ops`` holding only ``fmha.BlockDiagonalMask`` (``from_tensor_list`` concatenates
      the (1, n_i, D) head inputs along dim 1, ``split`` cuts the head output back): ``ssl_meta_arch.py`` refuses to
      import without xFormers. The layers' own xFormers imports (memory_efficient_attention, SwiGLU,
      cross_entropy, scaled_index_add) still fail, so they take their pure-PyTorch paths.
  P3  ``NestedTensorBlock.forward`` on a list of tensors (the student's ``[global, local]`` call) runs the block on
      each tensor (``Block.forward``): what the xFormers block-diagonal attention computes, without drop path.
  P4  ``torch.Tensor.cuda`` is the identity while ``forward_backward`` runs (``.cuda(non_blocking=True)``).
  P5  ``get_fsdp_modules`` in the meta-arch module returns one pseudo FSDP module per submodule whose ``params`` are
      the submodule's parameters in order (``update_teacher`` walks FSDP modules; without FSDP it would update
      nothing). ``reshard_fsdp_model`` is a no-op on plain modules as it is.
  P6  ``need_to_synchronize_fsdp_streams = False`` (``fsdp_synchronize_streams`` calls torch.cuda.synchronize and
      copies FSDP stream attributes).
  P7  each ``model.student[k]`` gets ``clip_grad_norm_(max_norm)`` = ``torch.nn.utils.clip_grad_norm_`` over its
      parameters (the FSDP method of the same name: total l2 norm of the submodule, coefficient
      max_norm / (norm + 1e-6) clamped to 1).
  P8  config: ``compile: false`` (SimDINO), ``compute_precision.grad_scaler: false``, float32 inputs (the collate
      casts to half for the fp16 FSDP runs); no FSDP wrapping (``prepare_for_distributed_training`` is not called:
      the student and teacher state dicts are loaded as given), torch.distributed not initialised (world size 1;
      a gloo single-process group is started only for ``train.centering: sinkhorn_knopp``, whose iBOT branch
      calls ``dist.all_reduce`` unconditionally).
  P9  an architecture ``vit_parity`` is added to the official ``models/vision_transformer.py`` namespace: the
      repository's own ``vit_small`` definition (same block function and attention class) with our width / depth /
      heads, for presets that are not one of the official sizes.
  P10 ``model.backprop_loss`` is wrapped to record the scalar it back-propagates (``loss_accumulator``), which is the
      loss reported per step (dinov2's ``loss_dict`` halves the KoLeo and iBOT entries for display).

Loss convention. The official SimDINOv2 loss is ``-cos(cls) - weighted cos(patches) - gamma R``; ours is
``1/2 ||t - s||^2`` per pair, which for the unit-norm head outputs is ``1 - cos``. So per step
ours = official + 1 + (masked global crops) / (Mg B) exactly (same gradients); ``losses`` holds the official values
shifted by that constant (``loss_offsets``), ``losses_raw`` the official values. For dinov2 the offset is 0.

Measured (2 shared CPU cores, float32, official_parity.py's preset with width 96 / depth 4 / 3 heads, patch 4,
2 x 32 px + 4 x 16 px crops, batch 16 of digits, head 2048 / 256, K = 4096; 20 steps, 2 "epochs" of 10; the
official side at SimDINO 8149fc4e / dinov2 b8931f7b):
  * dinov2 with KoLeo off: every loss within 1.0e-6 relative (step 0: 2.4e-7), every parameter within 1.9e-5
    (optim.freeze_mode 'zero_lr'; with the default 'drop_grads' the runs separate when the prototypes unfreeze).
  * dinov2 recipe with model.layerscale=1.0 (KoLeo 0.1 on well-separated features): losses within 3.8e-7, every
    parameter within 2e-5 except the key third of attn.qkv.bias (see below).
  * dinov2 recipe as is (LayerScale 1e-5, KoLeo 0.1): step 0 1.9e-4, then up to 6e-3, parameters apart. At
    initialisation the student's cls tokens of different images are 1.5e-6 - 3.4e-6 apart (LayerScale 1e-5 leaves
    them ~LayerNorm(cls + pos)), below what float32 resolves after normalisation: on the SAME features the official
    KoLeoLoss gives 23.43, ours 23.78, float64 25.35; its gradient (~1/distance) is float noise that dominates the
    clipped backbone update. Not a difference of the two codes.
  * simdinov2 with warmup_steps=1: losses within 1.2e-4 relative in our convention (absolute <= 9e-6 on terms of
    ~0.5-1.5; relative to the official raw values <= 1.1e-5, step 0 2.4e-6), every parameter within 2.4e-4 but the
    key bias (7.5e-4). Step 0 differs by 3.5e-6 absolute: the coding rate's float32 logdet of I + 320 Z^T Z (cos
    ~0.988 between images at init: ill-conditioned) is 6.6141472 ours / 6.614092 official / 6.6141201 in float64
    from either side's head outputs.
  * simdinov2 with warm-up > 1 step (10 here): the lr differs during the warm-up (official it / W, ours linspace;
    see ``notes``): losses apart by up to 1.2 relative from step 2 on, parameters by 12%. With our warm-up replaced
    by it / W (a test-only monkeypatch of simdino_jax.schedules.warmup_cosine in the local driver): losses within
    3.2e-4 relative (our convention; 4.3e-5 to the raw official values), every parameter within 3.1e-4 apart from
    the key bias.
  The key third of every attn.qkv.bias has a zero true gradient (softmax is invariant to it) and receives float
  noise, which Adam scales to lr-sized steps: it differs by O(1) relative on both methods (|b_k| ~ 1e-4); q and v
  thirds agree to ~1e-5.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import types

import numpy as np

OUR_OVERRIDES: dict[str, dict[str, object]] = {
  # simdinov2/configs/simdino_config.yaml over ssl_default_config.yaml (docs/methods.md#simdinov2-recipe).
  "simdinov2": {
    "model.num_registers": 4,
    "model.layerscale": 0.1,
    "model.drop_path_rate": 0.0,
    "model.drop_path_uniform": True,
    "model.token_init": "dinov2",
    "model.interpolate_offset": 0.0,
    "model.interpolate_antialias": True,
    "model.dtype": "float32",
    "head.num_layers": 3,
    "head.separate_patch_head": False,
    "masking.probability": 0.5,
    "masking.ratio": (0.1, 0.5),
    "loss.exclude_same_view": True,
    "loss.expansion": "mean",
    "loss.gamma_rule": "official",
    "loss.groups": 1,
    "loss.eps": math.sqrt(0.05),
    "loss.patch_weighting": "official",
    "loss.regularizer": "coding_rate",
    "optim.lr": 0.004,
    "optim.lr_scaling": "sqrt_1024",
    "optim.min_lr": 1e-6,
    "optim.weight_decay": 0.04,
    "optim.weight_decay_end": 0.4,
    "optim.warmup_from_min_lr": True,
    "optim.warmup_rule": "step_over_warmup",  # simdinov2/utils/utils.py CosineScheduler: start + (base - start) it/W
    "optim.clip_grad": 3.0,
    "optim.clip_mode": "per_module",
    "optim.layer_decay": 0.9,
    "optim.patch_embed_lr_mult": 0.2,
    "optim.freeze_last_layer_epochs": 0.0,  # no prototype layer (remove_last_layer: true)
    "optim.freeze_mode": "zero_lr",  # its CosineScheduler(freeze_cut_iters): last-layer lr 0 (no such layer here)
    "optim.b1": 0.9,
    "optim.b2": 0.999,
    "optim.adam_eps": 1e-8,
    "teacher.momentum": 0.9,
    "teacher.momentum_end": 1.0,
    "teacher.self_distillation": True,
  },
  # facebookresearch/dinov2 dinov2/configs/ssl_default_config.yaml (docs/methods.md#dinov2-and-ibot).
  "dinov2": {
    "model.num_registers": 0,
    # The recipe's LayerScale is 1e-5; at 1e-5 the initial student cls tokens of different images are only ~1e-6
    # apart, where KoLeo (gradient ~ 1/distance) is float32 noise on both sides (23.43 official, 23.78 ours, 25.35
    # in float64 on the same features). 1.0 keeps every other part of the recipe and makes KoLeo well-conditioned.
    "model.layerscale": 1.0,
    "model.drop_path_rate": 0.0,
    "model.drop_path_uniform": True,
    "model.token_init": "dinov2",
    "model.interpolate_offset": 0.1,
    "model.interpolate_antialias": False,
    "model.dtype": "float32",
    "head.num_layers": 3,
    "head.norm_last_layer": False,
    "head.separate_patch_head": False,
    "masking.probability": 0.5,
    "masking.ratio": (0.1, 0.5),
    "dino.student_temp": 0.1,
    "dino.teacher_temp": 0.07,
    "dino.warmup_teacher_temp": 0.04,
    "dino.teacher_temp_per": "iteration",
    "dino.center_momentum": 0.9,
    "dino.centering": "centering",
    "dino.ibot_weight": 1.0,
    "dino.koleo_weight": 0.1,
    "dino.koleo_groups": 0,  # KoLeo per device (one device here)
    "optim.lr": 0.004,
    "optim.lr_scaling": "sqrt_1024",
    "optim.min_lr": 1e-6,
    "optim.weight_decay": 0.04,
    "optim.weight_decay_end": 0.4,
    "optim.warmup_from_min_lr": False,
    "optim.warmup_rule": "linspace",  # dinov2/utils/utils.py CosineScheduler: np.linspace warm-up
    "optim.clip_grad": 3.0,
    "optim.clip_mode": "per_module",
    "optim.layer_decay": 0.9,
    "optim.patch_embed_lr_mult": 0.2,
    "optim.freeze_last_layer_epochs": 1.0,
    "optim.freeze_mode": "zero_lr",  # last_layer_lr_schedule[:freeze] = 0: lr 0, Adam moments accumulate
    "optim.b1": 0.9,
    "optim.b2": 0.999,
    "optim.adam_eps": 1e-8,
    "teacher.momentum": 0.992,
    "teacher.momentum_end": 1.0,
    "teacher.self_distillation": True,
  },
}

# configs/dinov2_vitb16_in1k.py: the DINOv2 baseline as the SimDINOv2 authors trained it, with their fork's
# simdinov2/configs/ssl_default_config.yaml (SimSSLMetaArch with use_mcr: false). What differs from upstream dinov2
# above: 4 registers, interpolation without offset and with antialias, the fork's lr warm-up (from min_lr, base at
# iteration W). LayerScale 1.0 for the reason given above (1e-5 makes the initial KoLeo float32 noise).
OUR_OVERRIDES["dinov2_fork"] = {
  **OUR_OVERRIDES["dinov2"],
  "model.num_registers": 4,
  "model.interpolate_offset": 0.0,
  "model.interpolate_antialias": True,
  "optim.warmup_from_min_lr": True,
  "optim.warmup_rule": "step_over_warmup",
  # The fork warms the teacher temperature up with the same CosineScheduler (start + (T - start) it / W), ours as
  # np.linspace (start + (T - start) it / (W - 1)): 8.4e-4 apart at iteration 1 of this preset's W = 30, at most
  # 0.03 / W = 8e-7 at the recipe's W = 30 epochs x 1251. Without the warm-up (start = T) both are constant.
  "dino.warmup_teacher_temp": 0.07,
}

PATCHES = [
  "P1 sys.modules['torchvision._meta_registrations'] = empty module (CPU torchvision wheel)",
  "P2 (dinov2) fake xformers.ops with only fmha.BlockDiagonalMask (concat / split of the head inputs)",
  "P3 NestedTensorBlock.forward(list) -> Block.forward on each tensor (no xFormers nested attention)",
  "P4 torch.Tensor.cuda = identity inside forward_backward",
  "P5 meta-arch get_fsdp_modules -> one pseudo FSDP module per submodule (params: its parameters) for update_teacher",
  "P6 need_to_synchronize_fsdp_streams = False (no torch.cuda.synchronize / FSDP streams)",
  "P7 student[k].clip_grad_norm_ = torch.nn.utils.clip_grad_norm_ over the submodule (FSDP method)",
  "P8 config compile=false, grad_scaler=false, float32 inputs, no FSDP wrapping, no torch.distributed "
  "(gloo world-size-1 group only for sinkhorn_knopp)",
  "P9 arch vit_parity added to the official vision_transformer namespace (vit_small's definition, our sizes)",
  "P10 backprop_loss wrapped to record loss_accumulator (the per-step loss)",
]


# ---- importing the official code ------------------------------------------------------------------------------
def _fork(method: str) -> bool:
  """Runs SimDINO's fork of the DINOv2 code (simdinov2/: SimSSLMetaArch, its train.py and CosineScheduler)."""
  return method in ("simdinov2", "dinov2_fork")


def _package_root(official_repo: str, package: str) -> str:
  """The directory holding ``package/`` (the clone's root, or its parent when given the package directory)."""
  repo = os.path.abspath(official_repo)
  if os.path.isdir(os.path.join(repo, package)):
    return repo
  if os.path.basename(repo) == package:
    return os.path.dirname(repo)
  raise FileNotFoundError(f"--official_repo={official_repo}: no {package}/ directory in it")


class _FakeBlockDiagonalMask:
  """P2: xformers.ops.fmha.BlockDiagonalMask's two uses in ssl_meta_arch.py, on (1, n_i, D) tensors."""

  def __init__(self, sizes):
    self.sizes = list(sizes)

  @classmethod
  def from_tensor_list(cls, tensors):
    import torch

    return cls([t.shape[1] for t in tensors]), torch.cat(list(tensors), dim=1)

  def split(self, tensor):
    return list(tensor.split(self.sizes, dim=1))


def _install_fake_xformers() -> None:
  if "xformers" in sys.modules and not getattr(sys.modules["xformers"], "_parity_fake", False):
    return  # a real xFormers: leave it alone (not expected on CPU)
  xformers = types.ModuleType("xformers")
  xformers._parity_fake = True
  ops = types.ModuleType("xformers.ops")
  ops.fmha = types.SimpleNamespace(BlockDiagonalMask=_FakeBlockDiagonalMask)
  xformers.ops = ops
  sys.modules["xformers"] = xformers
  sys.modules["xformers.ops"] = ops


def _import_official(method: str, official_repo: str):
  """(meta-arch module, train module, vision_transformer module, block module, config module, package root)."""
  import importlib

  sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))  # P1
  if _fork(method):
    root = _package_root(official_repo, "simdinov2")
    pkg = "simdinov2"
  else:
    root = _package_root(official_repo, "dinov2")
    pkg = "dinov2"
    _install_fake_xformers()  # P2
  if root not in sys.path:
    sys.path.insert(0, root)
  meta = importlib.import_module(
    f"{pkg}.train.ssl_meta_arch_sim" if pkg == "simdinov2" else f"{pkg}.train.ssl_meta_arch"
  )
  train = importlib.import_module(f"{pkg}.train.train")
  vits = importlib.import_module(f"{pkg}.models.vision_transformer")
  block = importlib.import_module(f"{pkg}.layers.block")
  configs = importlib.import_module(f"{pkg}.configs")
  loaded = os.path.dirname(os.path.dirname(os.path.abspath(meta.__file__)))
  if os.path.abspath(os.path.join(root, pkg)) != loaded:
    raise RuntimeError(f"{pkg} was already imported from {loaded}, not from {root}")
  return meta, train, vits, block, configs, root


def _patch_nested_block(block_module) -> None:
  """P3."""
  cls = block_module.NestedTensorBlock
  if getattr(cls, "_parity_patched", False):
    return
  original = cls.forward
  base_forward = block_module.Block.forward

  def forward(self, x_or_x_list):
    if isinstance(x_or_x_list, list):
      return [base_forward(self, x) for x in x_or_x_list]
    return original(self, x_or_x_list)

  cls.forward = forward
  cls._parity_patched = True


def _add_arch(vits, method: str, embed_dim: int, depth: int, num_heads: int) -> str:
  """P9: vit_small's definition in this repository with our sizes."""
  from functools import partial

  if _fork(method):

    def vit_parity(patch_size=16, num_register_tokens=0, block="nested", **kwargs):
      return vits.DinoVisionTransformer(
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4,
        block_fn=vits.get_block_fn(block),
        num_register_tokens=num_register_tokens,
        **kwargs,
      )
  else:

    def vit_parity(patch_size=16, num_register_tokens=0, **kwargs):
      return vits.DinoVisionTransformer(
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4,
        block_fn=partial(vits.Block, attn_class=vits.MemEffAttention),
        num_register_tokens=num_register_tokens,
        **kwargs,
      )

  vits.vit_parity = vit_parity
  return "vit_parity"


@contextlib.contextmanager
def _cuda_is_identity():
  """P4."""
  import torch

  original = torch.Tensor.cuda
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  try:
    yield
  finally:
    torch.Tensor.cuda = original


# ---- config ---------------------------------------------------------------------------------------------------
def _durations(config, steps_per_epoch: int | None = None) -> tuple[int, int, int]:
  """(total_steps, warmup_steps, steps_per_epoch) as our trainer computes them (``steps_per_epoch`` given: the
  caller's, as official_parity.py's Ours(config, niter) uses it, with total_steps / warmup_steps > 0)."""
  from simdino_jax.data import sources
  from simdino_jax.train import setup

  if steps_per_epoch is not None:  # setup.durations with the given steps per epoch
    spe = max(int(steps_per_epoch), 1)
    total = config.total_steps if config.total_steps > 0 else config.total_epochs * spe
    warmup = config.warmup_steps if config.warmup_steps > 0 else int(round(config.warmup_epochs * spe))
    return int(total), int(min(warmup, total - 1)), spe
  spe_needed = (
    config.total_steps <= 0
    or config.warmup_steps <= 0
    or config.optim.freeze_last_layer_epochs > 0
    or (config.method == "dinov2" and config.dino.warmup_teacher_temp_epochs > 0)
  )
  num_train = len(sources.from_config(config.data, "train")) if spe_needed else config.batch_size
  d = setup.durations(config, num_train)
  return d.total_steps, d.warmup_steps, d.steps_per_epoch


def _official_config(method: str, config, configs_module, vits, steps_per_epoch: int | None = None):
  """The official OmegaConf config for our (already overridden) config; every duration in iterations."""
  from omegaconf import OmegaConf

  from simdino_jax.models.vit import parse_variant

  if method == "simdinov2":
    cfg = configs_module.load_and_merge_config("ssl_default_config", "simdino_config")
  elif method == "dinov2_fork":  # the fork's base file alone: DINO + iBOT + KoLeo (use_mcr: false)
    cfg = OmegaConf.create(configs_module.load_config("ssl_default_config"))
  else:
    cfg = OmegaConf.create(configs_module.dinov2_default_config)
  variant = parse_variant(config.model.variant)
  embed_dim = config.model.embed_dim or variant["embed_dim"]
  depth = config.model.depth or variant["depth"]
  num_heads = config.model.num_heads or variant["num_heads"]
  total, warmup, spe = _durations(config, steps_per_epoch)
  if config.data.num_global != 2:
    raise ValueError("the official meta-archs hard-code 2 global crops (config.data.num_global)")
  if config.model.img_size != config.data.global_size:
    raise ValueError(
      "the official ViT's positional embedding is made for crops.global_crops_size: set "
      f"config.model.img_size={config.data.global_size}"
    )

  s = cfg.student
  s.arch = _add_arch(vits, method, embed_dim, depth, num_heads)
  s.patch_size = variant["patch_size"]
  s.drop_path_rate = float(config.model.drop_path_rate)
  s.drop_path_uniform = bool(config.model.drop_path_uniform)
  s.layerscale = float(config.model.layerscale) or None
  s.num_register_tokens = int(config.model.num_registers)
  s.interpolate_offset = float(config.model.interpolate_offset)
  s.interpolate_antialias = bool(config.model.interpolate_antialias)
  s.block_chunks = min(int(s.block_chunks), depth)
  if variant["ffn"] != "mlp":
    s.ffn_layer = "swiglufused"

  c = cfg.crops
  c.global_crops_size, c.local_crops_size = int(config.data.global_size), int(config.data.local_size)
  c.local_crops_number = int(config.data.num_local)

  h = config.head
  cfg.dino.head_hidden_dim, cfg.dino.head_bottleneck_dim, cfg.dino.head_nlayers = h.hidden_dim, h.out_dim, h.num_layers
  cfg.ibot.head_hidden_dim, cfg.ibot.head_bottleneck_dim, cfg.ibot.head_nlayers = h.hidden_dim, h.out_dim, h.num_layers
  cfg.ibot.separate_head = bool(h.separate_patch_head)
  cfg.ibot.mask_sample_probability = float(config.masking.probability)
  cfg.ibot.mask_ratio_min_max = [float(r) for r in config.masking.ratio]
  if method == "simdinov2":
    cfg.dino.head_n_prototypes = h.out_dim  # unused: remove_last_layer
    cfg.ibot.head_n_prototypes = h.out_dim
    cfg.dino.mcr.eps = float(config.loss.eps) ** 2  # official eps = ours squared
    cfg.dino.mcr.expa_type = 1 if config.loss.expansion == "mean" else 0
    cfg.dino.koleo_loss_weight = 0
  else:
    cfg.dino.head_n_prototypes = h.num_prototypes
    cfg.ibot.head_n_prototypes = h.patch_num_prototypes or h.num_prototypes
    cfg.dino.koleo_loss_weight = float(config.dino.koleo_weight)
    cfg.ibot.loss_weight = float(config.dino.ibot_weight)
    cfg.train.centering = config.dino.centering
    cfg.teacher.warmup_teacher_temp = float(config.dino.warmup_teacher_temp)
    cfg.teacher.teacher_temp = float(config.dino.teacher_temp)
    if config.dino.teacher_temp_per == "iteration":
      cfg.teacher.warmup_teacher_temp_epochs = int(config.dino.warmup_teacher_temp_epochs * spe)
    else:
      raise ValueError("DINOv2 warms the teacher temperature up per iteration: set dino.teacher_temp_per")
  cfg.teacher.momentum_teacher = float(config.teacher.momentum)
  cfg.teacher.final_momentum_teacher = float(config.teacher.momentum_end)

  o = config.optim
  cfg.train.OFFICIAL_EPOCH_LENGTH = 1
  cfg.train.batch_size_per_gpu = int(config.batch_size)
  cfg.optim.epochs = int(total)
  cfg.optim.warmup_epochs = int(warmup)
  cfg.optim.freeze_last_layer_epochs = int(round(o.freeze_last_layer_epochs * spe))
  cfg.optim.weight_decay, cfg.optim.weight_decay_end = float(o.weight_decay), float(o.weight_decay_end)
  cfg.optim.min_lr = float(o.min_lr)
  cfg.optim.clip_grad = float(o.clip_grad)
  cfg.optim.layerwise_decay = float(o.layer_decay)
  cfg.optim.patch_embed_lr_mult = float(o.patch_embed_lr_mult)
  if o.lr_scaling == "sqrt_1024":
    cfg.optim.base_lr, cfg.optim.scaling_rule = float(o.lr), "sqrt_wrt_1024"
    cfg.optim.lr = float(o.lr) * math.sqrt(config.batch_size / 1024.0)  # utils/config.py apply_scaling_rules_to_cfg
  elif o.lr_scaling == "linear_256":
    cfg.optim.base_lr, cfg.optim.scaling_rule = float(o.lr) * 4.0, "linear_wrt_1024"
    cfg.optim.lr = float(o.lr) * config.batch_size / 256.0
  else:
    cfg.optim.lr = float(o.lr)
  if _fork(method):
    cfg.optim.kwargs.betas = [float(o.b1), float(o.b2)]
  else:
    cfg.optim.adamw_beta1, cfg.optim.adamw_beta2 = float(o.b1), float(o.b2)
  # P8
  if "compile" in cfg:
    cfg.compile = False
  cfg.compute_precision.grad_scaler = False
  return cfg


def _check_recipe(method: str, config) -> list[str]:
  """Our config values the official code hard-codes; a mismatch is reported (and would show in the numbers)."""
  notes = []

  def want(field, value):
    node = config
    for part in field.split("."):
      node = node.get(part) if hasattr(node, "get") else None
    if node != value and not (isinstance(value, float) and isinstance(node, float) and math.isclose(node, value)):
      notes.append(f"config.{field}={node!r}, the official code hard-codes {value!r}")

  if method == "simdinov2":
    for field, value in (
      ("loss.exclude_same_view", True),
      ("loss.gamma_rule", "official"),
      ("loss.groups", 1),
      ("loss.patch_weighting", "official"),
      ("loss.regularizer", "coding_rate"),
      ("optim.clip_mode", "per_module"),
      ("optim.warmup_from_min_lr", True),
      ("optim.adam_eps", 1e-8),
      ("head.separate_patch_head", False),
    ):
      want(field, value)
    warms_up = config.warmup_steps > 1 or (config.warmup_steps <= 0 and config.warmup_epochs > 0)
    if warms_up and config.optim.warmup_rule != "step_over_warmup":
      notes.append(
        "lr warm-up: simdinov2/utils/utils.py CosineScheduler (line 112) warms up as "
        "start + (base - start) * it / W (base reached at iteration W), simdino_jax/schedules.py "
        "warmup_cosine as np.linspace (base reached at W - 1): the lr differs at iterations 1 .. W - 1"
      )
  else:
    fork = method == "dinov2_fork"  # the fork's CosineScheduler: warm-up from min_lr, step over warm-up
    for field, value in (
      ("dino.student_temp", 0.1),
      ("dino.center_momentum", 0.9),
      ("optim.clip_mode", "per_module"),
      ("optim.warmup_from_min_lr", fork),
      ("optim.warmup_rule", "step_over_warmup" if fork else "linspace"),
      ("optim.adam_eps", 1e-8),
      ("head.norm_last_layer", False),
      ("optim.freeze_mode", "zero_lr"),
    ):
      want(field, value)
  return notes


# ---- batches --------------------------------------------------------------------------------------------------
def _official_batch(batch: dict, cfg, patch_size: int) -> dict:
  """Our batch (numpy, batch-major NHWC) -> the official collate_data_and_cast output (crop-major NCHW)."""
  import torch

  glob = np.asarray(batch["global"], np.float32)  # (B, Mg, H, W, 3)
  loc = np.asarray(batch["local"], np.float32)  # (B, Ml, h, w, 3)
  b, mg = glob.shape[:2]
  collated_global = torch.from_numpy(
    np.ascontiguousarray(glob.transpose(1, 0, 4, 2, 3).reshape(mg * b, 3, *glob.shape[2:4]))
  )
  collated_local = torch.from_numpy(
    np.ascontiguousarray(loc.transpose(1, 0, 4, 2, 3).reshape(loc.shape[1] * b, 3, *loc.shape[2:4]))
  )
  mask = np.asarray(batch["mask"], bool)  # (B, Mg, N)
  collated_masks = torch.from_numpy(np.ascontiguousarray(mask.transpose(1, 0, 2).reshape(mg * b, -1)))
  n_tokens = collated_masks.shape[1]
  mask_indices_list = collated_masks.flatten().nonzero().flatten()
  masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
  # data/collate.py: upperbound = sum over the masked crops of int(N * prob_max) of their ratio bin.
  n_samples_masked = int(mg * b * cfg.ibot.mask_sample_probability)
  probs = torch.linspace(*cfg.ibot.mask_ratio_min_max, n_samples_masked + 1)
  upperbound = sum(int(n_tokens * probs[i + 1]) for i in range(n_samples_masked))
  upperbound = max(upperbound, int(mask_indices_list.shape[0]))
  return {
    "collated_global_crops": collated_global,
    "collated_local_crops": collated_local,
    "collated_masks": collated_masks,
    "mask_indices_list": mask_indices_list,
    "masks_weight": masks_weight,
    "upperbound": upperbound,
    "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
  }


# ---- state dicts ----------------------------------------------------------------------------------------------
def _chunk_names(module) -> dict[str, str]:
  """{unchunked name 'backbone.blocks.i.x': official name 'backbone.blocks.c.i.x'} for a chunked backbone."""
  import re

  out = {}
  for name in module.state_dict():
    m = re.fullmatch(r"backbone\.blocks\.(\d+)\.(\d+)\.(.*)", name)
    out[f"backbone.blocks.{m.group(2)}.{m.group(3)}" if m else name] = name
  return out


def _load(module, sd: dict, label: str) -> None:
  import torch

  names = _chunk_names(module)
  own = module.state_dict()
  state, missing = {}, []
  for ours, theirs in names.items():
    if ours in sd:
      value = torch.from_numpy(np.array(sd[ours], np.float32, copy=True, order="C"))
      if tuple(value.shape) != tuple(own[theirs].shape):
        raise ValueError(
          f"{label}: {ours} has shape {tuple(value.shape)}, the official {theirs} {tuple(own[theirs].shape)}"
        )
      state[theirs] = value
    elif ours.endswith("mask_token"):
      state[theirs] = own[theirs]  # DINO v1 flavour export: keep the official zeros
    else:
      missing.append(ours)
  unexpected = sorted(set(sd) - set(names))
  if missing or unexpected:
    raise ValueError(
      f"{label}: state dict does not fit the official network: missing {missing[:8]}, unexpected {unexpected[:8]}"
    )
  module.load_state_dict(state, strict=True)


def _dump(module) -> dict[str, np.ndarray]:
  inverse = {v: k for k, v in _chunk_names(module).items()}
  return {inverse[k]: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


# ---- the run --------------------------------------------------------------------------------------------------
def run_official(
  method: str,
  config,
  student_sd: dict[str, np.ndarray],
  teacher_sd: dict[str, np.ndarray],
  batches: list[dict[str, np.ndarray]],
  steps: int,
  official_repo: str,
  threads: int,
  *,
  steps_per_epoch: int | None = None,
) -> dict:
  """``steps`` official training iterations from the given student / teacher state dicts on ``batches``.

  Returns {"losses": per-step loss in our convention, "losses_raw": the official ``loss_accumulator``,
  "loss_offsets", "student", "teacher" (full state dicts, unchunked official names), "patches", "notes",
  "lr", "wd", "momentum", "teacher_temp" (the official schedules' values per step)}.

  steps_per_epoch: the iterations per epoch our side uses for the durations given in epochs (last-layer freeze,
  teacher-temperature warm-up); None: computed as the Trainer does, from the size of ``config.data.source``."""
  if method not in ("simdinov2", "dinov2", "dinov2_fork"):
    raise ValueError(f"_parity_official_v2 runs simdinov2, dinov2 and dinov2_fork, not {method!r}")
  import torch

  torch.set_num_threads(max(int(threads), 1))
  meta, train, vits, block, configs, _ = _import_official(method, official_repo)
  _patch_nested_block(block)  # P3
  _, _, spe = _durations(config, steps_per_epoch)
  cfg = _official_config(method, config, configs, vits, spe)
  notes = _check_recipe(method, config)
  if steps_per_epoch is None:
    notes.append(
      f"steps_per_epoch not given: {spe} from config.data.source (as the Trainer computes it); the "
      "last-layer freeze and the teacher-temperature warm-up are in epochs: pass the value your side uses"
    )

  started_dist = False
  if cfg.train.centering == "sinkhorn_knopp" and not torch.distributed.is_initialized():  # P8
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    started_dist = True

  meta.get_fsdp_modules = lambda module: [types.SimpleNamespace(params=list(module.parameters()))]  # P5
  torch.manual_seed(0)
  model = meta.SimSSLMetaArch(cfg) if _fork(method) else meta.SSLMetaArch(cfg)
  model.need_to_synchronize_fsdp_streams = False  # P6
  for k in model.student.keys():  # P7
    model.student[k].clip_grad_norm_ = types.MethodType(
      lambda self, max_norm: torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm), model.student[k]
    )
  _load(model.student, student_sd, "student")
  _load(model.teacher, teacher_sd, "teacher")
  for p in model.teacher.parameters():
    p.requires_grad = False

  recorded = []
  backprop = model.backprop_loss

  def backprop_loss(loss):  # P10
    recorded.append(float(loss.detach()))
    return backprop(loss)

  model.backprop_loss = backprop_loss
  model.train()

  # train/train.py do_train: optimizer and schedules.
  if _fork(method):
    optimizer = train.build_optimizer(cfg, model)
    (
      lr_schedule,
      wd_schedule,
      momentum_schedule,
      teacher_temp_schedule,
      last_layer_lr_schedule,
      mcr_coeff_schedule,
      mcr_eps_schedule,
      ibot_weight_schedule,
      clip_grad_schedule,
    ) = train.build_schedulers(cfg)
  else:
    optimizer = train.build_optimizer(cfg, model.get_params_groups())
    lr_schedule, wd_schedule, momentum_schedule, teacher_temp_schedule, last_layer_lr_schedule = train.build_schedulers(
      cfg
    )

  patch = cfg.student.patch_size
  losses_raw, offsets, trace = [], [], {"lr": [], "wd": [], "momentum": [], "teacher_temp": []}
  try:
    for iteration in range(steps):
      data = _official_batch(batches[iteration % len(batches)], cfg, patch)
      mom = momentum_schedule[iteration]
      teacher_temp = teacher_temp_schedule[iteration]
      lr = lr_schedule[iteration]
      wd = wd_schedule[iteration]
      last_layer_lr = last_layer_lr_schedule[iteration]
      train.apply_optim_scheduler(optimizer, lr, wd, last_layer_lr)
      if _fork(method):
        if cfg.dino.use_mcr:
          model.dino_loss.coeff = mcr_coeff_schedule[iteration]
          model.dino_loss.eps = mcr_eps_schedule[iteration]
        if cfg.ibot.loss_weight > 0:
          cfg.ibot.loss_weight = float(ibot_weight_schedule[iteration])
      optimizer.zero_grad(set_to_none=True)
      with _cuda_is_identity():
        model.forward_backward(data, teacher_temp=teacher_temp)
      if _fork(method):
        if (clip_grad := clip_grad_schedule[iteration]) > 0:
          for v in model.student.values():
            v.clip_grad_norm_(clip_grad)
          optimizer.step()
      else:
        if cfg.optim.clip_grad:
          for v in model.student.values():
            v.clip_grad_norm_(cfg.optim.clip_grad)
        optimizer.step()
      model.update_teacher(mom)

      losses_raw.append(recorded[-1])
      if method == "simdinov2":
        masked_crops = int((data["collated_masks"].sum(-1) > 0).sum())
        offsets.append(1.0 + masked_crops / data["collated_masks"].shape[0])
      else:
        offsets.append(0.0)
      for key, value in (("lr", lr), ("wd", wd), ("momentum", mom), ("teacher_temp", teacher_temp)):
        trace[key].append(float(value))
  finally:
    if started_dist:
      torch.distributed.destroy_process_group()

  return {
    "losses": [r + o for r, o in zip(losses_raw, offsets)],
    "losses_raw": losses_raw,
    "loss_offsets": offsets,
    "student": _dump(model.student),
    "teacher": _dump(model.teacher),
    "patches": list(PATCHES),
    "notes": notes,
    **trace,
  }
