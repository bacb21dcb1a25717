"""config.eval.dtype: the frozen backbone is evaluated in float32 by default (DINO's evaluation scripts) whatever
model.dtype it trained in, in training's rounds and in evaluate.py, and every result states the dtype."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import checkpoint_at_init
from flax import nnx

from simdino_jax import config as config_lib
from simdino_jax import evaluate
from simdino_jax.errors import ConfigError
from simdino_jax.evals import runner
from simdino_jax.models.network import build_backbone


def test_a_bfloat16_trained_backbone_is_evaluated_in_float32_by_default(tiny_config, tmp_path):
  tiny_config.model.dtype = "bfloat16"
  rng = np.random.default_rng(0)
  data = str(tmp_path / "data.npz")
  np.savez(
    data,
    train_images=rng.integers(0, 256, (32, 16, 16, 3), np.uint8),
    train_labels=np.arange(32) % 4,
    test_images=rng.integers(0, 256, (16, 16, 16, 3), np.uint8),
    test_labels=np.arange(16) % 4,
  )
  tiny_config.data.source = f"npz:{data}"
  workdir = str(tmp_path / "run")
  tr, state = checkpoint_at_init(tiny_config, workdir)
  params = state.teacher["backbone"]
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3), jnp.float32)

  ctx = tr.eval_context()
  assert ctx.dtype == "float32"
  evaluated = np.asarray(runner.make_feature_fn(ctx.graphdef, [("cls",)])(params, images)["cls"])
  f32 = tiny_config.copy_and_resolve_references()
  f32.model.dtype = "float32"
  graph = nnx.split(nnx.eval_shape(lambda: build_backbone(f32.model, rngs=nnx.Rngs(0))))[0]
  reference = np.asarray(nnx.merge(graph, params)(images, key=None)["cls"])
  assert np.max(np.abs(evaluated - reference)) <= 1e-6
  # What evaluating in the training dtype gave (the former behaviour): visibly other features.
  trained_dtype = np.asarray(nnx.merge(tr.setup.backbone_graphdef, params)(images, key=None)["cls"], np.float32)
  assert np.max(np.abs(trained_dtype - reference)) > 1e-3

  r = evaluate.evaluate(tiny_config, workdir, ["knn"], output=str(tmp_path / "f32"))["knn"]
  assert r["dtype"] == "float32" and json.loads((tmp_path / "f32" / "knn.json").read_text())["dtype"] == "float32"
  bf16 = tiny_config.copy_and_resolve_references()
  bf16.eval.dtype = "bfloat16"
  r = evaluate.evaluate(bf16, workdir, ["knn"], output=str(tmp_path / "bf16"))["knn"]
  assert json.loads((tmp_path / "bf16" / "knn.json").read_text())["dtype"] == "bfloat16"


def test_eval_dtype_is_validated_in_one_line(tiny_config):
  tiny_config.eval.dtype = "float16"
  with pytest.raises(ConfigError, match=r"^config.eval.dtype: must be one of 'float32', 'bfloat16', got 'float16'$"):
    config_lib.validate(tiny_config, num_devices=1)
