"""DINO's linear evaluation protocol (evals.linear.protocol="dino", simdino_jax/evals/linear_dino.py).

Checked against independent transcriptions of facebookresearch/dino's eval_linear.py (commit 7c446df): its lr scaling
and CosineAnnealingLR schedule, PyTorch's SGD with momentum, its feature layout per architecture; plus per-epoch
re-augmentation, the end-to-end protocol on a tiny folder dataset through ``simdino_jax.evaluate``, and validation.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from simdino_jax import config as config_lib
from simdino_jax import evaluate
from simdino_jax.data import augment
from simdino_jax.evals import linear_dino, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"blue": (50, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def _write_shapes(root, n_train=24, n_test=12, size=24):
  """A folder dataset: discs of one colour per class on a noisy grey background, at random places and radii."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:size, :size]
  for split, n in (("train", n_train), ("val", n_test)):
    for name, colour in COLOURS.items():
      os.makedirs(os.path.join(root, split, name))
      for i in range(n):
        img = (118 + rng.integers(0, 20, (size, size, 3))).astype(np.uint8)
        r = int(rng.integers(5, 10))
        cy, cx = rng.integers(r, size - r, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour
        Image.fromarray(img).save(os.path.join(root, split, name, f"{i}.png"))


def _dino_config(data_root):
  from conftest import make_tiny_config

  c = make_tiny_config()
  c.data.source = f"folder:{data_root}"
  c.model.depth = 4  # room for DINO's ViT-S choice, the cls tokens of the last 4 blocks
  c.evals.linear.protocol = "dino"
  c.evals.linear.epochs = 4
  c.evals.linear.lrs = (0.01, 0.1, 1.0)
  c.evals.linear.batch_size = 32
  c.evals.linear.n_last_blocks = 4
  return c


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory):
  """(config, workdir, trainer, state): the tiny network at initialisation on a folder of shapes, checkpointed (the
  evaluated checkpoint); shared with the feature tests, which need a network of depth 4 (built once: ~10 s)."""
  root = tmp_path_factory.mktemp("linear_dino")
  _write_shapes(str(root / "data"))
  config = _dino_config(str(root / "data"))
  workdir = str(root / "run")
  from conftest import checkpoint_at_init

  tr, state = checkpoint_at_init(config, workdir)
  return config, workdir, tr, state


# -- end to end ------------------------------------------------------------------------------------------------
def test_dino_protocol_through_evaluate_learns_the_shapes_and_writes_linear_json(dino_run):
  config, workdir, _, _ = dino_run
  results = evaluate.evaluate(config, workdir, ["linear"])
  lin = results["linear"]
  assert json.load(open(os.path.join(workdir, "eval", "linear.json"))) == json.loads(json.dumps(lin))
  assert lin["protocol"] == "dino" and lin["epochs"] == 4 and lin["step"] == 0
  assert lin["features"] == "teacher backbone: cls of the last 4 block(s)" and lin["feature_dim"] == 4 * 32
  assert lin["num_train"] == 72 and lin["num_test"] == 36
  assert (lin["crop_size"], lin["resize_size"]) == (16, 18)  # the run's 16 px eval size, resize 16 x 256 / 224
  assert set(lin["per_lr"]) == {"0.01", "0.1", "1"} and lin["lr"] in (0.01, 0.1, 1.0)
  assert lin["accuracy"] == max(v["top1"] for v in lin["per_lr"].values())
  assert lin["scaled_lr"] == pytest.approx(lin["lr"] * 32 / 256)
  for v in lin["per_lr"].values():
    assert len(v["top1_per_epoch"]) == 4 and v["top1"] == max(v["top1_per_epoch"])  # DINO: the best epoch
  # Colour is linearly readable even from a random backbone: well above chance (33.3%) on 36 test images.
  assert lin["accuracy"] >= 70.0, lin


# -- views -----------------------------------------------------------------------------------------------------
def _source(n=10, size=20):
  rng = np.random.default_rng(1)
  return [{"image": rng.integers(0, 256, (size, size + 4, 3), np.uint8), "label": i % 3} for i in range(n)]


def _epoch(source, epoch, seed=0, **kw):
  batches = list(linear_dino.train_batches(source, epoch=epoch, seed=seed, batch_size=4, crop=8, **kw))
  return {k: np.concatenate([b[k] for b in batches]) for k in ("image", "label", "weight")}


def test_training_views_are_redrawn_every_epoch_and_reproducible():
  source = _source()
  e0, e0_again, e1 = _epoch(source, 0), _epoch(source, 0), _epoch(source, 1)
  for k in ("image", "label", "weight"):
    np.testing.assert_array_equal(e0[k], e0_again[k])  # the same seed: the same views
  assert e0["image"].shape == (12, 8, 8, 3) and e0["image"].dtype == np.uint8  # 10 examples, 3 batches of 4
  np.testing.assert_array_equal(e0["weight"], [1.0] * 10 + [0.0] * 2)
  assert not np.any(e0["image"][10:])
  assert not np.allclose(e0["image"], e1["image"])  # a new epoch: new order and new crops
  assert not np.allclose(e0["image"], _epoch(source, 0, seed=1)["image"])
  # Each example once per epoch, in another order.
  order0, order1 = linear_dino.epoch_order(0, 0, 10), linear_dino.epoch_order(0, 1, 10)
  assert sorted(order0) == list(range(10)) and not np.array_equal(order0, order1)
  np.testing.assert_array_equal(e1["label"][:10], [source[i]["label"] for i in order1])
  # The same example's crop differs across epochs: compare example 3's view in epochs 0 and 1.
  v0 = e0["image"][int(np.where(order0 == 3)[0][0])]
  v1 = e1["image"][int(np.where(order1 == 3)[0][0])]
  assert not np.allclose(v0, v1)
  # Threads and process shards do not change the views (per-example RNG).
  import concurrent.futures

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    np.testing.assert_array_equal(_epoch(source, 1, pool=pool)["image"], e1["image"])
  halves = [
    list(linear_dino.train_batches(source, epoch=1, seed=0, batch_size=4, crop=8, shard_index=k, shard_count=2))
    for k in (0, 1)
  ]
  joined = np.concatenate([np.concatenate([a["image"], b["image"]]) for a, b in zip(*halves)])
  np.testing.assert_array_equal(joined, e1["image"])


def test_train_view_is_a_random_resized_crop_and_flip_of_the_example():
  # A horizontal ramp: a crop of columns [left, left + w) resized keeps the ramp's direction unless flipped.
  ramp = np.repeat(np.repeat(np.linspace(0, 255, 40)[None, :, None], 30, 0), 3, 2).astype(np.uint8)
  flips = []
  for i in range(40):
    rng = np.random.default_rng(i)
    top, left, h, w = augment.rrc_params(30, 40, np.random.default_rng(i), (0.08, 1.0), (3 / 4, 4 / 3))
    view = linear_dino.train_view(ramp, rng, 16)
    assert view.shape == (16, 16, 3) and view.dtype == np.uint8
    row = view[8, :, 0] / 255
    flips.append(row[0] > row[-1])
    lo, hi = sorted((row[0], row[-1]))
    # The view spans the crop's columns: its extreme values lie within the crop's ramp range (bilinear, +-1 level).
    assert lo >= ramp[0, left, 0] / 255 - 1 / 255 and hi <= ramp[0, left + w - 1, 0] / 255 + 2 / 255
  assert 5 < sum(flips) < 35  # RandomHorizontalFlip(p=0.5)


def test_eval_view_is_resize_shorter_side_then_center_crop():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (30, 45, 3), np.uint8)  # h 30, w 45
  # Independent: torchvision Resize(37) keeps the aspect (long side truncated), CenterCrop(32) rounds the offsets.
  resized = np.asarray(Image.fromarray(img).resize((int(37 * 45 / 30), 37), Image.BICUBIC))
  top, left = int(round((37 - 32) / 2)), int(round((resized.shape[1] - 32) / 2))
  want = augment.normalize(resized[top : top + 32, left : left + 32])
  np.testing.assert_allclose(linear_dino.eval_view(img, 32, 37), want, atol=1e-6)
  assert linear_dino.resolve_sizes(0, 0, 32) == (32, 37) and linear_dino.resolve_sizes(224, 256, 32) == (224, 256)
  assert linear_dino.resolve_sizes(0, 0, 224) == (224, 256)


# -- the recipes' protocols ------------------------------------------------------------------------------------
DINO_SWEEP = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


@pytest.mark.parametrize(
  "name,protocol,n_last_blocks,avgpool,lrs",
  [
    # The SimDINO README's command: `eval_linear.py --arch vit_base` with its argparse defaults (--n_last_blocks 4,
    # --avgpool_patchtokens False, --lr 0.001, --epochs 100, --batch_size_per_gpu 128 on --nproc_per_node=8).
    ("simdino_vits16_in1k", "dino", 4, False, (1e-3,)),
    ("simdino_vitb16_in1k", "dino", 4, False, (1e-3,)),
    # DINO's paper for ViT-B: n=1 + avgpool ("We use n=1 with ViT-Base", "True with ViT-Base"), the lr swept.
    ("dino_vitb16_in1k", "dino", 1, True, DINO_SWEEP),
    ("dino_vmf_vitb16_in1k", "dino", 1, True, DINO_SWEEP),
    ("ibot_vmf_vitb16_in1k", "dino", 1, True, DINO_SWEEP),
    # The README's simdinov2/run/eval/linear.py: SimDINO's fork of DINOv2's eval/linear.py, defaults.
    ("simdinov2_vitb16_in1k", "simdinov2", 1, True, (2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)),
    ("simdinov2_vitl16_in1k", "simdinov2", 1, True, (2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)),
    ("dinov2_vitb16_in1k", "simdinov2", 1, True, (2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)),
  ],
)
def test_each_recipe_evaluates_with_the_protocol_behind_its_figure(name, protocol, n_last_blocks, avgpool, lrs):
  import runpy

  from simdino_jax.evals import linear_eval

  c = runpy.run_path(os.path.join(ROOT, "configs", f"{name}.py"))["get_config"]()
  r = linear_eval.resolve(c.evals.linear)
  assert r["protocol"] == protocol and (r["n_last_blocks"], r["avgpool"]) == (n_last_blocks, avgpool)
  assert r["lrs"] == lrs and r["batch_size"] == 1024 and (r["crop_size"], r["resize_size"]) == (224, 256)
  assert r["epochs"] == (100 if protocol == "dino" else 10)
  if protocol == "simdinov2":  # n_last_blocks_list = [1,2]; for avgpool in [True]; 10 epochs x 1250 iterations
    assert (r["n_last_blocks_grid"], r["avgpool_grid"], r["epoch_length"]) == ((1, 2), (True,), 1250)


def test_each_recipe_docstring_names_its_linear_protocol():
  import runpy

  for name, named in (
    ("simdino_vits16_in1k", "eval_linear.py defaults"),
    ("simdino_vitb16_in1k", "`eval_linear.py --arch vit_base` with its defaults"),
    ("dino_vitb16_in1k", "DINO's paper protocol for ViT-B"),
    ("dino_vmf_vitb16_in1k", "DINO's paper protocol for ViT-B"),
    ("ibot_vmf_vitb16_in1k", "DINO's paper protocol for ViT-B"),
    ("simdinov2_vitb16_in1k", 'evals.linear.protocol "simdinov2"'),
    ("simdinov2_vitl16_in1k", 'evals.linear.protocol "simdinov2"'),
    ("dinov2_vitb16_in1k", 'evals.linear.protocol "simdinov2"'),
  ):
    doc = " ".join(runpy.run_path(os.path.join(ROOT, "configs", f"{name}.py"))["__doc__"].split())
    assert named in doc, name


def test_dino_feature_choice_per_architecture_and_small_data_recipes_use_the_frozen_probe():
  assert linear_dino.dino_feature_choice(192) == (4, False) and linear_dino.dino_feature_choice(384) == (4, False)
  assert linear_dino.dino_feature_choice(768) == (1, True) and linear_dino.dino_feature_choice(1024) == (1, True)
  import runpy

  for name in ("demo", "cifar10_simdino"):
    assert runpy.run_path(os.path.join(ROOT, "configs", f"{name}.py"))["get_config"]().evals.linear.protocol == "frozen"


@pytest.mark.parametrize("n_last_blocks,avgpool", [(4, False), (1, True)])
def test_features_are_dinos_cls_concat_or_cls_and_avgpool(dino_run, n_last_blocks, avgpool):
  _, _, tr, state = dino_run
  graphdef, params = tr.setup.backbone_graphdef, state.teacher["backbone"]
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  spec = ("linear", n_last_blocks, avgpool)
  feature_fn = runner.make_feature_fn(graphdef, (spec,))
  intermediate = lambda p, x: nnx.merge(graphdef, p).get_intermediate_layers(x, n_last_blocks)  # noqa: E731
  got = jax.jit(feature_fn)(params, images)[runner.spec_key(spec)]  # jitted: seconds faster than op-by-op on CPU
  # DINO's computation on the token sequences [cls, patches] of the last n blocks (eval_linear.py, train()):
  #   output = cat([x[:, 0] for x in intermediate_output], -1)
  #   if avgpool: output = cat((output[..., None], mean(intermediate_output[-1][:, 1:], 1)[..., None]), -1)
  #               output = output.reshape(B, -1)        (interleaved [c0, a0, c1, a1, ...])
  layers = jax.jit(intermediate)(params, images)
  tokens = [np.concatenate([np.asarray(l["cls"])[:, None], np.asarray(l["patch"])], 1) for l in layers]
  out = np.concatenate([t[:, 0] for t in tokens], -1)
  d = 32
  if avgpool:
    out = np.stack([out, tokens[-1][:, 1:].mean(1)], -1).reshape(3, -1)
    assert got.shape == (3, 2 * d)
    # Ours concatenates [cls, avg]: the same numbers, de-interleaved.
    np.testing.assert_allclose(np.asarray(got), out.reshape(3, d, 2).transpose(0, 2, 1).reshape(3, -1), atol=1e-5)
  else:
    assert got.shape == (3, 4 * d)
    np.testing.assert_allclose(np.asarray(got), out, atol=1e-5)


# -- schedule and optimiser ------------------------------------------------------------------------------------
def _torch_cosine_annealing(base_lr, t_max, epochs):
  """torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max, eta_min=0).get_lr(), its recursive (chainable)
  form, transcribed: the lr of each epoch, scheduler.step() called after each epoch as in eval_linear.py."""
  eta_min, lrs, lr = 0.0, [], base_lr
  for last_epoch in range(epochs):
    if last_epoch == 0:
      lr = base_lr
    elif (last_epoch - 1 - t_max) % (2 * t_max) == 0:
      lr = lr + (base_lr - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
    else:
      lr = (1 + math.cos(math.pi * last_epoch / t_max)) / (1 + math.cos(math.pi * (last_epoch - 1) / t_max)) * (
        lr - eta_min
      ) + eta_min
    lrs.append(lr)
  return np.array(lrs)


def test_lr_scaling_and_cosine_schedule_follow_eval_linear():
  batch_size_per_gpu, world_size, epochs = 128, 8, 100
  for lr in (1e-3, 0.05):
    # eval_linear.py: torch.optim.SGD(..., args.lr * (args.batch_size_per_gpu * utils.get_world_size()) / 256., ...)
    peak = lr * (batch_size_per_gpu * world_size) / 256.0
    assert linear_dino.scaled_lrs([lr], 1024)[0] == pytest.approx(peak, rel=1e-12)
    want = _torch_cosine_annealing(peak, epochs, epochs)
    np.testing.assert_allclose(
      linear_dino.scaled_lrs([lr], 1024)[0] * linear_dino.epoch_lr_factors(epochs), want, rtol=1e-9
    )
  # The loop hands each epoch's lr (constant within the epoch) to the step, for every lr of the sweep at once.
  seen = []

  def step_fn(state, images, labels, weights, lrs):
    seen.append(np.asarray(lrs))
    return state, jnp.zeros(lrs.shape)

  batches = lambda epoch: [(None, None, None)] * 2  # noqa: E731  (two steps per epoch)
  linear_dino.run(
    step_fn=step_fn,
    batches_fn=batches,
    test_x=np.zeros((4, 3)),
    test_y=np.zeros(4, np.int32),
    num_classes=2,
    dim=3,
    lrs=(0.01, 0.1),
    batch_size=512,
    epochs=3,
    seed=0,
    num_train=1000,
    log=lambda _: None,
  )
  want = np.stack([_torch_cosine_annealing(lr * 2, 3, 3) for lr in (0.01, 0.1)], -1)  # batch 512: x 2
  np.testing.assert_allclose(np.stack(seen), np.repeat(want, 2, axis=0), rtol=1e-6)


def test_sgd_update_is_pytorch_sgd_momentum_on_the_mean_cross_entropy():
  rng = np.random.default_rng(0)
  n, d, c, lrs = 6, 5, 3, np.array([0.1, 0.5])
  state = linear_dino.init_classifiers(jax.random.key(0), 2, d, c)
  w0 = np.asarray(state["w"][0], np.float64)
  assert abs(w0.std() - 0.01) < 0.005 and not np.any(np.asarray(state["b"]))  # N(0, 0.01), bias 0
  np.testing.assert_array_equal(state["w"][0], state["w"][1])  # one init for every lr
  batches = [(rng.normal(size=(n, d)), rng.integers(0, c, n), np.array([1, 1, 1, 1, 0, 0.0])) for _ in range(3)]
  update = jax.jit(linear_dino.sgd_update)
  for x, y, wt in batches:
    state, _ = update(
      state,
      jnp.asarray(x, jnp.float32),
      jnp.asarray(y, jnp.int32),
      jnp.asarray(wt, jnp.float32),
      jnp.asarray(lrs, jnp.float32),
    )
  for i, lr in enumerate(lrs):  # NumPy: nn.CrossEntropyLoss on the real examples, SGD(momentum=0.9), no decay
    w, b = w0.copy(), np.zeros(c)
    bw, bb = np.zeros_like(w), np.zeros_like(b)
    for x, y, wt in batches:
      keep = wt > 0
      xr, yr = x[keep], y[keep]
      logits = xr @ w + b
      p = np.exp(logits - logits.max(1, keepdims=True))
      p /= p.sum(1, keepdims=True)
      p[np.arange(len(yr)), yr] -= 1
      gw, gb = xr.T @ p / len(yr), p.mean(0)
      bw, bb = 0.9 * bw + gw, 0.9 * bb + gb
      w, b = w - lr * bw, b - lr * bb
    np.testing.assert_allclose(np.asarray(state["w"][i]), w, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state["b"][i]), b, atol=1e-6)


def test_train_step_normalises_uint8_views_on_the_device_as_the_host_would():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 2, 2, 3), np.uint8)
  labels, weights, lrs = jnp.array([0, 1, 2, 0]), jnp.ones(4), jnp.array([0.1, 1.0])
  step = jax.jit(linear_dino.make_train_step(lambda p, x: {"linear": x.reshape(len(x), -1)}, "linear"))
  state = linear_dino.init_classifiers(jax.random.key(0), 2, 12, 3)
  (on_device, _), (on_host, _) = [
    step(dict(state), None, x, labels, weights, lrs)
    for x in (jnp.asarray(images), jnp.asarray(augment.normalize(images)))
  ]
  for k in on_host:
    np.testing.assert_allclose(np.asarray(on_device[k]), np.asarray(on_host[k]), atol=1e-6)


# -- validation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "field,value,message",
  [
    ("evals.linear.protocol", "dinov3", "config.evals.linear.protocol: must be 'frozen' (cached features), 'dino'"),
    (
      "evals.linear.crop_size",
      18,
      "config.evals.linear.crop_size: must be 0 (the eval image size) or a positive multiple of the patch size 4",
    ),
    (
      "evals.linear.resize_size",
      12,
      "config.evals.linear.resize_size: must be 0 (crop x 256 / 224) or >= the crop size 16",
    ),
  ],
)
def test_invalid_linear_protocol_fields_are_refused_naming_the_field(tiny_config, field, value, message):
  tiny_config.update_from_flattened_dict({field: value})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(tiny_config, num_devices=1)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_dino_protocol_batch_must_split_over_the_devices(tiny_config):
  tiny_config.evals.linear.protocol = "dino"
  tiny_config.evals.linear.batch_size = 30
  tiny_config.batch_size = 8
  with pytest.raises(config_lib.ConfigError, match=r"^config.evals.linear.batch_size: 30 is not divisible by the 4"):
    config_lib.validate(tiny_config, num_devices=4)
  tiny_config.evals.linear.protocol = "frozen"  # the frozen probe runs on one device's copy: any batch
  config_lib.validate(tiny_config, num_devices=4)
