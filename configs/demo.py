r"""Demo: SimDINO on scikit-learn's bundled digits (1,797 real 8x8 scans, no download), a small ViT, 2 CPU cores.

Command (the README's main command):

  python -m simdino_jax.train --config=configs/demo.py --workdir=/tmp/simdino_demo

Runtime: about 2 minutes on 2 CPU cores with tcmalloc (121 s measured, compilation and both k-NN evaluations included).
Expected result: DIR/eval/knn.json with the teacher backbone's k-NN top-1 around 72% against about 51% for the
same network at initialisation (`accuracy_at_init`); docs/results.md has the measured figures.

The loss is the paper's eq. (22) (same-view pairs kept, coding rate of the student's global views) with
Remark C.3's gamma; the multi-crop recipe is DINO's, scaled to 8x8 digits upsampled to 32px: 2 x 16px global and
4 x 8px local crops, local scale (0.1, 0.4) since a 5% crop of an 8x8 digit holds under two pixels, blur radius
(0.1, 0.5) px instead of the (0.1, 2.0) px meant for 224px crops, and no horizontal flip (a flipped digit is
another symbol). Backbone: ViT width 96, depth 4, 3 heads, patch 4; head 512/128.
"""

from simdino_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.batch_size = 64
  c.total_steps = 600
  c.warmup_steps = 60
  c.checkpoint_every = 200
  c.data.source = "digits"
  c.data.num_local = 4
  c.data.global_size, c.data.local_size = 16, 8
  c.data.local_scale = (0.1, 0.4)
  c.data.augment.flip_p = 0.0
  c.data.augment.blur_sigma = (0.1, 0.5)
  c.model.variant = "mu/4"
  c.model.embed_dim, c.model.depth, c.model.num_heads = 96, 4, 3
  c.model.img_size = 16
  c.model.drop_path_rate = 0.0
  c.head.hidden_dim, c.head.out_dim = 512, 128
  c.loss.eps = 0.5
  c.loss.gamma_rule = "paper"
  c.loss.exclude_same_view = False
  c.loss.expansion = "student"
  c.optim.lr, c.optim.lr_scaling, c.optim.min_lr = 1e-3, "none", 1e-5
  c.teacher.momentum = 0.99
  # evals.linear.protocol stays config.py's "frozen": small data, the fast probe on cached features.
  return c
