"""The progress lines' time format and the one-helper rule: ``progress.hms`` is the only H:MM:SS formatter and
``errors.require`` the only "config.FIELD: message" check in the package (issue 29: four copies of ``_hms`` and three
of ``require`` had drifted: one rounded where the others truncated, one crashed on an infinite ETA)."""

import ast
import pathlib

from simdino_jax.progress import hms

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "simdino_jax"


def test_hms_is_h_mm_ss_truncated_and_zero_when_unknown():
  assert hms(0) == "0:00:00"
  assert hms(3 * 3600 + 62.7) == "3:01:02"  # truncated, not rounded
  assert hms(59.99) == "0:00:59"
  assert hms(float("inf")) == "0:00:00"  # an ETA before the first rate is known
  assert hms(float("nan")) == "0:00:00"
  assert hms(-5) == "0:00:00"


def _definitions(names: set[str]) -> list[str]:
  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.FunctionDef) and node.name in names:
        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.name}")
  return found


def test_one_progress_time_helper_and_one_config_check_in_the_package():
  assert _definitions({"hms", "_hms"}) == ["simdino_jax/progress.py:hms"]
  assert _definitions({"require", "_require"}) == ["simdino_jax/errors.py:require"]
