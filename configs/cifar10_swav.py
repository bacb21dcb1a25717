r"""SwAV on CIFAR-10, CPU-sized: configs/cifar10_common.py with SwAV's head, prototypes, Sinkhorn-Knopp codes and
queue (methods/swav.py).

Command (from the repository root; data.source is relative to it):

  python -m simdino_jax.train --config=configs/cifar10_swav.py --workdir=/tmp/cifar10_swav

Runtime: not measured yet for the 1000 steps (a shorter run's figures are added here when measured).
Expected result: not measured yet; see docs/results.md.

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
