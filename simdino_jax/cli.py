"""What every entry point shares: flag parsing whose errors are one line naming the flag, config field or file.

absl reports a bad flag value in one line, but ml_collections' config flag does not: a missing config file is
deferred to the first access and then raised with its loader's traceback, a config file that raises while loading
(a recipe refusing its ``:ARG``, ``evaluate --workdir`` on a directory that is not a run) comes back as a traceback
squashed into the flag's message, and an override of a field the config does not have is a bare ``KeyError``.
``flags_parser`` turns each into ``PROG: error: ...`` and exit code 1, suggests the closest existing fields for an
unknown one, makes ``--help`` exit 0 (absl exits 1 after printing it) and applies the command-line precedence rules
of ``config.apply_command_line`` (a command-line ``model.variant`` decides the architecture).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from typing import Callable

from absl import flags
from ml_collections.config_flags import config_flags

from simdino_jax.errors import SimdinoError

HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")  # absl's; each prints and exits before main
FIELDS_DOC = "fields and defaults: simdino_jax/config.py"


def one_line(error: BaseException) -> str:
  """The message of ``error`` on one line (ml_collections quotes its KeyError / AttributeError messages)."""
  text = str(error)
  if isinstance(error, (KeyError, AttributeError)) and len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1].replace("\\'", "'").replace("\\n", " ")
  return " ".join(text.split())


def _asked_for_help(argv: list[str]) -> bool:
  args = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
  return any(re.fullmatch(r"--?(help|helpshort|helpfull|helpxml|\?)(=.*)?", a) for a in args)


def _config_arg(argv: list[str], name: str = "config") -> str | None:
  """The value of ``--NAME=VALUE`` / ``--NAME VALUE`` in argv (the last one, as absl takes it)."""
  value = None
  for i, a in enumerate(argv[1:], 1):
    if a.startswith(f"--{name}="):
      value = a.split("=", 1)[1]
    elif a == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _overrides(argv: list[str], name: str = "config") -> list[str]:
  """The field paths of ``--NAME.FIELD=VALUE`` / ``--noNAME.FIELD`` in argv, in order."""
  found = []
  for a in argv[1:]:
    m = re.match(rf"--?(?:no)?{name}\.([^=]+)", a)
    if m and m.group(1) not in found:
      found.append(m.group(1))
  return found


def _root_cause(error: BaseException) -> BaseException:
  """The exception a config file raised, under absl's IllegalFlagValueError and ml_collections' re-raise of the
  same type with the traceback as its message: the last of the chain."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def _config_file_error(spec: str, error: BaseException) -> str:
  """One line for a config file (``spec`` = PATH[:ARG]) that could not be loaded."""
  path = spec.split(":", 1)[0]
  if not path:
    return "--config: give a config file, e.g. --config=configs/demo.py"
  if not os.path.isfile(path):
    where = os.path.dirname(path) or "."
    near = sorted(f for f in os.listdir(where) if f.endswith(".py")) if os.path.isdir(where) else []
    close = difflib.get_close_matches(os.path.basename(path), near, n=3)
    hint = f"; did you mean {', '.join(os.path.join(where, c) for c in close)}?" if close else ""
    listing = f" ({where} holds {', '.join(near[:12])}{' ...' if len(near) > 12 else ''})" if near and not close else ""
    return f"--config={spec}: no such config file{hint}{listing}"
  if isinstance(error, SimdinoError):
    return one_line(error)  # names the field or file itself
  return f"--config={spec}: {type(error).__name__}: {one_line(error)}{_where(error)}"


def _where(error: BaseException) -> str:
  """`` (FILE, line N)`` of the innermost frame that raised ``error`` outside ml_collections (a recipe's own bug),
  or "" when its message says it already (SyntaxError)."""
  if isinstance(error, SyntaxError):
    return ""
  frames = [f for f in traceback.extract_tb(error.__traceback__) if "ml_collections" not in f.filename]
  return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


def _raised_loading_config(error: BaseException) -> bool:
  """Whether ``error`` came out of ml_collections' loading of a config file (its ``get_config`` or the module), or
  out of the placeholder it keeps for a file that failed to load (read by a --config.FIELD override)."""
  return any(
    f.name in ("parse", "_ReportError") and f.filename.endswith(os.path.join("config_flags", "config_flags.py"))
    for f in traceback.extract_tb(error.__traceback__)
  )


def _flatten(config, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if hasattr(value, "items"):
      out.extend(_flatten(value, f"{prefix}{key}."))
  return out


def _acronym(name: str) -> str:
  return "".join(word[0] for word in name.split("_") if word)


def closest_fields(name: str, fields: list[str], n: int = 3) -> list[str]:
  """The fields of ``fields`` (dotted paths) closest to the unknown ``name``: spelling (difflib) of the whole path, or
  of the last part weighted by how close the blocks are, or an abbreviation (``learning_rate`` -> ``lr``)."""
  parent, _, leaf = name.rpartition(".")
  scored = []
  for field in fields:
    f_parent, _, f_leaf = field.rpartition(".")
    block = 0.5 + 0.5 * difflib.SequenceMatcher(None, parent, f_parent).ratio()
    abbreviation = leaf and f_leaf and (_acronym(leaf) == f_leaf or _acronym(f_leaf) == leaf)
    score = max(
      difflib.SequenceMatcher(None, name, field).ratio(),
      difflib.SequenceMatcher(None, leaf, f_leaf).ratio() * block,
      block if abbreviation else 0.0,
    )
    scored.append((-score, field))
  scored.sort()
  best = -scored[0][0] if scored else 0.0
  return [field for neg, field in scored[:n] if -neg >= max(0.6, best - 0.15)]


def _unknown_field(argv: list[str], name: str) -> str | None:
  """One line naming the first ``--NAME.FIELD`` override the config does not have, with the closest fields; None
  when every override names a field (the error was something else)."""
  spec = _config_arg(argv, name)
  if spec is None:
    return None
  try:  # only on this error path: load the config once more, to list its fields
    config = config_flags.ConfigFileFlagParser(name).parse(spec)
    fields = _flatten(config)
  except Exception:  # pylint: disable=broad-except  (the original error is reported instead)
    return None
  for path in _overrides(argv, name):
    if path.split("[")[0] not in fields:  # "[i]" indexes into a tuple field
      close = closest_fields(path, fields)
      hint = f"; did you mean {' or '.join(f'{name}.{c}' for c in close)}?" if close else ""
      return f"{name}.{path}: no such config field{hint} ({FIELDS_DOC})"
  return None


def _config_flags(flag_values: flags.FlagValues) -> list:
  """The config-file flags among ``flag_values`` (each name once; absl also keys a flag by its short name)."""
  return [flag_values[name] for name in flag_values if config_flags.is_config_flag(flag_values[name])]


def _check_loaded(flag) -> None:
  """ml_collections keeps a config file that failed to load (IOError) as a placeholder raising on first access."""
  try:
    getattr(flag.value, "lock", None)
  except OSError as e:
    raise _ConfigLoadError(_config_file_error(flag.config_filename, e.__cause__ or e)) from None


class _ConfigLoadError(Exception):
  pass


def flags_parser(prog: str, flag_values: flags.FlagValues = flags.FLAGS) -> Callable[[list[str]], list[str]]:
  """An ``app.run(flags_parser=...)`` that parses the flags and exits with one line on any parsing error, 0 after
  ``--help``, and applies ``config.apply_command_line`` to each config flag."""

  def parse(argv: list[str]) -> list[str]:
    try:
      rest = flag_values(argv)
      for flag in _config_flags(flag_values):
        _check_loaded(flag)
        if flag.value is not None:
          from simdino_jax import config as config_lib  # pylint: disable=g-import-not-at-top  (jax: after tcmalloc)

          for note in config_lib.apply_command_line(flag.value, flag.override_values):
            print(f"{prog}: {note}", flush=True)
      if len(rest) > 1:  # absl hands them to main, which would run as if they were not there
        sys.exit(f"{prog}: error: unexpected argument(s) {' '.join(rest[1:])}: give flags as --NAME=VALUE")
      return rest
    except SystemExit as e:
      if e.code == 1 and _asked_for_help(argv):
        sys.exit(0)  # absl exits 1 after printing the help it was asked for
      raise
    except _ConfigLoadError as e:
      sys.exit(f"{prog}: error: {e}")
    except flags.IllegalFlagValueError as e:
      spec = _config_arg(argv)
      if spec is not None and "Error whilst parsing config file" in str(e):
        sys.exit(f"{prog}: error: {_config_file_error(spec, _root_cause(e))}")
      sys.exit(f"{prog}: error: {one_line(e)} (--helpfull lists the flags)")
    except flags.Error as e:
      sys.exit(f"{prog}: error: {one_line(e)} (--helpfull lists the flags)")
    except Exception as e:  # pylint: disable=broad-except  (re-raised unless a user can have caused it)
      spec = _config_arg(argv)
      if spec is not None and _raised_loading_config(e):  # a recipe raising anything while it loads (its :ARG ...)
        sys.exit(f"{prog}: error: {_config_file_error(spec, e.__cause__ or e)}")
      if isinstance(e, (KeyError, AttributeError)):  # --config.FIELD of a field the config does not have
        sys.exit(f"{prog}: error: {_unknown_field(argv, 'config') or one_line(e)}")
      if isinstance(e, (SimdinoError, ValueError, TypeError, FileNotFoundError)):
        sys.exit(f"{prog}: error: {one_line(e)}")
      raise

  return parse
