"""Host data-pipeline throughput: multi-crop images per second per process.

Times the training input pipeline (``simdino_jax.data.pipeline.train_iterator``: source read + JPEG decode +
multi-crop augmentation + batching) for each ``--workers`` count, after ``--warmup_batches`` batches, and reports
images/s in total and per process (per grain worker process; with 0 workers the one in-process read thread).

Recipes: ``dino224`` = DINO / SimDINO ImageNet (2 x 224 + 10 x 96 crops, docs/data.md#augmentation-recipe), ``cifar32`` =
``configs/cifar10_common.py`` (2 x 32 + 6 x 16 crops, local scale (0.1, 0.4), blur sigma (0.1, 0.5)).

``--mode device``: the host part of on-device augmentation (``data.augment_mode="device"``): decode + crop + resize,
uint8 out; flip, the photometric ops and normalisation then run inside the jitted train step (not timed here).

``--reference`` also times, in this process and interleaved with our per-example map on the same decoded images, a
PIL re-implementation of the official recipe (DINO's ``DataAugmentationDINO``: torchvision's RandomResizedCrop
(BICUBIC), RandomHorizontalFlip, ColorJitter, RandomGrayscale on PIL images, PIL GaussianBlur, ImageOps.solarize,
ToTensor + Normalize; torchvision is not needed, the same PIL calls are made here), and reports the ratio. The
reference's tensors are numpy arrays in torchvision's CHW layout.

With 0 workers the run also reports images per CPU-second of the process (``time.process_time``), which
other jobs on the same cores disturb less than wall-clock rates. Prints one JSON object on the last line. On
Linux the script re-executes itself with tcmalloc preloaded when it is installed (``--no-tcmalloc`` or
SIMDINO_NO_TCMALLOC=1 opts out); ``allocator`` says which one ran.

  python benchmarks/data_throughput.py --workers 0,1,2 --reference
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simdino_jax import tcmalloc  # pylint: disable=wrong-import-position  # stdlib only, cheap

DEFAULT_SOURCES = {
  "dino224": "folder:../shared/data/imagenette224-mini/imagenette224-mini.tar",
  "cifar32": "folder:../shared/data/cifar10/cifar10-jpeg.tar",
}
REFERENCE_NAME = "PIL re-implementation of the official recipe"


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    epilog=__doc__.split("\n\n", 1)[1],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--source", default=None, help="data source spec (default: the recipe's, e.g. " + DEFAULT_SOURCES["dino224"] + ")"
  )
  p.add_argument("--recipe", choices=("dino224", "cifar32"), default="dino224")
  p.add_argument(
    "--workers", default="0", help="grain worker processes, one count or a comma-separated list (0 = in-process)"
  )
  p.add_argument("--mode", choices=("host", "device"), default="host")
  p.add_argument("--num_images", type=int, default=256, help="images timed per worker count")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument(
    "--warmup_batches", type=int, default=2, help="batches read before timing (after each worker count's start)"
  )
  p.add_argument("--threads", type=int, default=1, help="grain read threads per process (1 = one core per process)")
  p.add_argument(
    "--resize",
    choices=("default", "pil", "cv2"),
    default="default",
    help="crop resize backend (default: MultiCropConfig's)",
  )
  p.add_argument("--reference", action="store_true", help="also time the PIL re-implementation of the official recipe")
  p.add_argument("--reference_images", type=int, default=64, help="images for the reference comparison")
  p.add_argument(
    "--tcmalloc",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="re-execute with tcmalloc preloaded when it is installed (Linux)",
  )
  args = p.parse_args(argv)
  try:
    args.workers = [int(w) for w in str(args.workers).split(",")]
  except ValueError:
    p.error(f"--workers: expected a count or a comma-separated list of counts, got {args.workers!r}")
  if any(w < 0 for w in args.workers):
    p.error(f"--workers: counts must be >= 0, got {args.workers}")
  for name in ("num_images", "batch_size", "threads", "reference_images"):
    if getattr(args, name) <= 0:
      p.error(f"--{name}: must be positive, got {getattr(args, name)}")
  if args.warmup_batches < 0:
    p.error(f"--warmup_batches: must be >= 0, got {args.warmup_batches}")
  return args


def recipe_config(recipe: str, mode: str, resize: str):
  from simdino_jax.data.multicrop import MultiCropConfig

  kw = {}
  if recipe == "cifar32":  # configs/cifar10_common.py
    kw = dict(
      global_size=32, local_size=16, num_local=6, global_scale=(0.4, 1.0), local_scale=(0.1, 0.4), blur_sigma=(0.1, 0.5)
    )
  if mode == "device":  # the host only crops and resizes (uint8)
    kw["augment_mode"] = "device"
  if resize != "default":
    kw["resize"] = resize
  return MultiCropConfig(**kw)


class OfficialPILRecipe:
  """PIL re-implementation of the official DINO recipe (torchvision's ops on PIL images), for timing.

  Same random decisions as the recipe (drawn with numpy, a negligible cost), the op sequence of
  ``DataAugmentationDINO``: crop + bicubic resize, flip, ColorJitter (PIL ImageEnhance brightness / contrast /
  colour and torchvision's uint8 HSV hue shift, in random order) with p, greyscale with p, PIL GaussianBlur,
  ImageOps.solarize, then ToTensor's /255 and Normalize.
  """

  def __init__(self, cfg):
    import numpy as np

    self.cfg = cfg
    self.mean = np.array((0.485, 0.456, 0.406), np.float32)
    self.std = np.array((0.229, 0.224, 0.225), np.float32)

  @staticmethod
  def _hue(img, hue):
    import numpy as np
    from PIL import Image

    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.array(hue * 255).astype(np.int64).astype(np.uint8)  # wraps around, as torchvision's
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")

  def _crop(self, pil, rng, kind, index):
    import numpy as np
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    from simdino_jax.data import augment

    c = self.cfg
    is_global = kind == "global"
    size = c.global_size if is_global else c.local_size
    top, left, h, w = augment.rrc_params(pil.size[1], pil.size[0], rng, c.global_scale if is_global else c.local_scale)
    img = pil.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if rng.random() < c.flip_p:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < c.jitter_p:
      p = augment.color_jitter_params(rng, c.brightness, c.contrast, c.saturation, c.hue)
      for op in p.order:
        if op == 0:
          img = ImageEnhance.Brightness(img).enhance(p.brightness)
        elif op == 1:
          img = ImageEnhance.Contrast(img).enhance(p.contrast)
        elif op == 2:
          img = ImageEnhance.Color(img).enhance(p.saturation)
        else:
          img = self._hue(img, p.hue)
    if rng.random() < c.grayscale_p:
      img = img.convert("L").convert("RGB")
    blur_p = c.blur_p[index] if is_global else c.blur_p[2]
    if rng.random() <= blur_p:
      img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*c.blur_sigma)))
    if is_global and index == 1 and rng.random() < c.solarize_p:
      img = ImageOps.solarize(img, c.solarize_threshold)
    # ToTensor: HWC uint8 -> contiguous CHW, to float, / 255; Normalize: in place per channel plane.
    x = np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)).astype(np.float32)
    x /= np.float32(255.0)
    x -= self.mean[:, None, None]
    x /= self.std[:, None, None]
    return x

  def _crop_only(self, pil, rng, kind, index):
    """Device mode's host part: the crop and bicubic resize only, uint8 out."""
    import numpy as np
    from PIL import Image

    from simdino_jax.data import augment

    c = self.cfg
    size = c.global_size if kind == "global" else c.local_size
    box = augment.rrc_params(pil.size[1], pil.size[0], rng, c.global_scale if kind == "global" else c.local_scale)
    self._skip_draws(rng, kind, index)
    top, left, h, w = box
    return np.asarray(pil.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC))

  def _skip_draws(self, rng, kind, index):
    # The remaining draws of the crop, so that the crops match those of MultiCrop.sample_params.
    from simdino_jax.data import augment

    c = self.cfg
    rng.random()  # flip
    if rng.random() < c.jitter_p:
      augment.color_jitter_params(rng, c.brightness, c.contrast, c.saturation, c.hue)
    rng.random()  # greyscale
    if rng.random() <= (c.blur_p[index] if kind == "global" else c.blur_p[2]):
      rng.uniform(*c.blur_sigma)
    if kind == "global" and index == 1:
      rng.random()  # solarize

  def __call__(self, image, rng):
    import numpy as np
    from PIL import Image

    pil = Image.fromarray(image)  # torchvision's loader hands over a PIL image
    c = self.cfg
    if getattr(c, "augment_mode", "host") == "device":
      return {
        "global": np.stack([self._crop_only(pil, rng, "global", i) for i in range(c.num_global)]),
        "local": np.stack([self._crop_only(pil, rng, "local", i) for i in range(c.num_local)]),
      }
    return {
      "global": np.stack([self._crop(pil, rng, "global", i) for i in range(c.num_global)]),
      "local": np.stack([self._crop(pil, rng, "local", i) for i in range(c.num_local)]),
    }


def time_pipeline(source, cfg, workers, args) -> dict:
  from simdino_jax.data import pipeline

  it = pipeline.train_iterator(
    source,
    cfg,
    batch_size=args.batch_size,
    seed=0,
    num_workers=workers,
    num_threads=args.threads,
    prefetch_batches=max(2, workers),
  )
  try:
    for _ in range(args.warmup_batches):
      next(it)
    n_batches = max(1, args.num_images // args.batch_size)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(n_batches):
      next(it)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  finally:
    if hasattr(it, "close"):
      it.close()
  n = n_batches * args.batch_size
  run = {
    "workers": workers,
    "images": n,
    "seconds": round(elapsed, 3),
    "images_per_sec": round(n / elapsed, 1),
    "images_per_sec_per_process": round(n / elapsed / max(workers, 1), 1),
  }
  if workers == 0:  # all the work is in this process: also per CPU-second, steadier on a shared machine
    run["images_per_cpu_sec"] = round(n / cpu, 1)
  return run


def time_reference(source, cfg, args) -> dict:
  """Ours (the per-example map) and the PIL reference on the same decoded images, interleaved in chunks of 8.

  Reports wall-clock rates and rates per CPU-second of this process (``time.process_time``), which are steadier
  than wall-clock ones when other jobs share the cores.
  """
  import numpy as np

  from simdino_jax.data.multicrop import MultiCrop

  images = [source[i % len(source)] for i in range(args.reference_images)]
  fns = {"ours": MultiCrop(cfg).random_map, "reference": lambda ex, rng: OfficialPILRecipe(cfg)(ex["image"], rng)}
  wall = dict.fromkeys(fns, 0.0)
  cpu = dict.fromkeys(fns, 0.0)
  for fn in fns.values():  # warm-up (allocator, caches)
    for ex in images[:4]:
      fn(ex, np.random.default_rng(0))
  for start in range(0, len(images), 8):
    for name, fn in fns.items():
      w, c = time.perf_counter(), time.process_time()
      for i, ex in enumerate(images[start : start + 8]):
        fn(ex, np.random.default_rng(start + i))
      wall[name] += time.perf_counter() - w
      cpu[name] += time.process_time() - c
  n = len(images)
  return {
    "name": REFERENCE_NAME,
    "images": n,
    "images_per_sec": round(n / wall["reference"], 1),
    "images_per_cpu_sec": round(n / cpu["reference"], 1),
    "ours_images_per_sec": round(n / wall["ours"], 1),
    "ours_images_per_cpu_sec": round(n / cpu["ours"], 1),
    "ratio": round(wall["reference"] / wall["ours"], 2),
    "ratio_cpu": round(cpu["reference"] / cpu["ours"], 2),
  }


def main(argv=None):
  args = parse_args(argv)
  if args.tcmalloc:
    tcmalloc.maybe_reexec(script=__file__)

  from simdino_jax.data import sources

  spec = args.source or DEFAULT_SOURCES[args.recipe]
  source = sources.load_source(spec, "train")
  cfg = recipe_config(args.recipe, args.mode, args.resize)
  runs = []
  for w in args.workers:
    runs.append(time_pipeline(source, cfg, w, args))
    print(
      f"workers={w}: {runs[-1]['images_per_sec']} images/s, {runs[-1]['images_per_sec_per_process']} per process",
      file=sys.stderr,
      flush=True,
    )
  out = {
    "benchmark": "data_throughput",
    "recipe": args.recipe,
    "mode": args.mode,
    "source": spec,
    "resize": cfg.resize,
    "batch_size": args.batch_size,
    "threads_per_process": args.threads,
    "allocator": tcmalloc.allocator(),
    "cpu_count": os.cpu_count(),
    "runs": runs,
    "images_per_sec_per_process": runs[0]["images_per_sec_per_process"],
  }
  if args.reference:
    ref = time_reference(source, cfg, args)
    out["reference"] = ref
    out["ratio_vs_reference"] = ref["ratio"]
  print(json.dumps(out))


if __name__ == "__main__":
  main()
