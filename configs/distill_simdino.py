r"""SimDINO distillation on CIFAR-10: a ViT-Ti-like student (width 48, depth 4, 3 heads, patch 4: 4x fewer
parameters per block than the recipe's width 96) learns from a FROZEN CIFAR SimDINO teacher (configs/cifar10_simdino.py,
width 96, depth 4) with SimDINO's own objective: alignment to the frozen teacher's features + the coding rate of the
student's (with this recipe's expansion "mean": of the mean of the student's and the teacher's global features). The
student's EMA (state.teacher, momentum 0.9 -> 1 as the recipe) is the model the evaluators read, as DINOv2 / DINOv3
keep "a spare EMA of the student that we use as our final model" (train/distill.py, docs/training.md#distillation).

Command (from the repository root, after configs/cifar10_simdino.py's own command trained the teacher into runs/c10;
the data from $SIMDINO_CIFAR10, or as the config argument ``--config=configs/distill_simdino.py:/path/to/cifar10.tar``):

  python -m simdino_jax.train --config=configs/distill_simdino.py --workdir=runs/c10_distilled

Another teacher: --config.distill.teacher=DIR (a training workdir of ours), an export with --with_head, or official
weights with --config.distill.teacher_config naming their recipe. The same student trained from scratch on the same
budget: --config.distill.enabled=False (no teacher read).

Runtime: not measured at the full 2000 steps. The miniature (docs/results.md, "Distillation into a smaller student":
--config.total_steps=200 --config.warmup_steps=20, k-NN on a 5,000 / 2,000 CIFAR subset) took 27 min 33 s, side by
side with the scratch arm at a load of 13-25 on 2 cores.
Expected result (seed 0, measured in that miniature, the teacher a configs/cifar10_simdino.py run at step 200 of
2000, k-NN 32.45%): the distilled student's k-NN top-1 25.00% against 27.15% for the same student from scratch and
26.90% at initialisation (k=20; within 0.1 point of each other at k=100 and k=200): no gain shown at this budget.

Everything else is configs/cifar10_simdino.py (data, crops, optimiser, batch 32 for 2000 steps, head 1024 -> 128:
the head output must be the teacher's, which train/distill.py checks). No masks and no drop path to remove (DINOv2's
distillation removes both; this recipe has neither).
"""

import os
import runpy

# Loaded by path so the config works from any working directory.
_SIMDINO = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_simdino.py"))


def get_config(arg=None):
  c = _SIMDINO["get_config"](arg)
  c.model.embed_dim = 48  # the ViT-Ti-like student; depth 4 and 3 heads (16 per head) as the teacher's recipe
  c.distill.enabled = True
  c.distill.teacher = "runs/c10"  # where configs/cifar10_simdino.py's command trains the teacher
  return c
