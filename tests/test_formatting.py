"""The tree is formatted with the one configured formatter (``ruff format``, settings in pyproject.toml)."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_code_is_formatted_with_ruff():
  out = subprocess.run(
    [sys.executable, "-m", "ruff", "format", "--check", "simdino_jax", "tests", "benchmarks", "configs"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, (
    "run `ruff format simdino_jax tests benchmarks configs`:\n" + (out.stdout + out.stderr)[-3000:]
  )


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_check_is_clean():
  """pyflakes (F: unused imports and variables, undefined names) and import order (I), as pyproject.toml selects."""
  out = subprocess.run(
    [sys.executable, "-m", "ruff", "check", "--no-cache", "simdino_jax", "tests", "benchmarks", "configs"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, (
    "run `ruff check --fix simdino_jax tests benchmarks configs`:\n" + (out.stdout + out.stderr)[-3000:]
  )
