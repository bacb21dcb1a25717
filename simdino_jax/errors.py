"""Every exception simdino_jax raises on purpose, under one base class.

Entry points catch ``SimdinoError`` (and the ValueError / FileNotFoundError of argument parsing) and print one
line naming the config field, file or option and what was expected. Each type also derives from the built-in it
refines (ValueError, RuntimeError), so callers that caught those before keep working.
"""

from __future__ import annotations


class SimdinoError(Exception):
  """Base of every error raised on purpose by simdino_jax."""


class ConfigError(SimdinoError, ValueError):
  """An invalid config value; the message starts with the offending ``config.FIELD``."""


class DataError(SimdinoError, ValueError):
  """A data source that cannot be read as specified (``data.source``, a file or a folder layout)."""


class MissingDataError(DataError, FileNotFoundError):
  """A data file, directory or split that does not exist (both a DataError and a FileNotFoundError)."""


class CheckpointMismatchError(SimdinoError, ValueError):
  """A checkpoint that does not fit this run's config (shapes, dtypes or tree structure)."""


class ResumeError(SimdinoError, ValueError):
  """``config.resume`` / ``config.init_from`` names no usable checkpoint or weights file."""


class ExportError(SimdinoError, ValueError):
  """An export that cannot be written or read (format, path, missing arrays)."""


class InteropError(SimdinoError, ValueError):
  """A PyTorch state dict or checkpoint that does not map onto this project's ViT."""


class PlotError(SimdinoError, ValueError):
  """metrics.jsonl missing or empty when curves are drawn."""


class NonFiniteLossError(SimdinoError, RuntimeError):
  """Training stopped on a non-finite loss; ``step`` is the step whose update was refused."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def require(cond: bool, field: str, message: str) -> None:
  """ConfigError "config.FIELD: message" unless ``cond``: the one check every config validation goes through
  (config.py, the methods' and the evaluators' ``validate``), so every refusal names its field the same way."""
  if not cond:
    raise ConfigError(f"config.{field}: {message}")
