r"""SimDINO on a folder of your own photos: CPU-sized by default, one argument switches to 224 px ViT-S/16 on a GPU.

Command (the folder as the config argument, made absolute, `~` expanded; any size and mix of .jpg/.jpeg/.png files):

  python -m simdino_jax.train --config=configs/own_images.py:/path/to/photos --workdir=runs/photos
  python -m simdino_jax.train --config=configs/own_images.py:/path/to/photos,gpu --workdir=runs/photos_s16

Without the folder, `python -m simdino_jax.train --config=configs/own_images.py --workdir=runs/photos` stops before
compiling with one line saying how to give it. The folder (or an uncompressed tar of it, `launch/prepare_data.sh
folder`) is read as the folder source reads any (docs/data.md#your-own-photos):
  * flat: the photos directly in the folder, or in sub-folders that are not train/ test/ val/: one unlabelled
    training set. Training needs no labels; the label-based evaluators (k-NN, linear, few-shot) are then off, so
    judge the run by `metrics.jsonl` (`loss`, `effective_rank`, `feature_std`) or give labelled data with
    `--config.data.eval_source=folder:/path/to/labelled` (train/<class>/..., test/<class>/...);
  * labelled: train/<class>/<image> and test/<class>/<image> (or val/): training reads train/ and the k-NN
    evaluator runs at initialisation and at the end (DIR/eval/knn.json).

CPU default (2 cores): the measured CIFAR-10 SimDINO recipe (configs/cifar10_simdino.py: SimDINOv2's backbone
settings, official SimDINO objective, batch 32, 2000 steps, 64,000 images) at twice its resolution: 2 x 64 px
global and 6 x 32 px local crops through a ViT of width 96 / depth 4 / 3 heads with patch 8, i.e. the same 8 x 8 patch
tokens per global crop (4 x 4 per local) and so the same step cost as the 32 px recipe, with four times the pixels
per token. Photos of any size are cropped by fractions of the image (global scale 0.4-1, local 0.1-0.4) and
resized to those sizes; the blur radius is scaled to the crop size ((0.1, 1.0) px at 64 px; (0.1, 2.0) at 224).

Runtime (CPU default), measured on the Imagenette images of ../shared/data/imagenette224-mini (real 224 x 224
photos, 10 classes; 1,000 in train/, 500 in val/), 300 of the 2000 steps (--config.total_steps=300
--config.warmup_steps=30), on 2 cores shared with about 15 other processes (tcmalloc): 17 min 31 s wall, 4 min 17 s of
CPU time, compilation and both k-NN passes included; 9-13 images/s under that load. The full 2000 steps were not run
here: the step costs what configs/cifar10_simdino.py's does (same token counts; 224 px JPEGs decode in 0.4 ms), so
count about 15 minutes on 2 quiet cores (that file: 14 min 42 s measured), an estimate. Large photos cost a full
decode per example (a 12-megapixel JPEG about 0.1 s of CPU, 3 s per batch of 32): pack a downscaled copy with
`MAX_SIDE=512 launch/prepare_data.sh folder /path/to/photos photos.tar` and train on photos.tar.
Expected result (CPU default, measured on that folder after those 300 steps): loss -1.35 at step 50 -> -1.77 at step
300 (alignment 0.62 -> 0.72), effective rank 7.2 -> 10.5 (no collapse); teacher k-NN top-1 on val/ 33.80% against
27.20% for the network at initialisation (+6.6; top-5 78.8% vs 71.4%). A few hundred photos are enough to run, not
to learn features that transfer.

GPU (`:PATH,gpu`): the official SimDINO ViT-S/16 recipe (configs/simdino_vits16_in1k.py: 2 x 224 + 10 x 96 px
crops, drop path 0.1, head 2048 -> 256, lr 5e-4 per 256 images, 100 epochs with 10 of warm-up, bfloat16) at batch 64
on one GPU with one covariance over the batch (`loss.groups=1`, eps = sqrt(0.05)), 8 data-loading workers. Expected
result: not measured (no GPU run of this file yet). Runtime: an estimate, not measured: ViT-S/16 costs about a
third of configs/simdino_vitb16_in1k.py's 470 GFLOP per image, so 100 epochs of 10,000 photos (10^6 images) are
~1.6e17 FLOP, about 10 minutes of H100 compute at 40% of its bfloat16 peak; the 8 workers' decoding and cropping
(about 140 images/s of 2 x 224 + 10 x 96 crops per process from 224 px JPEGs, docs/performance.md) set the
pace at roughly 1,000 images/s, so count 20-30 minutes, more for large photos (MAX_SIDE above). More GPUs:
launch/gpu.sh, with `batch_size` global (over all devices).
"""

import os
import runpy

_HERE = os.path.dirname(os.path.abspath(__file__))
# Loaded by path so the config works from any working directory.
_CIFAR = runpy.run_path(os.path.join(_HERE, "cifar10_simdino.py"))
_VITS16 = runpy.run_path(os.path.join(_HERE, "simdino_vits16_in1k.py"))

MODES = ("cpu", "gpu")


def parse_arg(arg):
  """``"PATH"`` or ``"PATH,gpu"`` (or ``",cpu"``) -> ``(path, mode)``; the mode is split off the last comma only
  when it names one, so a path with commas in it still works. No path leaves ``data.source`` empty: the config
  still loads (its fields can be read) and training refuses it before compiling, in one line saying what to give
  (config.validate)."""
  arg = (arg or "").strip()
  path, _, mode = arg.rpartition(",")
  if mode.strip().lower() not in MODES:
    path, mode = arg, "cpu"
  path = path.strip().removeprefix("folder:")
  # Absolute, so DIR/config.json names the same folder for evaluate run from anywhere; `~` too (the shell does not
  # expand it after `:`).
  return (os.path.abspath(os.path.expanduser(path)) if path else ""), mode.strip().lower()


def cpu_config(path):
  c = _CIFAR["get_config"](path)  # data.source = folder:PATH
  if not path and c.data.source:
    c.data.source = ""  # not the CIFAR-10 recipes' $SIMDINO_CIFAR10: no folder given
  c.data.global_size, c.data.local_size = 64, 32
  c.data.augment.blur_sigma = (0.1, 1.0)  # scaled with the crop: (0.1, 2.0) at 224 px, (0.1, 0.5) at 32 px
  c.model.variant = "Ti/8"  # patch 8; width 96, depth 4, 3 heads as the CIFAR-10 recipe sets them
  c.model.img_size = 64
  return c


def gpu_config(path):
  c = _VITS16["get_config"]()
  c.data.source = "folder:" + path if path else ""
  c.batch_size = 64
  c.loss.groups = 1  # one GPU: one covariance over the batch (the official reduce_cov=1 form)
  c.loss.eps = 0.05**0.5
  c.data.num_workers = 8
  c.log_every, c.checkpoint_every, c.eval_every = 50, 1000, 0
  c.eval.batch_size = 256
  c.evals.linear.protocol = "frozen"  # small data: the fast probe on cached features
  return c


def get_config(arg=None):
  path, mode = parse_arg(arg)
  return gpu_config(path) if mode == "gpu" else cpu_config(path)
