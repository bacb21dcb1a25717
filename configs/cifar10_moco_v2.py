r"""MoCo-v2 on CIFAR-10, CPU-sized: configs/cifar10_common.py with MoCo-v2's head, queue and InfoNCE, two crops.

Command (from the repository root; data.source is relative to it):

  python -m simdino_jax.train --config=configs/cifar10_moco_v2.py --workdir=/tmp/cifar10_moco_v2

Runtime: see docs/results.md for the full 1000-step recipe (not measured). Measured: a short run of 300 steps
(``--config.total_steps=300 --config.warmup_steps=30``) took 27 min wall (0.26 steps/s) on 2 cores shared with
another training run and ~7 other jobs (load ~25), the final k-NN included.
Expected result (seed 0, measured, that 300-step run, when training still evaluated the teacher): teacher (key
encoder) k-NN top-1 27.83% (top-5 76.9%) against 29.85% at init (-2.0); the student (query encoder, the network
MoCo's own linear evaluation reads, which training and ``python -m simdino_jax.evaluate`` now evaluate by default:
methods/moco.py ``evaluated="student"``) 27.79%; loss 6.39 at step 50, 7.06 at
step 300 (InfoNCE over 1 + 4096 candidates: ln 4097 = 8.3 by chance), effective rank 2.7. Not a learning result:
MoCo-v2 on this tiny ViT does not gain in 300 steps.

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
  # InfoNCE temperature 0.2: the base config's moco.temperature
  c.teacher.momentum_end = 0.99  # constant 0.99 (the shared recipe's start value), as MoCo's constant m
  return c
