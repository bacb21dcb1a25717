r"""SimDINO on CIFAR-10, CPU-sized: the shared recipe of configs/cifar10_common.py with the SimDINO loss, SimDINOv2's
backbone settings and the 64,000-image budget in 2000 steps of batch 32.

Command (from the repository root; the data from $SIMDINO_CIFAR10, or as the config argument
``--config=configs/cifar10_simdino.py:/path/to/cifar10.tar``):

  export SIMDINO_CIFAR10=/path/to/cifar10.tar
  python -m simdino_jax.train --config=configs/cifar10_simdino.py --workdir=runs/c10

Runtime: 14 min 42 s wall on 2 quiet cores (tcmalloc; 67-92 images/s), compilation and both k-NN passes included.
Expected result (seed 0, measured): teacher k-NN top-1 43.46% (top-5 88.1%) vs 29.34% for the network at init
(+14.1); effective rank of the teacher features 16.5 at the end. The same file on another small dataset, only
the data changed (benchmarks/recipe_transfer.py: Imagenette's 1,000 train / 500 val images downscaled to 64 px,
10 classes): 40.8% vs 28.6% (+12.2, 13.0 min) with seed 0, 40.6% vs 28.6% (+12.0, 13.2 min) with seed 1, 41.4% vs
24.8% (+16.6, 13.0 min) with seed 2 (its network at init scores lower, so its gain is larger than its k-NN).
On CIFAR-10 it ends 1.1 points below cifar10_simdino_shared.py (44.54%, +14.7, v1 backbone at batch 64), which gains
only +7.6 / +6.2 on that Imagenette copy: these settings are chosen for what transfers, not for CIFAR-10.

Why these settings (the shared ones are argued in cifar10_common.py; every run behind them: docs/results.md):
  * SimDINOv2's backbone and optimiser settings (cifar10_common.py's dinov2_backbone: 4 registers, LayerScale 0.1,
    DINOv2 token init, antialiased size-based position interpolation, layer decay 0.9, patch-embed lr x 0.2,
    per-module clipping, warm-up from min_lr), without its masks: on the v1 backbone of the other files SimDINO
    gains +14.7 on CIFAR-10 but flattens at +5.4 to +9.4 on the Imagenette copy (twelve runs of its own settings:
    lr, batch, crop count and scale, resolution, drop path; mean +7.3); these settings alone gave +11.2 / +8.2
    there (seeds 0-1).
  * batch 32 for 2000 steps (the shared 64,000 images, lr 1e-3 by the shared linear rule, warm-up 200 steps =
    6,400 images): twice the optimiser steps on the same images. On the v1 backbone +9.4 / +9.4 on Imagenette
    against +7.6 / +6.2 at batch 64, and in the claims miniature (Table 7) 40.70 at batch 32 against 36.93 at 64 for
    the same CIFAR-10 images; the paper finds SimDINO insensitive to the batch size at ImageNet scale. With the
    backbone above: +12.2 / +12.0 / +16.6 (seeds 0-2).
  * teacher momentum 0.9 -> 1 (SimDINOv2's value; the ImageNet SimDINO recipe's 0.996 is for 125k steps): the k-NN
    is measured on the teacher, and 1/(1 - m) = 100 steps of averaging (m = 0.99) is a sixth of a 600-step run, so
    the teacher trails the student. Measured, 600 steps at lr 1e-3 on the v1 backbone: 34.45% with 0.99, 39.35% with
    0.9 (init 29.9).
  * the official objective (same-view pairs excluded, coding rate of (student + teacher)/2, gamma = 1/p + 1/B, so
    1/128 + 1/32 at this batch: the rule, not a tuned weight, raises it from 1/128 + 1/64 at batch 64) over one
    global covariance of the batch with eps = sqrt(0.05), head 1024 -> 128 without prototypes: as
    configs/simdino_vitb16_in1k.py; the paper's eq. (22) with Remark C.3's gamma and eps 0.5 gave the same gain at
    600 steps (+4.8 vs +4.6), so the objective form is not what a short run needs.
  * crops, ViT width 96 / depth 4 / patch 4: the shared recipe. Nothing depends on CIFAR's images (crop scales are
    fractions of the image, any image size is cropped to 32 / 16 px).
configs/cifar10_simdino_shared.py is SimDINO on exactly the other files' recipe (v1 backbone, batch 64), the
like-for-like of configs/cifar10_dino.py that benchmarks/claims.py uses.
"""

import os
import runpy

# Loaded by path so the config works from any working directory.
_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_common.py"))


def get_config(arg=None):
  c = _COMMON["get_config"](arg)
  _COMMON["dinov2_backbone"](c)
  # The shared image budget (64,000 images = 1.28 epochs) in twice the steps; lr 1e-3 by the shared linear rule.
  c.batch_size, c.total_steps, c.warmup_steps = 32, 2000, 200
  c.teacher.momentum = 0.9
  return c
