"""The README's main command keeps its promise: the demo's k-NN beats the network at initialisation by >= 3 points.

This runs the full demo config (about 3 minutes on 2 CPU cores), in-process to skip a second compilation cache.
"""

import json
import os
import runpy

from simdino_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_config_learns_beyond_initialisation(tmp_path):
  config = runpy.run_path(os.path.join(ROOT, "configs", "demo.py"))["get_config"]()
  result = trainer.train(config, str(tmp_path))
  on_disk = json.loads((tmp_path / "eval" / "knn.json").read_text())
  assert on_disk["accuracy"] == result["accuracy"]
  assert result["accuracy"] >= result["accuracy_at_init"] + 3.0, result
