r"""Parity of MoCo-v2 and SwAV with their official PyTorch training steps: same weights, same batches, N steps each.

  /path/to/torch-venv/bin/python benchmarks/official_parity_classic.py --method moco_v2|swav \
      --official_repo DIR [--steps 20] [--arch vit|resnet18|...] [--threads 2]
      [--optimizer sgd|larc] [--start_warmup LR]   (swav: main_swav.py's LARC wrapper, its --start_warmup)
  (DIR: a clone of facebookresearch/moco (moco_v2) or facebookresearch/swav (swav), or a folder holding moco/, swav/.)

The sibling of benchmarks/official_parity.py (DINO-family methods), sharing its pieces: OUR side is training's own
assembly (``setup.build`` + ``setup.make_step`` through ``official_parity.Ours``) with config overrides mirroring the
official recipe on a small preset; the OFFICIAL side runs the official modules and training function from the clone,
never copied: main_moco.py's ``train`` / ``adjust_learning_rate`` / ``accuracy`` and moco/builder.py's ``MoCo``
(``mlp=True``, K, T = 0.2, m = 0.999); main_swav.py's ``train`` / ``distributed_sinkhorn`` and src/resnet50.py's
``ResNet`` (projection head with BN, l2-normalisation, prototypes). main_moco.py and main_swav.py import packages that
are not installed here (an internal ``deeplearning.`` path, apex), so their functions are taken out with ``ast``.
Both sides start from OUR initial weights (torchvision names for a ResNet, DINO's ViT names for a ViT), MoCo's queue
from ours (transposed), and see our pipeline's crops of the ``digits`` source.

Backbones. ``--arch resnet18`` (default for swav): torchvision's ResNet (MoCo: ``torchvision.models.__dict__[arch](
num_classes=dim)`` as main_moco.py; SwAV: src/resnet50.py's ``ResNet`` with the arch's block and layers). ``--arch
vit`` (default for moco_v2): DINO's ``vision_transformer.vit_tiny`` with an ``fc`` layer as MoCo's base encoder.
MoCo-v2 is compared on the ViT by default (no BatchNorm: the cheaper run); ``--arch resnet18`` compares the ResNet,
whose BatchNorm batches follow the official ones since our MoCo-v2 runs each view in a call of its own
(``Method.view_calls``: the query batch and the key batch normalised apart, each encoder's running statistics from
its own view; before that, one call over both views gave a step-1 loss of 2.91 vs the official 2.26). SwAV's official forward groups the crops by resolution
as ours does, so its ResNet is compared as is.

Patches (also in the JSON ``patches``):
  moco_v2: ``moco.builder.concat_all_gather`` -> identity and ``_batch_shuffle_ddp`` / ``_batch_unshuffle_ddp`` ->
    identity (one process: the gather of one process is the tensor itself, and BN statistics of a permuted batch
    are those of the batch up to summation order); ``torch.Tensor.cuda`` -> identity; after the last step the
    official ``_momentum_update_key_encoder`` is called once more: builder.py updates the key encoder at the start of
    the NEXT forward, ours at the end of the step, so that the two teachers are compared after the same updates.
  swav: a single-process gloo group (``dist.all_reduce`` in ``distributed_sinkhorn`` runs unchanged, world size 1);
    the student wrapped in a module exposing ``.module`` (DDP's attribute); ``torch.optim.SGD`` without apex's
    ``LARC`` wrapper by default (``--optimizer sgd``, ours ``optim.name="sgd"``), or with ``--optimizer larc`` inside
    ``ApexLARC``, a transcription of apex's LARC placed here (apex is not installed; ours ``optim.name="larc"``);
    weight decay on every parameter on both sides (``optim.weight_decay_all``); ``args.rank = 1`` (the rank-0 log
    line reads LARC's ``optimizer.optim``); the
    queue is off (``--queue_length 0``); the official prototypes are l2-normalised once after the last step (the
    official loop normalises them at the start of every iteration, ours after every update: the same weights enter
    every forward).

Schedules. moco_v2: ``--cos`` is per epoch, so within the first epoch (the run) the official lr is the base lr;
ours is set constant (min_lr = lr). swav: 2 epochs of ceil(steps / 2) iterations, warm-up 1 epoch from
``--start_warmup`` (default 0; ours ``optim.warmup_start_lr``), cosine to final_lr as main_swav.py builds it (its
four lines, quoted in ``swav_lr_schedule``), ours through ``optim.lr`` / ``optim.min_lr`` / warm-up steps (the DINO
cosine, the same formula).

Measures (as official_parity.py): per-step losses (the same quantity on both sides), ||ours - official|| /
||official|| per leaf (max; BN running statistics included and also reported alone), the whole update
||Δθ_ours - Δθ_official|| / ||Δθ_official||, the student parameters before every step (lockstep: our step runs on
the same batch inside the official loop, just before the official forward), MoCo's queue before every step and at
the end, and ``--float64`` (both sides in double precision, official_parity.enable_float64) to tell float32 rounding
amplified by training from a semantic difference.

Measured (docs/parity.md, docs/parity/*.json; batch 16, 20 steps): moco_v2 on ViT-Ti/4 in float32, losses 1.8e-7,
student 6.3e-6, update 4.9e-6, teacher 1.7e-5, queue 1.1e-6; swav on resnet18 in float64, losses 2.1e-13, parameters
8.2e-12, BN statistics 1.6e-12 (in float32 it drifts from the second real update on, as DINO's ResNet does); swav
with ``--optimizer larc`` in float64: docs/parity.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
  sys.path.insert(0, HERE)

import official_parity as op  # noqa: E402  # pylint: disable=g-import-not-at-top,wrong-import-position

METHODS = ("moco_v2", "swav")
CLONES = {"moco_v2": "moco", "swav": "swav"}
NEEDS = {"moco_v2": "moco/builder.py", "swav": "main_swav.py"}
ARCHS = ("vit",) + op.RESNET_ARCHS
# Goals (float32, CPU), as official_parity.py: step-0 loss, every loss, parameters / updates after N steps.
STEP0_TOL, LOSS_TOL, PARAM_TOL = op.STEP0_TOL, op.LOSS_TOL, op.PARAM_TOL


def error(msg: str) -> None:
  print(f"official_parity_classic.py: error: {msg}", file=sys.stderr, flush=True)
  raise SystemExit(2)


def resolve_repo(method: str, path: str | None) -> str:
  if not path:
    error(f"--official_repo is required: a clone of facebookresearch/{CLONES[method]} (or a folder holding it)")
  if not os.path.isdir(path):
    error(f"--official_repo={path}: no such directory")
  for repo in (path, os.path.join(path, CLONES[method])):
    if os.path.exists(os.path.join(repo, NEEDS[method])):
      return repo
  error(f"--official_repo={path}: {NEEDS[method]} not found (method {method} needs facebookresearch/{CLONES[method]})")


# ---- our side -----------------------------------------------------------------------------------------------------
def our_overrides(args) -> dict:
  """Our config fields mirroring the official recipe on the preset (dotted name -> value)."""
  niter = max(1, math.ceil(args.steps / 2))
  o = {
    "method": args.method,
    "seed": args.seed,
    "batch_size": args.batch_size,
    "data.source": "digits",
    "data.num_global": 2,
    "data.global_size": args.global_size,
    "data.local_size": args.local_size,
    "model.arch": args.arch,
    "model.drop_path_rate": 0.0,
    "optim.name": "sgd",
    "optim.momentum": 0.9,
    "optim.lr_scaling": "none",
    "optim.weight_decay_all": True,  # torch.optim.SGD(model.parameters(), weight_decay=...) in both official mains
    "optim.clip_grad": 0.0,  # neither official loop clips
    "head.out_dim": args.out_dim,
  }
  if args.arch == "vit":
    o.update({"model.variant": f"Ti/{args.patch_size}", "model.img_size": args.global_size})
  if args.method == "moco_v2":
    lr = 0.03 * args.batch_size / 256  # --lr 0.03 at batch 256, the moco README's linear scaling
    o.update(
      {
        "total_steps": args.steps,
        "warmup_steps": 0,
        "warmup_epochs": 0,
        "data.num_local": 0,
        "data.global_scale": (0.2, 1.0),
        "moco.queue_size": args.queue_size,
        "moco.temperature": 0.2,
        "teacher.momentum": 0.999,
        "teacher.momentum_end": 0.999,
        "optim.lr": lr,
        "optim.min_lr": lr,  # --cos is per epoch: constant within the first epoch
        "optim.weight_decay": 1e-4,
        "optim.weight_decay_end": 1e-4,
      }
    )
  else:
    scale = args.batch_size / 4096  # --base_lr 4.8 / --final_lr 0.0048 at batch 4096, scaled to the preset batch
    o.update(
      {
        "total_steps": 2 * niter,
        "warmup_steps": niter,
        "data.num_local": args.num_local,
        "data.global_scale": (0.14, 1.0),
        "data.local_scale": (0.05, 0.14),
        "head.hidden_dim": args.hidden_dim,
        "head.num_prototypes": args.num_prototypes,
        "head.use_bn": True,
        "teacher.self_distillation": False,
        "swav.temperature": 0.1,
        "swav.epsilon": 0.05,
        "swav.sinkhorn_iterations": 3,
        "swav.crops_for_assign": (0, 1),
        "swav.queue_length": 0,
        "swav.freeze_prototypes_iters": args.freeze_prototypes_iters,
        "optim.lr": 4.8 * scale,
        "optim.min_lr": 0.0048 * scale,
        "optim.weight_decay": 1e-6,
        "optim.weight_decay_end": 1e-6,
        "optim.name": args.optimizer,  # larc: LARC(SGD, trust_coefficient=0.001, clip=False), optim.lars_eta 0.001
        "optim.warmup_start_lr": args.start_warmup,
      }
    )
  return o


def build_config(args):
  from simdino_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.base_config()
  for name, value in our_overrides(args).items():
    node = config
    *parents, leaf = name.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  config_lib.validate(config, num_devices=1)
  return config


def _linear(flat: dict, prefix: str, tname: str, out: dict) -> None:
  """A flax Dense (kernel (in, out), bias) -> torch Linear weight (out, in), bias."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  out[f"{tname}.weight"] = np.ascontiguousarray(flat[f"{prefix}/kernel"].T)
  if f"{prefix}/bias" in flat:
    out[f"{tname}.bias"] = flat[f"{prefix}/bias"]


def _batchnorm(flat: dict, prefix: str, tname: str, out: dict) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top

  for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var")):
    out[f"{tname}.{theirs}"] = flat[f"{prefix}/{ours}"]
  out[f"{tname}.num_batches_tracked"] = np.asarray(flat[f"{prefix}/num_batches_tracked"]).astype(np.int64)


def to_official(flat: dict, method: str, arch: str) -> dict:
  """Our network's state (named leaves, params and BN statistics) -> the official module's state dict:
  moco_v2: one encoder (backbone + ``fc.0`` / ``fc.2``, MoCo's --mlp head); swav: src/resnet50.py's ResNet
  (backbone + ``projection_head.0/1/3`` + ``prototypes``)."""
  from simdino_jax.io import torch_interop, torchvision_resnet  # pylint: disable=g-import-not-at-top

  backbone = {k: v for k, v in flat.items() if k.startswith("backbone/")}
  if arch == "vit":
    out = dict(torch_interop.to_torch(backbone, flavor="dino"))
  else:
    out = dict(torchvision_resnet.to_torchvision(backbone))
  if method == "moco_v2":
    _linear(flat, "head/mlp/fc1", "fc.0", out)
    _linear(flat, "head/mlp/fc2", "fc.2", out)
  else:
    _linear(flat, "head/projection/fc1", "projection_head.0", out)
    _batchnorm(flat, "head/projection/bn", "projection_head.1", out)
    _linear(flat, "head/projection/fc2", "projection_head.3", out)
    out["prototypes.weight"] = flat["head/prototypes"]  # (K, D): torch's Linear(D, K).weight layout already
  return out


# ---- the official side --------------------------------------------------------------------------------------------
def _vit_encoder(dino_repo: str, args):
  """MoCo's base_encoder(num_classes) on DINO's ViT: vit_tiny + an ``fc`` Linear (builder.py reads fc's input width
  and replaces it by its --mlp head); forward = fc(the normed cls token)."""
  if dino_repo not in sys.path:
    sys.path.insert(0, dino_repo)
  import vision_transformer as vits  # pylint: disable=g-import-not-at-top,import-error
  from torch import nn  # pylint: disable=g-import-not-at-top

  class Encoder(vits.VisionTransformer):
    def __init__(self, num_classes):
      super().__init__(
        patch_size=args.patch_size,
        embed_dim=192,
        depth=12,
        num_heads=3,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        img_size=[args.global_size],
      )  # vit_tiny's arguments (vision_transformer.py)
      self.fc = nn.Linear(self.embed_dim, num_classes)

    def forward(self, x):
      return self.fc(super().forward(x))

  return Encoder


def run_official_moco(args, repo, student_sd, teacher_sd, queue, batches, ours, float64) -> dict:
  import importlib.util  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  spec = importlib.util.spec_from_file_location("moco_builder_official", os.path.join(repo, "moco", "builder.py"))
  builder = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(builder)
  patches = [
    "moco/builder.py concat_all_gather -> identity (one process)",
    "MoCo._batch_shuffle_ddp / _batch_unshuffle_ddp -> identity (one process: BN over a permuted batch is BN over "
    "the batch up to summation order)",
    "torch.Tensor.cuda -> identity",
    "one more MoCo._momentum_update_key_encoder() after the last step (builder.py updates the key encoder at the "
    "start of the next forward, ours at the end of the step)",
  ]
  builder.concat_all_gather = lambda t: t
  builder.MoCo._batch_shuffle_ddp = lambda self, x: (x, None)
  builder.MoCo._batch_unshuffle_ddp = lambda self, x, idx: x
  torch.Tensor.cuda = lambda self, *a, **k: self
  if args.arch == "vit":
    base_encoder = _vit_encoder(os.path.join(args.official_dino), args)
    patches.append("base encoder: DINO's vision_transformer (vit_tiny) with an fc layer (builder.py's --mlp head)")
  else:
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    from torchvision import models as torchvision_models  # pylint: disable=g-import-not-at-top

    base_encoder = torchvision_models.__dict__[args.arch]  # main_moco.py: models.__dict__[args.arch]
  model = builder.MoCo(base_encoder, args.out_dim, args.queue_size, 0.999, 0.2, mlp=True)
  if float64:
    model.double()

  def load(module, sd):
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)

  load(model.encoder_q, student_sd)
  load(model.encoder_k, teacher_sd)
  with torch.no_grad():
    model.queue.copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(queue).T)))
  # main_moco.py's objects: the criterion, SGD over model.parameters() (the key encoder's have no grad: skipped)
  main = os.path.join(repo, "main_moco.py")
  ns = {"torch": torch, "nn": nn, "math": math, "time": time}
  op._extract(main, ("train", "adjust_learning_rate", "accuracy", "AverageMeter", "ProgressMeter"), ns)  # pylint: disable=protected-access

  def accuracy(output, target, topk=(1,)):  # logging only; its .view of a non-contiguous slice fails on torch 2
    return _accuracy(output, target, topk, torch)

  ns["accuracy"] = accuracy
  patches.append(
    "main_moco.py's accuracy (logging only: acc1/acc5) computed with .reshape in place of its .view, "
    "which fails on a non-contiguous tensor under torch 2"
  )
  lr = 0.03 * args.batch_size / 256
  optimizer = torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=1e-4)
  margs = types.SimpleNamespace(lr=lr, cos=True, epochs=200, schedule=[120, 160], gpu=None, print_freq=10**9)
  ns["adjust_learning_rate"](optimizer, 0, margs)
  images = [op.to_official_images(b, torch) for b in batches]
  if float64:
    images = [[c.double() for c in crops] for crops in images]
  result = {"patches": patches, "losses": [], "lr": []}
  lockstep = []

  def named(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}

  class Recording(nn.Module):
    """nn.CrossEntropyLoss unchanged; records each loss."""

    def __init__(self):
      super().__init__()
      self.inner = nn.CrossEntropyLoss()

    def forward(self, output, target):
      loss = self.inner(output, target)
      result["losses"].append(float(loss.item()))
      return loss

  class Lockstep(nn.Module):
    """The MoCo module unchanged; before each official forward, compares the student and the queue with ours (after
    the same number of updates) and runs our step on the same batch."""

    def __init__(self, inner):
      super().__init__()
      self.inner = inner

    def forward(self, im_q, im_k):
      t = len(lockstep)
      mine = to_official(ours.flat("student"), "moco_v2", args.arch)
      s_diff, s_leaf = op.max_leaf_diff(op.params_only(mine), op.params_only(named(self.inner.encoder_q)))
      q_diff = op.rel_diff(np.asarray(ours.state.loss_state["queue"]).T, self.inner.queue.detach().numpy())
      metrics = ours.step(batches[t])
      lockstep.append(
        {
          "step": t,
          "student_param_rel_diff": s_diff,
          "student_worst": s_leaf,
          "queue_rel_diff": q_diff,
          "loss_ours": metrics["loss"],
          "lr_ours": metrics["lr"],
          "lr_official": float(optimizer.param_groups[0]["lr"]),
        }
      )
      return self.inner(im_q=im_q, im_k=im_k)

  wrapped = Lockstep(model)
  with contextlib.redirect_stdout(sys.stderr):
    ns["train"](_Loader(images), wrapped, Recording(), optimizer, 0, margs)
  with torch.no_grad():
    model._momentum_update_key_encoder()  # pylint: disable=protected-access
  result["student"], result["teacher"] = named(model.encoder_q), named(model.encoder_k)
  result["queue"] = model.queue.detach().numpy().T.copy()
  result["queue_ptr"] = int(model.queue_ptr[0])
  result["lockstep"] = lockstep
  return result


def _accuracy(output, target, topk, torch):
  """main_moco.py's accuracy with ``.reshape`` for its ``.view`` (the same values)."""
  with torch.no_grad():
    maxk, batch_size = max(topk), target.size(0)
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / batch_size) for k in topk]


class _Loader:
  """The official data loader's interface: (crops, label) per iteration, ``len`` the number of iterations."""

  def __init__(self, images, length=None):
    self.images, self.length = images, length if length is not None else len(images)

  def __len__(self):
    return self.length

  def __iter__(self):
    return iter([(x, None) for x in self.images])


class _SwAVLoader(_Loader):
  def __iter__(self):  # main_swav.py: `for it, inputs in enumerate(train_loader)`, inputs the crop list
    return iter(list(self.images))


def swav_lr_schedule(base_lr, final_lr, epochs, warmup_epochs, niter, start_warmup=0.0):
  """main_swav.py's schedule (main(), verbatim but for the names):
      warmup_lr_schedule = np.linspace(args.start_warmup, args.base_lr, len(train_loader) * args.warmup_epochs)
      iters = np.arange(len(train_loader) * (args.epochs - args.warmup_epochs))
      cosine_lr_schedule = np.array([args.final_lr + 0.5 * (args.base_lr - args.final_lr) * (1 + \
                           math.cos(math.pi * t / (len(train_loader) * (args.epochs - args.warmup_epochs)))) for t in iters])
      lr_schedule = np.concatenate((warmup_lr_schedule, cosine_lr_schedule))"""
  import numpy as np  # pylint: disable=g-import-not-at-top

  warmup = np.linspace(start_warmup, base_lr, niter * warmup_epochs)
  iters = np.arange(niter * (epochs - warmup_epochs))
  cosine = np.array(
    [
      final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / (niter * (epochs - warmup_epochs))))
      for t in iters
    ]
  )
  return np.concatenate((warmup, cosine))


class ApexLARC:
  """apex/parallel/LARC.py's ``LARC`` (NVIDIA/apex 0bfb830085a31c6ed49502c52403c8d0f1fd3eb9), transcribed for the
  harness because apex is not installed: the wrapper's interface main_swav.py's ``train`` uses (``param_groups``,
  ``zero_grad``, ``step``) and ``step`` as apex's lines 79-107, statement for statement."""

  def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8):
    self.optim = optimizer
    self.trust_coefficient = trust_coefficient
    self.eps = eps
    self.clip = clip

  @property
  def param_groups(self):
    return self.optim.param_groups

  def zero_grad(self):
    self.optim.zero_grad()

  def step(self):
    import torch  # pylint: disable=g-import-not-at-top

    with torch.no_grad():
      weight_decays = []
      for group in self.optim.param_groups:
        # absorb weight decay control from optimizer
        weight_decay = group["weight_decay"] if "weight_decay" in group else 0
        weight_decays.append(weight_decay)
        group["weight_decay"] = 0
        for p in group["params"]:
          if p.grad is None:
            continue
          param_norm = torch.norm(p.data)
          grad_norm = torch.norm(p.grad.data)
          if param_norm != 0 and grad_norm != 0:
            # calculate adaptive lr + weight decay
            adaptive_lr = self.trust_coefficient * (param_norm) / (grad_norm + param_norm * weight_decay + self.eps)
            # clip learning rate for LARC
            if self.clip:
              adaptive_lr = min(adaptive_lr / group["lr"], 1)
            p.grad.data += weight_decay * p.data
            p.grad.data *= adaptive_lr
    self.optim.step()
    # return weight decay control to optimizer
    for i, group in enumerate(self.optim.param_groups):
      group["weight_decay"] = weight_decays[i]


def run_official_swav(args, repo, student_sd, batches, ours, float64, config) -> dict:
  import importlib.util  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.distributed as dist  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  patches = []
  if not dist.is_initialized():
    rendezvous = tempfile.NamedTemporaryFile(prefix="parity_gloo_", delete=False).name
    os.remove(rendezvous)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
  patches.append("torch.distributed: single-process gloo group (distributed_sinkhorn's all_reduce, world size 1)")
  torch.Tensor.cuda = lambda self, *a, **k: self
  patches.append("torch.Tensor.cuda -> identity")
  spec = importlib.util.spec_from_file_location("swav_resnet50_official", os.path.join(repo, "src", "resnet50.py"))
  resnet_mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(resnet_mod)
  from simdino_jax.models.resnet import VARIANTS  # pylint: disable=g-import-not-at-top

  if args.arch not in op.RESNET_ARCHS:
    error(f"--arch {args.arch}: swav is compared on a ResNet ({', '.join(op.RESNET_ARCHS)})")
  block, layers, _, _ = VARIANTS[args.arch]
  block_cls = resnet_mod.BasicBlock if block == "basic" else resnet_mod.Bottleneck
  # main_swav.py: resnet_models.__dict__[args.arch](normalize=True, hidden_mlp=..., output_dim=..., nmb_prototypes=...)
  model = resnet_mod.ResNet(
    block_cls,
    list(layers),
    normalize=True,
    hidden_mlp=args.hidden_dim,
    output_dim=args.out_dim,
    nmb_prototypes=args.num_prototypes,
  )
  if float64:
    model.double()
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in student_sd.items()}, strict=True)

  class DDPLike(nn.Module):
    def __init__(self, module):
      super().__init__()
      self.module = module

    def forward(self, x):
      return self.module(x)

  patches.append("model wrapped in a module exposing .module (DDP's attribute), no DDP")
  niter = max(1, math.ceil(args.steps / 2))
  scale = args.batch_size / 4096
  lr_schedule = swav_lr_schedule(4.8 * scale, 0.0048 * scale, 2, 1, niter, start_warmup=args.start_warmup)
  optimizer = torch.optim.SGD(model.parameters(), lr=4.8 * scale, momentum=0.9, weight_decay=1e-6)
  if args.optimizer == "larc":  # main_swav.py: LARC(optimizer=optimizer, trust_coefficient=0.001, clip=False)
    optimizer = ApexLARC(optimizer=optimizer, trust_coefficient=0.001, clip=False)
    patches.append(
      "apex's LARC(SGD(model.parameters(), momentum=0.9, weight_decay=wd), trust_coefficient=0.001, clip=False) "
      "through ApexLARC, a transcription of apex/parallel/LARC.py in this harness (apex is not installed)"
    )
  else:
    patches.append(
      "torch.optim.SGD(model.parameters(), momentum=0.9, weight_decay=wd) without apex's LARC wrapper (--optimizer sgd)"
    )
  patches.append("args.rank = 1 (the rank-0 log line reads LARC's optimizer.optim)")
  s = config.swav
  sargs = types.SimpleNamespace(
    crops_for_assign=list(s.crops_for_assign),
    nmb_crops=[2, args.num_local],
    temperature=s.temperature,
    epsilon=s.epsilon,
    sinkhorn_iterations=s.sinkhorn_iterations,
    world_size=1,
    freeze_prototypes_niters=s.freeze_prototypes_iters,
    use_fp16=False,
    rank=1,
  )
  utils_ns = {"torch": torch, "dist": dist}
  op._extract(os.path.join(repo, "src", "utils.py"), ("AverageMeter",), utils_ns)  # pylint: disable=protected-access
  ns = {
    "torch": torch,
    "nn": nn,
    "F": F,
    "np": np,
    "dist": dist,
    "time": time,
    "math": math,
    "args": sargs,
    "AverageMeter": utils_ns["AverageMeter"],
    "logger": logging.getLogger("swav_parity"),
    "apex": None,
  }
  op._extract(os.path.join(repo, "main_swav.py"), ("train", "distributed_sinkhorn"), ns)  # pylint: disable=protected-access
  images = [op.to_official_images(b, torch) for b in batches]
  if float64:
    images = [[c.double() for c in crops] for crops in images]
  result = {"patches": patches, "losses": [], "lr": []}
  lockstep = []

  def named(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}

  class Lockstep(DDPLike):
    """Before each official forward (after the official prototype normalisation), compares the student with ours
    and runs our step on the same batch; records the official loss through the logits' consumer (below)."""

    def forward(self, x):
      t = len(lockstep)
      mine = to_official(ours.flat("student"), "swav", args.arch)
      s_diff, s_leaf = op.max_leaf_diff(op.params_only(mine), op.params_only(named(self.module)))
      metrics = ours.step(batches[t])
      lockstep.append(
        {
          "step": t,
          "student_param_rel_diff": s_diff,
          "student_worst": s_leaf,
          "loss_ours": metrics["loss"],
          "lr_ours": metrics["lr"],
          "lr_official": float(optimizer.param_groups[0]["lr"]),
        }
      )
      return self.module(x)

  wrapped = Lockstep(model)
  # The loss is a local of train(); optimizer.step() follows its backward, so record it from the step: the loss of
  # step t is recomputed by nobody; instead wrap Tensor.backward to read the value that is differentiated.
  original_backward = torch.Tensor.backward

  def backward(self, *a, **k):
    if self.dim() == 0 and self.requires_grad:
      result["losses"].append(float(self.item()))
    return original_backward(self, *a, **k)

  torch.Tensor.backward = backward
  patches.append("torch.Tensor.backward wrapped to record the scalar loss it differentiates (values unchanged)")
  epochs = 2
  try:
    with contextlib.redirect_stdout(sys.stderr):
      for epoch in range(epochs):
        chunk = images[epoch * niter : (epoch + 1) * niter]
        if not chunk:
          break
        ns["train"](_SwAVLoader(chunk, niter), wrapped, optimizer, epoch, lr_schedule, None)
  finally:
    torch.Tensor.backward = original_backward
  with torch.no_grad():  # what the next iteration's normalisation would do (ours normalises after every update)
    model.prototypes.weight.copy_(F.normalize(model.prototypes.weight.data.clone(), dim=1, p=2))
  result["student"] = named(model)
  result["lockstep"] = lockstep
  result["lr"] = [float(x) for x in lr_schedule[: args.steps]]
  return result


# ---- driver -------------------------------------------------------------------------------------------------------
def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--method", choices=METHODS, default="moco_v2")
  parser.add_argument(
    "--official_repo",
    default=None,
    help="a clone of facebookresearch/moco or /swav, or a folder holding moco/ and swav/ (and dino/ for --arch vit)",
  )
  parser.add_argument("--arch", choices=ARCHS, default=None, help="default: vit (moco_v2), resnet18 (swav)")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--global_size", type=int, default=32)
  parser.add_argument("--local_size", type=int, default=16)
  parser.add_argument("--num_local", type=int, default=2, help="swav: local crops (nmb_crops 2 N)")
  parser.add_argument("--patch_size", type=int, default=4)
  parser.add_argument("--out_dim", type=int, default=128, help="moco --moco-dim / swav --feat_dim")
  parser.add_argument("--queue_size", type=int, default=256, help="moco --moco-k (a multiple of the batch)")
  parser.add_argument("--hidden_dim", type=int, default=256, help="swav --hidden_mlp")
  parser.add_argument("--num_prototypes", type=int, default=300, help="swav --nmb_prototypes")
  parser.add_argument("--freeze_prototypes_iters", type=int, default=5, help="swav --freeze_prototypes_niters")
  parser.add_argument(
    "--optimizer",
    choices=("sgd", "larc"),
    default="sgd",
    help="swav: plain torch.optim.SGD (default) or main_swav.py's apex LARC(clip=False) around it (optim.name=larc)",
  )
  parser.add_argument("--start_warmup", type=float, default=0.0, help="swav --start_warmup (optim.warmup_start_lr)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--float64", action="store_true", help="diagnostic: both sides in double precision")
  args = parser.parse_args(argv)
  if args.arch is None:
    args.arch = "vit" if args.method == "moco_v2" else "resnet18"
  if args.method == "swav" and args.arch == "vit":
    error("--arch vit: swav is compared on a ResNet (src/resnet50.py's ResNet)")
  if args.steps < 1:
    error(f"--steps must be >= 1, got {args.steps}")
  if args.method != "swav" and (args.optimizer != "sgd" or args.start_warmup != 0.0):
    error("--optimizer / --start_warmup: swav only (main_moco.py's SGD has no LARC wrapper, its warm-up no start)")
  if args.start_warmup < 0:
    error(f"--start_warmup must be >= 0, got {args.start_warmup}")
  repo = resolve_repo(args.method, args.official_repo)
  args.official_dino = ""
  if args.method == "moco_v2" and args.arch == "vit":
    root = os.path.dirname(repo.rstrip("/"))
    args.official_dino = os.path.join(root, "dino")
    if not os.path.exists(os.path.join(args.official_dino, "vision_transformer.py")):
      error(f"--arch vit: DINO's vision_transformer.py not found in {args.official_dino} (a dino/ clone beside moco/)")

  start = time.time()
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_default_matmul_precision", "highest")
  if args.float64:
    op.enable_float64()
  import numpy as np  # pylint: disable=g-import-not-at-top

  config = build_config(args)
  niter = max(1, math.ceil(args.steps / 2))
  ours = op.Ours(config, num_train=(args.steps if args.method == "moco_v2" else niter) * config.batch_size)
  batches = op.make_batches(ours.setup, args.steps)
  student_sd = to_official(ours.flat("student"), args.method, args.arch)
  teacher_sd = to_official(ours.flat("teacher"), args.method, args.arch)
  if args.method == "moco_v2":
    queue0 = np.array(ours.state.loss_state["queue"], copy=True)
    off = run_official_moco(args, repo, student_sd, teacher_sd, queue0, batches, ours, args.float64)
  else:
    off = run_official_swav(args, repo, student_sd, batches, ours, args.float64, config)
  lockstep = off.pop("lockstep")
  losses_ours = [row["loss_ours"] for row in lockstep]
  losses_official = off["losses"]
  mine_s = to_official(ours.flat("student"), args.method, args.arch)
  student_diff, student_leaf = op.max_leaf_diff(op.params_only(mine_s), op.params_only(off["student"]))
  student_update = op.update_rel_diff(
    op.params_only(mine_s), op.params_only(off["student"]), op.params_only(student_sd)
  )
  stats = [k for k in off["student"] if k.rsplit(".", 1)[-1] in op.BN_BUFFERS]
  bn = {}
  if stats:
    bn["student"] = op.max_leaf_diff({k: mine_s[k] for k in stats}, {k: off["student"][k] for k in stats})
  out = {
    "method": args.method,
    "steps": args.steps,
    "official_repo": repo,
    "official_commit": op.git_commit(repo),
    "losses_ours": losses_ours,
    "losses_official": losses_official,
    **op.loss_agreement(losses_ours, losses_official),
    "student_param_rel_diff": student_diff,
    "student_worst_leaf": student_leaf,
    "student_update_rel_diff": student_update,
    "student_param_rel_diff_per_step": [row["student_param_rel_diff"] for row in lockstep],
    "max_lr_rel_diff": max(op.rel_diff(r["lr_ours"], r["lr_official"]) for r in lockstep),
  }
  if args.method == "moco_v2":
    mine_t = to_official(ours.flat("teacher"), args.method, args.arch)
    t_diff, t_leaf = op.max_leaf_diff(op.params_only(mine_t), op.params_only(off["teacher"]))
    out.update(
      teacher_param_rel_diff=t_diff,
      teacher_worst_leaf=t_leaf,
      teacher_update_rel_diff=op.update_rel_diff(
        op.params_only(mine_t), op.params_only(off["teacher"]), op.params_only(teacher_sd)
      ),
      queue_rel_diff_per_step=[row["queue_rel_diff"] for row in lockstep],
      queue_rel_diff=op.rel_diff(np.asarray(ours.state.loss_state["queue"]), off["queue"]),
      queue_ptr=[int(ours.state.loss_state["queue_ptr"]), off["queue_ptr"]],
    )
    if stats:
      bn["teacher"] = op.max_leaf_diff({k: mine_t[k] for k in stats}, {k: off["teacher"][k] for k in stats})
  out["bn_stats_rel_diff"] = {k: {"max": v[0], "worst": v[1]} for k, v in bn.items()} or None
  goals = (
    len(losses_official) == args.steps
    and out["step0_rel_diff"] <= STEP0_TOL
    and out["max_loss_rel_diff"] <= LOSS_TOL
    and student_diff <= PARAM_TOL
    and student_update <= PARAM_TOL
    and out["max_lr_rel_diff"] <= 1e-6
  )
  if args.method == "moco_v2":
    goals = goals and out["teacher_param_rel_diff"] <= PARAM_TOL and out["queue_rel_diff"] <= PARAM_TOL
  out["parity"] = bool(goals)
  out["patches"] = off["patches"]
  out["preset"] = {
    "arch": args.arch if args.arch != "vit" else f"vit Ti/{args.patch_size}",
    "batch_size": args.batch_size,
    "crops": f"2x{args.global_size}" + (f" + {args.num_local}x{args.local_size}" if args.method == "swav" else ""),
    "out_dim": args.out_dim,
    "queue_size": args.queue_size if args.method == "moco_v2" else None,
    "hidden_dim/prototypes/freeze": (
      f"{args.hidden_dim}/{args.num_prototypes}/{args.freeze_prototypes_iters}" if args.method == "swav" else None
    ),
    "dtype": "float64 (--float64)" if args.float64 else "float32",
    "optimizer": f"{args.optimizer} (start_warmup {args.start_warmup})" if args.method == "swav" else "sgd",
  }
  out["seconds"] = round(time.time() - start, 1)
  print(json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main()
