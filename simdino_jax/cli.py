"""What every entry point shares: flag parsing whose errors are one line naming the flag or config field.

absl reports a bad flag value in one line, but a config override of a field the config does not have
(``--config.model.dept=3``) or a config file that raises while loading surfaces as a Python traceback. ``flags_parser``
turns those into ``PROG: error: ...`` and exit code 1 as well.
"""

from __future__ import annotations

import sys
from typing import Callable

from absl import flags

from simdino_jax.errors import SimdinoError


def one_line(error: BaseException) -> str:
  """The message of ``error`` on one line (ml_collections quotes its KeyError / AttributeError messages)."""
  text = str(error)
  if isinstance(error, (KeyError, AttributeError)) and len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1].replace("\\'", "'").replace("\\n", " ")
  return " ".join(text.split())


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
  """An ``app.run(flags_parser=...)`` that parses the flags and exits with one line on any parsing error."""

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      sys.exit(f"{prog}: error: {one_line(e)} (--helpfull lists the flags)")
    except (SimdinoError, KeyError, AttributeError, ValueError, TypeError, FileNotFoundError) as e:
      sys.exit(f"{prog}: error: {one_line(e)}")

  return parse
