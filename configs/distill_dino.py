r"""DINO distillation on CIFAR-10: configs/distill_simdino.py's ViT-Ti-like student (width 48, depth 4, 3 heads, patch
4) trained with DINO's objective on a FROZEN DINO teacher's targets (configs/cifar10_dino.py, width 96, depth 4: the
teacher's centred, sharpened prototype scores, the centre updated from the frozen teacher's outputs as DINO updates
it from its EMA's); the student's EMA (state.teacher) is the model the evaluators read. The same code path as SimDINO
distillation (train/distill.py, docs/training.md#distillation): only the method's loss differs.

Command (from the repository root, after configs/cifar10_dino.py's own command trained the teacher into
/tmp/cifar10_dino, K = 4096 prototypes as here; the data as configs/cifar10_common.py says):

  python -m simdino_jax.train --config=configs/distill_dino.py --workdir=/tmp/cifar10_dino_distilled

Runtime: not measured (no trained CIFAR DINO teacher in this session; SimDINO's miniature is in docs/results.md).
Expected result: not measured; DINO itself gains +2.1 k-NN points on this recipe (configs/cifar10_dino.py), so a DINO
teacher here has little to give.
"""

import os
import runpy

# Loaded by path so the config works from any working directory.
_DINO = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_dino.py"))


def get_config(arg=None):
  c = _DINO["get_config"](arg)
  c.model.embed_dim = 48  # configs/distill_simdino.py's student
  c.distill.enabled = True
  c.distill.teacher = "/tmp/cifar10_dino"  # where configs/cifar10_dino.py's command trains the teacher
  return c
