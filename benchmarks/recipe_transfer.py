r"""Does a CIFAR-10 recipe learn on other small images? Train it unchanged except data.source on a downscaled copy of
an image-folder dataset (default: the Imagenette mini tar, 10 classes, 1,000 train / 500 val images, at 64 px).

  python benchmarks/recipe_transfer.py --config configs/cifar10_simdino.py \
      --source /path/to/imagenette224-mini.tar --size 64 [--out /tmp/imagenette64]

The copy (OUT/train/<class>/*.png, OUT/val/<class>/*.png, bicubic to size x size, made once and reused) is given to
the recipe as its config argument, i.e. exactly ``--config=RECIPE:OUT``; nothing else changes (crop sizes, steps,
lr, ...). Prints one JSON line: {"benchmark": "recipe_transfer", config, images, knn_top1, knn_top1_at_init, gain,
effective_rank, minutes, ...}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import runpy
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import miniature  # benchmarks/miniature.py: one training run

DEFAULT_SOURCE = os.path.join(miniature.ROOT, "..", "shared", "data", "imagenette224-mini", "imagenette224-mini.tar")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--config", default="configs/cifar10_simdino.py", help="recipe file taking the data as its argument")
  p.add_argument("--source", default=DEFAULT_SOURCE, help="image-folder tar or directory with train/ and val|test/")
  p.add_argument("--size", type=int, default=64, help="side of the square copies")
  p.add_argument("--out", default="", help="folder for the copy (default: next to the system's temporary files)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override (reported)")
  return p.parse_args(argv)


def downscaled_copy(source: str, out: str, size: int) -> int:
  """Writes every <split>/<class>/<image> of ``source`` (tar or folder) as a size x size PNG under ``out``; returns
  the number of images (0 new files when ``out`` is already complete, marked by OUT/.complete)."""
  from PIL import Image

  marker = os.path.join(out, ".complete")
  if os.path.exists(marker):
    with open(marker) as f:
      return int(f.read())

  def members():
    if os.path.isdir(source):
      for dirpath, _, files in os.walk(source):
        for name in sorted(files):
          path = os.path.join(dirpath, name)
          with open(path, "rb") as f:
            yield os.path.relpath(path, source), f.read()
    else:
      with tarfile.open(source) as tar:
        for m in tar:
          if m.isfile():
            yield m.name, tar.extractfile(m).read()

  count = 0
  for name, data in members():
    parts = name.split("/")
    if not name.lower().endswith(IMAGE_SUFFIXES) or len(parts) < 3 or parts[-3] not in ("train", "val", "test"):
      continue
    split, cls, base = parts[-3], parts[-2], os.path.splitext(parts[-1])[0]
    os.makedirs(os.path.join(out, split, cls), exist_ok=True)
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
    image.save(os.path.join(out, split, cls, base + ".png"))
    count += 1
  if count == 0:
    sys.exit(f"recipe_transfer.py: no <split>/<class>/<image> files in {source}")
  with open(marker, "w") as f:
    f.write(str(count))
  return count


def main(argv=None):
  args = parse_args(argv)
  if argv is None:  # run as a script: sys.argv is what the re-executed process gets
    miniature.preload_tcmalloc(__file__)
  if not os.path.exists(args.source):
    sys.exit(f"recipe_transfer.py: --source not found: {args.source}")
  import tempfile

  out = os.path.abspath(args.out or os.path.join(tempfile.gettempdir(), f"recipe_transfer_{args.size}px"))
  images = downscaled_copy(args.source, out, args.size)
  miniature.mark_flags_parsed()
  config = runpy.run_path(args.config)["get_config"](out)
  config.checkpoint_every = 0
  for item in args.set:
    miniature.apply_override(config, item)
  result = miniature.run(config)
  from simdino_jax import tcmalloc

  print(
    json.dumps(
      {
        "benchmark": "recipe_transfer",
        "config": args.config,
        "source": os.path.basename(args.source.rstrip("/")),
        "size": args.size,
        "images": images,
        "overrides": args.set,
        "allocator": tcmalloc.allocator(),
        **result,
      }
    )
  )


if __name__ == "__main__":
  main()
