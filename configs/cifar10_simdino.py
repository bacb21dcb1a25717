r"""SimDINO on CIFAR-10, CPU-sized: the shared recipe of configs/cifar10_common.py with the SimDINO loss.

Command (from the repository root; data.source is relative to it):

  python -m simdino_jax.train --config=configs/cifar10_simdino.py --workdir=/tmp/cifar10_simdino

Runtime: 33.5 min wall for this run on 2 cores shared with other jobs (51 images/s at the end); about 10 min on a
quiet machine (89 images/s measured over 30 quiet steps, plus ~2 min of compilation and the two k-NN passes).
Expected result (seed 0, measured): teacher k-NN top-1 34.45% (top-5 82.1%) vs 29.87% for the network at init (+4.6).

SimDINO as in configs/simdino_vitb16_in1k.py, scaled down: the official objective (same-view pairs excluded,
coding rate of (student + teacher)/2, gamma = 1/128 + 1/64) over one global covariance of the 64-image batch
with eps = sqrt(0.05), head 1024 -> 128 without prototypes, teacher momentum 0.99 -> 1. Everything else (crops,
ViT width 96 / depth 4 / patch 4, 600 steps, optimiser) is the shared recipe.
"""

import os
import runpy

# Loaded by path so the config works from any working directory.
_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_common.py"))


def get_config(arg=None):
  c = _COMMON["get_config"](arg)
  c.method = "simdino"
  return c
