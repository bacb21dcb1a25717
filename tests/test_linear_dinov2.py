"""DINOv2's linear evaluation (evals.linear.protocol="dinov2" / "simdinov2", simdino_jax/evals/linear_dinov2.py).

Checked against transcriptions of facebookresearch/dinov2's eval/linear.py (commit b8931f7, lines quoted) and
SimDINO's fork simdinov2/eval/linear.py: the grid and its order, the classifier names, create_linear_input's
feature layout, the per-iteration CosineAnnealingLR, the validation iterations and the final selection; the
infinite shuffled stream; the protocol end to end through ``simdino_jax.evaluate``; the defaults against the
official argparse defaults (when the clones are there); and the official classifier code itself run on the same
features (``benchmarks/_eval_parity_dinov2_linear.py``, when torch and the clones are there).
"""

import ast
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from simdino_jax import config as config_lib
from simdino_jax import evaluate
from simdino_jax.evals import linear_dino, linear_dinov2, linear_eval, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the grid ----------------------------------------------------------------------------------------------------
def test_grid_order_and_names_are_setup_linear_classifiers():
  # for n in n_last_blocks_list: for avgpool in [False, True]: for _lr in learning_rates:
  #   lr = scale_lr(_lr, batch_size)   # learning_rates * (batch_size * get_global_size()) / 256.0
  #   f"classifier_{n}_blocks_avgpool_{avgpool}_lr_{lr:.5f}".replace(".", "_")
  blocks, pools, lrs = linear_dinov2.GRIDS["dinov2"]
  grid = linear_dinov2.settings(blocks, pools)
  assert grid == [(1, False), (1, True), (4, False), (4, True)]
  scaled = linear_dino.scaled_lrs(lrs, 128 * 8)
  names = [linear_dinov2.classifier_name(n, a, lr) for n, a in grid for lr in scaled]
  assert len(names) == 52 and len(set(names)) == 52
  assert names[0] == "classifier_1_blocks_avgpool_False_lr_0_00004"  # 1e-5 x 1024 / 256
  assert names[-1] == "classifier_4_blocks_avgpool_True_lr_0_40000"
  blocks, pools, lrs = linear_dinov2.GRIDS["simdinov2"]  # the fork: [1,2] x [True] x 8 lrs
  assert linear_dinov2.settings(blocks, pools) == [(1, True), (2, True)] and len(lrs) == 8


def test_feature_slices_are_create_linear_input_of_the_intermediate_layers():
  from simdino_jax.models.vit import VisionTransformer

  vit = VisionTransformer(
    img_size=16, patch_size=4, embed_dim=16, depth=4, num_heads=2, num_registers=2, rngs=nnx.Rngs(0)
  )
  graphdef, params = nnx.split(vit)
  images = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  layers = jax.jit(lambda p, x: nnx.merge(graphdef, p).get_intermediate_layers(x, 4))(params, images)  # jit: faster
  # get_intermediate_layers(norm=True, return_class_token=True) -> ((patch, cls), ...), registers dropped; then
  #   output = torch.cat([class_token for _, class_token in intermediate_output[-n:]], dim=-1)
  #   if use_avgpool: output = torch.cat((output, torch.mean(intermediate_output[-1][0], dim=1)), dim=-1)
  official = [(np.asarray(l["patch"]), np.asarray(l["cls"])) for l in layers]
  assert official[-1][0].shape == (3, 16, 16)  # 16 patches, the 2 registers excluded

  def create_linear_input(x_tokens_list, n, avgpool):
    out = np.concatenate([c for _, c in x_tokens_list[-n:]], -1)
    return np.concatenate([out, x_tokens_list[-1][0].mean(1)], -1) if avgpool else out

  for protocol in ("dinov2", "simdinov2"):
    grid = linear_dinov2.settings(*linear_dinov2.GRIDS[protocol][:2])
    spec = linear_dinov2.feature_spec(grid)
    x = np.asarray(jax.jit(runner.make_feature_fn(graphdef, (spec,)))(params, images)[runner.spec_key(spec)])
    for (n, a), (lo, hi) in zip(grid, linear_dinov2.feature_slices(grid, 16)):
      np.testing.assert_allclose(x[:, lo:hi], create_linear_input(official, n, a), atol=1e-5)


# -- schedule, validations, selection ------------------------------------------------------------------------------
def test_lr_is_cosine_annealing_per_iteration_and_validation_follows_eval_linear():
  from test_linear_dino import _torch_cosine_annealing  # torch's chainable CosineAnnealingLR, transcribed

  max_iter = 12
  seen = []

  def step_fn(state, images, labels, lrs):
    seen.append(np.asarray(lrs))
    return state, jnp.zeros((2, 2))

  result = linear_dinov2.run(
    **{**_RUN, "step_fn": step_fn, "batches": iter([(None, None)] * max_iter), "eval_period": 5}
  )
  # CosineAnnealingLR(optimizer, max_iter, eta_min=0), scheduler.step() after every optimizer.step(); lr x 512/256.
  want = np.stack([_torch_cosine_annealing(lr * 2, max_iter, max_iter) for lr in (0.01, 0.1)], -1)
  np.testing.assert_allclose(np.stack(seen), want, rtol=1e-6)
  # if eval_period > 0 and (iteration + 1) % eval_period == 0 and iteration != max_iter - 1: evaluate; then at the end
  official = [it + 1 for it in range(max_iter) if (it + 1) % 5 == 0 and it != max_iter - 1] + [max_iter]
  assert result["eval_iterations"] == official == [5, 10, 12]
  assert linear_dinov2.eval_iterations(10, 5) == [5, 10]  # the last iteration is validated once
  assert len(result["settings"]) == 4 and all(len(s["top1_per_eval"]) == 3 for s in result["settings"])
  with pytest.raises(ValueError, match="ended after 3 of 12 iterations"):
    linear_dinov2.run(**{**_RUN, "batches": iter([(None, None)] * 3), "step_fn": step_fn})


_RUN = dict(
  test_x=np.zeros((4, 3 * 4), np.float32),  # spec ("linear", 2, True) of width 4: [cls_-2, cls_-1, avg]
  test_y=np.zeros(4, np.int32),
  num_classes=3,
  grid=[(1, True), (2, True)],
  lrs=(0.01, 0.1),
  batch_size=512,
  epochs=3,
  epoch_length=4,
  eval_period=0,
  seed=0,
  num_train=100,
  log=lambda _: None,
)


def test_the_first_best_classifier_of_the_final_validation_is_reported():
  # evaluate_linear_classifiers: for classifier_string, metric in results (grid order):
  #   if metric["top-1"].item() > max_accuracy: max_accuracy, best_classifier = ..., classifier_string   (strict >)
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 64).astype(np.int32)
  x = (np.eye(3)[y] * 3 + rng.normal(size=(64, 3))).astype(np.float32)
  feats = np.concatenate([rng.normal(size=(64, 3)).astype(np.float32), x, x], 1)  # [cls_-2, cls_-1, avg]
  grid, lrs = [(1, False), (2, False), (1, True)], (1e-4, 10.0, 20.0)
  slices = linear_dinov2.feature_slices(grid, 3)
  assert slices == [(3, 6), (0, 6), (3, 9)]
  step = jax.jit(lambda s, xb, yb, lr: linear_dinov2.sgd_step(s, xb, yb, lr, slices))
  batches = [
    (jnp.asarray(feats[i % 4 * 16 : i % 4 * 16 + 16]), jnp.asarray(y[i % 4 * 16 : i % 4 * 16 + 16])) for i in range(8)
  ]
  r = linear_dinov2.run(
    **{**_RUN, "test_x": feats, "test_y": y, "grid": grid, "lrs": lrs, "batch_size": 16, "epochs": 2, "eval_period": 4},
    step_fn=step,
    batches=iter(batches),
  )
  final = np.array([s["top1"] for s in r["settings"]])
  first_best = int(np.flatnonzero(final == final.max())[0])
  assert r["accuracy"] == final.max() > 90.0 and r["best_classifier"] == r["settings"][first_best]["name"]
  assert (r["best_n_last_blocks"], r["best_avgpool"], r["lr"]) == tuple(
    r["settings"][first_best][k] for k in ("n_last_blocks", "avgpool", "lr")
  )
  assert [s["lr"] for s in r["settings"][:3]] == list(lrs) and r["settings"][0]["top1"] < 90.0  # lr 1e-4: no time
  assert r["iterations"] == 8 and r["eval_iterations"] == [4, 8] and r["scaled_lr"] == r["lr"] * 16 / 256


def test_classifiers_start_independently_from_normal_0_01():
  state = linear_dinov2.init_state(jax.random.key(0), [8, 16], 3, 5)
  w = [np.asarray(s["w"]) for s in state]
  assert w[0].shape == (3, 8, 5) and w[1].shape == (3, 16, 5)
  assert not np.allclose(w[0][0], w[0][1])  # each LinearClassifier draws its own weight.data.normal_(0, 0.01)
  assert abs(np.concatenate([a.ravel() for a in w]).std() - 0.01) < 0.002
  assert not any(np.any(np.asarray(s[k])) for s in state for k in ("b", "mw", "mb"))


# -- the stream ----------------------------------------------------------------------------------------------------
def test_stream_is_endless_fresh_permutations_in_full_batches():
  rng = np.random.default_rng(1)
  source = [{"image": rng.integers(0, 256, (12, 14, 3), np.uint8), "label": i} for i in range(10)]
  kw = dict(seed=3, batch_size=4, crop=8, num_iterations=6)
  batches = list(linear_dinov2.stream_batches(source, **kw))
  labels = np.concatenate([b["label"] for b in batches])  # label i = example i
  assert len(batches) == 6 and all(b["image"].shape == (4, 8, 8, 3) for b in batches)  # drop_last: always full
  np.testing.assert_array_equal(labels[:10], linear_dino.epoch_order(3, 0, 10))  # pass 0, then pass 1 ...
  np.testing.assert_array_equal(labels[10:20], linear_dino.epoch_order(3, 1, 10))  # ... across the batch boundary
  assert not np.array_equal(labels[:10], labels[10:20])
  # Each view: RandomResizedCrop (bicubic) + flip drawn by (seed, pass, example).
  first = linear_dino.train_view(source[labels[0]]["image"], linear_dino.example_rng(3, 0, labels[0]), 8, "pil", True)
  np.testing.assert_array_equal(batches[0]["image"][0], first)
  # Two processes hold the two halves of every global batch.
  halves = [list(linear_dinov2.stream_batches(source, **kw, shard_index=k, shard_count=2)) for k in (0, 1)]
  for whole, a, b in zip(batches, *halves):
    np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]), whole["image"])


# -- config --------------------------------------------------------------------------------------------------------
def test_protocol_defaults_are_the_official_argparse_defaults():
  clones = os.environ.get("SIMDINO_OFFICIAL_DIR")
  if not clones:
    pytest.skip("needs SIMDINO_OFFICIAL_DIR (clones dinov2/ and SimDINO/ of the official repositories)")
  files = {
    "dinov2": os.path.join(clones, "dinov2", "dinov2", "eval", "linear.py"),
    "simdinov2": os.path.join(clones, "SimDINO", "simdinov2", "eval", "linear.py"),
  }
  for protocol, path in files.items():
    if not os.path.isfile(path):
      pytest.skip(f"{path} is absent")
    tree = ast.parse(open(path).read())
    defaults = {}
    for node in ast.walk(tree):  # parser.set_defaults(epochs=10, batch_size=128, ..., learning_rates=[...])
      if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "set_defaults":
        for kw in node.keywords:
          try:
            defaults[kw.arg] = ast.literal_eval(kw.value)
          except ValueError:
            pass
    blocks = [
      n for n in ast.walk(tree) if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "n_last_blocks_list"
    ]
    avgpool_loop = [n for n in ast.walk(tree) if isinstance(n, ast.For) and ast.unparse(n.target) == "avgpool"]
    r = linear_eval.PROTOCOL_DEFAULTS[protocol]
    assert r["lrs"] == tuple(defaults["learning_rates"]), protocol
    assert r["epochs"] == defaults["epochs"] and linear_dinov2.EPOCH_LENGTH == defaults["epoch_length"]
    assert r["batch_size"] == defaults["batch_size"] * 8  # per GPU x run/submit.py's default 8 GPUs, 1 node
    assert defaults["eval_period_iterations"] == defaults["epoch_length"]  # eval_period 0: every epoch_length
    assert r["n_last_blocks_grid"] == tuple(ast.literal_eval(blocks[0].value)), protocol
    assert r["avgpool_grid"] == tuple(ast.literal_eval(avgpool_loop[0].iter)), protocol


def test_fields_left_at_zero_take_the_protocols_values(tiny_config):
  lin = tiny_config.evals.linear
  for protocol in linear_eval.PROTOCOLS:
    lin.protocol = protocol
    r = linear_eval.resolve(lin)
    assert {k: r[k] for k in linear_eval.PROTOCOL_DEFAULTS[protocol]} == linear_eval.PROTOCOL_DEFAULTS[protocol]
  assert linear_eval.PROTOCOL_DEFAULTS["dino"] == dict(n_last_blocks=4, epochs=100, batch_size=1024, lrs=(1e-3,))
  lin.protocol, lin.epochs, lin.lrs, lin.n_last_blocks_grid = "dinov2", 2, (0.5,), (1,)
  r = linear_eval.resolve(lin)
  assert (r["epochs"], r["lrs"], r["n_last_blocks_grid"], r["avgpool_grid"]) == (2, (0.5,), (1,), (False, True))


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("evals.linear.n_last_blocks_grid", (1, 3), "config.evals.linear.n_last_blocks_grid: must be () (the protocol's)"),
    ("evals.linear.avgpool_grid", (1,), "config.evals.linear.avgpool_grid: must be () (the protocol's) or a tuple"),
    ("evals.linear.epoch_length", -1, "config.evals.linear.epoch_length: must be >= 1 iterations"),
    # DINOv2's own grid needs 4 blocks; the tiny backbone has 2.
    ("evals.linear.n_last_blocks_grid", (), "config.evals.linear.n_last_blocks_grid: (1, 4) (the protocol's when ())"),
    ("evals.linear.protocol", "dinov3", "config.evals.linear.protocol: must be 'frozen' (cached features), 'dino'"),
  ],
)
def test_invalid_dinov2_fields_are_refused_naming_the_field(tiny_config, field, value, message):
  tiny_config.evals.linear.protocol = "dinov2"
  tiny_config.update_from_flattened_dict({field: value})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(tiny_config, num_devices=1)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


# -- end to end ----------------------------------------------------------------------------------------------------
def test_dinov2_protocol_through_evaluate_learns_the_shapes_and_writes_linear_json(tmp_path):
  from conftest import checkpoint_at_init, make_tiny_config
  from test_linear_dino import _write_shapes

  _write_shapes(str(tmp_path / "data"), n_train=16, n_test=8)
  c = make_tiny_config()
  c.data.source = f"folder:{tmp_path / 'data'}"
  c.evals.linear.protocol = "simdinov2"
  c.evals.linear.n_last_blocks_grid = (1, 2)
  c.evals.linear.avgpool_grid = (False, True)
  c.evals.linear.lrs = (0.1, 1.0)
  c.evals.linear.epochs, c.evals.linear.epoch_length, c.evals.linear.batch_size = 2, 6, 16
  checkpoint_at_init(c, str(tmp_path / "run"))
  lin = evaluate.evaluate(c, str(tmp_path / "run"), ["linear"])["linear"]
  assert json.load(open(tmp_path / "run" / "eval" / "linear.json")) == json.loads(json.dumps(lin))
  assert lin["protocol"] == "simdinov2" and lin["iterations"] == 12 and lin["eval_iterations"] == [6, 12]
  assert lin["feature_dim"] == 3 * 32 and lin["num_train"] == 48 and lin["num_test"] == 24
  assert [(s["n_last_blocks"], s["avgpool"], s["lr"]) for s in lin["settings"]] == [
    (n, a, lr) for n in (1, 2) for a in (False, True) for lr in (0.1, 1.0)
  ]
  assert lin["accuracy"] == max(s["top1"] for s in lin["settings"])
  assert lin["scaled_lr"] == pytest.approx(lin["lr"] * 16 / 256)
  # Colour is linearly readable even from a random backbone: well above chance (33.3%) on 24 test images.
  assert lin["accuracy"] >= 70.0, lin


# -- parity with the official code ---------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol,clone", [("dinov2", "dinov2"), ("simdinov2", "SimDINO")])
def test_parity_with_the_official_linear_classifiers(protocol, clone):
  python, clones = os.environ.get("SIMDINO_TORCH_PYTHON"), os.environ.get("SIMDINO_OFFICIAL_DIR")
  if not python or not clones:
    pytest.skip(
      "needs SIMDINO_TORCH_PYTHON (a Python with torch and simdino_jax) and SIMDINO_OFFICIAL_DIR (clones dinov2/ of "
      "facebookresearch/dinov2 and SimDINO/ of RobinWu218/SimDINO)"
    )
  if not os.path.isdir(os.path.join(clones, clone)):
    pytest.skip(f"SIMDINO_OFFICIAL_DIR={clones} has no {clone}/ clone")
  script = os.path.join(ROOT, "benchmarks", "_eval_parity_dinov2_linear.py")
  out = subprocess.run(
    [python, script, "--official_dir", clones, "--protocol", protocol],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  # Same logits, losses, lrs and final weights to float32 rounding; the same top-1 per classifier and the same pick.
  assert r["ok"] and r["official"]["names_match"], json.dumps(r)[:4000]
  assert r["max_abs_diff"] < 1e-5 and r["diffs"]["lr_rel"] < 1e-6 and r["diffs"]["top1"] == 0.0
  assert r["ours"]["best_classifier"] == r["official"]["best_classifier"]
