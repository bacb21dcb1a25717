"""SwAV ResNet-50 on ImageNet-1k with multi-crop (2 x 224 + 6 x 96), batch 4096, 400 epochs (":800ep": 800)
(docs/methods.md "SwAV").

Command (TFDS data prepared as in docs/data.md#tfds-source):

  python -m simdino_jax.train --config=configs/swav_resnet50_in1k.py --workdir=gs://BUCKET/swav_resnet50
  python -m simdino_jax.train --config=configs/swav_resnet50_in1k.py:800ep --workdir=gs://BUCKET/swav_resnet50_800ep

Runtime: the official run takes 3 min 40 s per epoch on 64 V100 (SwAV README), ~24 h for 400 epochs; not measured
here.
Expected result (SwAV README, "SwAV | 400 | 4096 | 2x224 + 6x96"): 74.6 linear top-1 on ImageNet-1k val; 75.3 for
the 800-epoch run (the README's command, ``sbatch ./scripts/swav_800ep_pretrain.sh``).

The official runs it follows (facebookresearch/swav scripts/swav_400ep_pretrain.sh, 8 nodes x 8 GPUs x 64 images;
scripts/swav_800ep_pretrain.sh, the README's command, differs only in ``--epochs 800``):

  python -u main_swav.py --nmb_crops 2 6 --size_crops 224 96 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14
    --crops_for_assign 0 1 --temperature 0.1 --epsilon 0.05 --sinkhorn_iterations 3 --feat_dim 128
    --nmb_prototypes 3000 --queue_length 0 --epochs 400 --batch_size 64 --base_lr 4.8 --final_lr 0.0048
    --freeze_prototypes_niters 313 --wd 0.000001 --warmup_epochs 10 --start_warmup 0.3 --arch resnet50
    --use_fp16 true --sync_bn apex

with main_swav.py's code for the rest (``--hidden_mlp 2048``; ``LARC(optimizer=torch.optim.SGD(model.parameters(),
lr=args.base_lr, momentum=0.9, weight_decay=args.wd), trust_coefficient=0.001, clip=False)``: ``optim.name="larc"``,
``optim.lars_eta`` 0.001, ``optim.larc_clip`` False, ``optim.weight_decay_all`` (every parameter in the one group); no
gradient clipping; ``--epoch_queue_starts 15`` unused with ``--queue_length 0``). The lr schedule is the scripts':
``np.linspace(start_warmup, base_lr, iters x warmup_epochs)`` then a cosine to ``final_lr`` per iteration
(``optim.warmup_start_lr`` 0.3, ``optim.lr`` 4.8 unscaled, ``optim.min_lr`` 0.0048). main_swav.py's own defaults
(``--start_warmup 0 --final_lr 0 --epochs 100``) are not what any published run used.

Where this differs from the official run (each can matter at the 0.1-point level, none was measured):
  * precision: bfloat16 compute (the official apex O1 float16 autocast);
  * SyncBN: over the whole global batch (the official apex SyncBN synchronises groups of 8 GPUs,
    ``--syncbn_process_group_size 8``);
  * augmentation: the shared recipe's crops and photometric ops (flip, colour jitter 0.4/0.4/0.2/0.1 at p 0.8,
    grey 0.2, blur, solarisation); SwAV's are flip, jitter 0.8/0.8/0.8/0.2 at p 0.8, grey 0.2 and blur at p 0.5 on
    every crop, no solarisation (src/multicropdataset.py).
"""

from simdino_jax import config as config_lib
from simdino_jax.errors import ConfigError


def get_config(arg=None):
  if arg not in (None, "", "800ep"):
    raise ConfigError(f"configs/swav_resnet50_in1k.py: unknown argument {arg!r} (none, or 800ep)")
  c = config_lib.base_config()
  c.method = "swav"
  c.log_every = 100
  c.checkpoint_every = 2500
  c.eval_every = 25000
  c.data.num_workers = 16
  c.batch_size = 4096  # 64 GPUs x --batch_size 64
  c.total_epochs = 800 if arg == "800ep" else 400  # --epochs 400 / 800 (--warmup_epochs 10: config.py's)
  c.model.arch = "resnet50"  # --arch resnet50
  c.model.dtype = "bfloat16"  # --use_fp16 true
  c.data.num_local = 6  # --nmb_crops 2 6 --size_crops 224 96
  c.data.global_scale = (0.14, 1.0)  # --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14
  c.data.local_scale = (0.05, 0.14)
  c.head.out_dim, c.head.num_prototypes = 128, 3000  # --feat_dim 128 --nmb_prototypes 3000 (--hidden_mlp 2048)
  c.head.use_bn = True
  c.teacher.self_distillation = False  # no momentum encoder
  # swav.temperature 0.1, epsilon 0.05, sinkhorn_iterations 3, crops_for_assign (0, 1), queue_length 0 and
  # freeze_prototypes_iters 313 are config.py's defaults (main_swav.py's and the script's values).
  # LARC(SGD(model.parameters(), momentum=0.9, weight_decay=wd), trust_coefficient=0.001, clip=False): optim.momentum
  # 0.9, optim.lars_eta 0.001, larc_eps 1e-8 (apex's default) and larc_clip False are config.py's defaults.
  c.optim.name = "larc"
  c.optim.weight_decay_all = True  # one param group: biases and BN scales decayed (and adapted) too
  c.optim.lr, c.optim.lr_scaling = 4.8, "none"  # --base_lr 4.8 at batch 4096, not rescaled
  c.optim.min_lr = 0.0048  # --final_lr 0.0048
  c.optim.warmup_start_lr = 0.3  # --start_warmup 0.3
  c.optim.weight_decay = c.optim.weight_decay_end = 1e-6  # --wd 0.000001, constant
  c.optim.clip_grad = 0.0  # main_swav.py clips nothing
  c.eval.batch_size = 1024
  return c
