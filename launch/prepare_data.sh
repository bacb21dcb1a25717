#!/usr/bin/env bash
# Prepare training data for the data sources of config.data.source, and print where it went.
#
#   launch/prepare_data.sh imagenet2012 MANUAL_DIR [DATA_DIR]
#       ImageNet-1k as TFDS ArrayRecord files (source tfds:imagenet2012). MANUAL_DIR holds the archives from
#       image-net.org, ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar; DATA_DIR [$TFDS_DATA_DIR, else
#       ~/tensorflow_datasets] may be a gs:// bucket. Needs the [tf] extra (pip install -e ".[tf]"): TFDS
#       decodes and re-encodes the images with TensorFlow. About 150 GB and a few hours on 8 cores.
#   launch/prepare_data.sh tfds NAME [DATA_DIR]
#       Any TFDS dataset that TFDS can download itself (e.g. cifar10, imagenette) as ArrayRecord (source tfds:NAME).
#       Both run `tfds build NAME --file_format=array_record --data_dir=DATA_DIR [--manual_dir=MANUAL_DIR]`; the
#       tfds source reads ArrayRecord only (random access, no TensorFlow at training time), from
#       --config.data.tfds_data_dir or $TFDS_DATA_DIR; its test split is "validation" if the dataset has one.
#   launch/prepare_data.sh cifar10 SRC OUT_TAR
#       CIFAR-10 as an image-folder tar (source folder:OUT_TAR): train/<class>/NNNNN.png (50,000) and
#       test/<class>/NNNNN.png (10,000), lossless PNG, class directories named by the official label names
#       (alphabetical, so the folder source's labels are the official ones). SRC is the official
#       cifar-10-python.tar.gz (or its extracted cifar-10-batches-py directory), or its URL
#       https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz to download it first.
#   launch/prepare_data.sh folder SRC_DIR OUT_TAR
#       Pack an image folder into one uncompressed tar (source folder:OUT_TAR): one file to copy, read lazily
#       without unpacking. Either labelled, SRC_DIR/<split>/<class>/<image> (split: train, test or val; the split
#       directories are packed), or flat: no train/, test/ or val/ directory, the images directly in SRC_DIR or in
#       any sub-folders (every .jpg/.jpeg/.png below it is packed; it trains as one unlabelled set, as the folder
#       source reads it). MAX_SIDE=N (e.g. 512) downscales larger images to fit N x N while packing (needs PYTHON
#       with Pillow): a 12-megapixel JPEG costs ~0.1 s of CPU to decode per training example, a 512 px one ~1 ms.
#
# Settings: PYTHON [python3], the interpreter with this project installed (for cifar10 and MAX_SIDE); MAX_SIDE
# [unset] (folder only).
set -euo pipefail

SCRIPT=${BASH_SOURCE[0]}
PYTHON=${PYTHON:-python3}
MAX_SIDE=${MAX_SIDE:-}
# The image files the folder source reads (any case).
IMAGE_FIND=(\( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \))

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SCRIPT" >&2
  exit 2
}

die() {
  echo "prepare_data.sh: $*" >&2
  exit 1
}

need_tfds() {
  command -v tfds >/dev/null 2>&1 || die "the tfds command is missing: pip install -e \".[tf]\" (tensorflow-datasets + TensorFlow)"
  "$PYTHON" -c 'import tensorflow' 2>/dev/null ||
    die "TensorFlow is missing: building image datasets needs it: pip install -e \".[tf]\""
}

tfds_build() {
  local name=$1 data_dir=$2
  shift 2
  need_tfds
  echo "+ tfds build $name --file_format=array_record --data_dir=$data_dir $*" >&2
  tfds build "$name" --file_format=array_record --data_dir="$data_dir" "$@"
  echo
  echo "$name is in $data_dir/$name/ (ArrayRecord). Train with:"
  echo "  TFDS_DATA_DIR=$data_dir python -m simdino_jax.train --config=... --workdir=... --config.data.source=tfds:$name"
  echo "  (or --config.data.tfds_data_dir=$data_dir instead of TFDS_DATA_DIR)"
}

cmd_imagenet() {
  [ $# -ge 1 ] || usage
  local manual_dir=$1 data_dir=${2:-${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}}
  local f
  for f in ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar; do
    [ -f "$manual_dir/$f" ] || die "$manual_dir/$f not found: download it from https://image-net.org (login required)"
  done
  tfds_build imagenet2012 "$data_dir" --manual_dir="$manual_dir"
}

cmd_tfds() {
  [ $# -ge 1 ] || usage
  tfds_build "$1" "${2:-${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}}"
}

cmd_cifar10() {
  [ $# -eq 2 ] || usage
  local src=$1 out=$2
  case "$src" in
    http://* | https://*)
      local download
      download="$(dirname "$out")/cifar-10-python.tar.gz"
      echo "downloading $src -> $download" >&2
      "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$src" "$download"
      src=$download
      ;;
  esac
  [ -e "$src" ] || die "$src not found (the official cifar-10-python.tar.gz, its cifar-10-batches-py directory or URL)"
  "$PYTHON" - "$src" "$out" <<'PY'
"""Official CIFAR-10 pickles -> uncompressed tar of train/<class>/NNNNN.png and test/<class>/NNNNN.png."""
import io
import os
import pickle
import sys
import tarfile
import time

import numpy as np
from PIL import Image

src, out = sys.argv[1], sys.argv[2]
FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def members(names):
  """{name: bytes} of the wanted files, from the directory or the .tar.gz."""
  if os.path.isdir(src):
    return {n: open(os.path.join(src, n), "rb").read() for n in names}
  found = {}
  with tarfile.open(src) as tar:
    for m in tar.getmembers():
      base = os.path.basename(m.name)
      if m.isfile() and base in names:
        found[base] = tar.extractfile(m).read()
  missing = sorted(set(names) - set(found))
  if missing:
    sys.exit(f"{src}: missing {missing}; is it the official cifar-10-python.tar.gz?")
  return found


raw = members(["batches.meta"] + [f for fs in FILES.values() for f in fs])
classes = [c.decode() for c in pickle.loads(raw["batches.meta"], encoding="bytes")[b"label_names"]]
start, counts = time.time(), {}
tmp = out + ".tmp"
with tarfile.open(tmp, "w") as tar:  # uncompressed: the folder source reads members in place
  for split, files in FILES.items():
    index = 0
    for f in files:
      batch = pickle.loads(raw[f], encoding="bytes")
      images = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
      for image, label in zip(images, batch[b"labels"]):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        info = tarfile.TarInfo(f"{split}/{classes[label]}/{index:05d}.png")
        info.size, info.mtime, info.mode = buf.tell(), 0, 0o644
        buf.seek(0)
        tar.addfile(info, buf)
        index += 1
    counts[split] = index
os.replace(tmp, out)
print(f"wrote {counts['train']} train + {counts['test']} test images of {len(classes)} classes "
      f"({', '.join(classes)}) to {out} ({os.path.getsize(out) / 2**20:.0f} MiB, {time.time() - start:.0f} s)")
PY
  echo "Train with: SIMDINO_CIFAR10=$out python -m simdino_jax.train --config=configs/cifar10_simdino.py --workdir=..."
  echo "  (or --config=configs/cifar10_<method>.py:$out; other configs: --config.data.source=folder:$out)"
}

downscale_py() {
  cat <<'PY'
"""Pack the images named on stdin (NUL-separated, relative to SRC) into OUT, re-encoding those whose longer side
exceeds MAX_SIDE: EXIF rotation applied, shrunk (bicubic) to fit MAX_SIDE x MAX_SIDE, same format (JPEG quality 90).
A file PIL cannot read is packed unchanged (the folder source skips and counts it)."""
import io
import os
import sys
import tarfile

from PIL import Image, ImageOps

src, out, max_side = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = [n for n in sys.stdin.buffer.read().decode("utf-8", "surrogateescape").split("\0") if n]
resized = 0
tmp = out + ".tmp"
with tarfile.open(tmp, "w") as tar:  # uncompressed: the folder source reads members in place
  for name in names:
    path = os.path.join(src, name)
    with open(path, "rb") as f:
      data = f.read()
    try:
      with Image.open(io.BytesIO(data)) as im:
        if max(im.size) > max_side:
          fmt = im.format
          im.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale (at least max_side)
          im = ImageOps.exif_transpose(im)
          im.thumbnail((max_side, max_side), Image.BICUBIC)
          if fmt == "JPEG" and im.mode not in ("RGB", "L", "CMYK"):
            im = im.convert("RGB")
          buf = io.BytesIO()
          im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
          data, resized = buf.getvalue(), resized + 1
    except Exception as e:  # packed unchanged
      print(f"{path}: not resized ({type(e).__name__}: {e})", file=sys.stderr)
    info = tarfile.TarInfo(os.path.normpath(name))
    info.size, info.mtime, info.mode = len(data), int(os.path.getmtime(path)), 0o644
    tar.addfile(info, io.BytesIO(data))
os.replace(tmp, out)
print(f"{resized} of {len(names)} images downscaled to at most {max_side} px")
PY
}

cmd_folder() {
  [ $# -eq 2 ] || usage
  local src=$1 out=$2
  [ -d "$src" ] || die "$src is not a directory"
  if [ -n "$MAX_SIDE" ] && ! [[ $MAX_SIDE =~ ^[1-9][0-9]*$ ]]; then
    die "MAX_SIDE must be a positive number of pixels, got '$MAX_SIDE'"
  fi
  local splits=()
  local s
  for s in train test val; do
    if [ -d "$src/$s" ]; then
      splits+=("$s")
    fi
  done
  # Labelled: the split directories; flat: every image below SRC_DIR (hidden ones left out, as the folder source).
  local what=(.) layout="flat"
  if [ ${#splits[@]} -gt 0 ]; then
    what=("${splits[@]}")
    layout="labelled"
  fi
  local count
  count=$(cd "$src" && find "${what[@]}" -type f "${IMAGE_FIND[@]}" -not -path '*/.*' | wc -l)
  if [ "$count" -eq 0 ]; then
    [ "$layout" = labelled ] && die "$src/{${splits[*]// /,}} hold no .jpg/.jpeg/.png images"
    die "$src has no train/, test/ or val/ directory and no .jpg/.jpeg/.png images below it"
  fi
  out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
  if [ -n "$MAX_SIDE" ]; then
    (cd "$src" && find "${what[@]}" -type f "${IMAGE_FIND[@]}" -not -path '*/.*' -print0 | LC_ALL=C sort -z) |
      "$PYTHON" -c "$(downscale_py)" "$src" "$out" "$MAX_SIDE"
  elif [ "$layout" = labelled ]; then
    tar -C "$src" -cf "$out" "${splits[@]}"
  else
    (cd "$src" && find . -type f "${IMAGE_FIND[@]}" -not -path '*/.*' -print0 | LC_ALL=C sort -z |
      tar --null --no-recursion -T - -cf "$out")
  fi
  if [ "$layout" = labelled ]; then
    echo "packed ${splits[*]} of $src ($count images) into $out ($(du -h "$out" | cut -f1))."
  else
    echo "packed $count images of $src into $out ($(du -h "$out" | cut -f1)): no train/, test/ or val/ directory," \
      "so they are one unlabelled training set (label-based evaluators off)."
  fi
  echo "Train with: --config=configs/own_images.py:$out (or --config.data.source=folder:$out)"
}

[ $# -ge 1 ] || usage
command=$1
shift
case "$command" in
  imagenet2012) cmd_imagenet "$@" ;;
  tfds) cmd_tfds "$@" ;;
  cifar10) cmd_cifar10 "$@" ;;
  folder) cmd_folder "$@" ;;
  -h | --help | help) usage ;;
  *) echo "prepare_data.sh: unknown command '$command'" >&2; usage ;;
esac
