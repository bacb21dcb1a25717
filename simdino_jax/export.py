r"""Export trained weights: teacher (or student) backbone, optionally with the head(s), as flat named arrays.

  python -m simdino_jax.export --workdir=DIR --format=safetensors --output=vit.safetensors \
      [--which=teacher|student] [--step=N] [--with_head]

Restores the newest committed checkpoint of ``DIR/checkpoints`` (or ``--step``) on the CPU, whatever the devices it
was written on, and writes one array per parameter, named by its slash path in the network
(``backbone/blocks/0/attn/qkv/kernel``, ``backbone/pos_embed``, ``head/mlp/0/kernel`` ...), in the checkpoint's
dtype and Flax layout (Dense kernels are (in, out), the patch embedding (p, p, 3, D)).

Formats:
  safetensors  https://github.com/huggingface/safetensors : an 8-byte little-endian header length, a JSON header
               {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the raw
               little-endian C-order bytes. Written here without the ``safetensors`` package (files load with
               ``safetensors.numpy.load_file`` / ``safetensors.torch.load_file``, or ``load_arrays`` below).
  npz          ``numpy.savez`` (uncompressed); dtypes NumPy cannot name (bfloat16) are stored as unsigned
               integers of the same width and viewed back by ``load_arrays``.
  torch        the backbone as an official PyTorch state dict (facebookresearch/dino or dinov2 names and layouts,
               see ``torch_interop``; loads with ``load_state_dict(strict=True)`` into their ViT): a ``.pth``
               written with ``torch.save`` when PyTorch is importable, else (or for an ``--output`` ending in
               ``.safetensors``) a safetensors file with the same names. The metadata rides in the .pth's
               ``_metadata`` attribute (PyTorch's own per-module versions, entry ``simdino_jax``).
Both carry metadata (``load_metadata``): the run's config (JSON), the step, which network and whether the head
is included (``__metadata__`` in safetensors, a ``__metadata__`` string entry in the npz).

Only the exported parameters are read from the checkpoint (a partial restore of ``teacher`` or ``student``): no
optimizer state, no data source, so a ViT-L checkpoint of an ImageNet run exports on a laptop without ImageNet.
The restore target is the network the trainer builds (``methods.build_network`` on the stored config). Nothing
in the workdir is modified, so exporting while a run is writing checkpoints into it is safe.

Python API: ``export(workdir, output, ...)``, ``restore_params(workdir, ...)``, ``save_safetensors``, ``save_npz``,
``load_arrays``, ``load_metadata``.
"""

from __future__ import annotations

import collections
import json
import os
import struct
import sys
from typing import Any

import numpy as np
from simdino_jax.errors import ExportError

FORMATS = ("safetensors", "npz", "torch")
WHICH = ("teacher", "student")
METADATA_KEY = "__metadata__"

# NumPy dtype name -> safetensors dtype code.
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
_ST_CODES = {code: name for name, code in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit on the JSON header




# ---- dtypes -------------------------------------------------------------------------------------------------
def _dtype(name: str) -> np.dtype:
  """A NumPy dtype from its name, including ml_dtypes' (bfloat16, float8_*)."""
  try:
    return np.dtype(name)
  except TypeError:
    import ml_dtypes  # pylint: disable=g-import-not-at-top  (a JAX dependency)
    return np.dtype(getattr(ml_dtypes, name))


def _is_numpy_native(dtype: np.dtype) -> bool:
  return dtype.kind in "biuf"  # ml_dtypes' bfloat16 / float8_* are kind "V"


# ---- safetensors --------------------------------------------------------------------------------------------
def save_safetensors(arrays: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> int:
  """Write ``arrays`` to ``path`` in the safetensors format; returns the file size in bytes.

  Tensors are laid out by decreasing item size (then name), so each starts at a multiple of its item size once
  the header is padded (with spaces, as the reference writer does) to a multiple of 8 bytes.
  """
  arrays = {name: np.asarray(a) for name, a in arrays.items()}
  header: dict[str, Any] = {}
  if metadata:
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
      raise ExportError(f"safetensors metadata must map str to str, got {bad}")
    header[METADATA_KEY] = dict(metadata)
  order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
  offset = 0
  for name in order:
    if name == METADATA_KEY:
      raise ExportError(f"{METADATA_KEY!r} is reserved and cannot name an array")
    a = arrays[name]
    if a.dtype.name not in _ST_DTYPES:
      raise ExportError(f"{name}: dtype {a.dtype} has no safetensors code (supported: {sorted(_ST_DTYPES)})")
    header[name] = {"dtype": _ST_DTYPES[a.dtype.name], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in order:
      a = arrays[name]
      if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
        a = a.astype(a.dtype.newbyteorder("<"))
      f.write(np.ascontiguousarray(a).tobytes())
  return 8 + len(blob) + offset


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  with open(path, "rb") as f:
    data = bytearray(f.read())  # writable arrays without a second copy
  if len(data) < 8:
    raise ExportError(f"{path}: too short for a safetensors file ({len(data)} bytes)")
  (n,) = struct.unpack("<Q", bytes(data[:8]))
  if n > _MAX_HEADER or 8 + n > len(data):
    raise ExportError(f"{path}: not a safetensors file (header length {n}, file size {len(data)})")
  try:
    header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ExportError(f"{path}: the safetensors header is not JSON ({e})") from None
  metadata = header.pop(METADATA_KEY, None) or {}
  buffer = memoryview(data)[8 + n:]
  arrays, spans = {}, []
  for name, info in header.items():
    code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    if code not in _ST_CODES:
      raise ExportError(f"{path}: {name} has an unknown dtype {code!r}")
    dtype = _dtype(_ST_CODES[code]).newbyteorder("<")
    count = int(np.prod(shape, dtype=np.int64))
    if not 0 <= begin <= end <= len(buffer) or end - begin != count * dtype.itemsize:
      raise ExportError(f"{path}: {name} has data offsets {[begin, end]} that do not fit shape {list(shape)} "
                        f"of {code} in a {len(buffer)}-byte buffer")
    arrays[name] = np.frombuffer(buffer, dtype=dtype, count=count, offset=begin).reshape(shape)
    spans.append((begin, end))
  spans.sort()
  position = 0
  for begin, end in spans:  # as the reference reader: no gaps, no overlaps, nothing left over
    if begin != position:
      raise ExportError(f"{path}: tensor data is not contiguous at byte {position}")
    position = end
  if position != len(buffer):
    raise ExportError(f"{path}: {len(buffer) - position} bytes after the last tensor")
  return arrays, dict(metadata)


# ---- npz ----------------------------------------------------------------------------------------------------
def save_npz(arrays: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> int:
  """Write ``arrays`` (+ ``metadata`` as a JSON string entry) with ``numpy.savez``; returns the file size.

  ``path`` is used as given (``numpy.savez`` would append ``.npz`` to a name without it).
  """
  out, stored_as = {}, {}
  for name, a in arrays.items():
    if name == METADATA_KEY:
      raise ExportError(f"{METADATA_KEY!r} is reserved and cannot name an array")
    a = np.asarray(a)
    if not _is_numpy_native(a.dtype):  # bfloat16 & co: NumPy's .npy header cannot name them
      stored_as[name] = a.dtype.name
      a = a.view(np.dtype(f"uint{8 * a.dtype.itemsize}"))
    out[name] = a
  meta = dict(metadata or {})
  if stored_as:
    meta["stored_as_uint"] = json.dumps(stored_as)
  out[METADATA_KEY] = np.array(json.dumps(meta))
  with open(path, "wb") as f:
    np.savez(f, **out)
  return os.path.getsize(path)


def _read_npz(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  with np.load(path, allow_pickle=False) as z:
    arrays = {name: z[name] for name in z.files}
  meta_entry = arrays.pop(METADATA_KEY, None)
  metadata = json.loads(str(meta_entry)) if meta_entry is not None else {}
  for name, dtype_name in json.loads(metadata.pop("stored_as_uint", "{}")).items():
    arrays[name] = arrays[name].view(_dtype(dtype_name))
  return arrays, metadata


# ---- reading either format ----------------------------------------------------------------------------------
def _read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ExportError(f"{path}: no such file")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic == b"PK\x03\x04":  # a zip archive: .npz
    return _read_npz(path)
  return _read_safetensors(path)


def load_arrays(path: str) -> dict[str, np.ndarray]:
  """{name: array} of an exported file, safetensors or npz (told apart by content, not by extension)."""
  return _read(path)[0]


def load_metadata(path: str) -> dict[str, str]:
  """The metadata of an exported file: ``config`` (JSON), ``step``, ``which``, ``with_head``, ``format``."""
  return _read(path)[1]


# ---- restoring from a workdir -------------------------------------------------------------------------------
def _checkpoint_steps(directory) -> list[int]:
  """Steps under ``directory`` whose checkpoint was committed (orbax's marker and the state item present)."""
  from simdino_jax.io import checkpointing  # pylint: disable=g-import-not-at-top

  steps = []
  for path in directory.iterdir():
    if path.name.isdigit() and (path / checkpointing.COMMIT_MARKER).exists() and (path / "state").exists():
      steps.append(int(path.name))
  return sorted(steps)


def _load_config(step_dir, workdir: str) -> dict:
  """The config stored with the checkpoint in ``step_dir`` (orbax JSON item ``config``), else ``workdir/config.json``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  try:
    config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "config", args=ocp.args.JsonRestore())
  except Exception:  # pylint: disable=broad-except  (no or unreadable stored config: use the workdir's copy)
    config = None
  if config:
    return dict(config)
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise ExportError(f"checkpoint {step_dir} has no readable stored config and {path} does not exist")
  return json.loads(path.read_text())


def restore_params(workdir: str, *, which: str = "teacher", step: int | None = None,
                   with_head: bool = False) -> tuple[dict[str, np.ndarray], int, dict]:
  """({name: array}, step, config dict) of the ``which`` network of a checkpoint of ``workdir``, on the host.

  The newest committed checkpoint unless ``step`` is given. Names are slash paths starting with ``backbone/``
  (and ``head/``, ``patch_head/`` with ``with_head``). Raises ExportError naming the path when there is nothing
  to export.
  """
  if which not in WHICH:
    raise ExportError(f"which must be one of {WHICH}, got {which!r}")
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from simdino_jax import methods  # pylint: disable=g-import-not-at-top
  from simdino_jax.train import trainer
  from simdino_jax.tree import named_leaves  # pylint: disable=g-import-not-at-top

  directory = epath.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise ExportError(f"no checkpoints to export: {directory} does not exist (train into {workdir} first)")
  steps = _checkpoint_steps(directory)
  if not steps:
    raise ExportError(f"no checkpoints to export: {directory} holds no committed checkpoint")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ExportError(f"no committed checkpoint of step {step} in {directory}; available steps: {steps}")

  # Read-only: no orbax CheckpointManager here, whose start-up deletes unfinished saves ("*.orbax-checkpoint-tmp-*"),
  # i.e. those of a training run writing into the same workdir right now.
  step_dir = directory / str(step)
  config_dict = _load_config(step_dir, workdir)
  config = ml_collections.ConfigDict(config_dict)
  method = methods.get_method(config.method)
  abstract = nnx.eval_shape(lambda: methods.build_network(config))
  params = nnx.split(abstract)[1]
  subtree = params if with_head else {"backbone": params["backbone"]}
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  target = {"step": jax.ShapeDtypeStruct((), np.int32, sharding=cpu),
            which: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), subtree)}
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  try:  # a partial restore: only `which` (and the step) are read
    restored = ocp.PyTreeCheckpointer().restore(
        step_dir / "state", args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except  (re-raised with the path and the likely cause)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ExportError(f"could not read the {which} parameters of {step_dir} with the network of its config "
                      f"({type(e).__name__}: {first[:300]})") from e
  saved_step = int(np.asarray(restored["step"]))
  if saved_step != step:
    raise ExportError(f"{step_dir} holds the state of step {saved_step}, not {step}")
  arrays = {name: np.asarray(a) for name, a in named_leaves(restored[which]).items()}
  return arrays, step, config_dict


def default_output(workdir: str, fmt: str, which: str, step: int, with_head: bool) -> str:
  part = "network" if with_head else "backbone"
  return os.path.join(workdir, "export", f"{which}_{part}_step{step}.{fmt}")


def export(workdir: str, output: str | None = None, *, fmt: str | None = None, which: str = "teacher",
           step: int | None = None, with_head: bool = False) -> dict:
  """Restore and write the parameters; returns a summary (path, format, step, arrays, parameters, bytes).

  ``fmt`` defaults to the output's extension (``.npz`` -> npz, ``.pth`` -> torch), else safetensors; ``output``
  defaults to ``workdir/export/<which>_<backbone|network>_step<N>.<fmt>`` (``.pth`` for torch).
  """
  if fmt is None:
    ext = os.path.splitext(output)[1] if output is not None else ""
    fmt = {".npz": "npz", ".pth": "torch", ".pt": "torch"}.get(ext, "safetensors")
  if fmt not in FORMATS:
    raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
  if fmt == "torch":
    if with_head:
      raise ExportError("--format=torch exports the backbone only (the official names cover the ViT); "
                        "drop --with_head, or use --format=safetensors|npz for the heads")
    return _export_torch(workdir, output, which=which, step=step)
  arrays, step, config = restore_params(workdir, which=which, step=step, with_head=with_head)
  if output is None:
    output = default_output(workdir, fmt, which, step, with_head)
  if os.path.dirname(output):
    os.makedirs(os.path.dirname(output), exist_ok=True)
  metadata = {"format": "simdino_jax", "which": which, "step": str(step),
              "with_head": "true" if with_head else "false", "config": json.dumps(config, sort_keys=True)}
  writer = save_safetensors if fmt == "safetensors" else save_npz
  size = writer(arrays, output, metadata)
  dtypes = sorted({a.dtype.name for a in arrays.values()})
  return {"output": output, "format": fmt, "which": which, "with_head": with_head, "step": step,
          "arrays": len(arrays), "parameters": int(sum(a.size for a in arrays.values())), "bytes": size,
          "dtypes": dtypes}


def _export_torch(workdir: str, output: str | None, *, which: str, step: int | None) -> dict:
  """The backbone as an official PyTorch state dict: .pth via torch.save if torch imports, else .safetensors."""
  from simdino_jax.io import torch_interop  # pylint: disable=g-import-not-at-top

  arrays, step, config = restore_params(workdir, which=which, step=step)
  state_dict = torch_interop.to_torch(arrays)
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional, never a dependency)
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
  metadata = {"format": "pt", "layout": "torch", "which": which, "step": str(step), "with_head": "false",
              "config": json.dumps(config, sort_keys=True)}
  if container == "pth":
    tensors = collections.OrderedDict()
    for name, a in state_dict.items():
      t = torch.from_numpy(np.ascontiguousarray(a.astype(np.float32) if not _is_numpy_native(a.dtype) else a))
      tensors[name] = t.to(torch.bfloat16) if a.dtype.name == "bfloat16" else t
    # PyTorch keeps per-module versions in the state dict's `_metadata` attribute (saved and loaded with it); an
    # entry named after no module carries the run's config (num_heads ...) and is ignored by load_state_dict.
    tensors._metadata = collections.OrderedDict({torch_interop.PTH_METADATA_KEY: metadata})  # pylint: disable=protected-access
    torch.save(tensors, output)
    size = os.path.getsize(output)
  else:
    size = save_safetensors(state_dict, output, metadata)
  dtypes = sorted({a.dtype.name for a in state_dict.values()})
  return {"output": output, "format": f"torch ({container}){note}", "which": which, "with_head": False,
          "step": step, "arrays": len(state_dict), "parameters": int(sum(a.size for a in state_dict.values())),
          "bytes": size, "dtypes": dtypes}


def _summary_line(s: dict) -> str:
  part = "network (backbone + head)" if s["with_head"] else "backbone"
  return (f"exported the {s['which']} {part} of step {s['step']}: {s['arrays']} arrays, {s['parameters']:,} "
          f"parameters ({'/'.join(s['dtypes'])}), {s['bytes'] / 2**20:.2f} MiB {s['format']} -> {s['output']}")


# ---- command line -------------------------------------------------------------------------------------------
def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "Training directory (holds checkpoints/ and config.json).")
  flags.DEFINE_enum("format", None, list(FORMATS), "Output format (default: from --output's extension, else "
                    "safetensors); torch: the backbone as an official PyTorch state dict (.pth, or .safetensors "
                    "without PyTorch).")
  flags.DEFINE_string("output", None, "Output file (default: WORKDIR/export/<which>_<backbone|network>_step<N>."
                      "<format>).")
  flags.DEFINE_enum("which", "teacher", list(WHICH), "Which network to export.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest committed one).")
  flags.DEFINE_bool("with_head", False, "Also export the head (and the patch head, if any).")
  flags.mark_flags_as_required(["workdir"])
  return flags.FLAGS


def main(argv) -> None:
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if logging.get_verbosity() <= logging.INFO and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs ~10 INFO lines per restore; --verbosity=0 shows them
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_platforms", "cpu")  # a host-side job: never take the accelerators of a running job
  f = flags.FLAGS
  try:
    summary = export(f.workdir, f.output, fmt=f.format, which=f.which, step=f.step, with_head=f.with_head)
  except ExportError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(_summary_line(summary), flush=True)


if __name__ == "__main__":
  from absl import app as _app

  _define_flags()
  _app.run(main)
