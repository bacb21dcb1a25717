"""Every method's CIFAR-10 config trains from the real CIFAR-10 tar in ../shared/data (skipped when absent).

Two steps of each config's recipe (data, crops, masks, heads, optimiser) with a shrunken backbone; the k-NN
evaluation over 60k images is left to real runs (README "Results").
"""

import math
import os
import runpy

import jax
import pytest

from simdino_jax import methods
from simdino_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAR = os.path.join(ROOT, "..", "shared", "data", "cifar10", "cifar10-jpeg.tar")


@pytest.mark.skipif(not os.path.exists(TAR), reason=f"CIFAR-10 tar not found at {TAR} (../shared/data is absent)")
@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_cifar10_config_trains_on_real_cifar10(method, tmp_path):
  config = runpy.run_path(os.path.join(ROOT, "configs", f"cifar10_{method}.py"))["get_config"]()
  assert config.method == method
  config.data.source = "folder:" + TAR  # the config's path is relative to the repo root; pytest may run elsewhere
  config.batch_size, config.model.depth, config.model.embed_dim, config.model.num_heads = 16, 1, 32, 2
  config.head.hidden_dim, config.head.num_prototypes = 64, 256
  config.head.patch_num_prototypes = 0
  t = trainer.Trainer(config, str(tmp_path))
  assert len(t.train_source) == 50000
  state = t.init_state()
  step = t.compiled_step()
  batches = t.train_batches()
  for _ in range(2):
    state, metrics = step(state, next(batches))
    assert math.isfinite(float(metrics["loss"])), metrics
  assert int(state.step) == 2
