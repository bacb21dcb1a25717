r"""Demo: SimDINO on scikit-learn's bundled digits (1,797 real 8x8 scans, no download), a small ViT, 2 CPU cores.

Command (the README's main command):

  python -m simdino_jax.train --config=configs/demo.py --workdir=/tmp/simdino_demo

Runtime: about 3 minutes on 2 CPU cores (tcmalloc preloaded, see README), compilation and k-NN included.
Expected result: DIR/eval/knn.json with k-NN top-1 of the teacher backbone well above `accuracy_at_init`
(the same network at initialisation): see README "Results" for the measured figures.

The recipe is the official SimDINO v1 one (global covariance, official gamma, same-view pairs excluded, expansion
on (student + teacher)/2) scaled down: 2 x 32px global + 4 x 16px local crops of the digits upsampled to 32px,
ViT "mu"-sized (width 96, depth 4) with patch 4, head 512/128.
"""

from simdino_jax import defaults


def get_config(arg=None):
  del arg
  c = defaults.base_config()
  c.method = "simdino"
  c.seed = 0
  c.batch_size = 64
  c.total_steps = 600
  c.warmup_steps = 60
  c.log_every = 50
  c.checkpoint_every = 200
  c.eval_every = 0
  c.data.source = "digits"
  c.data.num_global, c.data.num_local = 2, 4
  c.data.global_size, c.data.local_size = 32, 16
  c.data.global_scale, c.data.local_scale = (0.4, 1.0), (0.05, 0.4)
  c.data.num_workers = 0
  c.model.variant = "mu/4"
  c.model.embed_dim, c.model.depth, c.model.num_heads = 96, 4, 3
  c.model.img_size = 32
  c.model.drop_path_rate = 0.0
  c.head.hidden_dim, c.head.out_dim, c.head.num_layers = 512, 128, 3
  c.loss.eps = 0.5
  c.loss.groups = 1
  c.optim.lr, c.optim.lr_scaling, c.optim.min_lr = 1e-3, "none", 1e-5
  c.optim.weight_decay, c.optim.weight_decay_end = 0.04, 0.4
  c.teacher.momentum = 0.99
  c.eval.batch_size = 256
  return c
