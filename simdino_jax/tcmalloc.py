"""Re-execute the entry point with tcmalloc preloaded when it is installed (Linux).

XLA on CPU spends seconds per step in page faults with glibc malloc; preloading tcmalloc made the SimDINO step
~1.5x faster on the project's 2-core machines (docs/performance.md#cpu-memory-allocator). It must be preloaded before the process starts, so
the entry points call ``maybe_reexec()`` first thing. Set SIMDINO_NO_TCMALLOC=1 to opt out.
"""

from __future__ import annotations

import glob
import os
import sys

_CANDIDATES = (
  "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
  "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
  "/usr/lib64/libtcmalloc_minimal.so.4",
  "/usr/lib/libtcmalloc_minimal.so.4",
)


def find_tcmalloc() -> str | None:
  for path in _CANDIDATES:
    if os.path.exists(path):
      return path
  found = glob.glob("/usr/lib*/**/libtcmalloc_minimal.so.4", recursive=True)
  return found[0] if found else None


def preloaded() -> bool:
  return "tcmalloc" in os.environ.get("LD_PRELOAD", "")


def allocator() -> str:
  """What benchmarks report as their allocator: "tcmalloc" when it is preloaded, else "default" (glibc malloc)."""
  return "tcmalloc" if preloaded() else "default"


def maybe_reexec(module: str | None = None, *, script: str | None = None) -> None:
  """If tcmalloc is available and not yet preloaded, replace this process by ``python -m module argv...`` (entry
  points) or ``python script argv...`` (the benchmark scripts)."""
  if (module is None) == (script is None):
    raise ValueError("give exactly one of module and script")
  if not sys.platform.startswith("linux") or os.environ.get("SIMDINO_NO_TCMALLOC") or preloaded():
    return
  lib = find_tcmalloc()
  if lib is None:
    return
  preload = os.environ.get("LD_PRELOAD", "")
  env = dict(os.environ, LD_PRELOAD=f"{lib}:{preload}" if preload else lib, SIMDINO_NO_TCMALLOC="1")
  target = ["-m", module] if module is not None else [os.path.abspath(script)]
  os.execve(sys.executable, [sys.executable, *target, *sys.argv[1:]], env)
