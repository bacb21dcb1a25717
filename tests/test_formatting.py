"""The tree is formatted with the one configured formatter (``ruff format``, settings in pyproject.toml)."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


PATHS = ["simdino_jax", "tests", "benchmarks", "configs"]
needs_ruff = pytest.mark.skipif(
  importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')"
)


def ruff(*args):
  return subprocess.run(
    [sys.executable, "-m", "ruff", *args, *PATHS], cwd=ROOT, capture_output=True, text=True, timeout=300
  )


@needs_ruff
def test_code_is_formatted_with_ruff():
  out = ruff("format", "--check")
  assert out.returncode == 0, (
    "run `ruff format simdino_jax tests benchmarks configs`:\n" + (out.stdout + out.stderr)[-3000:]
  )


@needs_ruff
def test_ruff_check_is_clean():
  """pyflakes (F: unused imports and variables, undefined names) and import order (I), as pyproject.toml selects."""
  out = ruff("check", "--no-cache")
  assert out.returncode == 0, (
    "run `ruff check --fix simdino_jax tests benchmarks configs`:\n" + (out.stdout + out.stderr)[-3000:]
  )
