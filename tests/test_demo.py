"""The README's main command keeps its promise: the demo recipe's k-NN beats the network at initialisation by >= 3
points.

The demo config as shipped, shortened from 600 to 200 steps (warm-up 60 -> 20, the same tenth; in-process, to skip a
second compilation cache): 92 s of CPU time instead of 234 s (2 cores), with a wide margin: 60.7% vs 51.5% at
initialisation, +9.2 points against the 3 required (150 steps gave +7.2, 250 steps +12.5, the full 600 steps +20.3:
docs/results.md).
"""

import json
import os
import runpy

from simdino_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_config_learns_beyond_initialisation(tmp_path):
  config = runpy.run_path(os.path.join(ROOT, "configs", "demo.py"))["get_config"]()
  assert (config.total_steps, config.warmup_steps) == (600, 60)  # the figures above are measured against these
  config.total_steps, config.warmup_steps = 200, 20
  result = trainer.train(config, str(tmp_path))
  on_disk = json.loads((tmp_path / "eval" / "knn.json").read_text())
  assert on_disk["accuracy"] == result["accuracy"]
  assert result["accuracy"] >= result["accuracy_at_init"] + 3.0, result
