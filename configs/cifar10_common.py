r"""The CIFAR-10 recipe shared by every configs/cifar10_<method>.py: a small ViT on 32x32 images, sized for CPU.

Not meant to be run by itself (it is the SimDINO variant without its docstring); run a method's file, e.g.

  python -m simdino_jax.train --config=configs/cifar10_simdino.py --workdir=/tmp/cifar10_simdino

with the data given by the environment variable SIMDINO_CIFAR10 (or as the config argument,
``--config=configs/cifar10_simdino.py:/path/to/cifar10.tar``; the argument wins): an image-folder tar with train/
(50,000) and test/ (10,000) splits of 10 classes, made by

  launch/prepare_data.sh cifar10 https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz /path/to/cifar10.tar

A relative path is read from the working directory. Without either, training stops before compiling with that
instruction.

Each cifar10_<method>.py loads this file by path, sets its method and changes only what that method's ImageNet
recipe changes (the v2 files: registers, LayerScale, masks, layer decay; the DINO files: head and temperatures), so
the six variants share data, backbone size, image budget and optimiser and can be compared with each other. One
exception, argued in its file: cifar10_simdino.py takes SimDINOv2's backbone settings (dinov2_backbone below) and
spends the 64,000 images in 2000 steps of 32; cifar10_simdino_shared.py is SimDINO on exactly this recipe (the
like-for-like of cifar10_dino.py that benchmarks/claims.py uses).

Shared choices, scaled from the ImageNet recipes (docs/methods.md#simdino-recipe, docs/methods.md#dino, docs/data.md#augmentation-recipe, docs/methods.md#optimisation) to 32px images and a CPU budget of
at most 20 minutes per method on 2 quiet cores, compilation and both k-NN passes included (1000 steps of batch 64 =
1.28 epochs; SimDINO on this recipe: 13 minutes):
  * data: 2 x 32px global crops at scale (0.4, 1) and 6 x 16px local crops at scale (0.1, 0.4) (a 5% crop of a
    32px image is ~7x7 pixels, too little to recognise anything); blur radius (0.1, 0.5) px instead of the (0.1, 2.0)
    px meant for 224px crops (radius 2 wipes out a 32px crop; same reasoning as configs/demo.py); the rest of the
    photometric recipe (flip, colour jitter, grayscale, solarisation) unchanged;
  * backbone: ViT width 96, depth 4, 3 heads, patch 4 (8x8 = 64 patch tokens per global crop, 4x4 per local
    crop), no drop path (too short a run and too small a model to need it), float32;
  * head: 3 layers 1024 -> 128; DINO family: K = 4096 prototypes;
  * batch 64, 1000 steps (1.28 epochs of 781 steps: the most that fits the 20 minutes), 100 warm-up steps, AdamW
    peak lr 2e-3 at batch 64, linear in the batch as DINO's rule (8e-3 per 256 images), cosine decay to 1e-5, weight
    decay 0.04 -> 0.4, per-tensor clipping at 3.0, teacher momentum 0.99 -> 1 (DINO's 0.996 lags too far behind the
    student in a run this short); the SimDINO files use 0.9 -> 1 and the v2 files keep their own (their docstrings);
  * SimDINO losses: the official objective (same-view pairs excluded, coding rate of (student + teacher)/2, gamma =
    1/p + 1/B) with one global covariance over the batch and the paper-convention eps = sqrt(0.05);
  * DINO family: teacher temperature 0.04 for the first epoch, then 0.07 (DINO's per-epoch warm-up over 1 epoch
    instead of 30 of 100: 0.04 for 781 steps, 0.07 for the last 219; cifar10_dino.py: 0.04 throughout, its search),
    student 0.1, centre momentum 0.9, prototype layer frozen for the first 0.1 epoch (78 steps; DINO freezes 1 of
    100 epochs).
Runtime / expected k-NN of each method: its file's docstring and docs/results.md.
"""

import os

from simdino_jax import config as config_lib

CIFAR10_ENV = "SIMDINO_CIFAR10"  # path of the image-folder tar (or directory) when no config argument is given


def cifar10_path(arg=None) -> str:
  """The CIFAR-10 data: the config argument, else $SIMDINO_CIFAR10, else "" (the config loads, so its fields can be
  read, and training refuses it before compiling with the instruction above: config.validate on data.source)."""
  return (arg or os.environ.get(CIFAR10_ENV, "")).strip().removeprefix("folder:")


def get_config(arg=None):
  c = config_lib.base_config()
  c.batch_size = 64
  c.total_steps = 1000
  c.warmup_steps = 100
  c.checkpoint_every = 200
  path = cifar10_path(arg)
  c.data.source = "folder:" + path if path else ""
  c.data.num_local = 6
  c.data.global_size, c.data.local_size = 32, 16
  c.data.local_scale = (0.1, 0.4)
  c.data.augment.blur_sigma = (0.1, 0.5)
  c.model.variant = "Ti/4"
  c.model.embed_dim, c.model.depth, c.model.num_heads = 96, 4, 3
  c.model.img_size = 32
  c.model.drop_path_rate = 0.0
  c.head.hidden_dim, c.head.out_dim = 1024, 128
  c.head.num_prototypes = 4096
  # Coding-rate methods (simdino, simdinov2): config.py's official objective over one global covariance (loss.groups
  # 1, eps sqrt(0.05)); SimDINOv2's patch term as its code (cls + patch, no 1/2).
  c.loss.patch_weighting = "official"
  # DINO family (dino, dinov2, dino_vmf, ibot_vmf): config.py's temperatures and centring, the warm-up over 1 epoch.
  c.dino.warmup_teacher_temp_epochs = 1
  c.optim.lr, c.optim.min_lr = 8e-3, 1e-5  # 2e-3 at batch 64, linear in the batch
  c.optim.freeze_last_layer_epochs = 0.1
  c.teacher.momentum = 0.99
  # evals.linear.protocol stays config.py's "frozen": small data, the fast probe on cached features.
  # Fine-tuning check sized for CPU (evals/finetune.py, docs/evaluation.md#fine-tuning), off; one flag runs it on the
  # final teacher (--config.evals.finetune.final=True) or on a checkpoint (python -m simdino_jax.evaluate
  # --workdir=DIR --eval=finetune): BEiT's recipe with its augmentations at 32 px (RandomCrop + flip, RandAugment,
  # erasing, mixup/cutmix, layer decay 0.75, drop path 0.1), but 3 epochs of batch 64 at lr 1e-3 instead of 100-1000.
  c.evals.finetune.update(epochs=3, warmup_epochs=1, batch_size=64, lr=1e-3, layer_decay=0.75, drop_path=0.1)
  return c


def dinov2_backbone(c):
  """SimDINOv2's backbone and optimiser settings (as configs/simdinov2_vitb16_in1k.py) on the shared recipe, in place:
  4 registers, LayerScale 0.1, DINOv2 token init, size-based positional-embedding interpolation with antialias
  (offset 0), drop path uniform over the blocks when raised, layer-wise lr decay 0.9, patch-embed lr x 0.2, clipping
  per module (backbone / head) and warm-up from min_lr (the fork's CosineScheduler). Used by cifar10_simdinov2.py and
  cifar10_simdino.py; the DINO files and cifar10_simdino_shared.py keep the v1 backbone above."""
  c.model.num_registers = 4
  c.model.layerscale = 0.1
  c.model.drop_path_uniform = True
  c.model.token_init = "dinov2"
  c.model.interpolate_offset = 0.0
  c.model.interpolate_antialias = True
  c.optim.warmup_from_min_lr = True
  c.optim.warmup_rule = "step_over_warmup"  # the fork's CosineScheduler: start + (base - start) * it / W
  c.optim.clip_mode = "per_module"
  c.optim.layer_decay = 0.9
  c.optim.patch_embed_lr_mult = 0.2
  return c
