r"""SimDINO on CIFAR-10, CPU-sized: the shared recipe of configs/cifar10_common.py with the SimDINO loss.

Command (from the repository root; data.source is relative to it):

  python -m simdino_jax.train --config=configs/cifar10_simdino.py --workdir=/tmp/cifar10_simdino

Runtime / expected k-NN: see README "Results".

SimDINO as in configs/simdino_vitb16_in1k.py, scaled down: the official objective (same-view pairs excluded,
coding rate of (student + teacher)/2, gamma = 1/128 + 1/128) over one global covariance of the 128-image batch
with eps = sqrt(0.05), head 1024 -> 128 without prototypes, teacher momentum 0.996 -> 1. Everything else (crops,
ViT width 128 / depth 6 / patch 4, 2000 steps, optimiser) is the shared recipe.
"""

import os
import runpy

# Loaded by path so the config works from any working directory.
_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_common.py"))


def get_config(arg=None):
  c = _COMMON["get_config"](arg)
  c.method = "simdino"
  return c
