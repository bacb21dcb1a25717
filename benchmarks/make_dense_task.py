r"""CIFAR mosaics: a small dense task (semantic segmentation, 10 classes) built from the CIFAR-10 image-folder tar,
written in the segmentation evaluator's ``folder:`` layout (data/segmentation.py), so a 32-px CIFAR network's patch
features can be scored densely (issue 32's Gram-anchoring miniature; docs/evaluation.md#a-dense-task-from-cifar-10).

  python benchmarks/make_dense_task.py --tar=/work/shared/data/cifar10/cifar10-jpeg.tar --out=/tmp/cifar_mosaics \
      [--train=2000] [--val=500] [--seed=0] [--size=32] [--grid=4]
  python -m simdino_jax.evaluate --workdir=W --eval=segmentation \
      --config.evals.segmentation.source=folder:/tmp/cifar_mosaics --config.evals.segmentation.num_classes=10 \
      --config.evals.segmentation.crop_size=32 --config.evals.segmentation.iterations=2000

Each sample is a ``size`` x ``size`` canvas cut into 2-4 rectangles (the number uniform in {2, 3, 4}) by guillotine
cuts: the largest rectangle is cut across its longer side (a coin decides a square), at a position uniform among
those leaving both parts at least ``size / 4`` pixels and NOT on a multiple of ``grid`` (the ViT's patch size), so
every boundary runs through patches instead of between them. Each rectangle holds one CIFAR image of its own class
(the classes of a sample are distinct, drawn without replacement; the image uniform among that class's), resized with
its aspect kept until it covers the rectangle (area interpolation: a downscale, or none) and cropped to it about its
centre, where CIFAR's objects sit. The label map gives every pixel the class id of the image it came from (the tar's
sorted class names, CIFAR's usual 0-9 order); there is no ignore label (the evaluator pads its training crops with
255 itself). Train mosaics come from the tar's train split, val mosaics from its test split; sample i of a split is a
pure function of (seed, split, i), so a larger build extends a smaller one. Images and label maps are PNG (lossless:
a pixel's colour is exactly its source image's).

Written: OUT/images/{train,val}/NNNNN.png, OUT/masks/{train,val}/NNNNN.png (one channel of class ids) and
OUT/task.json (the classes, the counts, the seed, the source and each sample's rectangles and source images). A
rebuild into an OUT holding a task.json replaces its images and masks; an OUT holding anything else is refused.

``--init_workdir=W [--config=configs/cifar10_simdinov2.py]`` (with or without a task build) writes the recipe's
network at initialisation (seed config.seed, the tar as its data) as W's step-0 checkpoint and config.json: the
random-network reference, evaluated with the same ``--workdir=W`` command (the evaluate CLI has no init mode).

Bad input (a missing or unreadable tar, a tar without a train or test split or with fewer than 4 classes, an OUT that
is not a task of this script, a count < 1): one line on stderr naming it, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import sys
import time

import cv2
import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, ROOT)

from simdino_jax import cli  # noqa: E402
from simdino_jax.data.sources.folder import load_folder  # noqa: E402
from simdino_jax.errors import DataError, SimdinoError  # noqa: E402

SPLITS = {"train": ("train", 0), "val": ("test", 1)}  # task split -> (the tar's split, its code in the seed)
MAX_PARTS = 4


def cut_canvas(rng: np.random.Generator, parts: int, size: int, grid: int) -> list[tuple[int, int, int, int]]:
  """``parts`` rectangles (y0, y1, x0, x1) tiling a size x size canvas by guillotine cuts (module doc): each cut
  leaves at least size // 4 pixels on both sides and lies off the multiples of ``grid`` (grid <= 1: anywhere)."""
  side = max(1, size // 4)
  rects = [(0, size, 0, size)]
  while len(rects) < parts:
    i = max(range(len(rects)), key=lambda j: (rects[j][1] - rects[j][0]) * (rects[j][3] - rects[j][2]))
    y0, y1, x0, x1 = rects.pop(i)
    h, w = y1 - y0, x1 - x0
    across_x = w > h or (w == h and rng.random() < 0.5)  # cut the longer side: a vertical line splits x
    lo, hi = (x0, x1) if across_x else (y0, y1)
    cands = [c for c in range(lo + side, hi - side + 1) if grid <= 1 or c % grid]
    if not cands:
      raise ValueError(f"a {h}x{w} rectangle cannot be cut off the {grid}-px grid with {side} px on each side")
    c = int(cands[rng.integers(len(cands))])
    rects += [(y0, y1, x0, c), (y0, y1, c, x1)] if across_x else [(y0, c, x0, x1), (c, y1, x0, x1)]
  return sorted(rects)


def cover_crop(image: np.ndarray, h: int, w: int) -> np.ndarray:
  """``image`` resized with its aspect kept to the smallest size covering h x w (area interpolation), cropped to h x
  w about its centre."""
  ih, iw = image.shape[:2]
  scale = max(h / ih, w / iw)
  nh, nw = max(h, round(ih * scale)), max(w, round(iw * scale))
  if (nh, nw) != (ih, iw):
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
  top, left = (nh - h) // 2, (nw - w) // 2
  return image[top : top + h, left : left + w]


def mosaic(src, by_class: list[np.ndarray], rng: np.random.Generator, size: int, grid: int):
  """(image (size, size, 3) uint8, label map (size, size) uint8, record) of one sample (module doc)."""
  parts = int(rng.integers(2, MAX_PARTS + 1))
  classes = rng.choice(len(by_class), parts, replace=False)
  rects = cut_canvas(rng, parts, size, grid)
  image = np.zeros((size, size, 3), np.uint8)
  label = np.zeros((size, size), np.uint8)
  used = []
  for (y0, y1, x0, x1), k in zip(rects, classes):
    index = int(by_class[k][rng.integers(len(by_class[k]))])
    image[y0:y1, x0:x1] = cover_crop(src.decode(index), y1 - y0, x1 - x0)
    label[y0:y1, x0:x1] = k
    used.append({"rect": [y0, y1, x0, x1], "class": int(k), "file": src.file_name(index)})
  return image, label, used


def _source(tar: str, split: str):
  src = load_folder(tar, split)
  if src.num_classes < MAX_PARTS:
    raise DataError(f"{tar}: its {split!r} split has {src.num_classes} classes; a mosaic needs at least {MAX_PARTS}")
  by_class = [np.flatnonzero(src.labels == k) for k in range(src.num_classes)]
  empty = [src.class_names[k] for k, idx in enumerate(by_class) if len(idx) == 0]
  if empty:
    raise DataError(f"{tar}: class(es) {empty} have no image in its {split!r} split")
  return src, by_class


def build(tar: str, out: str, *, train: int = 2000, val: int = 500, seed: int = 0, size: int = 32, grid: int = 4):
  """Writes the task (module doc) into ``out``; returns its task.json content. DataError on bad input."""
  for name, n in (("--train", train), ("--val", val), ("--size", size)):
    if n < 1:
      raise DataError(f"make_dense_task.py {name}: must be >= 1, got {n}")
  tar, out = os.path.abspath(os.path.expanduser(tar)), os.path.abspath(os.path.expanduser(out))
  if not os.path.isfile(tar):
    raise DataError(f"CIFAR-10 tar {tar}: no such file")
  sources = {split: _source(tar, tar_split) for split, (tar_split, _) in SPLITS.items()}
  names = [tuple(s.class_names) for s, _ in sources.values()]
  if names[0] != names[1]:
    raise DataError(f"{tar}: its train and test splits have different classes")
  if os.path.isdir(out) and os.listdir(out):
    if not os.path.isfile(os.path.join(out, "task.json")):
      raise DataError(f"output folder {out}: not empty and holds no task.json of this script; name a new folder")
    for d in ("images", "masks"):
      shutil.rmtree(os.path.join(out, d), ignore_errors=True)
  counts = {"train": train, "val": val}
  samples = {}
  for split, (src, by_class) in sources.items():
    code = SPLITS[split][1]
    for d in ("images", "masks"):
      os.makedirs(os.path.join(out, d, split), exist_ok=True)
    samples[split] = []
    for i in range(counts[split]):
      image, label, used = mosaic(src, by_class, np.random.default_rng([seed, code, i]), size, grid)
      Image.fromarray(image).save(os.path.join(out, "images", split, f"{i:05d}.png"))
      Image.fromarray(label).save(os.path.join(out, "masks", split, f"{i:05d}.png"))
      samples[split].append(used)
  task = {
    "task": "CIFAR mosaics (benchmarks/make_dense_task.py)",
    "source": tar,
    "seed": seed,
    "size": size,
    "grid": grid,
    "counts": counts,
    "num_classes": len(names[0]),
    "class_names": list(names[0]),
    "samples": samples,
  }
  with open(os.path.join(out, "task.json"), "w") as f:
    json.dump(task, f)
  return task


def init_checkpoint(config, workdir: str) -> str:
  """``config``'s state at initialisation (a pure function of config.seed) as ``workdir``'s step-0 checkpoint, with
  the config.json that ``simdino_jax.evaluate --workdir`` reads; returns the checkpoint's folder."""
  from simdino_jax.io import checkpointing
  from simdino_jax.train import trainer

  tr = trainer.Trainer(config, workdir)
  ckpts = os.path.join(tr.workdir, "checkpoints")
  if os.path.isdir(ckpts) and os.listdir(ckpts):
    raise DataError(f"--init_workdir {tr.workdir}: already holds checkpoints; name a new folder")
  os.makedirs(tr.workdir, exist_ok=True)
  with open(os.path.join(tr.workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  with tr.checkpointer() as ckpt:
    ckpt.save(0, tr.init_state(), checkpointing.config_dict(config))
    ckpt.wait()
  return os.path.join(ckpts, "0")


def write_init_checkpoint(config_path: str, workdir: str, tar: str) -> str:
  """``init_checkpoint`` of the recipe file ``config_path`` (its get_config given the tar as its data)."""
  if not os.path.isfile(config_path):
    raise DataError(f"--config {config_path}: no such file")
  return init_checkpoint(runpy.run_path(config_path)["get_config"](os.path.abspath(os.path.expanduser(tar))), workdir)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--tar", default="/work/shared/data/cifar10/cifar10-jpeg.tar", help="CIFAR-10 image-folder tar")
  p.add_argument("--out", help="the task's folder (omit to write only --init_workdir)")
  p.add_argument("--train", type=int, default=2000, help="train mosaics (from the tar's train split)")
  p.add_argument("--val", type=int, default=500, help="val mosaics (from the tar's test split)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--size", type=int, default=32, help="canvas side in pixels")
  p.add_argument("--grid", type=int, default=4, help="the patch size: no cut on its multiples (<= 1: anywhere)")
  p.add_argument("--init_workdir", help="also write the --config recipe at initialisation as this step-0 run")
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "cifar10_simdinov2.py"))
  a = p.parse_args(argv)
  if not a.out and not a.init_workdir:
    p.error("name --out (the task) and/or --init_workdir (the random-network checkpoint)")
  try:
    if a.out:
      t0 = time.time()
      task = build(a.tar, a.out, train=a.train, val=a.val, seed=a.seed, size=a.size, grid=a.grid)
      print(
        f"make_dense_task.py: {task['counts']['train']} train / {task['counts']['val']} val {a.size}x{a.size} "
        f"mosaics of {task['num_classes']} classes in {os.path.abspath(a.out)} ({time.time() - t0:.1f} s); evaluate "
        f"with --config.evals.segmentation.source=folder:{os.path.abspath(a.out)} "
        f"--config.evals.segmentation.num_classes={task['num_classes']} --config.evals.segmentation.crop_size={a.size}"
      )
    if a.init_workdir:
      t0 = time.time()
      path = write_init_checkpoint(a.config, a.init_workdir, a.tar)
      print(f"make_dense_task.py: {os.path.basename(a.config)} at initialisation -> {path} ({time.time() - t0:.1f} s)")
  except (SimdinoError, ValueError, OSError) as e:
    sys.exit(f"make_dense_task.py: error: {cli.one_line(e)}")


if __name__ == "__main__":
  main()
