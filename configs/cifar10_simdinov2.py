r"""SimDINOv2 on CIFAR-10, CPU-sized: configs/cifar10_common.py with SimDINOv2's architecture, masks and optimiser.

Command (from the repository root; the data from $SIMDINO_CIFAR10, or as the config argument
``--config=configs/cifar10_simdinov2.py:/path/to/cifar10.tar``):

  export SIMDINO_CIFAR10=/path/to/cifar10.tar
  python -m simdino_jax.train --config=configs/cifar10_simdinov2.py --workdir=runs/c10v2

Runtime: 17 min 0 s wall on 2 quiet cores (tcmalloc; 69-76 images/s), compilation and both k-NN passes included
(20 min 30 s and 55-66 images/s before the step packed the masked patch tokens per batch instead of reserving
floor(64 x 0.5) = 32 head positions for every global crop: docs/performance.md#masked-patch-gather).
Expected result (seed 0, measured) at this budget (1000 steps, lr 2e-3 at batch 64): teacher k-NN top-1 42.16%
(top-5 87.6%) vs 29.34% at init (+12.8); effective rank 15.5 at the end (42.09% with the per-crop gather, the same
computation up to float rounding). At the former budget (600 steps at lr 1e-3, and before the fork's warm-up rule)
it was 39.83% vs 29.33% (+10.5).
The same file on another small dataset, only the data changed (benchmarks/recipe_transfer.py --config
configs/cifar10_simdinov2.py: Imagenette's 1,000 train / 500 val images downscaled to 64 px, 10 classes): 39.4% vs
28.6% (+10.8, 18.0 min) with seed 0, 41.0% vs 28.6% (+12.4, 18.3 min) with seed 1, 36.4% vs 24.8% (+11.6, 18.5 min)
with seed 2 (timed with the per-crop gather); SimDINO's recipe, this backbone at batch 32 without masks, gains
+12.2 / +12.0 / +16.6 there, and SimDINO on the shared v1 backbone flattened at +5.4 to +9.4 over twelve runs
(docs/results.md).

What configs/simdinov2_vitb16_in1k.py changes with respect to SimDINO, on the shared CIFAR recipe: 4 registers,
LayerScale 0.1, DINOv2 token init, size-based positional-embedding interpolation with antialias (offset 0), block
masks on half of the global crops with ratios (0.1, 0.5) of the 8x8 patch grid and the masked-patch alignment term
(loss.patch_weighting "official": cls + patch, no 1/2), layer-wise lr decay 0.9, patch-embed lr x 0.2, clipping
per module (backbone / head), warm-up from min_lr, teacher momentum 0.9 -> 1. Drop path stays 0 (uniform over the
blocks if raised) and the lr stays the shared one (2e-3 at batch 64). The backbone and optimiser settings are
cifar10_common.py's dinov2_backbone, shared with cifar10_simdino.py, which differs from this file only by its method
and its batch (2000 steps of 32).
"""

import os
import runpy

# Loaded by path so the config works from any working directory.
_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_common.py"))


def get_config(arg=None):
  c = _COMMON["get_config"](arg)
  c.method = "simdinov2"  # masks, shared head: config.py's defaults; the patch term: cifar10_common.py's "official"
  _COMMON["dinov2_backbone"](c)
  c.teacher.momentum = 0.9
  return c
