"""Every method's CIFAR-10 config trains from the real CIFAR-10 tar ($SIMDINO_CIFAR10, else the developers' copy
beside the repository; skipped when absent), and without the data it is refused with the instruction to make it.

Two steps of each config's recipe (data, crops, masks, heads, optimiser) with a shrunken backbone; the k-NN
evaluation over 60k images is left to real runs (docs/results.md).
"""

import math
import os
import runpy

import pytest

from simdino_jax import methods
from simdino_jax.errors import ConfigError
from simdino_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAR = os.environ.get("SIMDINO_CIFAR10") or os.path.join(ROOT, "..", "shared", "data", "cifar10", "cifar10-jpeg.tar")


def _load(method, arg=None):
  return runpy.run_path(os.path.join(ROOT, "configs", f"cifar10_{method}.py"))["get_config"](arg)


def test_cifar10_data_comes_from_the_argument_then_the_environment_and_is_required(monkeypatch, tmp_path):
  monkeypatch.setenv("SIMDINO_CIFAR10", "/env/cifar10.tar")
  assert _load("simdino").data.source == "folder:/env/cifar10.tar"
  assert _load("simdino", "/arg/cifar10.tar").data.source == "folder:/arg/cifar10.tar"  # the argument wins
  monkeypatch.delenv("SIMDINO_CIFAR10")
  config = _load("dino")  # the recipe's fields can be read without the data...
  assert config.data.source == "" and config.method == "dino"
  with pytest.raises(
    ConfigError, match=r"^config\.data\.source: not set.*SIMDINO_CIFAR10.*launch/prepare_data.sh cifar10"
  ):
    trainer.Trainer(config, str(tmp_path))  # ...but training refuses it before anything is built
  assert not os.listdir(tmp_path)


@pytest.mark.skipif(not os.path.exists(TAR), reason=f"CIFAR-10 tar not found at {TAR} (set SIMDINO_CIFAR10)")
@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_cifar10_config_trains_on_real_cifar10(method, tmp_path):
  config = _load(method, TAR)
  assert config.method == method
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
