"""What every data source family shares: image decoding, the skip-and-count base class and the error types.

Owns:

* :func:`decode_image` / :func:`pil_to_rgb` / :func:`array_to_rgb`: encoded bytes, a PIL image or a decoded array
  -> ``(H, W, 3)`` uint8, for every mode PIL opens (see :func:`pil_to_rgb` for the rules: 16-bit scaling, alpha,
  palette, CMYK, EXIF orientation).
* :class:`SkippingSource`: the base of the lazily decoding sources (folder, tar, tfds). ``source[i]`` never raises
  for an undecodable image (training needs full batches): it returns the next decodable example instead;
  ``source.try_example(i)`` returns None for it (evaluation leaves it out). Either way the bad image is warned
  about once and counted once per process (:func:`num_skipped`).
* :class:`MissingDataError`: a :class:`~simdino_jax.errors.DataError` that is also a ``FileNotFoundError``
  (a file, directory or split that does not exist), so callers catching either keep working.
"""

from __future__ import annotations

import io
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps

from simdino_jax.errors import DataError, MissingDataError  # noqa: F401  (re-exported: base.MissingDataError)

__all__ = [
  "ALPHA_BACKGROUND",
  "CorruptImageWarning",
  "DataError",
  "MissingDataError",
  "SkippingSource",
  "array_to_rgb",
  "decode_image",
  "decode_rgb",
  "num_skipped",
  "pil_to_rgb",
]

# Transparent pixels are composited onto white: the usual rendering of transparent images (browsers, viewers), and
# it keeps an object's silhouette visible; dropping alpha (PIL's convert("RGB"), torchvision's loader) shows the
# undefined colours stored under fully transparent pixels instead, often black or noise.
ALPHA_BACKGROUND = 255

_EXIF_ORIENTATION = 0x0112


class CorruptImageWarning(UserWarning):
  """An image could not be decoded; it was replaced (training) or left out (evaluation)."""


# ----------------------------------------------------------------------------
# Decoding


def _scale_16bit(x: np.ndarray) -> np.ndarray:
  """0..65535 -> 0..255, rounded (convert("RGB") would clip everything above 255 to white)."""
  x = np.clip(x.astype(np.int64), 0, 65535)
  return ((x * 255 + 32767) // 65535).astype(np.uint8)


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """``rgb`` (H, W, 3) uint8 over ``ALPHA_BACKGROUND`` with ``alpha`` (H, W) uint8, rounded."""
  a = alpha.astype(np.uint32)[..., None]
  out = (rgb.astype(np.uint32) * a + ALPHA_BACKGROUND * (255 - a) + 127) // 255
  return out.astype(np.uint8)


def _grey_to_rgb(x: np.ndarray) -> np.ndarray:
  return np.repeat(x[..., None], 3, axis=-1)


def pil_to_rgb(im: Image.Image) -> np.ndarray:
  """A PIL image of any mode -> ``(H, W, 3)`` uint8.

  * ``1``, ``L``: replicated to three channels; ``I;16*`` and ``I`` (16-bit greyscale PNG / TIFF; ``I`` is read
    as 16-bit, which is what PNG and TIFF encoders store in it) are scaled by 255 / 65535, rounded; ``F`` (float)
    is scaled by 255 when its values lie in [0, 1], else clipped to 0..255.
  * 16-bit RGB(A) PNGs: PIL already reduces them to 8 bits per channel (the high byte) when it opens them.
  * Alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, and ``P``/``L``/``RGB`` with a ``transparency`` entry) is
    composited onto white (:data:`ALPHA_BACKGROUND`), not dropped.
  * ``P`` (palette), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's conversion to RGB.

  EXIF orientation is not handled here but in :func:`decode_image`, which sees the file's metadata.
  """
  mode = im.mode
  if mode == "RGB" and "transparency" not in im.info:
    return np.asarray(im)
  if mode in ("1", "L") and "transparency" not in im.info:
    return _grey_to_rgb(np.asarray(im.convert("L")))
  if mode.startswith("I;16") or mode == "I":
    return _grey_to_rgb(_scale_16bit(np.asarray(im)))
  if mode == "F":
    x = np.nan_to_num(np.asarray(im, np.float32))
    if x.size and x.min() >= 0.0 and x.max() <= 1.0:
      x = x * 255.0
    return _grey_to_rgb(np.clip(np.rint(x), 0, 255).astype(np.uint8))
  if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
    rgba = np.asarray(im.convert("RGBA"))  # premultiplied modes are un-premultiplied by PIL here
    return _composite(rgba[..., :3], rgba[..., 3])
  return np.asarray(im.convert("RGB"))


def array_to_rgb(image, what: str) -> np.ndarray:
  """A decoded image array -> ``(H, W, 3)`` uint8: uint8 or uint16 ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or
  ``(H, W, 4)``; grey replicated, uint16 scaled by 255 / 65535, alpha composited as in :func:`pil_to_rgb`.
  ``what`` names the image in the DataError raised for any other array."""
  x = np.asarray(image)
  if x.ndim == 2:
    x = x[..., None]
  if x.dtype not in (np.uint8, np.uint16) or x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
    raise DataError(f"{what}: expected a uint8 or uint16 (H, W[, 1|3|4]) image, got {x.dtype} {x.shape}")
  if x.dtype == np.uint16:
    x = _scale_16bit(x)
  if x.shape[-1] == 1:
    return _grey_to_rgb(x[..., 0])
  if x.shape[-1] == 4:
    return _composite(x[..., :3], x[..., 3])
  return np.ascontiguousarray(x)


def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes -> ``(H, W, 3)`` uint8 (:func:`pil_to_rgb`), with the EXIF orientation applied (a
  camera's portrait JPEG comes out upright; torchvision's ImageFolder ignores it). Raises if the bytes do not
  decode completely (``load()`` forces the full decode, so a truncated file raises here)."""
  with Image.open(io.BytesIO(data)) as im:
    im.load()
    # Transposing copies the image: only when the EXIF says it is rotated or mirrored (rarely).
    if im.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None):
      im = ImageOps.exif_transpose(im)
    image = pil_to_rgb(im)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"decoded to {image.dtype} {image.shape}")
  return image


decode_rgb = decode_image  # the name used before the sources package was split


# ----------------------------------------------------------------------------
# Skipping and counting undecodable images

_lock = threading.Lock()  # counters, warnings and lazy file opening
_skipped_total = 0


def num_skipped() -> int:
  """Distinct undecodable images found by all decoding sources (folder, tar, tfds) of this process.

  Each file counts once, however often it is drawn or replaced. Counts per process: with grain worker processes
  the decoding, and hence this count, happens in the workers; the per-example ``"skipped"`` field (see
  :class:`SkippingSource`) is what reaches the trainer from there.
  """
  return _skipped_total


class SkippingSource:
  """Base of the decoding sources: ``source[i]`` replaces an undecodable example, ``try_example(i)`` omits it.

  * ``source[i]`` (training, grain): example ``i``, or when it cannot be read or decoded the next one that can
    (``i + 1, i + 2, ...`` cyclically, so the replacement is deterministic). ``"skipped"`` is 1 when example
    ``i``'s own image was undecodable (and replaced), else 0: a run of bad files counts each file once per draw,
    not once per replacement attempt. The training pipeline keeps the count of the first epoch only, so a run
    reports every bad file once (``pipeline.train_dataset``).
  * ``try_example(i)`` (evaluation): example ``i`` with ``"skipped"`` 0, or None when it is undecodable. An eval
    split must not score a duplicate of another image under the bad image's label: ``pipeline.eval_batches``
    marks the slot ``valid=False`` instead.

  A bad example is warned about once (:class:`CorruptImageWarning`) and counted once per process: ``skipped``
  (this object) and :func:`num_skipped` (all sources) are distinct bad examples found so far. The per-process
  state is never pickled, so grain worker processes start from zero.

  Subclasses define ``name``, ``__len__``, ``_example(j) -> (image, label)`` (raising on a bad example) and
  ``_describe(j)`` (what the warning names); ``_max_bad_run`` bounds a run of consecutive bad examples (None: try
  every example before giving up).
  """

  _PROCESS_LOCAL = ("skipped", "_bad")
  _max_bad_run: int | None = None

  def _reset_process_state(self) -> None:
    self.skipped = 0
    self._bad = set()

  def __getstate__(self):
    state = self.__dict__.copy()
    for k in self._PROCESS_LOCAL:
      state.pop(k, None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset_process_state()

  def num_skipped(self) -> int:
    """``skipped``: distinct undecodable examples found by this object (process)."""
    return self.skipped

  def _check_index(self, index) -> int:
    n = len(self)
    index = int(index)
    if not -n <= index < n:
      raise IndexError(f"{self.name}: index {index} out of range for {n} examples.")
    return index % n

  def _load(self, j: int, instead: str):
    """``(image, label)`` of example ``j``; when it is bad, the exception the first time (recorded, counted and
    warned about once), None after that (known bad: not read again)."""
    global _skipped_total
    if j in self._bad:
      return None
    try:
      return self._example(j)
    except Exception as e:  # noqa: BLE001  (whatever a reader or decoder raises, the image is unusable)
      with _lock:
        first = j not in self._bad
        if first:
          self._bad.add(j)
          self.skipped += 1
          _skipped_total += 1
      if first:
        warnings.warn(
          f"{self.name}: cannot decode {self._describe(j)} ({type(e).__name__}: {e}); {instead} (counted once in "
          f"{type(self).__name__}.skipped and sources.num_skipped()).",
          CorruptImageWarning,
          stacklevel=3,
        )
      return e

  def try_example(self, index) -> dict | None:
    """Example ``index`` as ``{"image", "label", "skipped": 0}``, or None when it cannot be read or decoded."""
    j = self._check_index(index)
    got = self._load(j, "left out of evaluation")
    if got is None or isinstance(got, Exception):
      return None
    image, label = got
    return {"image": image, "label": label, "skipped": np.int32(0)}

  def __getitem__(self, index) -> dict:
    n = len(self)
    index = self._check_index(index)
    tries = n if self._max_bad_run is None else min(n, self._max_bad_run + 1)
    last_error = None
    for k in range(tries):
      j = (index + k) % n
      got = self._load(j, "returning the next decodable example instead")
      if got is None or isinstance(got, Exception):
        last_error = got if got is not None else last_error
        continue
      image, label = got
      return {"image": image, "label": label, "skipped": np.int32(k > 0)}
    raise DataError(
      f"{self.name}: examples {index} .. {index + tries - 1} (mod {n}) cannot be read or decoded; the last "
      f"error: {type(last_error).__name__}: {last_error}"
    ) from last_error
