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

Runtime: not measured at the full 2000 steps; the miniature of docs/results.md ("Distillation into a smaller
student": 200 steps, both arms side by side on a CPU shared at a load of ~23) gives its wall time.
Expected result: that miniature's k-NN of the distilled student against the same student from scratch (the full
2000-step budget has not been run).

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
