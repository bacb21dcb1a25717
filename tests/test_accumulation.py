"""Gradient accumulation (train/accumulation.py): K = 1 is today's step, "exact" K micro-batches equal one batch of B,
"micro" equals the data-parallel run with per-device batch statistics, and the config refusals.

References (never the accumulated step itself): "exact" against the plain step on the whole batch; "micro" against
the plain step with ``loss.groups`` = K, the per-device covariance of a K-device run (the official ``reduce_cov=0``;
on one device micro-batch k is row group k), and for DINO's centre against the plain step's one update from the
whole batch. Each comparison covers the whole new state (student, teacher, the SGD momentum = the gradient, loss state) and the loss.
Tiny ViT (depth 1, 16 px crops, B = 8), drop path off (its masks are drawn per micro-batch), one step each; the
programs are compiled once per configuration and shared between the tests.
"""

import functools

import jax
import numpy as np
import pytest
from conftest import make_tiny_config
from test_step import fixed_batch

from simdino_jax import config as config_lib
from simdino_jax import sharding
from simdino_jax.data.masking import batch_masks
from simdino_jax.errors import ConfigError
from simdino_jax.train import setup as setup_lib
from simdino_jax.train.accumulation import merge_micro, split_micro
from simdino_jax.tree import named_leaves


def _config(method, overrides=()):
  c = make_tiny_config()
  c.method = method
  c.model.drop_path_rate = 0.0
  c.model.depth = 1
  # SGD (torch's, momentum 0.9) without clipping: its momentum after one step IS the gradient, so the state
  # comparison checks the gradient's scale too (Adam's first update g / |g| would hide it); and it compiles faster.
  c.optim.name, c.optim.clip_grad = "sgd", 0.0
  c.head.num_layers = 1
  for field, value in overrides:
    node = c
    *path, last = field.split(".")
    for name in path:
      node = node[name]
    node[last] = value
  return c


def _batch(config):
  batch = {k: np.asarray(v) for k, v in fixed_batch(config).items()}
  if config.method in ("simdinov2", "dinov2"):
    grid = config.data.global_size // 4
    masks = batch_masks(np.random.default_rng(0), config.batch_size * config.data.num_global, grid, grid)
    batch["mask"] = np.asarray(masks).reshape(config.batch_size, config.data.num_global, grid * grid)
  return batch


@functools.lru_cache(maxsize=None)
def _initial_state(method):
  """The initial state of ``method``'s config (the accumulation fields and loss.groups do not change it)."""
  setup = setup_lib.build(_config(method), 1000)
  return setup_lib.init_state(setup, setup_lib.state_sharding(setup, sharding.make_mesh(setup.config.mesh)))


@functools.lru_cache(maxsize=None)
def _step(method, overrides=()):
  """One step of ``method`` with the config ``overrides`` from the initial state: (new state leaves, metrics)."""
  config = _config(method, overrides)
  config_lib.validate(config, num_devices=1)
  setup = setup_lib.build(config, 1000)
  step = setup_lib.make_step(setup, sharding.make_mesh(config.mesh), donate=False)
  new, metrics = step(_initial_state(method), _batch(config))
  leaves = {k: np.asarray(v) for k, v in named_leaves(jax.device_get(new)).items()}
  return leaves, {k: float(v) for k, v in metrics.items()}


def _assert_same_step(got, want, *, state_rtol=1e-4, metric_rtol=1e-5):
  (state, metrics), (ref_state, ref_metrics) = got, want
  assert state.keys() == ref_state.keys()
  for name, ref in ref_state.items():
    if ref.dtype.kind != "f":
      np.testing.assert_array_equal(state[name], ref, err_msg=name)
      continue
    # Per leaf, relative to the leaf's largest value (float noise of the summation order).
    scale = max(float(np.max(np.abs(ref), initial=0.0)), 1e-12)
    assert float(np.max(np.abs(state[name] - ref), initial=0.0)) <= state_rtol * scale, name
  for key in ("loss", "grad_norm", "feature_std", "effective_rank"):
    assert metrics[key] == pytest.approx(ref_metrics[key], rel=metric_rtol, abs=1e-6), key


def test_split_and_merge_keep_each_shard_rows_on_their_shard():
  x = np.arange(24)
  micro = np.asarray(split_micro(x, steps=3, groups=2))  # 2 shards of 12 rows, 3 micro-batches of 2 x 4 rows
  np.testing.assert_array_equal(micro[:, :4], [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])  # shard 0's pieces
  np.testing.assert_array_equal(micro[:, 4:], [[12, 13, 14, 15], [16, 17, 18, 19], [20, 21, 22, 23]])  # shard 1's
  np.testing.assert_array_equal(np.asarray(merge_micro(micro, groups=2)), x)


def test_one_micro_batch_is_todays_step():
  # accumulation_steps=1 lowers to the very program of a config without the accumulation fields (today's step).
  def lowered(config):
    setup = setup_lib.build(config, 1000)
    mesh = sharding.make_mesh(config.mesh)
    batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(config))
    return setup_lib.make_step(setup, mesh).lower(setup.abstract_state, batch).as_text()

  with_fields = _config("simdino", (("accumulation_steps", 1), ("accumulation_mode", "exact")))
  without = _config("simdino")
  del without["accumulation_steps"], without["accumulation_mode"]
  assert lowered(with_fields) == lowered(without)


def test_exact_mode_equals_one_batch():
  # SimDINOv2, 4 micro-batches of 2: the coding rate's covariance over all B rows, the cls and masked-patch
  # alignments: the same loss terms, gradient (its norm, the SGD momentum), updated student and teacher as one batch.
  got, ref = _step("simdinov2", (("accumulation_steps", 4), ("accumulation_mode", "exact"))), _step("simdinov2")
  _assert_same_step(got, ref)
  for key in ("align", "patch_align", "rate"):
    assert got[1][key] == pytest.approx(ref[1][key], rel=1e-5), key


def test_micro_mode_equals_per_device_covariances():
  # On one device micro-batch k is rows [kB/K, (k+1)B/K): the plain step with loss.groups = K (a K-device run's
  # per-device covariance) is the reference.
  got, ref = (
    _step("simdino", (("accumulation_steps", 2), ("accumulation_mode", "micro"))),
    _step("simdino", (("loss.groups", 2),)),
  )
  _assert_same_step(got, ref)
  for key in ("align", "rate"):
    assert got[1][key] == pytest.approx(ref[1][key], rel=1e-5), key


def test_micro_mode_dino_centre_is_the_whole_batch_update():
  # DINO's cross-entropy is a mean over rows and its centre update linear in the batch mean: the micro mode's averaged
  # centre updates equal the plain step's one update from the whole batch's teacher outputs.
  got = _step("dino", (("accumulation_steps", 2), ("accumulation_mode", "micro")))
  ref = _step("dino")
  _assert_same_step(got, ref)
  centre = "loss_state/center"
  assert np.max(np.abs(ref[0][centre])) > 0  # the centre moved
  np.testing.assert_allclose(got[0][centre], ref[0][centre], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
  "method,base,overrides,field",
  [
    ("simdino", (), (("accumulation_steps", 3),), "accumulation_steps"),  # 8 rows into 3
    ("simdino", (), (("accumulation_steps", 0),), "accumulation_steps"),
    ("simdino", (), (("accumulation_steps", 2), ("accumulation_mode", "full")), "accumulation_mode"),
    ("simdino", (("loss.groups", 4),), (("accumulation_steps", 4),), "loss.groups"),  # 2-row micro-batches, 4 groups
    ("moco_v2", (("data.num_local", 0),), (("accumulation_steps", 2),), "accumulation_steps"),  # its key queue
    ("dino_vmf", (("head.norm_last_layer", False),), (("accumulation_steps", 2), ("accumulation_mode", "exact")), None),
    ("simdino", (("model.arch", "resnet18"),), (("accumulation_steps", 2), ("accumulation_mode", "exact")), None),
  ],
)
def test_config_refusals_name_the_field(method, base, overrides, field):
  config_lib.validate(_config(method, base), num_devices=1)  # valid without the accumulation fields
  with pytest.raises(ConfigError) as err:
    config_lib.validate(_config(method, base + overrides), num_devices=1)
  message = str(err.value)
  assert "\n" not in message and message.startswith(f"config.{field or 'accumulation_mode'}:"), message
