r"""SwAV on CIFAR-10, CPU-sized: configs/cifar10_common.py with SwAV's head, prototypes, Sinkhorn-Knopp codes and
queue (methods/swav.py).

Command (from the repository root; data.source is relative to it):

  python -m simdino_jax.train --config=configs/cifar10_swav.py --workdir=/tmp/cifar10_swav

Runtime: the 1000 steps not measured. A 300-step run (--config.total_steps=300 --config.warmup_steps=30, the rest as
here) took 48 min 28 s wall, 475 s user CPU, on 2 cores shared with seven other jobs (load ~20), final k-NN included.
Expected result (seed 0, measured) of that 300-step run: teacher k-NN top-1 28.42% (top-5 77.86%) vs 29.85% at
init (-1.4: no learning yet; the init figure is this config's evaluation at init, equal to configs/cifar10_dino.py's:
the same backbone init). At the end 29 of 3000 prototypes are the argmax of some code, the codes' entropy is 7.93 of
log 3000 = 8.01 (nearly uniform), feature std 0.028, effective rank 1.7: with features this alike, the scores of a
batch of 64 (and of the 1920-row queue from step 186) divided by epsilon 0.05 barely separate, so Sinkhorn-Knopp
spreads every image over most prototypes. The 1000-step recipe and fewer prototypes are untested.
See docs/results.md for later measurements.

SwAV (facebookresearch/swav main_swav.py, the swav_400ep_pretrain.sh / bs256 scripts' SwAV settings) on the shared
ViT, optimiser, crops and image budget (1000 steps of 64, 2 x 32px + 6 x 16px crops, AdamW 2e-3): projection head
96 -> 1024 -> BN -> ReLU -> 128 (the recipe's 2048 -> 128 with the shared 1024 hidden width), l2-normalised, against
K = 3000 unit-norm prototypes (``--nmb_prototypes 3000``), student temperature 0.1, Sinkhorn-Knopp epsilon 0.05 with
3 iterations, codes of the two global crops (``--crops_for_assign 0 1``), no momentum encoder (the teacher the
evaluators read is the current student). Scaled to this run's 1.28 epochs: the prototypes frozen for the first 78
steps (0.1 epoch, as the shared recipe freezes DINO's last layer; the recipe's 313 iterations are 0.06 of an
ImageNet epoch at batch 4096 and 0.25 at batch 256) and a queue of 1920 embeddings (30 batches; the bs-256 scripts'
``--queue_length 3840`` is 15 batches) filled from step 156 (``queue_start_epoch`` 0.2; the recipe's
``--epoch_queue_starts 15`` of 200-400 epochs), in use once full (step 186): the batch of 64 is small for
equipartition over 3000 prototypes, which is what the official queue is for.
"""

import os
import runpy

# Loaded by path so the config works from any working directory.
_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_common.py"))


def get_config(arg=None):
  c = _COMMON["get_config"](arg)
  c.method = "swav"
  c.head.num_prototypes = 3000  # head 1024 -> 128: the shared recipe's
  c.head.use_bn = True
  c.teacher.self_distillation = False  # no momentum encoder (methods/swav.py ignores config.teacher anyway)
  c.swav.freeze_prototypes_iters = 78
  c.swav.queue_length = 1920
  c.swav.queue_start_epoch = 0.2
  return c
