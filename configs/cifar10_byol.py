r"""BYOL on CIFAR-10, CPU-sized: configs/cifar10_common.py with BYOL's projector, predictor and regression loss,
two crops.

Command (from the repository root; data.source is relative to it):

  python -m simdino_jax.train --config=configs/cifar10_byol.py --workdir=/tmp/cifar10_byol

Runtime: see docs/results.md for the full 1000-step recipe (not measured). Measured: a short run of 300 steps
(``--config.total_steps=300 --config.warmup_steps=30``) took 27 min wall (0.27 steps/s) on 2 cores shared with
another training run and ~7 other jobs (load ~25), the final k-NN included.
Expected result (seed 0, measured, that 300-step run, when training still evaluated the teacher): teacher (target)
k-NN top-1 29.49% (top-5 79.4%) against 29.85% at init (-0.4); the student (online network, the one BYOL's own
evaluation reads, which training and ``python -m simdino_jax.evaluate`` now evaluate by default: methods/byol.py
``evaluated="student"``) 30.28% (+0.4); cosine of the predicted pairs 0.58 at
step 50 and 0.59 at step 300, effective rank 2.7. Not a learning result: BYOL on this tiny ViT barely moves in 300
steps.
Without BatchNorm in the MLPs (``--config.head.use_bn=False``) the same run collapsed at once (step 50: cosine 0.963,
effective rank 1.56) and was stopped.

BYOL (deepmind-research/byol) on the shared ViT, optimiser and image budget: projector 96 -> 1024 -> 128 and
predictor 128 -> 1024 -> 128 with BatchNorm (the recipe's 4096 / 256 scaled as the shared head), the symmetric
regression loss, teacher (target) momentum cosine 0.99 -> 1 (the shared recipe's; BYOL's 300-epoch preset is also
0.99). Two global crops and no local crops at scale (0.14, 1) (main_dino.py's advice without multi-crop; BYOL's own
is 0.08), the shared photometric recipe (the same as BYOL's: DINO took it from BYOL).
"""

import os
import runpy

# Loaded by path so the config works from any working directory.
_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_common.py"))


def get_config(arg=None):
  c = _COMMON["get_config"](arg)
  c.method = "byol"
  c.data.num_local = 0
  c.data.global_scale = (0.14, 1.0)
  c.head.predictor_hidden_dim = 1024
  c.head.use_bn = True  # BYOL's MLPs: Linear -> BN -> ReLU -> Linear
  return c
