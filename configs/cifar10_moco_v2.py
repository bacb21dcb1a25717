r"""MoCo-v2 on CIFAR-10, CPU-sized: configs/cifar10_common.py with MoCo-v2's head, queue and InfoNCE, two crops.

Command (from the repository root; data.source is relative to it):

  python -m simdino_jax.train --config=configs/cifar10_moco_v2.py --workdir=/tmp/cifar10_moco_v2

Runtime: see docs/results.md (measured figures below when present).

MoCo-v2 (facebookresearch/moco builder.py with --mlp --moco-t 0.2) on the shared ViT, optimiser and image budget:
head Linear(96, 96) ReLU Linear(96, 128) (``head.out_dim``), queue of K = 4096 keys (65,536 in the recipe, more
than the 50,000 CIFAR images; K is a multiple of the batch 64), temperature 0.2, query = student on view 1, key =
teacher on view 2 (``moco.symmetric`` False, as builder.py). Two global crops and no local crops (MoCo-v2 and the
"no multi-crop" rows of DINO's Table 14), at scale (0.14, 1): main_dino.py's advice when multi-crop is off ("we
recommend using --global_crops_scale 0.14 1."), the photometric recipe otherwise the shared one (MoCo-v2's
aug-plus has the same jitter probabilities but no solarisation; not changed, so the methods share their data).
Teacher (key encoder) momentum 0.99 constant: the recipe's constant 0.999 barely moves the key encoder in a
1000-step run (0.999^1000 = 0.37 of the initial weights left).
"""

import os
import runpy

# Loaded by path so the config works from any working directory.
_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_common.py"))


def get_config(arg=None):
  c = _COMMON["get_config"](arg)
  c.method = "moco_v2"
  c.data.num_local = 0
  c.data.global_scale = (0.14, 1.0)
  c.moco.queue_size = 4096
  c.moco.temperature = 0.2
  c.teacher.momentum = c.teacher.momentum_end = 0.99
  return c
