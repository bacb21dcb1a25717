"""Method-specific mechanics on configs/demo.py (masks, freezing, layer decay, no EMA)."""

import json
import math
import os
import re
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from simdino_jax import config as config_lib
from simdino_jax import methods, optim
from simdino_jax.data.masking import batch_masks, max_masked_tokens
from simdino_jax.train import trainer
from simdino_jax.train.step import masked_gather
from simdino_jax.tree import named_leaves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config(method, **overrides):
  c = runpy.run_path(os.path.join(ROOT, "configs", "demo.py"))["get_config"]()
  c.method = method
  c.total_steps, c.warmup_steps, c.log_every, c.batch_size = 3, 1, 1, 16
  c.model.depth, c.model.embed_dim = 2, 48
  c.head.hidden_dim, c.head.num_prototypes = 64, 128
  c.data.num_local = 0 if method in ("moco_v2", "byol") else 2  # the two-view methods refuse local crops
  if method.endswith("vmf"):
    c.head.norm_last_layer = False
  c.update_from_flattened_dict(overrides)
  return c


# No k-NN evaluation in the training runs below (nothing here reads it). Every method's training through the
# trainer, its metrics and progress-line terms: test_configs_methods.py's test_cifar10_config_trains_two_steps.
NO_KNN = {"evals.knn.at_init": False, "evals.knn.final": False}


@pytest.mark.parametrize("regularizer", ["infonce", "uniformity", "barlow"])
def test_table5_regularizers_train(regularizer, tmp_path):
  trainer.train(demo_config("simdino", **{"loss.regularizer": regularizer}, **NO_KNN), str(tmp_path))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(math.isfinite(r["regularizer"]) and math.isfinite(r["loss"]) for r in records)


def test_without_self_distillation_the_teacher_is_the_student(tmp_path):
  t = trainer.Trainer(demo_config("dino", **{"teacher.self_distillation": False}), str(tmp_path))
  state = t.init_state()
  step = t.compiled_step()
  batches = t.train_batches()
  for _ in range(2):
    state, metrics = step(state, next(batches))
    assert float(metrics["momentum"]) == 0.0
    for a, b in zip(jax.tree_util.tree_leaves(state.student), jax.tree_util.tree_leaves(state.teacher)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prototype_layer_is_frozen_for_the_first_epoch_and_g_for_good(tmp_path):
  # 1438 digits / batch 16 = 89 steps per epoch; freeze the last layer for 2/89 of an epoch -> 2 steps.
  config = demo_config("dino", **{"optim.freeze_last_layer_epochs": 2 / 89, "head.norm_last_layer": True})
  t = trainer.Trainer(config, str(tmp_path))
  state = t.init_state()
  init = {k: np.asarray(v) for k, v in named_leaves(state.student).items()}
  step = t.compiled_step()
  batches = t.train_batches()
  for i in range(3):
    state, _ = step(state, next(batches))
    now = named_leaves(state.student)
    v_same = np.array_equal(np.asarray(now["head/last_layer/weight_v"]), init["head/last_layer/weight_v"])
    assert v_same == (i < 2), i  # frozen during steps 0-1, updated at step 2
    np.testing.assert_array_equal(np.asarray(now["head/last_layer/weight_g"]), init["head/last_layer/weight_g"])
    if i >= 1:  # step 0 has lr 0 (warm-up starts at 0): from step 1 on the rest of the network moves
      assert not np.array_equal(np.asarray(now["backbone/cls_token"]), init["backbone/cls_token"])


def test_layerwise_lr_multipliers_follow_dinov2():
  params = {
    "backbone": {
      "patch_embed": {"kernel": 0},
      "cls_token": 0,
      "blocks": {"0": {"w": 0}, "11": {"w": 0}},
      "norm": {"scale": 0},
    },
    "head": {"w": 0},
  }
  m = optim.lr_multipliers(params, depth=12, layer_decay=0.9, patch_embed_mult=0.2)
  assert m["backbone"]["patch_embed"]["kernel"] == pytest.approx(0.2 * 0.9**13)
  assert m["backbone"]["cls_token"] == pytest.approx(0.9**13)
  assert m["backbone"]["blocks"]["0"]["w"] == pytest.approx(0.9**12)
  assert m["backbone"]["blocks"]["11"]["w"] == pytest.approx(0.9**1)
  assert m["backbone"]["norm"]["scale"] == 1.0 and m["head"]["w"] == 1.0


def test_masked_gather_packs_each_shard_and_lays_slots_out_per_crop():
  # Two shards of one image x two crops, N = 4: shard 0 masks 2 + 1 tokens, shard 1 masks 0 + 3.
  mask = jnp.array(
    [[[False, True, True, False], [True, False, False, False]], [[False] * 4, [True, True, False, True]]]
  )
  g = masked_gather(mask, per_crop=3, groups=2, tokens=3)
  # Token indices into a shard's (crops x N) tokens, masked first, in crop order.
  np.testing.assert_array_equal(g.tokens, [[1, 2, 4], [4, 5, 7]])
  np.testing.assert_array_equal(g.valid, [[[1, 1, 0], [1, 0, 0]], [[0, 0, 0], [1, 1, 1]]])
  slots = np.asarray(g.slots).reshape(2, 2, 3)
  np.testing.assert_array_equal(slots[0, 0, :2], [0, 1])  # crop (0, 0)'s masked tokens are packed slots 0 and 1
  np.testing.assert_array_equal(slots[0, 1, :1], [2])
  np.testing.assert_array_equal(slots[1, 1], [0, 1, 2])


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_masked_gather_round_trip_equals_a_per_crop_gather(groups):
  # Packed per shard, then laid out per crop: each crop's valid slots hold its masked tokens' features in order, as a
  # plain per-crop loop picks them.
  rng = np.random.default_rng(groups)
  b, mg, n, d, per_crop = 8, 2, 16, 3, 8
  mask = batch_masks(rng, b * mg, 4, 4, ratio_min_max=(0.1, 0.5)).reshape(b, mg, n)
  feats = rng.standard_normal((b, mg, n, d)).astype(np.float32)
  budget = max_masked_tokens(b * mg, n, (b // groups) * mg, ratio_min_max=(0.1, 0.5))
  g = masked_gather(jnp.asarray(mask), per_crop=per_crop, groups=groups, tokens=budget)
  packed = np.take_along_axis(feats.reshape(groups, -1, d), np.asarray(g.tokens)[..., None], axis=1)
  laid = np.take_along_axis(packed, np.asarray(g.slots)[..., None], axis=1).reshape(b, mg, per_crop, d)
  valid = np.asarray(g.valid)
  for i in range(b):
    for v in range(mg):
      idx = np.flatnonzero(mask[i, v])
      assert valid[i, v].sum() == len(idx)
      np.testing.assert_array_equal(laid[i, v, : len(idx)], feats[i, v, idx])


def test_max_masked_tokens_is_the_largest_targets_sum():
  # 4 crops, half masked: bins [0.1, 0.3), [0.3, 0.5) of N = 10 -> at most 3 and 5 cells.
  assert max_masked_tokens(4, 10, 1) == 5
  assert max_masked_tokens(4, 10, 2) == max_masked_tokens(4, 10, 4) == 8
  # DINOv2's settings on a 64-image batch of 8 x 8 grids: a third of the 64 x 2 x 32 per-crop bound.
  assert max_masked_tokens(128, 64, 128) == 1216 < 128 * 32


def test_max_masked_tokens_bounds_every_drawn_shard():
  rng = np.random.default_rng(0)
  crops, shard = 32, 8
  bound = max_masked_tokens(crops, 16, shard)
  worst = 0
  for _ in range(300):
    m = batch_masks(rng, crops, 4, 4).reshape(crops // shard, -1)
    worst = max(worst, int(m.sum(-1).max()))
  assert worst <= bound
  assert worst >= bound // 2  # the bound is not loose by a large factor


def test_mask_positions_bound_covers_the_generator():
  c = demo_config("simdinov2")
  n = (c.data.global_size // 4) ** 2
  assert methods.mask_positions(c) == int(n * c.masking.ratio[1])
  assert methods.mask_positions(demo_config("simdino")) == 0


def test_every_method_declares_what_the_trainer_and_step_need():
  for name, m in methods.METHODS.items():
    assert m.name == name
    assert m.progress_line_keys[0] == "loss" and m.progress_line_keys[-2:] == ("feature_std", "effective_rank")
    assert (m.build_patch_head is not None) == m.uses_masks, name
  for name in ("dino", "dinov2", "dino_vmf", "ibot_vmf"):
    assert "ce" in methods.METHODS[name].progress_keys and "prototypes_used" in methods.METHODS[name].progress_keys
  assert "ibot_ce" in methods.METHODS["dinov2"].progress_keys and "ibot_ce" not in methods.METHODS["dino"].progress_keys
  with pytest.raises(ValueError, match="build_patch_head"):
    methods.Method("masked", build_head=lambda *a: None, make_loss=lambda *a: None, uses_masks=True)


# swav's prototypes (no weight norm, frozen for swav.freeze_prototypes_iters): tests/test_swav_method.py.
@pytest.mark.parametrize("method", sorted(m for m in methods.METHODS if m != "swav"))
def test_optimizer_freezes_hold_the_prototype_layer(method):
  # 89 steps per epoch: the last layer frozen for round(2 / 89 * 89) = 2 steps; g for good with norm_last_layer.
  config = demo_config(method, **{"optim.freeze_last_layer_epochs": 2 / 89, "head.norm_last_layer": True})
  params = nnx.split(nnx.eval_shape(lambda: methods.build_network(config)))[1]
  freezes = methods.get_method(method).optimizer_freezes(config, params, 89)
  if not methods.get_method(method).prototypes:
    assert freezes == ()
    return
  (g_mask, g_until), (layer_mask, layer_until) = freezes
  assert (g_until, layer_until) == (-1, 2)
  assert [k for k, v in named_leaves(g_mask).items() if v] == ["head/last_layer/weight_g"]
  assert sorted(k for k, v in named_leaves(layer_mask).items() if v) == [
    "head/last_layer/weight_g",
    "head/last_layer/weight_v",
  ]
  config.head.norm_last_layer, config.optim.freeze_last_layer_epochs = False, 0.0
  assert methods.get_method(method).optimizer_freezes(config, params, 89) == ()


@pytest.mark.parametrize("method", ["dino", "dino_vmf", "ibot_vmf"])
def test_vmf_heads_output_their_prototype_norms(method):
  config = demo_config(method, **{"head.separate_patch_head": True, "head.patch_num_prototypes": 32})
  net = methods.build_network(config)
  x = jnp.ones((2, 3, 48), jnp.float32)
  out = net.head(x)
  assert out["logits"].shape == (2, 3, 128)
  if method == "dino":  # the step adds nothing: only the vMF heads carry norms
    assert set(out) == {"z", "logits"}
    return
  np.testing.assert_array_equal(out["prototype_norms"], np.abs(np.asarray(net.head.last_layer.weight_g[...])))
  if method == "ibot_vmf":
    assert net.head.__class__ is net.patch_head.__class__ and net.patch_head(x)["prototype_norms"].shape == (32,)


@pytest.mark.parametrize(
  "method,field,value,match",
  [
    ("simdinov2", "loss.regularizer", "infonce", "config.loss.regularizer: the Table 5 regularizers"),
    ("simdinov2", "masking.ratio", (0.1, 1.0), "config.masking.ratio"),
    ("dinov2", "dino.koleo_weight", 0.1, "config.dino.koleo_groups"),
    ("dino", "dino.centering", "mean", "config.dino.centering: must be one of 'centering', 'sinkhorn_knopp'"),
    ("dino", "data.num_local", 0, "config.data.num_local: the DINO-family cross-entropy"),
    ("dino_vmf", "dino.centering", "sinkhorn_knopp", "config.dino.centering: the vMF methods"),
    ("ibot_vmf", "head.norm_last_layer", True, "config.head.norm_last_layer"),
    ("dino_vmf", "vmf.terms", 0, "config.vmf.terms"),
  ],
)
def test_each_method_checks_its_own_fields(method, field, value, match):
  config = demo_config(method, **{field: value})
  if field == "data.num_local":
    config.data.num_global = 1
  if field == "dino.koleo_weight":
    config.dino.koleo_groups = 3  # does not divide batch_size 16
  with pytest.raises(config_lib.ConfigError, match=re.escape(match)):
    config_lib.validate(config, num_devices=1)
  with pytest.raises(config_lib.ConfigError, match=re.escape(match)):
    methods.get_method(method).validate(config, num_devices=1)
