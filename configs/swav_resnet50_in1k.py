r"""SwAV ResNet-50 on ImageNet-1k, 400 epochs with multi-crop (2 x 224 + 6 x 96), batch 4096 (docs/methods.md "SwAV").

Command (TFDS data prepared as in docs/data.md#tfds-source):

  python -m simdino_jax.train --config=configs/swav_resnet50_in1k.py --workdir=gs://BUCKET/swav_resnet50

Runtime: the official run takes 3 min 40 s per epoch on 64 V100 (SwAV README), ~24 h for 400 epochs; not measured
here.
Expected result (SwAV README, "SwAV | 400 | 4096 | 2x224 + 6x96"): 74.6 linear top-1 on ImageNet-1k val.

The official run it follows (facebookresearch/swav scripts/swav_400ep_pretrain.sh, 8 nodes x 8 GPUs x 64 images):

  python -u main_swav.py --nmb_crops 2 6 --size_crops 224 96 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14
    --crops_for_assign 0 1 --temperature 0.1 --epsilon 0.05 --sinkhorn_iterations 3 --feat_dim 128
    --nmb_prototypes 3000 --queue_length 0 --epochs 400 --batch_size 64 --base_lr 4.8 --final_lr 0.0048
    --freeze_prototypes_niters 313 --wd 0.000001 --warmup_epochs 10 --start_warmup 0.3 --arch resnet50
    --use_fp16 true --sync_bn apex

with main_swav.py's defaults for the rest (``--hidden_mlp 2048``, SGD momentum 0.9 in ``LARC(trust_coefficient=0.001,
clip=False)``, no gradient clipping, ``--epoch_queue_starts 15`` unused with ``--queue_length 0``).

Where this differs from the official run (each can matter at the 0.1-point level, none was measured):
  * optimiser: ``optim.name="lars"`` is DINO's LARS (update x eta ||p|| / ||g + wd p||, 1-D tensors neither decayed
    nor adapted); apex's LARC(clip=False) scales by eta ||p|| / (||g|| + wd ||p|| + eps) and adapts and decays
    every tensor, biases and BN included (weight decay 1e-6 makes the decay itself negligible);
  * warm-up: linear from 0 (here) instead of from ``--start_warmup 0.3`` to 4.8 over 10 epochs;
  * precision: bfloat16 compute (the official apex O1 float16 autocast);
  * SyncBN: over the whole global batch (the official apex SyncBN synchronises groups of 8 GPUs,
    ``--syncbn_process_group_size 8``);
  * augmentation: the shared recipe's crops and photometric ops (flip, colour jitter 0.4/0.4/0.2/0.1 at p 0.8,
    grey 0.2, blur, solarisation); SwAV's are flip, jitter 0.8/0.8/0.8/0.2 at p 0.8, grey 0.2 and blur at p 0.5 on
    every crop, no solarisation (src/multicropdataset.py).
"""

from simdino_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.method = "swav"
  c.log_every = 100
  c.checkpoint_every = 2500
  c.eval_every = 25000
  c.data.num_workers = 16
  c.batch_size = 4096  # 64 GPUs x --batch_size 64
  c.total_epochs = 400  # --epochs 400 (--warmup_epochs 10: config.py's)
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
  c.optim.name = "lars"  # SGD momentum 0.9 in LARC(trust_coefficient=0.001): see the docstring
  c.optim.lr, c.optim.lr_scaling = 4.8, "none"  # --base_lr 4.8 at batch 4096, not rescaled
  c.optim.min_lr = 0.0048  # --final_lr 0.0048
  c.optim.weight_decay = c.optim.weight_decay_end = 1e-6  # --wd 0.000001, constant
  c.optim.clip_grad = 0.0  # main_swav.py clips nothing
  c.eval.batch_size = 1024
  return c
