"""Gram anchoring in the train step (train/gram.py): the added term against the NumPy transcription of DINOv3's
GramLoss.forward (tests/test_gram.py) on the same features, the Gram teacher's refreshes (the EMA teacher's backbone
copied exactly after the scheduled iterations, never otherwise), the default path without it, and an exact resume.

One tiny SimDINOv2 network (1 block, 16 px crops of 4 px patches, no drop path), both steps compiled once per module.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_config
from flax import nnx
from test_gram import np_gram_loss

from simdino_jax import config as config_lib
from simdino_jax import sharding
from simdino_jax.data.masking import batch_masks
from simdino_jax.errors import ConfigError
from simdino_jax.io import checkpointing
from simdino_jax.train import setup as setup_lib

WEIGHT = 0.7
# Loaded into the Gram teacher before step 1 (term off at step 0), then refreshed after steps 1 and 3 (it + 1 = 2, 4:
# every 2 from 2), at most twice, so never after step 5.
SCHEDULE = dict(start_step=1, first_refresh=2, refresh_every=2, max_refreshes=2)
DUE = [True, True, False, True, False, False]  # after steps 0..5


def tiny(gram: bool, **gram_fields):
  c = make_tiny_config()
  c.method = "simdinov2"
  c.model.depth, c.model.drop_path_rate = 1, 0.0  # deterministic student: the reference recomputes its features
  c.head.num_layers = 1  # (less to compile)
  c.data.num_local = 0  # the global crops carry the term; fewer shapes to compile
  c.total_steps = 20  # the teacher momentum reaches 1 at the end: keep it moving through the steps tested
  c.masking.probability = 1.0
  c.gram.enabled = gram
  c.gram.weight = WEIGHT
  c.gram.update(SCHEDULE)
  c.gram.update(gram_fields)
  config_lib.validate(c, num_devices=1)
  return c


def built(config):
  setup = setup_lib.build(config, 1000)
  mesh = sharding.make_mesh(config.mesh)
  shardings = setup_lib.state_sharding(setup, mesh)
  return setup, setup_lib.init_state(setup, shardings), setup_lib.make_step(setup, mesh, donate=False)


def batch(config, seed):
  rng = np.random.default_rng(seed)
  d, b = config.data, config.batch_size
  grid = d.global_size // 4
  return {
    "global": jnp.asarray(rng.standard_normal((b, d.num_global, d.global_size, d.global_size, 3)), jnp.float32),
    "local": jnp.asarray(rng.standard_normal((b, d.num_local, d.local_size, d.local_size, 3)), jnp.float32),
    "mask": jnp.asarray(batch_masks(rng, b * d.num_global, grid, grid, mask_probability=1.0)).reshape(b, 2, -1),
  }


@pytest.fixture(scope="module")
def on():
  return built(tiny(True))


def sharding_of(tree):
  return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_the_added_term_is_dinov3_gram_loss_of_the_student_and_gram_teacher_patch_tokens(on):
  setup, state, step = on
  config = setup.config
  state, _ = step(state, batch(config, 0))
  b = batch(config, 1)
  # The same state as iteration 0 (term weight 0: before start_step) and as iteration 1 (the EMA teacher loaded into
  # the Gram teacher, weight WEIGHT); nothing else in this loss depends on the step (no drop path, no schedule).
  _, without = step(state.replace(step=jnp.zeros_like(state.step)), b)
  _, with_term = step(state, b)
  assert int(state.step) == 1 and float(without["gram_weight"]) == 0.0
  net = setup.backbone_graphdef

  # The backbone's normed patch tokens of the global crops (one compilation: an all-False mask is no mask).
  forward = jax.jit(lambda params, images, masks: nnx.merge(net, params)(images, masks=masks)["patch"])
  images, masks = b["global"].reshape((-1,) + b["global"].shape[2:]), b["mask"].reshape(-1, b["mask"].shape[-1])
  student = np.asarray(forward(state.student["backbone"], images, masks), np.float64)  # masked crops
  teacher = np.asarray(forward(state.teacher["backbone"], images, jnp.zeros_like(masks)), np.float64)  # unmasked
  ref = np_gram_loss(student, teacher, img_level=True)  # config.gram: normalized, img_level, negatives kept
  np.testing.assert_allclose(float(with_term["gram_loss"]), ref, rtol=1e-4)
  assert float(with_term["gram_weight"]) == pytest.approx(WEIGHT)
  np.testing.assert_allclose(float(with_term["loss"]) - float(without["loss"]), WEIGHT * ref, rtol=1e-3, atol=1e-6)
  assert float(with_term["grad_norm"]) != float(without["grad_norm"])  # the term reaches the student's gradient


def test_gram_teacher_takes_the_ema_teacher_exactly_on_the_scheduled_steps_only(on):
  """The snapshot due after iteration it is the teacher iteration it stored, taken as iteration it + 1 starts (the
  Gram teacher that iteration uses and stores)."""
  setup, state, step = on
  for it in range(len(DUE) + 1):
    gram_before, teacher_before = leaves(state.gram_teacher), leaves(state.teacher["backbone"])
    state, _ = step(state, batch(setup.config, it))
    after = leaves(state.gram_teacher)
    expected, other = (teacher_before, gram_before) if it and DUE[it - 1] else (gram_before, teacher_before)
    assert all(np.array_equal(a, b) for a, b in zip(after, expected, strict=True)), it
    if it:  # (at initialisation the Gram teacher is the teacher)
      assert not all(np.array_equal(a, b) for a, b in zip(after, other)), it  # the teacher had moved on


@flax.struct.dataclass
class FormerTrainState:  # train/state.py's TrainState before config.gram (and config.distill) added fields
  step: Any
  student: Any
  teacher: Any
  opt_state: Any
  loss_state: Any
  rng: Any


def test_off_has_no_gram_leaves_and_restores_a_former_checkpoint(tmp_path):
  """Off, the state is the former one (its step is bitwise the former step: measured against the previous commit, a
  change of the default path would show in tests/test_step.py and the parity tests)."""
  setup = setup_lib.build(tiny(False), 1000)
  state = setup_lib.init_state(setup, setup_lib.state_sharding(setup, sharding.make_mesh(setup.config.mesh)))
  assert setup.gram is None and state.gram_teacher is None
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  assert not any("gram" in n for n in names)
  # A checkpoint written before the field existed (orbax now also records the None field in its metadata).
  former = FormerTrainState(**{f: getattr(state, f) for f in FormerTrainState.__dataclass_fields__})
  with checkpointing.Checkpointer(tmp_path / "checkpoints", async_save=False) as ckpt:
    ckpt.save(0, former)
    restored = ckpt.restore(0, checkpointing.abstract_target(jax.eval_shape(lambda: state), sharding_of(state)))
  assert restored.gram_teacher is None
  for a, b in zip(leaves(restored), leaves(state), strict=True):
    np.testing.assert_array_equal(a, b)


def test_resume_with_gram_on_equals_the_uninterrupted_run(on, tmp_path):
  setup, state0, step = on
  state = state0
  for it in range(4):
    state, _ = step(state, batch(setup.config, it))
  uninterrupted = leaves(state)
  state = state0
  for it in range(2):
    state, _ = step(state, batch(setup.config, it))
  with checkpointing.Checkpointer(tmp_path / "checkpoints", async_save=False) as ckpt:
    ckpt.save(2, state)
    target = checkpointing.abstract_target(jax.eval_shape(lambda: state), sharding_of(state))
    state = ckpt.restore(2, target)
  for it in range(2, 4):  # a refresh after step 3
    state, _ = step(state, batch(setup.config, it))
  for a, b in zip(leaves(state), uninterrupted, strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"negatives": "clip"}, "config.gram.negatives"),
    ({"tokens_used": "masked"}, "config.gram.tokens_used: 'masked' needs gram.img_level=False"),
    ({"weight_schedule": (0, 0, 2, 10)}, "config.gram.weight_schedule"),
    ({"refresh_every": -1}, "config.gram.refresh_every"),
  ],
)
def test_bad_gram_fields_are_named(fields, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    tiny(True, **fields)
