"""The README's main command keeps its promise: the demo recipe's k-NN beats the network at initialisation by >= 3
points.

The README's command as shipped (configs/demo.py through ``python -m simdino_jax.train``), shortened from 600 to
STEPS = 150 steps (warm-up 60 -> 15, the same tenth). It runs in a subprocess compiled with XLA's default
optimisation, as a user runs it: the suite's in-process programs skip LLVM's optimisation passes
(tests/conftest.py), which makes this recipe's step ~1.7x slower (0.57 s of CPU per step vs 0.34 on 2 cores).
Measured with this file's command: 58.77% vs 51.53% at initialisation, +7.24 points against the 3 required, 76 s of
CPU (the former 200 steps in-process at the suite's optimisation level: ~130 s). Other lengths (docs/results.md has
the full 600 steps, +20.3): 200 steps +9.2 points, 250 steps +12.5.
"""

import json
import os
import runpy
import subprocess
import sys

from conftest import SUITE_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 150


def test_demo_config_learns_beyond_initialisation(tmp_path):
  config = runpy.run_path(os.path.join(ROOT, "configs", "demo.py"))["get_config"]()
  assert (config.total_steps, config.warmup_steps) == (600, 60)  # the figures above are measured against these
  # XLA's defaults (the suite's compile-time flags dropped, tests/conftest.py), one process, one device.
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f not in SUITE_XLA_FLAGS)
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  command = [
    sys.executable,
    "-m",
    "simdino_jax.train",
    "--config=configs/demo.py",
    f"--workdir={tmp_path}",
    f"--config.total_steps={STEPS}",
    f"--config.warmup_steps={STEPS // 10}",
  ]
  # A hang guard only: about a minute on 2 quiet cores, 12 minutes on a machine at load 25.
  out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads((tmp_path / "eval" / "knn.json").read_text())
  at_init = json.loads((tmp_path / "eval" / "knn_init.json").read_text())
  assert result["step"] == STEPS and at_init["step"] == 0
  assert result["accuracy_at_init"] == at_init["accuracy"]
  assert result["accuracy"] >= at_init["accuracy"] + 3.0, (result, at_init)
