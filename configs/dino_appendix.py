r"""The rows of DINO's component tables (Caron et al., ICCV 2021: Table 7, "Important component for self-supervised
ViT pre-training", and appendix B's Tables 14, "Relation to MoCo-v2 and BYOL", and 15, "Relation to SwAV"), one
command per row, the row named by the config argument (``ROW``, ``ROW,/path/to/cifar10.tar`` or ``ROW,in1k``; no
argument: the DINO row), e.g. Table 15's SwAV row:

  python -m simdino_jax.train --config=configs/dino_appendix.py:swav --workdir=/tmp/dino_appendix_swav
  python -m simdino_jax.train --config=configs/dino_appendix.py:swav,in1k --workdir=gs://BUCKET/dino_appendix_swav
  python -m simdino_jax.train --config=configs/dino_appendix.py --workdir=/tmp/dino_appendix_dino

Without a suffix a row is the CIFAR-10 miniature: configs/cifar10_dino.py (the shared CPU recipe of
configs/cifar10_common.py, ViT width 96, 1000 steps; data from $SIMDINO_CIFAR10 or the path given after the comma)
with the row's components switched. ``,in1k`` gives the paper's setting of these tables, ViT-S/16 trained for 300
epochs on ImageNet-1k (``in1k_base`` below), for the rows of the ``dino`` method.

The tables, as the paper prints them (ViT-S/16, 300 epochs; Table 7: k-NN / linear top-1, Tables 14-15: linear):

  Table 7   method   mom.  SK  MC  loss  pred.  k-NN  lin.     Table 15  method  mom.  operation       lin.
  1         DINO     x         x   CE          72.8  76.1     1         DINO    x     centering       76.1
  2                            x   CE           0.1   0.1     2                 x     Softmax(batch)  75.8
  3                  x     x   x   CE          72.2  76.0     3                 x     Sinkhorn-Knopp  76.0
  4                  x             CE          67.9  72.5     4                       centering        0.1
  5                  x         x   MSE         52.6  62.4     5                       Softmax(batch)  72.2
  6                  x         x   CE    x     71.8  75.6     6         SwAV          Sinkhorn-Knopp  71.8
  7         BYOL     x             MSE   x     66.6  71.4
  8         MoCov2   x             INCE        62.0  71.6
  9         SwAV           x   x   CE          64.7  71.8

  Table 14  method  loss  MC  centering  BN  pred.  lin.
  1         DINO    CE    x   x                     76.1
  2                 MSE   x   x                     62.4
  3                 CE    x   x              x     75.6
  4                 CE        x                     72.5
  5         MoCov2  INCE                 x          71.4
  6                 INCE  x              x          73.4
  7         BYOL    MSE                  x   x      71.4
  8                 MSE                  x           0.1
  9                 MSE       x                     52.6
  10                MSE   x              x   x      64.8

(x: the component is on. "No momentum" is a copy of the student with a stop-gradient as teacher. Table 7's MoCo-v2
row reads 71.6 and Table 14's 71.4.)

The rows (``ROWS``) and what each switches from its base:

  dino                        T7.1 T14.1 T15.1  nothing (cifar10_dino.py)
  no_momentum                 T7.2 T15.4        teacher.self_distillation False
  sk                          T7.3 T15.3        dino.centering "sinkhorn_knopp"
  no_multicrop                T7.4 T14.4        data.num_local 0, data.global_scale (0.14, 1)
  mse                         T7.5 T14.2        dino.loss "mse"
  predictor                   T7.6 T14.3        head.predictor True
  byol                        T7.7 T14.7        method byol (configs/cifar10_byol.py: no multi-crop), head.use_bn
  moco_v2                     T7.8 T14.5        method moco_v2 (configs/cifar10_moco_v2.py: no multi-crop)
  swav                        T7.9 T15.6        teacher.self_distillation False, dino.centering "sinkhorn_knopp"
  mse_no_multicrop            T14.9             dino.loss "mse", data.num_local 0, data.global_scale (0.14, 1)
  softmax_batch               T15.2             dino.centering "softmax_batch"
  no_momentum_softmax_batch   T15.5             teacher.self_distillation False, dino.centering "softmax_batch"

What is not exactly the paper's:
  * "no multi-crop" is two global crops at scale (0.14, 1), main_dino.py's own advice ("When disabling multi-crop we
    recommend to use --global_crops_scale 0.14 1."); "multi-crop" is the base's crops.
  * The MSE and "+ pred." rows are ``dino.loss="mse"`` and ``head.predictor`` of methods/dino.py (the MSE of BYOL on
    l2-normalised outputs between the student and the centred teacher; BYOL's predictor MLP on the student's head).
  * SwAV here is the row of the tables: DINO's framework (its head, temperatures and prototypes) with a stop-gradient
    copy of the student as teacher and Sinkhorn-Knopp targets; the SwAV method itself (its 2-layer BN head, 3000
    prototypes, epsilon 0.05, swapped prediction, queue) is ``--config.method=swav`` (configs/cifar10_swav.py).
  * MoCo-v2 rows use methods/moco.py as facebookresearch/moco builds it (``--mlp`` head without BN); the paper's
    reimplementation had "a bigger projection head (3 layers, with BN and 256-d output)", which is not reproduced.
    Table 14's BN column is on for BYOL (``head.use_bn``, BYOL's own projector and predictor).
  * Table 14 rows 6 and 10 (MoCo-v2 and BYOL with multi-crop) are not rows: methods/moco.py and methods/byol.py take
    the two global crops only.
  * Table 14 row 8 (BYOL without predictor, collapses) is not a row: methods/byol.py always has its predictor.
  * Appendix C's "BN in the head" of DINO (k-NN 69.7 without, 68.6 with, ViT-S 100 epochs) is not a row of these
    tables; it is ``--config=configs/dino_appendix.py:dino --config.head.use_bn_in_head=True`` (main_dino.py's
    ``--use_bn_in_head``: BatchNorm after each hidden Linear of DINO's head).
  * ``,in1k`` exists for the dino-method rows only; the paper's MoCo-v2 / BYOL reimplementations on ViT-S (head,
    optimiser, schedule) are not given in the paper.

Runtime: each CIFAR row about as configs/cifar10_dino.py (13-22 min on 2 CPU cores for 1000 steps; the rows without
local crops are faster), not measured row by row; the in1k rows as DINO ViT-S/16 for 300 epochs (the paper: 72.6 h
on 2 x 8 V100 with 10 local crops, Table 8).
Expected result: the paper's figures above for ``,in1k``; for the CIFAR rows, see docs/results.md (not measured yet).
"""

import os
import runpy

from simdino_jax.errors import ConfigError

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str):
  return runpy.run_path(os.path.join(_HERE, name))["get_config"]


NO_MULTICROP = {"data.num_local": 0, "data.global_scale": (0.14, 1.0)}

# name -> (base, the paper's rows, the components switched from the base). Bases: "dino" = configs/cifar10_dino.py,
# "byol" / "moco_v2" = configs/cifar10_byol.py / cifar10_moco_v2.py (the methods on the same shared recipe).
ROWS = {
  "dino": ("dino", ("T7.1", "T14.1", "T15.1"), {}),
  "no_momentum": ("dino", ("T7.2", "T15.4"), {"teacher.self_distillation": False}),
  "sk": ("dino", ("T7.3", "T15.3"), {"dino.centering": "sinkhorn_knopp"}),
  "no_multicrop": ("dino", ("T7.4", "T14.4"), dict(NO_MULTICROP)),
  "mse": ("dino", ("T7.5", "T14.2"), {"dino.loss": "mse"}),
  "predictor": ("dino", ("T7.6", "T14.3"), {"head.predictor": True}),
  "byol": ("byol", ("T7.7", "T14.7"), {"head.use_bn": True}),
  "moco_v2": ("moco_v2", ("T7.8", "T14.5"), {}),
  "swav": ("dino", ("T7.9", "T15.6"), {"teacher.self_distillation": False, "dino.centering": "sinkhorn_knopp"}),
  "mse_no_multicrop": ("dino", ("T14.9",), {"dino.loss": "mse", **NO_MULTICROP}),
  "softmax_batch": ("dino", ("T15.2",), {"dino.centering": "softmax_batch"}),
  "no_momentum_softmax_batch": (
    "dino",
    ("T15.5",),
    {"teacher.self_distillation": False, "dino.centering": "softmax_batch"},
  ),
}
BASES = {"dino": "cifar10_dino.py", "byol": "cifar10_byol.py", "moco_v2": "cifar10_moco_v2.py"}


def in1k_base():
  """The tables' setting: DINO ViT-S/16, 300 epochs on ImageNet-1k, 2 x 224 + 10 x 96 crops (Table 8's 76.1 row),
  the README's "boosted" ViT-S run: ``main_dino.py --arch vit_small --epochs 300 --teacher_temp 0.07
  --warmup_teacher_temp_epochs 30 --norm_last_layer false`` with the other arguments at main_dino.py's defaults
  (patch 16, 65536 prototypes, momentum 0.996, lr 5e-4 x B/256, min_lr 1e-6, 10 warm-up epochs, weight decay 0.04 ->
  0.4, clip 3.0, freeze_last_layer 1, drop path 0.1, crop scales (0.4, 1) / (0.05, 0.4)) on 2 nodes x 8 GPUs x 64 =
  batch 1024. Built from configs/dino_vitb16_in1k.py (the same code path, ViT-B/16 100 epochs) with what differs."""
  c = _load("dino_vitb16_in1k.py")()  # 10 local crops, teacher temperature 0.04 -> 0.07 over 30 epochs already
  c.model.variant = "S/16"
  c.batch_size = 1024
  c.total_epochs = 300
  c.head.norm_last_layer = False  # --norm_last_layer false ("only safe with --arch vit_small")
  return c


def get_config(arg=None):
  parts = [p.strip() for p in (arg or "dino").split(",") if p.strip()]
  if not parts or parts[0] not in ROWS:
    raise ConfigError(
      f"configs/dino_appendix.py: give a row, --config=configs/dino_appendix.py:ROW[,in1k|,/path/to/cifar10.tar], "
      f"ROW one of {', '.join(ROWS)}; got {arg!r}"
    )
  name, rest = parts[0], parts[1:]
  base, _, components = ROWS[name]
  if "in1k" in rest:
    if base != "dino":
      raise ConfigError(
        f"configs/dino_appendix.py:{name},in1k: the paper does not give its {base} reimplementation's ViT-S/16 "
        "recipe; this row exists on the CIFAR-10 miniature only"
      )
    c = in1k_base()
  else:
    c = _load(BASES[base])(rest[0] if rest else None)
  for field, value in components.items():
    c.update_from_flattened_dict({field: value})
  return c
