r"""DINO ResNet-50 on ImageNet-1k, 100 epochs: DINO's README recipe for convnets (docs/methods.md#dino).

Command (TFDS data prepared as in docs/data.md#tfds-source):

  python -m simdino_jax.train --config=configs/dino_resnet50_in1k.py --workdir=gs://BUCKET/dino_resnet50

The official command it reproduces (facebookresearch/dino README.md, "ResNet-50 and other convnets trainings": "a
command to train DINO on ResNet-50 on a single node with 8 GPUs for 100 epochs"):

  python -m torch.distributed.launch --nproc_per_node=8 main_dino.py --arch resnet50 --optimizer sgd --lr 0.03
    --weight_decay 1e-4 --weight_decay_end 1e-4 --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14
    --data_path /path/to/imagenet/train --output_dir /path/to/saving_dir

with every other argument at main_dino.py's default: 100 epochs, batch 8 x 64 = 512, 8 local crops, lr 0.03 x B/256
warmed up over 10 epochs then cosine to 1e-6, SGD momentum 0.9 (``torch.optim.SGD(params_groups, lr=0,
momentum=0.9)``: biases and 1-D tensors not decayed), weight decay 1e-4 constant, per-tensor gradient clipping at
3.0, prototype layer frozen during the first epoch, head 2048 -> 256 -> 65536 prototypes (no BatchNorm in the head:
use_bn_in_head False; norm_last_layer True), teacher temperature 0.04 constant (warmup_teacher_temp 0.04 ->
teacher_temp 0.04, warmup_teacher_temp_epochs 0), student 0.1, centre momentum 0.9, teacher momentum 0.996 -> 1,
fp16 autocast (here bfloat16). The ResNet is torchvision's resnet50 (fc removed, 2048-d pooled feature) with
SyncBatchNorm in student and teacher (models/resnet.py; the EMA moves parameters only, each network keeps its own
BatchNorm statistics). tests/test_resnet_recipes.py checks these values against main_dino.py and the README.

Runtime: about 51 GFLOP per image (ResNet-50: 4.1 GFLOP forward at 224 px, ~0.75 at 96 px; student forward and
backward on 2 + 8 crops, teacher forward on 2), 6.5e18 FLOP for 100 epochs, a few hours on 8 H200s; the host's
decoding and cropping of 10 crops per image, not the FLOPs, likely sets the pace (estimate, not measured).
Expected result: the README gives no accuracy for this 100-epoch run (its logs are online only). DINO's released
ResNet-50 (README model zoo: k-NN 67.5, linear 75.3) is another run: per the author (facebookresearch/dino#133) a
batch of 4080 over 80 GPUs with the args.txt published next to it (LARS among them: --config.optim.name=lars),
which is not available offline here and is not reproduced by this file.
"""

from simdino_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()  # batch 512, 100 epochs (10 warm-up), min lr 1e-6, clip 3.0, teacher 0.996 -> 1
  c.method = "dino"
  c.log_every = 100
  c.checkpoint_every = 2500
  c.eval_every = 25000
  c.data.num_workers = 16
  c.model.arch = "resnet50"
  c.model.dtype = "bfloat16"  # main_dino.py's use_fp16 True
  c.data.num_local = 8  # --local_crops_number 8 (default)
  c.data.global_scale = (0.14, 1.0)
  c.data.local_scale = (0.05, 0.14)
  c.dino.teacher_temp = 0.04  # --teacher_temp 0.04 (default), no warm-up (--warmup_teacher_temp_epochs 0)
  c.dino.warmup_teacher_temp_epochs = 0
  c.optim.name = "sgd"
  c.optim.lr = 0.03  # per 256 images (main_dino.py: args.lr * batch / 256)
  c.optim.weight_decay = 1e-4
  c.optim.weight_decay_end = 1e-4
  c.optim.freeze_last_layer_epochs = 1.0
  c.eval.batch_size = 1024
  return c
