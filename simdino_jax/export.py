r"""The export command: a run's trained weights -> a file. Teacher (or student) backbone, optionally with the
head(s), as flat named arrays, or the backbone as an official PyTorch state dict.

  python -m simdino_jax.export --workdir=DIR --format=safetensors --output=vit.safetensors \
      [--which=teacher|student] [--step=N] [--with_head]

Restores the newest committed checkpoint of ``DIR/checkpoints`` (or ``--step``) on the CPU, whatever the devices it
was written on (``io.checkpointing.restore_params``), and writes one array per parameter, named by its slash path
in the network (``backbone/blocks/0/attn/qkv/kernel``, ``backbone/pos_embed``, ``head/mlp/0/kernel`` ...), in the
checkpoint's dtype and Flax layout (Dense kernels are (in, out), the patch embedding (p, p, 3, D)).

Formats (written and read by ``io.formats``):
  safetensors  https://github.com/huggingface/safetensors (files load with ``safetensors.numpy.load_file`` /
               ``safetensors.torch.load_file``, or ``io.formats.load_arrays``).
  npz          ``numpy.savez`` (uncompressed); dtypes NumPy cannot name (bfloat16) are stored as unsigned
               integers of the same width and viewed back by ``io.formats.load_arrays``.
  torch        the backbone as an official PyTorch state dict (facebookresearch/dino or dinov2 names and layouts,
               see ``io.torch_interop``; loads with ``load_state_dict(strict=True)`` into their ViT): a ``.pth``
               written with ``torch.save`` when PyTorch is importable, else (or for an ``--output`` ending in
               ``.safetensors``) a safetensors file with the same names. The metadata rides in the .pth's
               ``_metadata`` attribute (PyTorch's own per-module versions, entry ``simdino_jax``).
Both carry metadata (``io.formats.load_metadata``): the run's config (JSON), the step, which network and whether
the head is included (``__metadata__`` in safetensors, a ``__metadata__`` string entry in the npz).

Only the exported parameters are read from the checkpoint (a partial restore of ``teacher`` or ``student``): no
optimizer state, no data source, so a ViT-L checkpoint of an ImageNet run exports on a laptop without ImageNet.
Nothing in the workdir is modified, so exporting while a run is writing checkpoints into it is safe.

Python API: ``export(workdir, output, ...)``; reading: ``simdino_jax.io.formats`` (``load_arrays``,
``load_metadata``) and ``simdino_jax.io.checkpointing.restore_params``.
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
from simdino_jax.io import checkpointing, formats, torch_interop

FORMATS = ("safetensors", "npz", "torch")


def default_output(workdir: str, fmt: str, which: str, step: int, with_head: bool) -> str:
  part = "network" if with_head else "backbone"
  return os.path.join(workdir, "export", f"{which}_{part}_step{step}.{fmt}")


def export(
  workdir: str,
  output: str | None = None,
  *,
  fmt: str | None = None,
  which: str = "teacher",
  step: int | None = None,
  with_head: bool = False,
) -> dict:
  """Restore and write the parameters; returns a summary (path, format, step, arrays, parameters, bytes).

  ``fmt`` defaults to the output's extension (``.npz`` -> npz, ``.pth`` -> torch), else safetensors; ``output``
  defaults to ``workdir/export/<which>_<backbone|network>_step<N>.<fmt>`` (``.pth`` for torch).
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
  arrays, step, config = checkpointing.restore_params(workdir, which=which, step=step, with_head=with_head)
  if output is None:
    output = default_output(workdir, fmt, which, step, with_head)
  if os.path.dirname(output):
    os.makedirs(os.path.dirname(output), exist_ok=True)
  metadata = {
    "format": "simdino_jax",
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
    "format": fmt,
    "which": which,
    "with_head": with_head,
    "step": step,
    "arrays": len(arrays),
    "parameters": int(sum(a.size for a in arrays.values())),
    "bytes": size,
    "dtypes": dtypes,
  }


def _export_torch(workdir: str, output: str | None, *, which: str, step: int | None) -> dict:
  """The backbone as an official PyTorch state dict: .pth via torch.save if torch imports, else .safetensors."""
  arrays, step, config = checkpointing.restore_params(workdir, which=which, step=step)
  state_dict = torch_interop.to_torch(arrays)
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional, never a dependency: imported only here)
  except ImportError:
    torch = None
  if output is None:
    output = default_output(workdir, "pth" if torch is not None else "safetensors", which, step, False)
  container = "safetensors" if torch is None or output.endswith(".safetensors") else "pth"
  note = ""
  if container == "safetensors" and not output.endswith(".safetensors"):
    note = f" (PyTorch is not installed, so a safetensors file instead of {os.path.basename(output)})"
    output = os.path.splitext(output)[0] + ".safetensors"
  if os.path.dirname(output):
    os.makedirs(os.path.dirname(output), exist_ok=True)
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
    size = formats.save_safetensors(state_dict, output, metadata)
  dtypes = sorted({a.dtype.name for a in state_dict.values()})
  return {
    "output": output,
    "format": f"torch ({container}){note}",
    "which": which,
    "with_head": False,
    "step": step,
    "arrays": len(state_dict),
    "parameters": int(sum(a.size for a in state_dict.values())),
    "bytes": size,
    "dtypes": dtypes,
  }


def _summary_line(s: dict) -> str:
  part = "network (backbone + head)" if s["with_head"] else "backbone"
  return (
    f"exported the {s['which']} {part} of step {s['step']}: {s['arrays']} arrays, {s['parameters']:,} "
    f"parameters ({'/'.join(s['dtypes'])}), {s['bytes'] / 2**20:.2f} MiB {s['format']} -> {s['output']}"
  )


# ---- command line -------------------------------------------------------------------------------------------
def _define_flags():
  flags.DEFINE_string("workdir", None, "Training directory (holds checkpoints/ and config.json).")
  flags.DEFINE_enum(
    "format",
    None,
    list(FORMATS),
    "Output format (default: from --output's extension, else "
    "safetensors); torch: the backbone as an official PyTorch state dict (.pth, or .safetensors "
    "without PyTorch).",
  )
  flags.DEFINE_string(
    "output", None, "Output file (default: WORKDIR/export/<which>_<backbone|network>_step<N>.<format>)."
  )
  flags.DEFINE_enum("which", "teacher", list(checkpointing.WHICH), "Which network to export.")
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
