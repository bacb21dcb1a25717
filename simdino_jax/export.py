r"""The export command: a run's trained weights -> a file. Teacher (or student) backbone, optionally with the
head(s), as flat named arrays, or the backbone as an official PyTorch state dict.

  python -m simdino_jax.export --workdir=DIR --format=safetensors --output=vit.safetensors \
      [--which=teacher|student] [--step=N] [--with_head]

Restores the newest committed checkpoint of ``DIR/checkpoints`` (or ``--step``) on the CPU, whatever the devices it
was written on (``io.restore.restore_params``), and writes one array per parameter, named by its slash path
in the network (``backbone/blocks/0/attn/qkv/kernel``, ``backbone/pos_embed``, ``head/mlp/0/kernel`` ...), in the
checkpoint's dtype and Flax layout (Dense kernels are (in, out), the patch embedding (p, p, 3, D)).

Formats (written and read by ``io.formats``):
  safetensors  https://github.com/huggingface/safetensors (files load with ``safetensors.numpy.load_file`` /
               ``safetensors.torch.load_file``, or ``io.formats.load_arrays``).
  npz          ``numpy.savez`` (uncompressed); dtypes NumPy cannot name (bfloat16) are stored as unsigned
               integers of the same width and viewed back by ``io.formats.load_arrays``.
  torch        the backbone as an official PyTorch state dict (facebookresearch/dino or dinov2 names and layouts,
               see ``io.torch_interop``; loads with ``load_state_dict(strict=True)`` into the official ViT whose
               constructor the command prints, ``torch_interop.official_constructor``): a ``.pth`` written with
               ``torch.save``, which needs PyTorch (without it: a one-line error, never another format under this
               flag), or, for an ``--output`` ending in ``.safetensors`` / ``.npz``, the same names and layouts in
               that container. The metadata rides in the .pth's ``_metadata`` attribute (PyTorch's own per-module
               versions, entry ``simdino_jax``).
Default file names carry the layout (``..._flax.safetensors``, ``..._torch.pth``). Files are created as ``open()``
creates them (0644 under the usual umask 022). All carry metadata (``io.formats.load_metadata``): the run's config (JSON), the step, which network and whether
the head is included (``__metadata__`` in safetensors, a ``__metadata__`` string entry in the npz).

Only the exported parameters are read from the checkpoint (a partial restore of ``teacher`` or ``student``): no
optimizer state, no data source, so a ViT-L checkpoint of an ImageNet run exports on a laptop without ImageNet.
Nothing in the workdir is modified, so exporting while a run is writing checkpoints into it is safe.

Python API: ``export(workdir, output, ...)``; reading: ``simdino_jax.io.formats`` (``load_arrays``,
``load_metadata``) and ``simdino_jax.io.restore.restore_params``.
"""

from __future__ import annotations

import collections
import json
import os
import sys

import jax
import numpy as np
from absl import app, flags, logging

from simdino_jax import cli
from simdino_jax import workdir as workdir_lib
from simdino_jax.errors import ExportError, SimdinoError
from simdino_jax.io import formats, restore, torch_interop, torchvision_resnet

FORMATS = ("safetensors", "npz", "torch")
# The file's container for --format=torch, from --output's extension: torch.save's .pth unless safetensors or npz.
_TORCH_CONTAINERS = {".safetensors": "safetensors", ".npz": "npz"}


def default_output(workdir: str, fmt: str, which: str, step: int, with_head: bool) -> str:
  """WORKDIR/export/<which>_<backbone|network>_step<N>_<flax|torch>.<safetensors|npz|pth>: the layout is in the name,
  so an official-layout export never overwrites a Flax-layout one (or the reverse)."""
  part = "network" if with_head else "backbone"
  layout, ext = ("torch", "pth") if fmt == "torch" else ("flax", fmt)
  return os.path.join(workdir, "export", f"{which}_{part}_step{step}_{layout}.{ext}")


def _makedirs_for(output: str) -> None:
  if os.path.dirname(output):
    os.makedirs(os.path.dirname(output), exist_ok=True)


def export(
  workdir: str,
  output: str | None = None,
  *,
  fmt: str | None = None,
  which: str = "teacher",
  step: int | None = None,
  with_head: bool = False,
) -> dict:
  """Restore and write the parameters; returns a summary (path, format, step, arrays, parameters, bytes; for
  ``torch`` also ``constructor``, the official module that loads the file strictly).

  ``fmt`` defaults to the output's extension (``.npz`` -> npz, ``.pth`` / ``.pt`` -> torch), else safetensors;
  ``output`` defaults to ``default_output``. ``torch`` writes a ``.pth`` with ``torch.save`` (ExportError when
  PyTorch is not importable), or the same state dict as safetensors / npz for an ``output`` with that extension.
  """
  workdir = workdir_lib.resolve(workdir)  # relative and ~ paths: orbax reads absolute paths only
  output = workdir_lib.resolve(output) if output else output
  if fmt is None:
    ext = os.path.splitext(output)[1] if output is not None else ""
    fmt = {".npz": "npz", ".pth": "torch", ".pt": "torch"}.get(ext, "safetensors")
  if fmt not in FORMATS:
    raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
  if fmt == "torch":
    if with_head:
      raise ExportError(
        "--format=torch exports the backbone only (the official names cover the ViT); "
        "drop --with_head, or use --format=safetensors|npz for the heads"
      )
    return _export_torch(workdir, output, which=which, step=step)
  arrays, step, config = restore.restore_params(workdir, which=which, step=step, with_head=with_head)
  if output is None:
    output = default_output(workdir, fmt, which, step, with_head)
  _makedirs_for(output)
  metadata = {
    "format": "simdino_jax",
    "layout": "flax",
    "which": which,
    "step": str(step),
    "with_head": "true" if with_head else "false",
    "config": json.dumps(config, sort_keys=True),
  }
  writer = formats.save_safetensors if fmt == "safetensors" else formats.save_npz
  size = writer(arrays, output, metadata)
  dtypes = sorted({a.dtype.name for a in arrays.values()})
  return {
    "output": output,
    "format": f"{fmt} (Flax layout)",
    "which": which,
    "with_head": with_head,
    "step": step,
    "arrays": len(arrays),
    "parameters": int(sum(a.size for a in arrays.values())),
    "bytes": size,
    "dtypes": dtypes,
  }


def _import_torch(output: str | None):
  """PyTorch, or ExportError saying what to do: a .pth is torch.save's format, which nothing else writes."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional, never a dependency: imported only here)
  except ImportError:
    stem = os.path.splitext(output)[0] if output else "vit_torch"
    raise ExportError(
      f"--format=torch writes a .pth with torch.save and PyTorch is not importable here: install it "
      f"(pip install torch), or write the same official state dict as safetensors with "
      f"--output={stem}.safetensors (loads with safetensors.torch.load_file, no PyTorch needed to write it)"
    ) from None
  return torch


def _export_torch(workdir: str, output: str | None, *, which: str, step: int | None) -> dict:
  """The backbone as an official PyTorch state dict: a .pth (torch.save), or .safetensors / .npz by extension."""
  container = _TORCH_CONTAINERS.get(os.path.splitext(output)[1], "pth") if output else "pth"
  torch = _import_torch(output) if container == "pth" else None  # before the restore: fail fast
  arrays, step, config = restore.restore_params(workdir, which=which, step=step)
  arch = (config.get("model") or {}).get("arch", "vit")
  # A ResNet run: torchvision's state dict (weights and running statistics, no fc), io/torchvision_resnet.py.
  state_dict = torch_interop.to_torch(arrays) if arch == "vit" else torchvision_resnet.to_torchvision(arrays)
  if output is None:
    output = default_output(workdir, "torch", which, step, False)
  _makedirs_for(output)
  metadata = {
    "format": "pt",
    "layout": "torch",
    "which": which,
    "step": str(step),
    "with_head": "false",
    "config": json.dumps(config, sort_keys=True),
  }
  if container == "pth":
    tensors = collections.OrderedDict()
    for name, a in state_dict.items():
      # torch.from_numpy cannot take ml_dtypes' bfloat16: through float32, then cast back.
      t = torch.from_numpy(np.ascontiguousarray(a.astype(np.float32) if a.dtype.kind not in "biuf" else a))
      tensors[name] = t.to(torch.bfloat16) if a.dtype.name == "bfloat16" else t
    # PyTorch keeps per-module versions in the state dict's `_metadata` attribute (saved and loaded with it); an
    # entry named after no module carries the run's config (num_heads ...) and is ignored by load_state_dict.
    tensors._metadata = collections.OrderedDict({torch_interop.PTH_METADATA_KEY: metadata})  # pylint: disable=protected-access
    torch.save(tensors, output)
    size = os.path.getsize(output)
  else:
    writer = formats.save_safetensors if container == "safetensors" else formats.save_npz
    size = writer(state_dict, output, metadata)
  if arch == "vit":
    kwargs = torch_interop.load_state_dict(state_dict, config=config).kwargs  # shapes + the config's head count
    constructor = torch_interop.official_constructor(kwargs, "dinov2" if "mask_token" in state_dict else "dino")
  else:
    constructor = resnet_constructor(arch, torchvision_resnet.infer_resnet_kwargs(state_dict))
  dtypes = sorted({a.dtype.name for a in state_dict.values()})
  return {
    "output": output,
    "format": f"torch ({container}, official layout)",
    "which": which,
    "with_head": False,
    "step": step,
    "arrays": len(state_dict),
    "parameters": int(sum(a.size for a in state_dict.values())),
    "bytes": size,
    "dtypes": dtypes,
    "constructor": constructor,
  }


def resnet_constructor(arch: str, kwargs: dict) -> str:
  """The torchvision module whose ``load_state_dict(strict=True)`` takes a ResNet run's export (as DINO builds its
  backbone: ``torchvision_models.__dict__[arch]()`` with ``fc = nn.Identity()``)."""
  base = arch.removesuffix("_cifar")
  line = f"torchvision.models.{base}() with model.fc = torch.nn.Identity()"
  if kwargs["cifar_stem"]:
    line += (
      f", model.conv1 = torch.nn.Conv2d(3, {kwargs['width']}, 3, 1, 1, bias=False), model.maxpool = torch.nn.Identity()"
    )
  if kwargs["width"] != 64:
    line += f" (width {kwargs['width']}: torchvision builds width 64 only; the names and layouts are its own)"
  return line


def _summary_line(s: dict) -> str:
  part = "network (backbone + head)" if s["with_head"] else "backbone"
  line = (
    f"exported the {s['which']} {part} of step {s['step']}: {s['arrays']} arrays, {s['parameters']:,} "
    f"parameters ({'/'.join(s['dtypes'])}), {s['bytes'] / 2**20:.2f} MiB {s['format']} -> {s['output']}"
  )
  if s.get("constructor"):
    line += f"\nloads with load_state_dict(strict=True) into the official {s['constructor']}"
  return line


# ---- command line -------------------------------------------------------------------------------------------
def _define_flags():
  flags.DEFINE_string("workdir", None, "Training directory (holds checkpoints/ and config.json).")
  flags.DEFINE_enum(
    "format",
    None,
    list(FORMATS),
    "Output format (default: from --output's extension, else safetensors); safetensors and npz: our names, "
    "Flax layout; torch: the backbone as an official PyTorch state dict (a .pth, which needs PyTorch; "
    "--output=FILE.safetensors or .npz writes the same state dict in that container).",
  )
  flags.DEFINE_string(
    "output",
    None,
    "Output file (default: WORKDIR/export/<which>_<backbone|network>_step<N>_<flax|torch>.<safetensors|npz|pth>).",
  )
  flags.DEFINE_enum("which", "teacher", list(restore.WHICH), "Which network to export.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest committed one).")
  flags.DEFINE_bool("with_head", False, "Also export the head (and the patch head, if any).")
  flags.mark_flags_as_required(["workdir"])
  return flags.FLAGS


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if logging.get_verbosity() <= logging.INFO and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs ~10 INFO lines per restore; --verbosity=0 shows them
  jax.config.update("jax_platforms", "cpu")  # a host-side job: never take the accelerators of a running job
  f = flags.FLAGS
  try:
    summary = export(f.workdir, f.output, fmt=f.format, which=f.which, step=f.step, with_head=f.with_head)
  except SimdinoError as e:  # ExportError, InteropError, ...: one line
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(_summary_line(summary), flush=True)


if __name__ == "__main__":
  _define_flags()  # here, not at import: importing this module must not define flags in another program
  app.run(main, flags_parser=cli.flags_parser("simdino_jax.export"))
