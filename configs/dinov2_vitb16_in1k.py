r"""DINOv2 ViT-B/16 on ImageNet-1k, 100 epochs: the DINOv2 baseline of the SimDINOv2 paper (docs/methods.md#dinov2-and-ibot, docs/methods.md#vision-transformer, docs/methods.md#optimisation).

Command (TFDS data prepared as in docs/data.md#tfds-source):

  python -m simdino_jax.train --config=configs/dinov2_vitb16_in1k.py --workdir=gs://BUCKET/dinov2_vitb16

Runtime: the SimDINOv2 ViT-B/16 run's FLOPs plus the 65536-prototype head on up to 2 x 98 gathered patch tokens per
image (~+10%): ~7e19 FLOP for 100 epochs, roughly 2 days on one H200, ~7 h on 8 (estimate, not measured).
Expected result (SimDINOv2 paper / official SimDINO README, "DINOv2 models that we trained"): k-NN 76.0, linear 77.2
top-1 on ImageNet-1k val, with the README's linear command for its v2 models, SimDINO's fork of DINOv2's
eval/linear.py (evals.linear.protocol "simdinov2", inherited from configs/simdinov2_vitb16_in1k.py); DINOv2's own
grid is --config.evals.linear.protocol=dinov2.

The SimDINOv2 authors trained this baseline with their fork of the DINOv2 code: `simdinov2/configs/
ssl_default_config.yaml` (DINO + iBOT losses, `use_mcr: false`) with `student.arch: vit_base`. This config follows
that file, so the comparison with configs/simdinov2_vitb16_in1k.py changes only what the DINOv2 recipe changes:
  * loss: DINO cls cross-entropy + iBOT masked-patch cross-entropy (weight 1) + KoLeo 0.1, one head shared by cls and
    patch tokens (`ibot.separate_head: false`: MLP 2048 -> 256 bottleneck -> 65536 weight-normalised prototypes),
    centring with momentum 0.9, teacher temperature 0.04 -> 0.07 over 30 epochs, student temperature 0.1;
  * prototype norms g trainable (DINOv2 has no norm_last_layer option: head.norm_last_layer False); the prototype
    layer gets lr 0 during the first epoch;
  * LayerScale 1e-5, drop path 0.3 uniform over the blocks, teacher momentum 0.992 -> 1.
Shared with SimDINOv2 (same base file): 4 registers, DINOv2 token init, interpolation to an explicit size with
antialias, block masks on half of the global crops with ratios (0.1, 0.5), lr 0.004 x sqrt(B/1024) warmed up from
min_lr, layer decay 0.9, patch-embed lr x 0.2, clip 3.0 per module, weight decay 0.04 -> 0.4, batch 1024.
Crops: the fork's base file has DINO's 2 x 224 at (0.4, 1) and 10 x 96 at (0.05, 0.4), used here. Upstream
facebookresearch/dinov2's ssl_default_config differs (global (0.32, 1), 8 locals at (0.05, 0.32), 0 registers,
interpolate_offset 0.1 without antialias, 64 images per GPU, and global crop 1 never blurred by its inverted-
probability bug); for that variant:
  --config.data.global_scale='(0.32, 1.0)' --config.data.num_local=8 --config.data.local_scale='(0.05, 0.32)'
  --config.model.num_registers=0 --config.model.interpolate_offset=0.1 --config.model.interpolate_antialias=False
As DINOv2, the teacher temperature rises per iteration (`dino.teacher_temp_per = "iteration"`, its CosineScheduler
warm-up; not DINO v1's per-epoch staircase), and the prototype norms g get weight decay: DINOv2 exempts only
parameters whose name contains "bias", "norm" or "gamma", and `last_layer.weight_g` has none of them
(simdino_jax/optim.py `decays` decays every `weight_g`, although it is a 1-D (K,) leaf here).
"""

import os
import runpy

# Loaded by path so the config works from any working directory.
_SIMDINOV2 = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "simdinov2_vitb16_in1k.py"))


def get_config(arg=None):
  c = _SIMDINOV2["get_config"](arg)  # the shared base: data, backbone, masks, optimiser, batch
  # DINOv2's head (2048 -> 256 -> 65536 prototypes, shared by cls and patches) and loss (student 0.1, teacher 0.04 ->
  # 0.07 over 30 epochs, centre momentum 0.9, iBOT weight 1) are config.py's defaults; drop path stays uniform.
  c.method = "dinov2"
  c.model.layerscale = 1e-5
  c.model.drop_path_rate = 0.3
  c.head.norm_last_layer = False
  c.dino.teacher_temp_per = "iteration"  # DINOv2 warms the temperature up per iteration (CosineScheduler)
  c.dino.koleo_weight = 0.1
  c.dino.koleo_groups = 8  # KoLeo per GPU as DINOv2: the fork's 8 GPUs x 128 images, whatever devices run this
  c.optim.freeze_last_layer_epochs = 1.0
  c.optim.freeze_mode = "zero_lr"  # DINOv2: last-layer lr 0 (its Adam moments keep accumulating)
  c.teacher.momentum = 0.992
  return c
