"""Files of flat named arrays with str -> str metadata: safetensors and npz, written and read here.

  safetensors  https://github.com/huggingface/safetensors, through the ``safetensors`` package's NumPy API (a
               dependency): an 8-byte header length, a JSON header ({name: {"dtype", "shape", "data_offsets"}},
               "__metadata__"), then the raw little-endian bytes. bfloat16 is stored as BF16, so PyTorch's
               ``safetensors.torch.load_file`` reads it back as torch.bfloat16. The package creates its files
               0600 (a private temporary file renamed into place); they are given the mode ``open()`` would give
               (0666 less the umask), as the npz files and torch.save's .pth files have.
  npz          ``numpy.savez`` (uncompressed); dtypes NumPy cannot name (bfloat16, float8_*) are stored as
               unsigned integers of the same width and viewed back by the reader. The metadata is a JSON string
               entry ``__metadata__``.

Which format a file is comes from its content (a zip archive is an npz), not from its extension. Errors are
ExportError, one line naming the file and what was expected.

Python API: ``save_safetensors``, ``save_npz``, ``read_arrays`` (arrays and metadata), ``load_arrays``,
``load_metadata``.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from simdino_jax.errors import ExportError

METADATA_KEY = "__metadata__"  # safetensors' name for the header's metadata; reused as the npz entry's name
# NumPy dtype names that safetensors stores (a subset of the package's list: the ones NumPy + ml_dtypes can hold).
_SAFETENSORS_DTYPES = frozenset(
  {
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "bool",
    "float8_e4m3fn",
    "float8_e5m2",
  }
)
# safetensors codes whose raw bytes are viewed here when the package's NumPy framework cannot build the array
# (float8 in safetensors 0.8; bfloat16 too in older releases of the package).
_ML_DTYPE_CODES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_ZIP_MAGIC = b"PK\x03\x04"


def _dtype(name: str) -> np.dtype:
  """A NumPy dtype from its name, including ml_dtypes' (bfloat16, float8_*)."""
  try:
    return np.dtype(name)
  except TypeError:
    return np.dtype(getattr(ml_dtypes, name))


def _check_names(arrays: dict, path: str) -> None:
  if METADATA_KEY in arrays:
    raise ExportError(f"{path}: {METADATA_KEY!r} is reserved and cannot name an array")


# ---- safetensors --------------------------------------------------------------------------------------------
def save_safetensors(arrays: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> int:
  """Write ``arrays`` to ``path`` in the safetensors format; returns the file size in bytes.

  The package lays tensors out by decreasing alignment and pads the header to 8 bytes, so each tensor starts
  aligned to its item size.
  """
  path = os.fspath(path)
  _check_names(arrays, path)
  if metadata:
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
      raise ExportError(f"{path}: safetensors metadata must map str to str, got {bad}")
  # Contiguous copies: safetensors 0.8 reads each array's buffer through its data pointer, so a strided view (a
  # transposed kernel) would be written in memory order, not in index order.
  arrays = {name: np.asarray(a, order="C") for name, a in arrays.items()}  # (ascontiguousarray makes 0-d 1-d)
  for name, a in arrays.items():
    if a.dtype.name not in _SAFETENSORS_DTYPES:
      raise ExportError(
        f"{path}: {name} has dtype {a.dtype}, which safetensors cannot store (supported: {sorted(_SAFETENSORS_DTYPES)})"
      )
  safetensors.numpy.save_file(arrays, path, metadata=dict(metadata) if metadata else None)
  os.chmod(path, 0o666 & ~_umask())
  return os.path.getsize(path)


def _umask() -> int:
  """The process's umask, read without changing it where Linux reports it (os.umask can only set it)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  arrays, raw_codes = {}, {}
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      metadata = dict(f.metadata() or {})
      for name in f.keys():
        code = f.get_slice(name).get_dtype()
        try:
          arrays[name] = f.get_tensor(name)
        except (AttributeError, KeyError, TypeError, ValueError):  # a dtype the NumPy framework cannot name
          if code not in _ML_DTYPE_CODES:
            raise ExportError(
              f"{path}: {name} has dtype {code}, which NumPy cannot hold "
              f"(readable: the NumPy dtypes and {sorted(_ML_DTYPE_CODES)})"
            ) from None
          raw_codes[name] = code
    if raw_codes:  # the package's byte-level reader; it checks the layout as safe_open does
      with open(path, "rb") as f:
        for name, info in safetensors.deserialize(f.read()):
          if name in raw_codes:
            arrays[name] = np.frombuffer(info["data"], _ML_DTYPE_CODES[info["dtype"]]).reshape(info["shape"])
  except safetensors.SafetensorError as e:
    raise ExportError(f"{path}: not a safetensors file ({e})") from None
  return arrays, metadata


# ---- npz ----------------------------------------------------------------------------------------------------
def save_npz(arrays: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> int:
  """Write ``arrays`` (+ ``metadata`` as a JSON string entry) with ``numpy.savez``; returns the file size.

  ``path`` is used as given (``numpy.savez`` would append ``.npz`` to a name without it).
  """
  path = os.fspath(path)
  _check_names(arrays, path)
  out, stored_as = {}, {}
  for name, a in arrays.items():
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":  # bfloat16 & co (kind "V"): NumPy's .npy header cannot name them
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
def _kind(path: str) -> str:
  """'npz' (a zip archive) or 'safetensors' (anything else, checked by its reader)."""
  if not os.path.isfile(path):
    raise ExportError(f"{path}: no such file")
  with open(path, "rb") as f:
    return "npz" if f.read(4) == _ZIP_MAGIC else "safetensors"


def read_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """({name: array}, metadata) of a safetensors or npz file (told apart by content, not by extension)."""
  path = os.fspath(path)
  return _read_npz(path) if _kind(path) == "npz" else _read_safetensors(path)


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{name: array} of a safetensors or npz file."""
  return read_arrays(path)[0]


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
  """The metadata of a file (its arrays are not read); our exports': ``config`` (JSON), ``step``, ``which``,
  ``with_head``, ``format``."""
  path = os.fspath(path)
  if _kind(path) == "npz":
    with np.load(path, allow_pickle=False) as z:  # lazy: only the metadata entry is decompressed
      metadata = json.loads(str(z[METADATA_KEY])) if METADATA_KEY in z.files else {}
    metadata.pop("stored_as_uint", None)
    return metadata
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      return dict(f.metadata() or {})
  except safetensors.SafetensorError as e:
    raise ExportError(f"{path}: not a safetensors file ({e})") from None
