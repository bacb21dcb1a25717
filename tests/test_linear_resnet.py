"""The linear evaluator on a ResNet reads the pooled feature whatever ``avgpool`` says, as DINO's eval_linear.py does
for a torchvision network (``output = model(inp)`` in its ``else`` branch; ``--avgpool_patchtokens`` and
``--n_last_blocks`` only shape the ViT branch), and the DINOv2 grid protocols, which slice a ViT's per-block
features, refuse a ResNet in one line. A tiny ResNet (width 4, 16 px), no training."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_resnet_training import resnet_config

from simdino_jax import config as config_lib
from simdino_jax.errors import ConfigError
from simdino_jax.evals import linear_eval, runner
from simdino_jax.models.network import ResNetBackbone


def linear_cfg(**fields):
  return ml_collections.ConfigDict(dict(linear_eval.LinearEvaluator.DEFAULTS, type="linear", **fields))


@pytest.mark.parametrize("avgpool", [False, True])
def test_linear_features_of_a_resnet_are_its_pooled_feature(avgpool):
  config = resnet_config()
  evaluator = linear_eval.LinearEvaluator("linear", linear_cfg(avgpool=avgpool, n_last_blocks=2), config)

  # One BasicBlock per stage in eval mode (as the evaluators run it), its variables drawn in NumPy from the shapes
  # and the forward jitted: an eager init or forward compiles op by op (~15 s of CPU).
  def make():
    backbone = ResNetBackbone(block="basic", layers=(1, 1, 1, 1), width=4, cifar_stem=True, rngs=nnx.Rngs(params=0))
    backbone.eval()
    return backbone

  graphdef, shapes = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes)
  x = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)

  def both(variables, x):  # KeyError 'patch' before the fix
    return runner.make_feature_fn(graphdef, (evaluator.spec,))(variables, x), nnx.merge(graphdef, variables)(x)["cls"]

  feats, pooled = jax.jit(both)(variables, x)
  np.testing.assert_array_equal(feats[runner.spec_key(evaluator.spec)], pooled)
  assert evaluator.spec == ("linear", 2, False)


def test_vit_keeps_avgpool():
  config = config_lib.base_config()
  assert linear_eval.LinearEvaluator("linear", linear_cfg(avgpool=True), config).spec[2] is True


@pytest.mark.parametrize("protocol", ["dinov2", "simdinov2"])
def test_grid_protocols_refuse_a_resnet_in_one_line(protocol):
  config = resnet_config()
  config.evals.linear.final = True
  config.evals.linear.protocol = protocol
  with pytest.raises(ConfigError) as e:
    config_lib.validate(config, num_devices=1)
  assert str(e.value).startswith("config.evals.linear.protocol:") and "\n" not in str(e.value), str(e.value)
  config.evals.linear.protocol, config.evals.linear.n_last_blocks = "dino", 1
  config_lib.validate(config, num_devices=1)
