"""The package's shape: every module imports on its own, the import graph has no cycle, dependencies point down.

The graph counts EVERY import of a simdino_jax module, function-local ones included, so an import moved into a
function cannot hide a cycle. The layering is the one docs/layout.md describes: entry points -> train ->
{methods, evals, io, data, sharding} -> {models, losses, optim, schedules}.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "simdino_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
  """The module (or package) of ``name``: itself if it is one, else its parent (``from pkg import function``)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(module: str) -> set[str]:
  """simdino_jax modules ``module`` imports anywhere in its file (top level or inside functions)."""
  tree = ast.parse(MODULES[module].read_text())
  package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
      names = [f"{base}.{a.name}" for a in node.names] + [base]
    else:
      continue
    for name in names:
      if name.startswith("simdino_jax"):
        target = _resolve(name)
        if target and target != module and not module.startswith(target + "."):  # a package's own __init__
          found.add(target)
  return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_the_import_graph_has_no_cycle():
  state = {}  # 1: on the current path, 2: done
  path = []

  def visit(m):
    state[m] = 1
    path.append(m)
    for n in sorted(GRAPH[m]):
      if state.get(n) == 1:
        cycle = path[path.index(n) :] + [n]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if n not in state:
        visit(n)
    path.pop()
    state[m] = 2

  for m in sorted(GRAPH):
    if m not in state:
      visit(m)


# (package prefix, prefixes it must never import): lower layers know nothing of the layers above them.
FORBIDDEN = [
  (
    "simdino_jax.losses",
    (
      "simdino_jax.models",
      "simdino_jax.data",
      "simdino_jax.train",
      "simdino_jax.evals",
      "simdino_jax.io",
      "simdino_jax.methods",
      "simdino_jax.config",
    ),
  ),
  (
    "simdino_jax.models",
    (
      "simdino_jax.losses",
      "simdino_jax.data",
      "simdino_jax.train",
      "simdino_jax.evals",
      "simdino_jax.io",
      "simdino_jax.methods",
      "simdino_jax.config",
    ),
  ),
  (
    "simdino_jax.data",
    (
      "simdino_jax.models",
      "simdino_jax.losses",
      "simdino_jax.train",
      "simdino_jax.evals",
      "simdino_jax.io",
      "simdino_jax.methods",
      "simdino_jax.config",
    ),
  ),
  ("simdino_jax.methods", ("simdino_jax.train", "simdino_jax.evals", "simdino_jax.io", "simdino_jax.config")),
  ("simdino_jax.evals", ("simdino_jax.train", "simdino_jax.io", "simdino_jax.methods", "simdino_jax.config")),
  (
    "simdino_jax.io",
    ("simdino_jax.methods", "simdino_jax.train", "simdino_jax.evals", "simdino_jax.export", "simdino_jax.evaluate"),
  ),
  ("simdino_jax.train.step", ("simdino_jax.train.trainer", "simdino_jax.evals", "simdino_jax.io")),
  ("simdino_jax.sharding", ("simdino_jax.config", "simdino_jax.train", "simdino_jax.methods")),
]


@pytest.mark.parametrize("package,forbidden", FORBIDDEN, ids=[p for p, _ in FORBIDDEN])
def test_dependencies_point_down(package, forbidden):
  bad = sorted(
    (m, n)
    for m, deps in GRAPH.items()
    if m == package or m.startswith(package + ".")
    for n in deps
    if n.startswith(forbidden)
  )
  assert not bad, f"{package} must not import {forbidden}: {bad}"


def test_every_module_says_what_it_owns():
  missing = [m for m, p in MODULES.items() if not ast.get_docstring(ast.parse(p.read_text()))]
  assert not missing, f"modules without an opening docstring: {missing}"


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
  # One interpreter per module would cost minutes; one fresh interpreter importing each in turn still catches a
  # module that only imports after another one (each import is checked in a clean sys.modules snapshot).
  code = (
    "import importlib, sys\n"
    "base = set(sys.modules)\n"
    f"for name in {sorted(m for m in MODULES if not m.endswith('__main__'))!r}:\n"
    "  for k in [k for k in sys.modules if k.startswith('simdino_jax') and k not in base]:\n"
    "    del sys.modules[k]\n"
    "  importlib.import_module(name)\n"
    "print('ok')\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
