"""Re-execute the entry point with tcmalloc preloaded when it is installed (Linux).

XLA on CPU spends seconds per step in page faults with glibc malloc; preloading tcmalloc made the SimDINO step
~1.5x faster on the project's 2-core machines (PITFALLS.md). It must be preloaded before the process starts, so
the entry points call ``maybe_reexec()`` first thing. Set SIMDINO_NO_TCMALLOC=1 to opt out.
"""

from __future__ import annotations

import glob
import os
import sys

_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
               "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")


def find_tcmalloc() -> str | None:
  for path in _CANDIDATES:
    if os.path.exists(path):
      return path
  found = glob.glob("/usr/lib*/**/libtcmalloc_minimal.so.4", recursive=True)
  return found[0] if found else None


def maybe_reexec(module: str) -> None:
  """If tcmalloc is available and not yet preloaded, replace this process by ``python -m module argv...``."""
  if not sys.platform.startswith("linux") or os.environ.get("SIMDINO_NO_TCMALLOC"):
    return
  preload = os.environ.get("LD_PRELOAD", "")
  if "tcmalloc" in preload:
    return
  lib = find_tcmalloc()
  if lib is None:
    return
  env = dict(os.environ, LD_PRELOAD=f"{lib}:{preload}" if preload else lib, SIMDINO_NO_TCMALLOC="1")
  os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
