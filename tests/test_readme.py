"""The README's two Quickstart commands stay true: CI runs the README's test command verbatim."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart_commands():
  text = open(os.path.join(ROOT, "README.md")).read()
  section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_quickstart_has_exactly_two_commands_demo_then_tests():
  demo, tests = quickstart_commands()
  assert "python -m simdino_jax.train --config=configs/demo.py" in demo and "pip install" in demo
  assert "pytest" in tests and "pip install" in tests and ".[test]" in tests


def test_ci_runs_the_readme_test_command_verbatim():
  _, tests = quickstart_commands()
  ci_lines = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
  assert tests.strip() in [line.strip() for line in ci_lines]
