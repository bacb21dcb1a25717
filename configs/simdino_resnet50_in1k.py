r"""SimDINO ResNet-50 on ImageNet-1k, 100 epochs: SimDINO's coding-rate objective on DINO's ResNet-50 recipe.

Command (TFDS data prepared as in docs/data.md#tfds-source):

  python -m simdino_jax.train --config=configs/simdino_resnet50_in1k.py --workdir=gs://BUCKET/simdino_resnet50

No official SimDINO recipe exists for a ResNet (the SimDINO paper and repository train ViTs only), so this one is
derived, field by field:
  from configs/dino_resnet50_in1k.py (DINO's README command for ResNet-50, 8 GPUs x 64): the backbone (torchvision
    resnet50 with SyncBatchNorm), the crops (2 x 224 at scale (0.14, 1) + 8 x 96 at (0.05, 0.14)), the optimiser (SGD
    momentum 0.9, lr 0.03 x B/256 warmed up over 10 epochs, cosine to 1e-6, weight decay 1e-4 constant, per-tensor
    clipping at 3.0), batch 512, 100 epochs, teacher momentum 0.996 -> 1, bfloat16;
  from configs/simdino_vitb16_in1k.py (the official SimDINO ViT-B/16 run, 8 GPUs x 64): the method and its loss
    (coding rate with the official eps 0.05 per GPU covariance, reduce_cov 0: loss.groups 8, eps^2 = 8 x 0.05,
    gamma 1/256 + 1/512, expansion "mean", same-view pairs excluded) and its head (2048 -> 256, no prototypes, so
    no prototype freezing).
DINO's temperatures and centring are unused by SimDINO.

Runtime: as configs/dino_resnet50_in1k.py (same crops and backbone; the coding rate's 256 x 256 logdet is
negligible): ~6.5e18 FLOP for 100 epochs, a few hours on 8 H200s (estimate, not measured).
Expected result: none published (no SimDINO ResNet run exists); not measured here.
"""

import math
import os
import runpy

# Loaded by path so the config works from any working directory.
_DINO_RN50 = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dino_resnet50_in1k.py"))


def get_config(arg=None):
  c = _DINO_RN50["get_config"](arg)  # backbone, crops, SGD, schedules, batch, teacher EMA
  c.method = "simdino"  # SimDINO's loss and head (config.py's defaults: the official SimDINO ViT-B/16 run)
  c.optim.freeze_last_layer_epochs = 0.0  # no prototype layer to freeze
  c.loss.groups = 8  # configs/simdino_vitb16_in1k.py: reduce_cov 0 on 8 GPUs
  c.loss.eps = math.sqrt(8 * 0.05)
  return c
