r"""MoCo-v2 ResNet-50 on ImageNet-1k, 200 epochs: facebookresearch/moco's MoCo v2 recipe
(docs/methods.md#moco-v2-and-byol).

Command (TFDS data prepared as in docs/data.md#tfds-source):

  python -m simdino_jax.train --config=configs/moco_v2_resnet50_in1k.py --workdir=gs://BUCKET/moco_v2_rn50

The official run (moco README): ``main_moco.py -a resnet50 --lr 0.03 --batch-size 256 --mlp --moco-t 0.2
--aug-plus --cos`` on 8 GPUs, the other arguments at their defaults: 200 epochs (``--epochs``), SGD momentum 0.9
(``--momentum``), weight decay 1e-4 (``--weight-decay``), queue K = 65536 (``--moco-k``), key-encoder momentum 0.999
(``--moco-m``), feature dim 128 (``--moco-dim``), the --mlp head Linear(2048, 2048) ReLU Linear(2048, 128), InfoNCE
at T = 0.2; the --cos schedule lr x 0.5 (1 + cos(pi epoch / epochs)), no warm-up; aug-plus: RandomResizedCrop(224,
scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, PIL Gaussian blur radius U(0.1, 2) with
p 0.5, horizontal flip, no solarisation. Here: the same values; lr 0.03 x B/256 (the README's linear scaling for
other batches), cosine per step to 0 instead of per epoch, and BatchNorm over the whole global batch (SyncBN) instead
of per-GPU BN with shuffled keys (methods/moco.py says what that changes). torch.optim.SGD(model.parameters())
decays every parameter, BN and biases included: ``optim.weight_decay_all`` (DINO's recipes decay the weights only).

Runtime: ResNet-50 forward 4.1 GFLOP at 224 px; student forward + backward on 2 crops and teacher forward on 2:
~33 GFLOP per image, 8.5e18 FLOP for 200 epochs, about a day on 8 H200s or less; host decoding of 2 crops per image
likely sets the pace (estimate, not measured). Expected result (moco README): linear top-1 67.5 (+-0.1) at 200 epochs
(the README's 67.7 row for 800 epochs is another run).
"""

from simdino_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.method = "moco_v2"
  c.batch_size = 256
  c.total_epochs = 200
  c.warmup_epochs = 0  # --cos: no warm-up
  c.log_every = 100
  c.checkpoint_every = 2500
  c.data.num_workers = 16
  c.model.arch = "resnet50"
  c.data.num_local = 0
  c.data.global_scale = (0.2, 1.0)  # aug-plus RandomResizedCrop(224, scale=(0.2, 1.0))
  c.data.augment.saturation = 0.4  # ColorJitter(0.4, 0.4, 0.4, 0.1)
  c.data.augment.blur_p = (0.5, 0.5, 0.5)
  c.data.augment.solarize_p = 0.0
  c.head.out_dim = 128  # --moco-dim
  # --moco-k 65536 and --moco-t 0.2: the base config's moco.queue_size / moco.temperature
  c.teacher.momentum = c.teacher.momentum_end = 0.999  # --moco-m, constant
  c.optim.name = "sgd"
  # --momentum 0.9: the base config's optim.momentum
  c.optim.lr = 0.03  # per 256 images
  c.optim.min_lr = 0.0
  c.optim.weight_decay = c.optim.weight_decay_end = 1e-4
  c.optim.weight_decay_all = True  # SGD(model.parameters(), weight_decay=1e-4): BN and biases decayed too
  c.optim.clip_grad = 0.0  # no clipping
  c.eval.batch_size = 1024
  return c
