r"""BYOL ResNet-50 on ImageNet-1k, 1000 epochs at batch 4096: deepmind-research/byol's recipe
(docs/methods.md#moco-v2-and-byol).

Command (TFDS data prepared as in docs/data.md#tfds-source):

  python -m simdino_jax.train --config=configs/byol_resnet50_in1k.py --workdir=gs://BUCKET/byol_rn50

The official values (byol/configs/byol.py, main_loop.py, byol_experiment.py, utils/): ``--batch_size`` 4096
(main_loop.py line 37), ``--pretrain_epochs`` 1000; for 1000 epochs ``_LR_PRESETS`` 0.2 (line 21), ``_WD_PRESETS``
1.5e-6 (line 22), ``_EMA_PRESETS`` 0.996 (line 23); projector 4096 -> 256 and predictor 4096 (lines 40-42), BatchNorm
decay 0.9, eps 1e-5, synchronised over the devices (lines 47-55); LARS ``eta`` 1e-3, ``momentum`` 0.9 (lines 57-61),
biases and normalisation parameters neither decayed nor adapted (``exclude_bias_and_norm``); learning rate
0.2 x batch / 256 (schedules.py ``learning_schedule``) warmed up linearly from 0 over 10 epochs (line 64) then cosine
to 0; target EMA 1 - (1 - 0.996)(cos(pi k / K) + 1) / 2; augmentations (utils/augmentations.py): inception crop
area (0.08, 1), flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2, blur p 1.0 / 0.1 and
solarisation p 0.0 / 0.2 for view 1 / 2. Here: the same values, optim.name "lars" (DINO's utils.LARS = BYOL's
scale_by_lars after add_weight_decay, 1-D tensors excluded), and torch's BatchNorm running-variance convention
(unbiased) instead of haiku's (biased): only the running statistics differ, which training never reads. BYOL's
blur kernel is sized image_size / 10 (sigma U(0.1, 2)); ours is PIL's GaussianBlur(radius) as DINO's.

Runtime: ~33 GFLOP per image (ResNet-50 on 2 x 224 crops, student forward + backward, teacher forward; the MLPs add
<1%), 4.2e19 FLOP for 1000 epochs: several days on 8 H200s (estimate, not measured; BYOL trained on 512 TPU v3
cores in ~8 h). Expected result (BYOL paper, Table 1): linear top-1 74.3.
"""

from simdino_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.method = "byol"
  c.batch_size = 4096
  c.total_epochs = 1000
  # warm-up: 10 epochs, the base config's warmup_epochs
  c.log_every = 100
  c.checkpoint_every = 2500
  c.data.num_workers = 16
  c.model.arch = "resnet50"
  c.data.num_local = 0
  c.data.global_scale = (0.08, 1.0)
  c.data.augment.blur_p = (1.0, 0.1, 0.0)
  # solarisation 0.2 on view 2 only: the base config's solarize_p
  c.head.hidden_dim = 4096  # out_dim 256 and predictor_hidden_dim 4096 are the base config's
  c.head.use_bn = True
  # teacher momentum 0.996 -> 1 (cosine): the base config's
  c.optim.name = "lars"
  # LARS momentum 0.9 and eta 1e-3: the base config's optim.momentum / optim.lars_eta
  c.optim.lr = 0.2  # per 256 images
  c.optim.min_lr = 0.0
  c.optim.weight_decay = c.optim.weight_decay_end = 1.5e-6
  c.optim.clip_grad = 0.0
  c.eval.batch_size = 1024
  return c
