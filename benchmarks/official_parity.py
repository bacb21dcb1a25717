r"""Parity with the official PyTorch trainers: same initial weights, same batches, N full training steps each.

  /path/to/torch-venv/bin/python benchmarks/official_parity.py --method simdino --official_repo /path/to/SimDINO \
      [--steps 20] [--threads 2]
  (--method dino: --official_repo a clone of facebookresearch/dino; simdinov2: SimDINO; dinov2: facebookresearch/dinov2.
   --official_repo may also be a folder holding the clones SimDINO/, dino/, dinov2/.)

Needs a Python with PyTorch and simdino_jax (PyTorch is not a dependency of the package) and a clone of the official
code; nothing official is copied into the package: the official files are imported or executed from the clone.

What runs (float32, CPU, no fp16, no DDP):
  * OURS: training's own assembly, nothing rebuilt here: ``simdino_jax.train.setup.build`` (durations from epochs,
    schedules including the teacher-momentum branch, network, optimiser chain, loss, init_fn) and
    ``setup.make_step`` (the trainer's jitted step: state shardings, donation, the packed mask gather), on one CPU
    device, on a small preset: ViT-Ti/4 (width 192, depth 12), 32 px global / 16 px local crops (2 + 4, --num_local),
    batch 16, head hidden 2048 / bottleneck 256, K = 4096 prototypes (dino), with config overrides that mirror the
    official recipe (official_recipe_overrides below; the v2 methods take _parity_official_v2.OUR_OVERRIDES on top).
    Durations: 2 epochs of ceil(steps / 2) steps (num_train = that x batch), lr warm-up 1 epoch, teacher-temperature
    warm-up 2 epochs, last layer frozen 1 epoch (dino).
  * RESNET (--arch resnet18|34|50|101, dino): the backbone is torchvision's ResNet on both sides (ours
    models/resnet.py through setup.build, theirs ``torchvision.models.__dict__[arch]()`` as main_dino.py builds it,
    fc replaced by Identity in MultiCropWrapper) with DINO's README ResNet-50 recipe read from
    configs/dino_resnet50_in1k.py (resnet_recipe_overrides: SGD momentum 0.9, lr 0.03 x B/256, weight decay 1e-4
    constant, crop scales (0.14, 1) / (0.05, 0.14), teacher temperature 0.04 constant) and the official
    ``torch.optim.SGD(params_groups, lr=0, momentum=0.9)`` (``utils.LARS`` with the recipe's optim.name lars). Both
    networks train in train mode (batch statistics; one running-statistics update per resolution for the student,
    per forward for the teacher), and the running statistics are compared with the parameters (state_dict buffers:
    running_mean / running_var / num_batches_tracked). The step-0 forward check runs both sides in train mode (the
    official running statistics are restored after it, so training starts from the initial ones).
  * DROP PATH (--drop_path RATE, simdino / dino): the student's stochastic depth at RATE, linear over depth as the
    official --drop_path_rate, with the same per-sample keep masks on both sides (DropPathDraws): ours through
    simdino_jax.models.vit.drop_path_factors, the official drop_path formula untouched (its torch.rand draws are
    served from the same masks). The official teacher has no drop path, ours runs the teacher without a key.
  * OFFICIAL (simdino: RobinWu218/SimDINO simdino/, dino: facebookresearch/dino): vit_tiny, the head, MultiCropWrapper,
    the loss module (MCRLoss / DINOLoss), get_params_groups + AdamW, cosine_scheduler for lr / wd / momentum, and the
    official ``train_one_epoch`` itself, taken out of main_dino.py with ``ast`` (main_dino.py imports torchvision
    and wandb at the top, so it is not imported) and executed epoch by epoch, as train_dino calls it.
    simdinov2 / dinov2: benchmarks/_parity_official_v2.py (run_official), written separately.
  * Both start from OUR initial student and teacher weights (converted with torch_interop.network_to_torch); the
    official forward at step 0 is checked against ours on the same batch before training. Batches: our data
    pipeline's crops of the ``digits`` source (simdino_jax.data), converted to the official layout (a list of NCHW
    tensors, global crops first).
  * simdino / dino run in lockstep: the official loss module is wrapped so that, at every official step (before its
    loss), the student / teacher parameters, the DINO centre and the lr / wd / momentum / teacher temperature of the
    two sides are compared after the same number of updates, and OUR step runs on the same batch; the first step
    where a quantity leaves its tolerance is reported as ``first_divergence`` when parity is not reached (else, if
    any, as ``lockstep_transient``). simdinov2 / dinov2 are compared after the official run: losses, the official
    lr / wd / momentum / teacher temperature per step against ours, and the final parameters.

Loss conventions: the official SimDINO loss is -coeff * mean cos - gamma R, ours is mean 1/2||t - s||^2 - gamma R;
for unit vectors official = coeff * (ours - 1) (coeff = 1 here). DINO losses are the same quantity on both sides.
simdinov2: _parity_official_v2 returns the official losses in both conventions (its ``loss_offsets``: 1 + masked
crops / (Mg B)). Both are reported: ``losses_ours`` / ``losses_official`` / ``step0_rel_diff`` / ``max_loss_rel_diff``
/ ``max_loss_abs_diff`` in the official convention, and the same under ``our_convention``: the official constant
enlarges the denominator, so the same two runs look ~2-10x closer in the official convention than in ours.

Patches (what cannot run as is on CPU without DDP; also listed in the JSON ``patches``):
  1. torch.distributed: a single-process gloo group (world size 1, file:// rendezvous), so that DINOLoss.update_center's
     dist.all_reduce / get_world_size and MCRLoss's dist.is_initialized() run unchanged (N = 1).
  2. the student is wrapped in a module exposing ``.module`` (what train_one_epoch reads off its DDP student);
     parameter names get DDP's ``module.`` prefix, as in the official run.
  3. torch.Tensor.cuda -> identity and torch.cuda.synchronize -> no-op (train_one_epoch moves images to the GPU).
  4. utils.SmoothedValue.synchronize_between_processes -> no-op (it builds a CUDA tensor to average logging meters).
  5. the loss module is wrapped to record each step's loss and to run the lockstep comparison before it (no change
     to what it computes).
  6. --arch resnet*: main_dino.py's nn.SyncBatchNorm.convert_sync_batchnorm is not applied (torch refuses SyncBN on
     CPU tensors once a process group exists; with world size 1 it computes BatchNorm2d's statistics), and the
     teacher is not DDP-wrapped (main_dino.py wraps it only for SyncBN).
  Constructor arguments that differ from the official command-line defaults (not patches): img_size=[32] (the
  positional embedding is stored for the 32 px global crops, as our model.img_size; 16 px local crops interpolate it
  in both), drop_path_rate=0, fp16 off, the preset sizes above.

Parity measure: max over leaves of ||ours - official|| / ||official||, with each attention key bias (the k third of
``attn.qkv.bias``) reported apart as ``key_bias_rel_diff``: it gets no gradient in exact arithmetic (softmax over
the keys is invariant to q . b_k), so its computed gradient is rounding noise that Adam turns into +-lr updates of
random sign on either side; it never changes any output (see ``split_key_bias``).

``student_update_rel_diff`` compares the whole training update (params - initial, all leaves together); the
teacher's counterpart is informative only over many steps: the teacher moves by (1 - m) of the student's update,
near float32's resolution on leaves of size 1, where the two EMA roundings (mul/add or lerp vs optax) dominate.

Measured figures, each with its JSON record: docs/parity.md and docs/parity/*.json (e.g. simdino, 20 steps on
training's setup.build + make_step: step-0 loss 2.7e-7, losses 4.4e-6 official / 1.0e-5 our convention, student
params 1.7e-4 / teacher 3.5e-4, student update 5.3e-5, teacher update 5.1e-4; 83 s quiet, 30 min at load 15).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# dinov2_fork: our dinov2 against SimDINO's fork of the DINOv2 code (simdinov2/ SimSSLMetaArch without MCR), which
# configs/dinov2_vitb16_in1k.py follows; dinov2: against facebookresearch/dinov2.
METHODS = ("simdino", "simdinov2", "dino", "dinov2", "dinov2_fork")
CLONES = {"simdino": "SimDINO", "simdinov2": "SimDINO", "dino": "dino", "dinov2": "dinov2", "dinov2_fork": "SimDINO"}
V2_METHODS = ("simdinov2", "dinov2", "dinov2_fork")
# Goals (float32, CPU): step-0 loss, every loss, parameters after N steps.
STEP0_TOL, LOSS_TOL, PARAM_TOL = 1e-5, 1e-3, 1e-3
FORWARD_TOL = 1e-5  # step-0 head outputs, ||ours - official|| / ||official||
# --dtype bfloat16: ours computing in bfloat16 against the official autocast; bfloat16 keeps 8 bits of mantissa
# (relative rounding 2**-9 = 2e-3 per operation), and the two sides round different operations.
BF16_LOSS_TOL, BF16_UPDATE_TOL = 1e-3, 0.1  # dino, 3 steps: 7.5e-5, 3.6e-2
OFFICIAL_EPS = 0.05  # SimDINO README --eps (official eps = paper eps**2)


def enable_float64() -> None:
  """--float64: jax x64, and ``jnp.float32`` replaced by ``jnp.float64`` before simdino_jax is imported, so that every
  explicit float32 in the package (parameters, BatchNorm statistics, losses, schedules, default dtype arguments)
  is float64. A diagnostic of the harness only: it tells float32 rounding noise amplified by training from a
  semantic difference (the two sides then agree to ~1e-12 per step if the computations are the same)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  if any(m.startswith("simdino_jax") for m in sys.modules):
    error("--float64 must take effect before simdino_jax is imported")
  jax.config.update("jax_enable_x64", True)
  jnp.float32 = jnp.float64


def error(msg: str) -> None:
  print(f"official_parity.py: error: {msg}", file=sys.stderr, flush=True)
  raise SystemExit(2)


def resolve_repo(method: str, path: str | None) -> str:
  """The clone for ``method``: ``path`` itself, or ``path/<SimDINO|dino|dinov2>``; exits with one line if absent."""
  if not path:
    error(
      f"--official_repo is required: a clone of the official {CLONES[method]} repository (or a folder holding "
      "SimDINO/, dino/, dinov2/)"
    )
  if not os.path.isdir(path):
    error(f"--official_repo={path}: no such directory")
  need = {
    "simdino": "simdino/main_dino.py",
    "simdinov2": "simdinov2",
    "dinov2_fork": "simdinov2",
    "dino": "main_dino.py",
    "dinov2": "dinov2/train/ssl_meta_arch.py",
  }[method]
  sub = os.path.join(path, CLONES[method])
  # The clone itself first: a dinov2 clone holds a dinov2/ package folder that is not a clone.
  repo = path if os.path.exists(os.path.join(path, need)) else sub
  if not os.path.exists(os.path.join(repo, need)):
    error(
      f"--official_repo={path}: {os.path.join(repo, need)} not found (method {method} needs a clone of "
      f"the official {CLONES[method]} repository)"
    )
  return repo


def git_commit(repo: str) -> str:
  import subprocess  # pylint: disable=g-import-not-at-top

  try:
    return subprocess.run(
      ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


# ---- our side ---------------------------------------------------------------------------------------------------
def schedule_lengths(steps: int, epochs: int) -> tuple[int, int]:
  """(iterations per epoch, epochs): ``steps`` steps run within ``epochs`` epochs of ceil(steps / epochs)."""
  niter = max(1, math.ceil(steps / epochs))
  return niter, epochs


def official_recipe_overrides(args) -> dict:
  """Our config fields set to mirror the official recipe on the small preset (dotted name -> value)."""
  niter, epochs = schedule_lengths(args.steps, args.epochs)
  o = {
    "method": "dinov2" if args.method == "dinov2_fork" else args.method,
    "seed": args.seed,
    "batch_size": args.batch_size,
    # Durations in epochs, turned into steps by training's own setup.durations (an epoch: num_train // batch_size
    # with num_train = niter * batch_size, see main).
    "total_steps": 0,
    "total_epochs": epochs,
    "warmup_steps": 0,
    "warmup_epochs": 1,  # warm-up 1 epoch
    "data.source": "digits",
    "data.num_global": 2,
    "data.num_local": args.num_local,
    "data.global_size": args.global_size,
    "data.local_size": args.local_size,
    "model.variant": f"Ti/{args.patch_size}",
    "model.img_size": args.global_size,
    "model.drop_path_rate": args.drop_path,
    "model.drop_path_uniform": False,  # DINO v1 / SimDINO: linear over depth (the v2 overrides set their own)
    "model.dtype": args.dtype,
    "head.hidden_dim": args.hidden_dim,
    "head.out_dim": args.out_dim,
    "head.num_layers": 3,
    "optim.lr": 5e-4,
    "optim.lr_scaling": "linear_256",
    "optim.min_lr": 1e-6,
    "optim.warmup_from_min_lr": False,
    "optim.weight_decay": 0.04,
    "optim.weight_decay_end": 0.4,
    "optim.clip_grad": 3.0,
    "optim.clip_mode": "per_tensor",
    "optim.layer_decay": 1.0,
    "optim.patch_embed_lr_mult": 1.0,
    "optim.b1": 0.9,
    "optim.b2": 0.999,
    "optim.adam_eps": 1e-8,
    "teacher.momentum": 0.996,
    "teacher.momentum_end": 1.0,
    "teacher.self_distillation": True,
  }
  if args.method == "simdino":
    o.update(
      {
        "loss.eps": math.sqrt(OFFICIAL_EPS),
        "loss.gamma_rule": "official",
        "loss.exclude_same_view": True,
        "loss.expansion": "mean",
        "loss.groups": 1,
        "loss.regularizer": "coding_rate",
        "optim.freeze_last_layer_epochs": 0.0,
      }
    )  # official --freeze_last_layer 1 is a no-op: no last layer
  if args.method in ("dino", "dinov2", "dinov2_fork"):
    o["head.num_prototypes"] = args.num_prototypes
  if args.method == "dino":
    o.update(
      {
        "head.norm_last_layer": True,
        "dino.student_temp": 0.1,
        "dino.teacher_temp": 0.07,
        "dino.warmup_teacher_temp": 0.04,
        "dino.warmup_teacher_temp_epochs": epochs,
        "dino.teacher_temp_per": "epoch",
        "dino.center_momentum": 0.9,
        "dino.centering": "centering",
        "dino.koleo_weight": 0.0,
        "optim.freeze_last_layer_epochs": 1.0,
      }
    )
  return o


RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")  # torchvision archs main_dino.py builds
# The fields of configs/dino_resnet50_in1k.py (DINO's README ResNet-50 command) a --arch resnet* run takes: the
# optimiser, its schedules' values, the crop scales and the teacher temperature (durations, batch and sizes stay the
# preset's).
RESNET_RECIPE_FIELDS = (
  "optim.name",
  "optim.momentum",
  "optim.lars_eta",
  "optim.lr",
  "optim.weight_decay",
  "optim.weight_decay_end",
  "data.global_scale",
  "data.local_scale",
  "dino.teacher_temp",
  "dino.warmup_teacher_temp",
  "dino.warmup_teacher_temp_epochs",
)


def resnet_recipe_overrides(args) -> dict:
  """--arch resnet*: our ResNet and the RESNET_RECIPE_FIELDS of configs/dino_resnet50_in1k.py (dotted -> value)."""
  import runpy  # pylint: disable=g-import-not-at-top

  recipe = runpy.run_path(os.path.join(ROOT, "configs", "dino_resnet50_in1k.py"))["get_config"]()
  out = {"model.arch": args.arch, "model.drop_path_rate": 0.0}
  for name in RESNET_RECIPE_FIELDS:
    node = recipe
    for part in name.split("."):
      node = node[part]
    out[name] = tuple(node) if isinstance(node, (list, tuple)) else node
  return out


def build_config(args, extra: dict | None = None):
  from simdino_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.base_config()
  arch = getattr(args, "arch", "vit")
  resnet = resnet_recipe_overrides(args) if arch != "vit" else {}
  for name, value in {**official_recipe_overrides(args), **resnet, **(extra or {})}.items():
    node = config
    *parents, leaf = name.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  config_lib.validate(config, num_devices=1)
  return config


def make_batches(setup, steps: int) -> list[dict]:
  """``steps`` batches of our pipeline's crops (numpy, our layout) of the config's source, with the setup's crops
  and patch size (the masks' grid)."""
  from simdino_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top

  config = setup.config
  masked = setup.method.uses_masks
  it = pipeline.train_iterator(
    sources.from_config(config.data, "train"),
    setup.multicrop,
    batch_size=config.batch_size,
    seed=config.seed,
    mask_patch_size=setup.patch_size if masked else 0,
    mask_probability=config.masking.probability,
    mask_ratio=tuple(config.masking.ratio),
    mask_min_patches=config.masking.min_num_patches,
  )
  keys = ("global", "local", "mask") if masked else ("global", "local")
  out = []
  try:
    for _ in range(steps):
      b = next(it)
      out.append({k: b[k] for k in keys})
  finally:
    if hasattr(it, "close"):
      it.close()
  return out


class Ours:
  """Training's own assembly and compiled step on one CPU device: ``setup.build`` (durations, schedules, network,
  optimiser, loss, initial state) and ``setup.make_step`` (shardings, donation, the packed mask gather), nothing
  rebuilt here. ``num_train`` sets the epoch: steps_per_epoch = num_train // batch_size, as in training."""

  def __init__(self, config, num_train: int):
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top

    from simdino_jax import sharding  # pylint: disable=g-import-not-at-top
    from simdino_jax.train import setup as setup_lib  # pylint: disable=g-import-not-at-top
    from simdino_jax.train.step import forward  # pylint: disable=g-import-not-at-top

    self.config = config
    self.setup = setup_lib.build(config, num_train)
    self.method = self.setup.method
    mesh = sharding.make_mesh(config.mesh)
    shardings = setup_lib.state_sharding(self.setup, mesh)
    self.state = setup_lib.init_state(self.setup, shardings)
    self._step = setup_lib.make_step(self.setup, mesh, shardings=shardings)  # donates the state, as training
    graphdef = self.setup.graphdef
    self._forward = jax.jit(
      lambda p, b, student: forward(nnx.merge(graphdef, p), b, key=None, student=student), static_argnums=2
    )
    self.draws: DropPathDraws | None = None  # --drop_path: the harness's keep masks (install_drop_path_draws)
    self.steps_done = 0
    self.flavor = "dinov2" if config.method in ("simdinov2", "dinov2") else "dino"
    self.heads = dict(head="dino_head", patch_head="ibot_head") if self.flavor == "dinov2" else dict(head="head")

  def step(self, batch: dict) -> dict:
    import jax  # pylint: disable=g-import-not-at-top

    if self.draws is not None:
      self.draws.begin("ours", self.steps_done)
    self.state, metrics = self._step(self.state, batch)
    self.steps_done += 1
    return {k: float(v) for k, v in jax.device_get(metrics).items()}

  def flat(self, which: str) -> dict:
    import numpy as np  # pylint: disable=g-import-not-at-top

    from simdino_jax.tree import named_leaves  # pylint: disable=g-import-not-at-top

    # Copies: the next step donates (frees) the state's buffers.
    return {k: np.array(v, copy=True) for k, v in named_leaves(getattr(self.state, which)).items()}

  def torch_state(self, which: str) -> dict:
    """The student's / teacher's parameters in official names and layouts (backbone + heads); for a ResNet also its
    BN running statistics (torchvision's state dict names, as the official state_dict() has them)."""
    from simdino_jax.io import torch_interop  # pylint: disable=g-import-not-at-top

    flat = self.flat(which)
    if self.config.model.get("arch", "vit") == "vit":
      return torch_interop.network_to_torch(flat, flavor=self.flavor, **self.heads)
    from simdino_jax.io import torchvision_resnet  # pylint: disable=g-import-not-at-top

    out = {f"backbone.{k}": v for k, v in torchvision_resnet.to_torchvision(flat).items()}
    head = {k: v for k, v in flat.items() if k.startswith("head/")}
    layers = torch_interop._head_layers(head, "head")  # pylint: disable=protected-access
    for name, a in head.items():
      tname, layout = torch_interop.head_torch_name(name[len("head/") :], layers)
      out[f"head.{tname}"] = a.reshape(-1, 1) if layout == "column" else torch_interop._to_torch_layout(a, layout)  # pylint: disable=protected-access
    return out

  def head_outputs(self, batch: dict, student: bool):
    """Head outputs of the step's forward in the official row order (crop-major: view v, image b -> row v*B + b);
    DINO heads: the logits."""
    import numpy as np  # pylint: disable=g-import-not-at-top

    params = self.state.student if student else self.state.teacher
    out = self._forward(params, {k: batch[k] for k in ("global", "local")}, student)["cls"]
    out = np.asarray(out["logits"] if isinstance(out, dict) else out)
    return out.transpose(1, 0, 2).reshape(-1, out.shape[-1])


def rel_diff(a, b) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top

  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  den = np.linalg.norm(b)
  num = np.linalg.norm(a - b)
  return float(num / den) if den > 0 else (0.0 if num == 0 else float("inf"))


def split_key_bias(state: dict) -> dict:
  """Leaves with each ``attn.qkv.bias`` split into its q / k / v thirds ("...qkv.bias[k]").

  The key bias gets no gradient in exact arithmetic (softmax over keys is invariant to q . b_k, the same for every
  key of a query), so its computed gradient is rounding noise, which Adam normalises into updates of about +-lr with
  a random sign on either side: the k third cannot agree between two implementations and is left out of the
  parity measure (``key_bias_rel_diff`` reports it); the q and v thirds are compared as any other leaf."""
  out = {}
  for k, v in state.items():
    if k.endswith("attn.qkv.bias"):
      third = v.shape[0] // 3
      for i, part in enumerate("qkv"):
        out[f"{k}[{part}]"] = v[i * third : (i + 1) * third]
    else:
      out[k] = v
  return out


def max_leaf_diff(ours: dict, theirs: dict, *, key_bias: bool = False) -> tuple[float, str]:
  """(max over leaves of ||ours - theirs|| / ||theirs||, the worst leaf); a leaf missing on one side is inf.
  Key biases (``split_key_bias``) are left out, or with ``key_bias`` the only leaves compared."""
  ours, theirs = split_key_bias(ours), split_key_bias(theirs)
  worst, name = 0.0, ""
  for k in sorted(set(ours) | set(theirs)):
    if k.endswith("[k]") != key_bias:
      continue
    d = rel_diff(ours[k], theirs[k]) if k in ours and k in theirs else float("inf")
    if d > worst or not name:
      worst, name = d, k
  return worst, name


BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def params_only(state: dict) -> dict:
  """A state dict without BatchNorm's running statistics (buffers)."""
  return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in BN_BUFFERS}


def update_rel_diff(ours: dict, theirs: dict, init: dict) -> float:
  """||(ours - init) - (theirs - init)|| / ||theirs - init|| over all leaves together (key biases left out): how well
  the whole training update agrees, insensitive to one odd element of a leaf that is still near zero."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  ours, theirs, init = split_key_bias(ours), split_key_bias(theirs), split_key_bias(init)
  num = den = 0.0
  for k in theirs:
    if k.endswith("[k]") or k not in ours or k not in init:
      continue
    b = np.asarray(theirs[k], np.float64) - np.asarray(init[k], np.float64)
    num += float(np.sum(np.square(np.asarray(ours[k], np.float64) - np.asarray(theirs[k], np.float64))))
    den += float(np.sum(np.square(b)))
  return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else float("inf"))


def to_official_loss(method: str, loss: float) -> float:
  """Our loss in the official convention: SimDINO's -coeff cos = coeff (1/2||t - s||^2 - 1) with coeff = 1."""
  return loss - 1.0 if method == "simdino" else loss


def from_official_loss(method: str, loss: float) -> float:
  """The official loss in our convention (inverse of ``to_official_loss``)."""
  return loss + 1.0 if method == "simdino" else loss


def loss_agreement(ours: list, official: list) -> dict:
  """Per-step agreement of two loss curves in one convention: step 0's and the worst relative difference, and the
  worst absolute difference (the relative one depends on the convention's constant offset; the absolute does not)."""
  n = min(len(ours), len(official))
  rel = [rel_diff(ours[i], official[i]) for i in range(n)]
  return {
    "step0_rel_diff": rel[0] if rel else None,
    "max_loss_rel_diff": max(rel) if rel else None,
    "max_loss_abs_diff": max(abs(ours[i] - official[i]) for i in range(n)) if n else None,
  }


# ---- stochastic depth: the same draws on both sides -----------------------------------------------------------
class DropPathDraws:
  """The per-sample keep masks of stochastic depth, the same on both sides (--drop_path > 0).

  Draw j of the student's forward at step t on a crop group of n = V * B samples (one group per resolution) is
  ``keep(t, n, j)``: seeded by (seed, t, n, j), n booleans in the official (crop-major, row v * B + b) order. Both
  sides number their draws per group in the order their code makes them (block 0 attention, block 0 MLP, block 1
  ...; blocks at rate 0 make none on either side), and every draw records its keep probability, so a draw that the
  two sides make with different rates is an error, not a silent mismatch.

  Ours: ``simdino_jax.models.vit.drop_path_factors`` is replaced by a ``jax.pure_callback`` serving keep / keep_prob
  in our (image-major, row b * V + v) order; the draw's index is fixed when the step is traced. Official: the
  official ``drop_path`` is untouched; the ``torch.rand`` it calls (v1) returns 1 - keep_prob / 2 for a kept sample
  and 0 for a dropped one, so its ``floor(keep_prob + rand)`` is exactly the mask (``torch_rand``)."""

  def __init__(self, seed: int, batch: int, draws_per_group: int):
    self.seed, self.batch, self.draws_per_group = seed, batch, draws_per_group
    self.keep_probs: dict = {}
    self.step = {"ours": 0, "official": 0}
    self.count: dict = {"ours": {}, "official": {}}
    self.used = {"ours": 0, "official": 0}

  def begin(self, side: str, step: int) -> None:
    self.step[side] = step
    self.count[side] = {}

  def keep(self, side: str, step: int, n: int, j: int, keep_prob: float):
    import numpy as np  # pylint: disable=g-import-not-at-top

    seen = self.keep_probs.setdefault((step, n, j), keep_prob)
    if abs(seen - keep_prob) > 1e-6:  # torch.linspace's float32 rates vs our float64 ones
      raise RuntimeError(
        f"drop path draw {j} on {n} samples at step {step}: keep probability {keep_prob} ({side}) "
        f"vs {seen} on the other side (the two networks' drop-path rates differ)"
      )
    self.used[side] += 1
    return np.random.default_rng([self.seed, step, n, j]).random(n) < keep_prob

  def next_official(self, n: int, keep_prob: float):
    j = self.count["official"].get(n, 0)
    self.count["official"][n] = j + 1
    return self.keep("official", self.step["official"], n, j, keep_prob)

  def ours_factors(self, key, keep_prob: float, batch: int):
    """The replacement of vit.drop_path_factors (traced; the draw index is a trace-time constant)."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    del key
    # Modulo the draws of one forward: a re-trace numbers its draws from 0 again.
    j = self.count["ours"].get(batch, 0) % self.draws_per_group
    self.count["ours"][batch] = j + 1
    views = batch // self.batch

    def host():
      keep = self.keep("ours", self.step["ours"], batch, j, keep_prob)
      keep = keep.reshape(views, self.batch).T.reshape(-1)  # crop-major -> image-major rows
      return (keep.astype(np.float32) / np.float32(keep_prob)).astype(np.float32)

    return jax.pure_callback(host, jax.ShapeDtypeStruct((batch,), np.float32))

  def torch_rand(self, original):
    """torch.rand for the official drop_path (called from a function named drop_path with (n, 1, ...) shapes);
    any other call goes to ``original``."""
    import torch  # pylint: disable=g-import-not-at-top

    def rand(*size, **kwargs):
      frame = sys._getframe(1)  # pylint: disable=protected-access
      if frame.f_code.co_name != "drop_path" or "keep_prob" not in frame.f_locals:
        return original(*size, **kwargs)
      shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
      keep_prob = float(frame.f_locals["keep_prob"])
      keep = torch.from_numpy(self.next_official(shape[0], keep_prob))
      r = torch.where(keep, torch.tensor(1.0 - keep_prob / 2), torch.tensor(0.0))
      return r.to(kwargs.get("dtype") or torch.float32).reshape(shape)

    return rand


def install_drop_path_draws(config, draws_per_group: int) -> DropPathDraws | None:
  """With config.model.drop_path_rate > 0: our drop_path_factors served by a DropPathDraws (returned); else None."""
  if config.model.drop_path_rate <= 0:
    return None
  from simdino_jax.models import vit  # pylint: disable=g-import-not-at-top

  draws = DropPathDraws(config.seed, config.batch_size, draws_per_group)
  vit.drop_path_factors = draws.ours_factors
  return draws


# ---- the official side (SimDINO v1, DINO v1) ----------------------------------------------------------------------
def _extract(path: str, names: tuple, namespace: dict) -> dict:
  """Compile the top-level definitions ``names`` of an official file alone (its other imports never run)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  nodes = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in names]
  missing = set(names) - {n.name for n in nodes}
  if missing:
    raise SystemExit(f"official_parity.py: error: {path} defines no {sorted(missing)} (not the expected clone?)")
  exec(compile(ast.Module(body=nodes, type_ignores=[]), path, "exec"), namespace)  # pylint: disable=exec-used
  return namespace


class _Epoch:
  """One epoch of the official data loader: ``len`` is the full epoch (train_one_epoch's global iteration index is
  len(data_loader) * epoch + it), iteration yields (crops, label) for the batches of this run."""

  def __init__(self, batches, length):
    self.batches, self.length = batches, length

  def __len__(self):
    return self.length

  def __iter__(self):
    return iter([(b, None) for b in self.batches])


def to_official_images(batch: dict, torch) -> list:
  """Our batch -> the official crop list: NCHW float32 tensors, the global crops first."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  crops = [batch["global"][:, i] for i in range(batch["global"].shape[1])]
  crops += [batch["local"][:, i] for i in range(batch["local"].shape[1])]
  return [torch.from_numpy(np.ascontiguousarray(c.transpose(0, 3, 1, 2), dtype=np.float32)) for c in crops]


def run_official_v1(
  method,
  config,
  student_sd,
  teacher_sd,
  batches,
  steps,
  official_repo,
  threads,
  *,
  epochs,
  niter,
  ours: Ours | None = None,
  draws: DropPathDraws | None = None,
  float64: bool = False,
) -> dict:
  """SimDINO v1 / DINO v1 from the clone: the official objects and train_one_epoch, from our weights.

  With ``ours``, runs lockstep (see the module docstring) and adds "lockstep" (per-step comparisons) and
  "step0_forward" (output differences at step 0) to the result."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.distributed as dist  # pylint: disable=g-import-not-at-top
  import torch.distributed.nn as dist_nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  src = os.path.join(official_repo, "simdino") if method == "simdino" else official_repo
  sys.path.insert(0, src)
  import utils  # pylint: disable=g-import-not-at-top,import-error  # the official utils.py
  import vision_transformer as vits  # pylint: disable=g-import-not-at-top,import-error

  torch.set_num_threads(threads)
  patches = []
  if not dist.is_initialized():
    rendezvous = tempfile.NamedTemporaryFile(prefix="parity_gloo_", delete=False).name
    os.remove(rendezvous)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
  patches.append(
    "torch.distributed: single-process gloo group (world size 1) for DINOLoss.update_center's "
    "all_reduce / get_world_size and MCRLoss's dist.is_initialized() (N = 1)"
  )
  torch.Tensor.cuda = lambda self, *a, **k: self
  torch.cuda.synchronize = lambda *a, **k: None
  patches.append("torch.Tensor.cuda -> identity, torch.cuda.synchronize -> no-op (train_one_epoch's GPU moves)")
  utils.SmoothedValue.synchronize_between_processes = lambda self: None
  patches.append("utils.SmoothedValue.synchronize_between_processes -> no-op (builds a CUDA tensor; logging only)")

  h = config.head
  p = int(config.model.variant.split("/")[1])
  o = config.optim

  arch = config.model.get("arch", "vit")
  if arch != "vit":
    # torchvision as main_dino.py imports it; its _meta_registrations module fails on this torch build and only
    # registers meta kernels (docs: PITFALLS), so it is stubbed.
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    from torchvision import models as torchvision_models  # pylint: disable=g-import-not-at-top

    patches.append(
      "--arch resnet*: nn.SyncBatchNorm.convert_sync_batchnorm not applied and the teacher not DDP-wrapped (torch "
      "refuses SyncBN on CPU tensors; with world size 1 SyncBN computes BatchNorm2d's statistics)"
    )

  def network(student: bool):
    # The official teacher is built without drop path (main_dino.py: no drop_path_rate argument).
    rate = float(config.model.drop_path_rate) if student else 0.0
    if arch != "vit":  # main_dino.py: torchvision_models.__dict__[args.arch](), embed_dim = fc's input width
      backbone = torchvision_models.__dict__[arch]()
      backbone.embed_dim = backbone.fc.weight.shape[1]
    else:
      backbone = vits.vit_tiny(patch_size=p, drop_path_rate=rate, img_size=[config.data.global_size])
    if method == "simdino":
      head = vits.DINOHead(backbone.embed_dim, h.num_prototypes, hidden_dim=h.hidden_dim, bottleneck_dim=h.out_dim)
    elif student:
      head = vits.DINOHead(
        backbone.embed_dim,
        h.num_prototypes,
        use_bn=False,
        norm_last_layer=h.norm_last_layer,
        hidden_dim=h.hidden_dim,
        bottleneck_dim=h.out_dim,
      )
    else:
      head = vits.DINOHead(
        backbone.embed_dim, h.num_prototypes, False, hidden_dim=h.hidden_dim, bottleneck_dim=h.out_dim
      )
    return utils.MultiCropWrapper(backbone, head)

  student, teacher = network(True), network(False)
  if float64:  # --float64: the official networks (before our float64 weights load), loss and images in double
    student.double()
    teacher.double()
  student.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in student_sd.items()}, strict=True)
  teacher.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in teacher_sd.items()}, strict=True)
  for param in teacher.parameters():
    param.requires_grad = False

  class DDPLike(nn.Module):  # what train_one_epoch reads off its DDP-wrapped student: .module, "module." names
    def __init__(self, module):
      super().__init__()
      self.module = module

    def forward(self, x):
      return self.module(x)

  student_ddp = DDPLike(student)
  patches.append("student wrapped in a module exposing .module (DDP's attribute and 'module.' names), no DDP")

  ncrops = config.data.num_global + config.data.num_local
  main_dino = os.path.join(src, "main_dino.py")
  ns = {
    "torch": torch,
    "nn": nn,
    "F": F,
    "dist": dist,
    "dist_nn": dist_nn,
    "np": np,
    "math": math,
    "sys": sys,
    "utils": utils,
    "wandb": types.SimpleNamespace(log=lambda *a, **k: None),
    # utils.setup_for_distributed's print (force=): train_one_epoch's "Loss is nan, stopping training" line
    "print": lambda *a, force=False, **k: print(*a, **k),
  }
  loss_name = "MCRLoss" if method == "simdino" else "DINOLoss"
  _extract(main_dino, ("train_one_epoch", loss_name), ns)
  if method == "simdino":
    # official eps = paper eps**2; gamma_code = 1/p + 1/(N B) is built in; coeff 1; expa_type 1 = expansion "mean".
    loss_module = ns["MCRLoss"](ncrops, 0, 1 if config.loss.expansion == "mean" else 0, config.loss.eps**2, 1.0)
  else:
    d = config.dino
    loss_module = ns["DINOLoss"](
      h.num_prototypes,
      ncrops,
      d.warmup_teacher_temp,
      d.teacher_temp,
      d.warmup_teacher_temp_epochs,
      epochs,
      student_temp=d.student_temp,
      center_momentum=d.center_momentum,
    )
  params_groups = utils.get_params_groups(student_ddp)
  if o.name == "sgd":  # main_dino.py's --optimizer branches
    optimizer = torch.optim.SGD(params_groups, lr=0, momentum=0.9)  # lr is set by scheduler
  elif o.name == "lars":
    optimizer = utils.LARS(params_groups)  # to use with convnet and large batches
  elif method == "simdino":
    optimizer = torch.optim.AdamW(params_groups, fused=True)
  else:
    optimizer = torch.optim.AdamW(params_groups)
  lr_schedule = utils.cosine_scheduler(o.lr * config.batch_size / 256.0, o.min_lr, epochs, niter, warmup_epochs=1)
  wd_schedule = utils.cosine_scheduler(o.weight_decay, o.weight_decay_end, epochs, niter)
  momentum_schedule = utils.cosine_scheduler(config.teacher.momentum, 1, epochs, niter)
  freeze_last_layer = int(round(o.freeze_last_layer_epochs)) if method == "dino" else 1
  args = types.SimpleNamespace(
    epochs=epochs,
    clip_grad=o.clip_grad,
    freeze_last_layer=freeze_last_layer,
    use_simdino=method == "simdino",
    enable_logging=False,
  )

  if float64:
    loss_module.double()
    patches.append("--float64: student, teacher, loss module (its centre) and images cast to torch.float64")
  images = [to_official_images(b, torch) for b in batches[:steps]]
  if float64:
    images = [[c.double() for c in crops] for crops in images]
  result = {"patches": patches, "official_commit": git_commit(official_repo), "losses": []}

  def named(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}

  if ours is not None:  # step-0 forward check on the first batch, before anything trains
    # A ResNet: our step's forward uses the batch statistics, so train mode, with the running statistics restored
    # afterwards (deepcopy refuses weight_norm modules); a ViT: eval mode, deterministic (no drop path).
    saved = [(b, b.clone()) for net in (student, teacher) for b in net.buffers()]
    student.train(arch != "vit")
    teacher.train(arch != "vit")
    with torch.no_grad():
      s_off = student(images[0]).numpy()
      t_off = teacher(images[0][: config.data.num_global]).numpy()
      for b, copy in saved:
        b.copy_(copy)
    result["step0_forward"] = {
      "student_rel_diff": rel_diff(ours.head_outputs(batches[0], True), s_off),
      "teacher_rel_diff": rel_diff(ours.head_outputs(batches[0], False), t_off),
    }
  lockstep = []

  class Recording(nn.Module):
    """The official loss module, unchanged; records each step's loss and runs the lockstep comparison first."""

    def __init__(self, inner):
      super().__init__()
      self.inner = inner

    def forward(self, *a):
      t = len(result["losses"])
      if ours is not None:
        row = {"step": t}
        # Parameters only: the official BN running statistics already hold this step's forward (the loss comes
        # after it), ours not yet; they are compared after the run.
        s_diff, s_leaf = max_leaf_diff(*(params_only(x) for x in (ours.torch_state("student"), named(student))))
        t_diff, t_leaf = max_leaf_diff(*(params_only(x) for x in (ours.torch_state("teacher"), named(teacher))))
        row.update(
          student_param_rel_diff=s_diff, student_worst=s_leaf, teacher_param_rel_diff=t_diff, teacher_worst=t_leaf
        )
        if method == "dino":
          row["center_rel_diff"] = rel_diff(np.asarray(ours.state.loss_state["center"]), self.inner.center.numpy())
        metrics = ours.step(batches[t])
        epoch = t // niter
        row.update(
          loss_ours=to_official_loss(method, metrics["loss"]),
          loss_ours_native=metrics["loss"],
          lr_ours=metrics["lr"],
          lr_official=float(optimizer.param_groups[0]["lr"]),
          wd_ours=metrics["wd"],
          wd_official=float(optimizer.param_groups[0]["weight_decay"]),
          momentum_ours=metrics["momentum"],
          momentum_official=float(momentum_schedule[t]),
        )
        if method == "dino":
          row.update(
            teacher_temp_ours=metrics.get("teacher_temp", float("nan")),
            teacher_temp_official=float(self.inner.teacher_temp_schedule[epoch]),
          )
        lockstep.append(row)
      out = self.inner(*a)
      result["losses"].append(float((out[0] if isinstance(out, tuple) else out).item()))
      if draws is not None:  # the next student forward is the next step's
        draws.begin("official", len(result["losses"]))
      if ours is not None:
        lockstep[-1]["loss_official"] = result["losses"][-1]
      return out

  recording = Recording(loss_module)
  patches.append("loss module wrapped to record each loss and run the lockstep comparison (values unchanged)")
  student_ddp.train()
  teacher.train()
  fp16_scaler = None
  if config.model.dtype == "bfloat16":
    # The official mixed-precision path (--use_fp16: autocast around the forward and the loss, the scaler's
    # backward / unscale / step) on CPU in bfloat16: torch.cuda.amp.autocast(enabled) -> torch.autocast("cpu",
    # bfloat16, enabled), and a disabled GradScaler (bfloat16 needs no loss scaling; its calls pass through).
    torch.cuda.amp.autocast = lambda enabled=True, *a, **k: torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)
    fp16_scaler = torch.amp.GradScaler("cpu", enabled=False)
    patches.append(
      "bfloat16: torch.cuda.amp.autocast(enabled) -> torch.autocast('cpu', bfloat16, enabled); fp16_scaler = a "
      "disabled torch.amp.GradScaler('cpu') (train_one_epoch's --use_fp16 branch, no loss scaling)"
    )
  if draws is not None:
    torch.rand = draws.torch_rand(torch.rand)
    patches.append(
      "torch.rand, when called by the official drop_path: 1 - keep_prob/2 (kept) or 0 (dropped) per sample, from "
      "the harness's keep masks (the official formula floor(keep_prob + rand) unchanged)"
    )
  with contextlib.redirect_stdout(sys.stderr):  # the official MetricLogger prints; stdout keeps the JSON line
    for epoch in range(epochs):
      chunk = images[epoch * niter : (epoch + 1) * niter]
      if not chunk:
        break
      ns["train_one_epoch"](
        student_ddp,
        teacher,
        teacher,
        recording,
        _Epoch(chunk, niter),
        optimizer,
        lr_schedule,
        wd_schedule,
        momentum_schedule,
        epoch,
        fp16_scaler,
        args,
      )
  result["student"], result["teacher"] = named(student), named(teacher)
  if ours is not None:
    result["lockstep"] = lockstep
  return result


# ---- driver -------------------------------------------------------------------------------------------------------
def first_divergence(lockstep: list, method: str) -> dict | None:
  """The first step where a lockstep quantity leaves its tolerance, with the worst leaf and the values."""
  for row in lockstep:
    t = row["step"]
    checks = [
      (key, rel_diff(row[f"{key}_ours"], row[f"{key}_official"]), 1e-6)
      for key in ("lr", "wd", "momentum", "teacher_temp")
      if f"{key}_ours" in row
    ]
    if "center_rel_diff" in row:
      checks.append(("center (before the step)", row["center_rel_diff"], PARAM_TOL))
    if "student_param_rel_diff" in row:
      checks += [
        ("student params (before the step)", row["student_param_rel_diff"], PARAM_TOL),
        ("teacher params (before the step)", row["teacher_param_rel_diff"], PARAM_TOL),
      ]
    checks.append(
      ("loss", rel_diff(row["loss_ours"], row.get("loss_official", float("nan"))), STEP0_TOL if t == 0 else LOSS_TOL)
    )
    for name, value, tol in checks:
      if not value <= tol:
        out = {"step": t, "quantity": name, "rel_diff": value, "tolerance": tol}
        if name.startswith("student"):
          out["worst_leaf"] = row["student_worst"]
        if name.startswith("teacher params"):
          out["worst_leaf"] = row["teacher_worst"]
        out["why"] = explain(name, out.get("worst_leaf", ""), t, row, method)
        return out
  return None


def explain(quantity: str, leaf: str, step: int, row: dict, method: str) -> str:
  """A first diagnosis from where the divergence shows (the report gives the verified root causes)."""
  if quantity in ("lr", "wd", "momentum", "teacher_temp"):
    return f"schedule mismatch: ours {row.get(quantity + '_ours')} vs official {row.get(quantity + '_official')}"
  if "last_layer" in leaf:
    return (
      "the prototype layer: its Adam moments / step count or the freeze differ (official: grad=None while "
      "frozen, so torch.optim.AdamW neither updates its moments nor counts the step)"
    )
  if quantity.startswith("center"):
    return "the DINO centre update differs"
  if quantity == "loss" and "student_param_rel_diff" not in row:
    return "the loss differs (this method's parameters are compared at the end only)"
  if quantity == "loss":
    return "the loss differs while the parameters entering it agree: a loss-term difference"
  return f"parameters drift first at {leaf}"


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--method", choices=METHODS, default="simdino")
  parser.add_argument(
    "--official_repo",
    default=None,
    help="clone of the official repository for --method (SimDINO, dino or dinov2), or a folder "
    "holding SimDINO/, dino/, dinov2/",
  )
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (torch.set_num_threads)")
  parser.add_argument("--epochs", type=int, default=2, help="schedule length in epochs of ceil(steps/epochs) steps")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--num_local", type=int, default=4)
  parser.add_argument("--global_size", type=int, default=32)
  parser.add_argument("--local_size", type=int, default=16)
  parser.add_argument("--patch_size", type=int, default=4)
  parser.add_argument("--hidden_dim", type=int, default=2048)
  parser.add_argument("--out_dim", type=int, default=256)
  parser.add_argument("--num_prototypes", type=int, default=4096)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--arch",
    choices=("vit",) + RESNET_ARCHS,
    default="vit",
    help="dino: a torchvision ResNet on both sides (main_dino.py --arch resnet50) with configs/dino_resnet50_in1k.py's "
    "optimiser (SGD), schedules' values, crop scales and teacher temperature; BN running statistics compared too",
  )
  parser.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="bfloat16 (dino; simdino's official loss is not finite under bfloat16 autocast): our model.dtype "
    "bfloat16 against the official mixed-precision branch under torch.autocast('cpu', bfloat16); compared within "
    "BF16_LOSS_TOL / BF16_UPDATE_TOL, not the float32 goals",
  )
  parser.add_argument(
    "--drop_path",
    type=float,
    default=0.0,
    help="student drop-path rate (simdino, dino: linear over depth, as the official --drop_path_rate); both sides "
    "get the same per-sample keep masks (DropPathDraws)",
  )
  parser.add_argument(
    "--dump",
    default="",
    help="write both sides' final student / teacher parameters (official "
    "names) to this .npz, for looking into a divergence",
  )
  parser.add_argument(
    "--float64",
    action="store_true",
    help="diagnostic: both sides in double precision (ours: jax x64 with jnp.float32 mapped to float64 before "
    "simdino_jax is imported; official: .double()), to tell float32 rounding from a semantic difference",
  )
  parser.add_argument(
    "--official_float32_vs_float64",
    action="store_true",
    help="diagnostic (dino): the OFFICIAL trainer alone, run twice from our initial weights on our batches, in "
    "float32 and in float64; reports how far its own float32 run ends from its float64 run (the float32 bound)",
  )
  args = parser.parse_args(argv)
  if args.official_float32_vs_float64 and (args.method != "dino" or args.float64 or args.dtype != "float32"):
    error("--official_float32_vs_float64: implemented for --method dino without --float64 / --dtype")
  if args.float64 and (args.method != "dino" or args.dtype != "float32" or args.drop_path > 0):
    error("--float64: implemented for --method dino in float32 without --drop_path")
  if args.arch != "vit" and (args.method != "dino" or args.drop_path > 0 or args.dtype != "float32"):
    error(f"--arch {args.arch}: implemented for --method dino in float32 without --drop_path")
  repo = resolve_repo(args.method, args.official_repo)
  if args.steps < 1:
    error(f"--steps must be >= 1, got {args.steps}")

  start = time.time()
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_default_matmul_precision", "highest")  # float32 parity: no reduced-precision passes
  if args.float64:
    enable_float64()
  import numpy as np  # pylint: disable=g-import-not-at-top

  v2 = None
  extra = {}
  if args.method in V2_METHODS:
    try:
      sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
      import _parity_official_v2 as v2  # pylint: disable=g-import-not-at-top,import-error
    except ImportError as e:
      error(
        f"--method {args.method}: the official side lives in benchmarks/_parity_official_v2.py, which could not "
        f"be imported ({e})"
      )
    extra = dict(getattr(v2, "OUR_OVERRIDES", {}).get(args.method, {}))
  niter, epochs = schedule_lengths(args.steps, args.epochs)
  config = build_config(args, extra)
  if args.dtype != "float32" and v2 is not None:
    error(f"--dtype {args.dtype}: not implemented for --method {args.method} (simdino and dino only)")
  draws = None
  if args.drop_path > 0:
    if v2 is not None:
      error(f"--drop_path: not implemented for --method {args.method} (simdino and dino only)")
    from simdino_jax.models.vit import parse_variant  # pylint: disable=g-import-not-at-top

    depth = config.model.depth or parse_variant(config.model.variant)["depth"]
    rates = [args.drop_path] * depth if config.model.drop_path_uniform else np.linspace(0.0, args.drop_path, depth)
    draws = install_drop_path_draws(config, 2 * sum(1 for r in rates if r > 0))
  ours = Ours(config, num_train=niter * config.batch_size)
  ours.draws = draws
  batches = make_batches(ours.setup, args.steps)
  student_sd, teacher_sd = ours.torch_state("student"), ours.torch_state("teacher")

  if args.official_float32_vs_float64:
    runs = {}
    for wide in (False, True):
      runs[wide] = run_official_v1(
        args.method, config, student_sd, teacher_sd, batches, args.steps, repo, args.threads,
        epochs=epochs, niter=niter, float64=wide,
      )  # fmt: skip
    out = {"method": args.method, "steps": args.steps, "arch": args.arch, "compared": "official float32 vs float64"}
    out.update(loss_agreement(runs[False]["losses"], runs[True]["losses"]))
    for which, init in (("student", student_sd), ("teacher", teacher_sd)):
      f32, f64 = runs[False][which], runs[True][which]
      out[f"{which}_param_rel_diff"], out[f"{which}_worst_leaf"] = max_leaf_diff(params_only(f32), params_only(f64))
      out[f"{which}_update_rel_diff"] = update_rel_diff(params_only(f32), params_only(f64), params_only(init))
      stats = [k for k in f64 if k.rsplit(".", 1)[-1] in BN_BUFFERS]
      if stats:
        out[f"{which}_bn_stats_rel_diff"] = max_leaf_diff({k: f32[k] for k in stats}, {k: f64[k] for k in stats})[0]
    out["losses_float32"], out["losses_float64"] = runs[False]["losses"], runs[True]["losses"]
    out["seconds"] = round(time.time() - start, 1)
    print(json.dumps(out), flush=True)
    return out
  if v2 is None:
    off = run_official_v1(
      args.method,
      config,
      student_sd,
      teacher_sd,
      batches,
      args.steps,
      repo,
      args.threads,
      epochs=epochs,
      niter=niter,
      ours=ours,
      draws=draws,
      float64=args.float64,
    )
    lockstep = off.pop("lockstep")
    losses_ours = [row["loss_ours"] for row in lockstep]
    native_ours = [row["loss_ours_native"] for row in lockstep]
    native_official = [from_official_loss(args.method, x) for x in off["losses"]]
    step0_forward = off.get("step0_forward")
  else:
    import inspect  # pylint: disable=g-import-not-at-top

    run = getattr(v2, "run_official", None)
    if run is None:
      error(f"--method {args.method}: benchmarks/_parity_official_v2.py defines no run_official")
    # The helper's durations in epochs must use our steps per epoch (it accepts them as a keyword, if at all).
    kw = {"steps_per_epoch": niter} if "steps_per_epoch" in inspect.signature(run).parameters else {}
    try:
      with contextlib.redirect_stdout(sys.stderr):  # the official code prints; stdout keeps the one JSON line
        off = run(args.method, config, student_sd, teacher_sd, batches, args.steps, repo, args.threads, **kw)
    except NotImplementedError as e:
      error(f"--method {args.method}: benchmarks/_parity_official_v2.run_official is not implemented yet ({e})")
    # Ours after the official run (not lockstep): the official side returns its per-step schedules, compared here.
    lockstep, step0_forward, losses_ours = [], None, []
    for t, b in enumerate(batches):
      metrics = ours.step(b)
      losses_ours.append(metrics["loss"])  # the v2 side reports its losses in our convention (its loss_offsets)
      row = {"step": t, "loss_ours": metrics["loss"], "loss_official": off["losses"][t]}
      for key in ("lr", "wd", "momentum", "teacher_temp"):
        if key in metrics and key in off and t < len(off[key]):
          row[f"{key}_ours"], row[f"{key}_official"] = metrics[key], off[key][t]
      lockstep.append(row)

  if args.dump:
    np.savez(
      args.dump,
      **{
        f"{side}/{which}/{k}": v
        for which in ("student", "teacher")
        for side, sd in (("ours", ours.torch_state(which)), ("official", off[which]))
        for k, v in sd.items()
      },
    )
  student_diff, student_leaf = max_leaf_diff(ours.torch_state("student"), off["student"])
  teacher_diff, teacher_leaf = max_leaf_diff(ours.torch_state("teacher"), off["teacher"])
  key_bias_diff = max_leaf_diff(ours.torch_state("student"), off["student"], key_bias=True)[0]
  bn_stats = {}  # a ResNet's BN running statistics alone (they are in the parameter figures above too)
  for which in ("student", "teacher"):
    mine, theirs = ours.torch_state(which), off[which]
    stats = [k for k in theirs if k.rsplit(".", 1)[-1] in BN_BUFFERS]
    if stats:
      bn_stats[which] = max_leaf_diff({k: mine.get(k) for k in stats if k in mine}, {k: theirs[k] for k in stats})
  student_update = update_rel_diff(ours.torch_state("student"), off["student"], student_sd)
  teacher_update = update_rel_diff(ours.torch_state("teacher"), off["teacher"], teacher_sd)
  losses_official = off["losses"]
  if v2 is not None:
    native_ours, native_official = list(losses_ours), list(off["losses"])  # the v2 side returns ours as "losses"
  if off.get("losses_raw") is not None and off.get("loss_offsets") is not None:
    # simdinov2 in the official convention: ours - (1 + masked crops / (Mg B)) against the raw official values.
    losses_ours = [x - o for x, o in zip(losses_ours, off["loss_offsets"])]
    losses_official = off["losses_raw"]
  # Both conventions: the official one's constant offsets (SimDINO: -1; v2: -(1 + masked / (Mg B))) enlarge the
  # denominator, so its relative differences look ~10x smaller than ours on the same two runs.
  official_conv = loss_agreement(losses_ours, losses_official)
  our_conv = {
    "losses_ours": native_ours,
    "losses_official": native_official,
    **loss_agreement(native_ours, native_official),
  }
  out = {
    "method": args.method,
    "steps": args.steps,
    "official_repo": repo,
    "official_commit": git_commit(repo),
    "losses_ours": losses_ours,
    "losses_official": losses_official,
    **official_conv,  # step0_rel_diff, max_loss_rel_diff, max_loss_abs_diff in the official convention
    "our_convention": our_conv,
    "student_param_rel_diff": student_diff,
    "student_worst_leaf": student_leaf,
    "teacher_param_rel_diff": teacher_diff,
    "teacher_worst_leaf": teacher_leaf,
    "key_bias_rel_diff": key_bias_diff,  # student attn key biases, left out above (split_key_bias)
    # --arch resnet*: max over the BN running_mean / running_var / num_batches_tracked leaves, and the worst one
    "bn_stats_rel_diff": {k: {"max": v[0], "worst": v[1]} for k, v in bn_stats.items()} or None,
    "student_update_rel_diff": student_update,
    "teacher_update_rel_diff": teacher_update,
    "step0_forward": step0_forward,
    "patches": off["patches"],
    # --drop_path: the rate and how many keep masks each side drew (equal counts: the same masks on both sides)
    "drop_path": {"rate": args.drop_path, **draws.used} if draws is not None else None,
    "preset": {
      "variant": config.model.variant if args.arch == "vit" else args.arch,
      "optimizer": config.optim.name,
      "batch_size": config.batch_size,
      "crops": f"{config.data.num_global}x{config.data.global_size} + {config.data.num_local}x{config.data.local_size}",
      "head": f"{config.head.hidden_dim}/{config.head.out_dim}",
      "epochs": epochs,
      "niter_per_ep": niter,
      "dtype": "float64 (--float64)" if args.float64 else config.model.dtype,
      "prototypes": config.head.num_prototypes if ours.method.prototypes else None,
    },
  }
  if lockstep and "student_param_rel_diff" in lockstep[0]:  # after 0, 1, ... updates (key biases left out)
    out["student_param_rel_diff_per_step"] = [row["student_param_rel_diff"] for row in lockstep]
  if off.get("notes"):
    out["official_notes"] = off["notes"]
  div = first_divergence(lockstep, args.method) if lockstep else None
  goals = (
    out["step0_rel_diff"] is not None
    and out["step0_rel_diff"] <= STEP0_TOL
    and out["max_loss_rel_diff"] <= LOSS_TOL
    and student_diff <= PARAM_TOL
    and teacher_diff <= PARAM_TOL
    and len(losses_official) == args.steps
  )
  if step0_forward:  # the official forward on our initial weights gives our head outputs (before any training)
    goals = goals and max(step0_forward.values()) <= FORWARD_TOL
  if args.dtype == "bfloat16":  # two different roundings of the same computation: the bfloat16 bounds instead
    goals = (
      len(losses_official) == args.steps
      and out["max_loss_rel_diff"] <= BF16_LOSS_TOL
      and out["our_convention"]["max_loss_rel_diff"] <= BF16_LOSS_TOL
      and student_update <= BF16_UPDATE_TOL
    )
  out["parity"] = bool(goals)
  if not goals:
    out["first_divergence"] = div or {"quantity": "final parameters or losses", "why": "see the *_rel_diff fields"}
  elif div is not None:
    # Parity reached, but a lockstep quantity left its tolerance on the way: early in training, leaves that start
    # at zero (biases) hold a few Adam updates of +-lr whose direction m/sqrt(v) is ill-conditioned for the odd
    # element whose successive gradients nearly cancel, so one element can weigh a lot in a tiny norm; it fades as
    # the leaf grows. Reported, not a failure.
    out["lockstep_transient"] = div
  out["seconds"] = round(time.time() - start, 1)
  print(json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main()
