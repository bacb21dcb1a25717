"""BatchNorm statistics through the training step (train/step.py "BatchNorm statistics") and ResNet backbones in
training: a ViT step is the params-only step bit for bit; a ResNet step updates the student's running statistics
from its crops and the teacher's from its own forward (checked against a NumPy transcription of torch's BatchNorm2d
on the stem conv), the EMA and the optimizer see the parameters only, a non-finite step rolls the statistics back,
a checkpoint round trip resumes exactly, the 2-device sharded step equals the 1-device one (SyncBN), and the config
refuses what a ResNet cannot do in one line.

Networks are tiny (ResNet width 4, one BasicBlock per stage, 16 px / 8 px crops) so that each compile is cheap.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pod
import pytest
from conftest import make_tiny_config
from flax import nnx

from simdino_jax import config as config_lib
from simdino_jax import methods, optim, schedules
from simdino_jax.errors import ConfigError
from simdino_jax.models.network import Network, ResNetBackbone, build_backbone, eval_backbone_graphdef
from simdino_jax.train.state import TrainState
from simdino_jax.train.step import make_train_step, split_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOMENTUM = 0.9


def resnet_config(method="simdino"):
  c = make_tiny_config()
  c.method = method
  c.batch_size = 4
  c.model.arch = "resnet18_cifar"
  c.model.resnet_width = 4
  c.head.hidden_dim, c.head.out_dim, c.head.num_layers = 16, 8, 2
  return c


def tiny_resnet_network(config):
  """The config's method head on a ResNet of one BasicBlock per stage (width 4, CIFAR stem): a cheap compile."""
  rngs = nnx.Rngs(params=0)
  backbone = ResNetBackbone(block="basic", layers=(1, 1, 1, 1), width=4, cifar_stem=True, rngs=rngs)
  return Network(backbone, methods.get_method(config.method).build_head(config, backbone.embed_dim, rngs))


def build_state(config, network):
  """(state, jitted step, graphdef, tx) as train/setup.py assembles them: the optimizer on the parameters only."""
  method = methods.get_method(config.method)
  graphdef, variables = nnx.split(network)
  params = split_params(variables)[0]
  lr, wd = schedules.constant(1e-2), schedules.constant(0.04)
  tx = optim.make_optimizer(config.optim, params, lr, wd)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    student=variables,
    teacher=jax.tree_util.tree_map(jnp.copy, variables),
    opt_state=tx.init(params),
    loss_state=method.init_loss_state(config),
    rng=jax.random.key_data(jax.random.key(1)),
  )
  step = make_train_step(
    graphdef,
    method.make_loss(config, 100),
    tx,
    lr_fn=lr,
    wd_fn=wd,
    momentum_fn=schedules.constant(MOMENTUM),
    view_calls=None if method.view_calls is None else method.view_calls(config),
  )
  return state, jax.jit(step), graphdef, tx


def batch_of(config, seed=0):
  rng = np.random.default_rng(seed)
  d = config.data
  return {
    "global": rng.normal(size=(config.batch_size, d.num_global, d.global_size, d.global_size, 3)).astype(np.float32),
    "local": rng.normal(size=(config.batch_size, d.num_local, d.local_size, d.local_size, 3)).astype(np.float32),
  }


def np_stem_stats(x, kernel):
  """Channel mean and UNBIASED variance of a 3x3 stride-1 pad-1 conv (torch Conv2d, HWIO kernel) of NHWC ``x``:
  what torch's BatchNorm2d folds into its running statistics in training mode."""
  x = np.asarray(x, np.float64)
  k = np.asarray(kernel, np.float64)
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = sum(np.einsum("bhwc,co->bhwo", xp[:, u : u + h, v : v + w], k[u, v]) for u in range(3) for v in range(3))
  flat = out.reshape(-1, out.shape[-1])
  return flat.mean(0), flat.var(0, ddof=1)


def leaves(tree):
  return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def test_vit_train_state_is_the_params_only_state(tiny_config):
  # A ViT has no statistics: its TrainState (and so its checkpoint layout) is what it was before BN existed, the
  # network's nnx.Param state, and the optimizer state is the one built on that whole state. (Its numbers: 20 steps
  # of configs/demo.py before / after this change were bitwise equal, every state leaf and loss; see the commit.)
  from simdino_jax.train import setup as setup_lib

  for method in ("simdino", "dino", "dinov2"):
    tiny_config.method = method
    setup = setup_lib.build(tiny_config, 100)
    abstract = nnx.eval_shape(lambda: methods.build_network(tiny_config))
    variables = nnx.split(abstract)[1]
    assert leaves(split_params(variables)[1]) == []
    state = setup.abstract_state
    assert jax.tree_util.tree_structure(state.student) == jax.tree_util.tree_structure(variables)
    assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(
      jax.eval_shape(setup.tx.init, variables)
    )


def test_resnet_step_updates_student_stats_from_its_crops_and_teacher_stats_from_its_own(tmp_path):
  # simdino here; dino (a loss state) in the 2-device test, which checks the same counts.
  config = resnet_config("simdino")
  state, step, _, _ = build_state(config, tiny_resnet_network(config))
  batch = batch_of(config)
  new, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))

  # torch BatchNorm2d, momentum 0.1: the student's stem BN saw the global crops, then the local crops (one backbone
  # call per resolution, as DINO's MultiCropWrapper); the teacher's only the global crops, in its own forward.
  kernel = np.asarray(state.student["backbone"]["conv1"]["kernel"][...])  # both networks start from it
  g = batch["global"].reshape((-1,) + batch["global"].shape[2:])
  loc = batch["local"].reshape((-1,) + batch["local"].shape[2:])
  (mg, vg), (ml, vl) = np_stem_stats(g, kernel), np_stem_stats(loc, kernel)
  s_bn, t_bn = new.student["backbone"]["bn1"], new.teacher["backbone"]["bn1"]
  np.testing.assert_allclose(s_bn["mean"][...], 0.9 * (0.1 * mg) + 0.1 * ml, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(s_bn["var"][...], 0.9 * (0.9 + 0.1 * vg) + 0.1 * vl, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(t_bn["mean"][...], 0.1 * mg, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(t_bn["var"][...], 0.9 + 0.1 * vg, rtol=1e-4, atol=1e-6)
  # Every BN layer: two updates in the student, one in the teacher (none is an EMA of the student's).
  for name, n in (("student", 2), ("teacher", 1)):
    stats = split_params(getattr(new, name))[1]
    counts = [int(a) for p, a in jax.tree_util.tree_leaves_with_path(stats) if "num_batches_tracked" in str(p)]
    assert counts and set(counts) == {n}, (name, counts)

  # The optimizer and the EMA see the parameters only: teacher params = m * old + (1 - m) * new student params.
  params_new, params_old = split_params(new.student)[0], split_params(state.teacher)[0]
  assert len(jax.tree_util.tree_leaves(new.opt_state)) == len(jax.tree_util.tree_leaves(optim_leaves_like(new)))
  for t, old, s in zip(leaves(split_params(new.teacher)[0]), leaves(params_old), leaves(params_new)):
    np.testing.assert_allclose(t, MOMENTUM * old + (1 - MOMENTUM) * s, rtol=1e-5, atol=1e-7)

  # A non-finite loss rolls the statistics back with everything else.
  bad = dict(batch, **{"global": np.full_like(batch["global"], np.nan)})
  same, metrics = step(new, bad)
  assert not np.isfinite(float(metrics["loss"]))
  for a, b in zip(leaves(same), leaves(new)):
    np.testing.assert_array_equal(a, b)

  # A checkpoint round trip carries the statistics, and the resumed step is the uninterrupted one.
  from simdino_jax import sharding
  from simdino_jax.io import checkpointing

  with checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=False) as ckpt:
    ckpt.save(1, new)
    ckpt.wait()
    target = checkpointing.abstract_target(
      jax.eval_shape(lambda: new), sharding.replicated(sharding.make_mesh(config.mesh))
    )
    restored, restored_step = ckpt.restore_latest(target)
  assert restored_step == 1 and int(restored.student["backbone"]["bn1"]["num_batches_tracked"][...]) == 2
  for a, b in zip(leaves(restored), leaves(new)):
    np.testing.assert_array_equal(a, b)
  (a, ma), (b, mb) = step(new, batch_of(config, 1)), step(restored, batch_of(config, 1))
  assert float(ma["loss"]) == float(mb["loss"])
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_array_equal(x, y)


def two_view_config(method):
  c = resnet_config(method)
  c.data.num_local = 0
  c.moco.queue_size = 8
  return c


@pytest.mark.parametrize("method", ["moco_v2", "byol"])
def test_moco_and_byol_run_each_view_in_a_batchnorm_call_of_its_own_as_their_official_encoders(method):
  # moco/builder.py: q = encoder_q(im_q), k = encoder_k(im_k): the student's BN batch is view 1 alone, the teacher's
  # view 2 alone, each encoder's running statistics updated once, from its own view. byol_experiment.py:
  # apply_once_fn(view1) then apply_once_fn(view2) in both networks: two updates, view 1's first. (One BN call over
  # both views, as the DINO family's per-resolution call, gives one update from both views: fails every check below.)
  config = two_view_config(method)
  network = tiny_resnet_network(config)
  state, step, graphdef, _ = build_state(config, network)
  batch = batch_of(config)
  new, metrics = step(state, batch)

  kernel = np.asarray(state.student["backbone"]["conv1"]["kernel"][...])
  (m1, v1), (m2, v2) = (np_stem_stats(batch["global"][:, v], kernel) for v in (0, 1))
  one = lambda m, v: (0.1 * m, 0.9 + 0.1 * v)  # noqa: E731  torch BatchNorm2d, momentum 0.1, from (0, 1)
  two = lambda m, v, m2, v2: (0.9 * 0.1 * m + 0.1 * m2, 0.9 * (0.9 + 0.1 * v) + 0.1 * v2)  # noqa: E731
  if method == "moco_v2":
    want = {"student": one(m1, v1), "teacher": one(m2, v2)}
  else:
    want = {name: two(m1, v1, m2, v2) for name in ("student", "teacher")}
  for name, (mean, var) in want.items():
    bn = getattr(new, name)["backbone"]["bn1"]
    np.testing.assert_allclose(bn["mean"][...], mean, rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(bn["var"][...], var, rtol=1e-4, atol=1e-6, err_msg=name)
    counts = {
      int(a)
      for p, a in jax.tree_util.tree_leaves_with_path(split_params(getattr(new, name))[1])
      if "num_batches_tracked" in str(p)
    }
    assert counts == {1 if method == "moco_v2" else 2}, (name, counts)

  if method == "moco_v2":  # the loss is InfoNCE of the query normalised over view 1's batch vs view 2's key
    from simdino_jax.losses import moco as ml

    def encode(variables, x):
      net = nnx.merge(graphdef, variables, copy=True)
      return net.head(net.backbone(jnp.asarray(x))["cls"])

    q, k = encode(state.student, batch["global"][:, 0]), encode(state.teacher, batch["global"][:, 1])
    want_loss, _ = ml.info_nce_loss(q, k, state.loss_state["queue"], temperature=config.moco.temperature)
    np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-5)


def optim_leaves_like(state):
  """What an optimizer built on the parameters holds: the optax state of ``tx.init(params)`` has this many leaves."""
  return optim.make_optimizer(
    resnet_config().optim, split_params(state.student)[0], schedules.constant(1.0), schedules.constant(0.0)
  ).init(split_params(state.student)[0])


def test_evaluators_run_the_backbone_on_its_running_statistics():
  # DINO's evaluation scripts call model.eval(): the evaluators' graph (setup.eval_graphdef, built by
  # eval_backbone_graphdef) normalises with the running statistics, the training graph with the batch's.
  config = resnet_config()
  backbone = build_backbone(config.model, rngs=nnx.Rngs(params=0))
  train_graphdef, variables = nnx.split(backbone)
  params, stats = split_params(variables)
  rng = np.random.default_rng(3)
  stats = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), stats)
  variables = nnx.merge_state(params, stats)
  x = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
  evaluated = nnx.merge(eval_backbone_graphdef(config.model, "float32"), variables).get_intermediate_layers(x, 4)
  assert len(evaluated) == 1 and set(evaluated[0]) == {"cls"}  # the pooled feature, no patch tokens
  running = nnx.merge(train_graphdef, variables)(x, use_running_average=True)["cls"]
  training = nnx.merge(train_graphdef, variables)(x)["cls"]
  assert evaluated[0]["cls"].shape == (4, 32)  # resnet18_cifar at width 4: 8 x 4 channels
  np.testing.assert_array_equal(evaluated[0]["cls"], running)
  assert np.abs(np.asarray(running) - np.asarray(training)).max() > 1e-3


SHARDED = r"""
import json, sys
sys.path.insert(0, "tests")
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import test_resnet_training as t
assert jax.device_count() == 2
config = t.resnet_config("dino")
results = {}
for n in (1, 2):
  state, step, _, _ = t.build_state(config, t.tiny_resnet_network(config))
  mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  state = jax.device_put(state, rep)
  batch = jax.device_put(t.batch_of(config), data)
  new, m = jax.jit(step, in_shardings=(rep, data), out_shardings=(rep, rep))(state, batch)
  stats = [t.split_params(new.student)[1], t.split_params(new.teacher)[1]]
  counts = [int(np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(stats) if "num_batches_tracked" in str(p)]
  results[n] = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "counts": counts,
                "stats": [np.asarray(a, np.float64).ravel().tolist() for a in t.leaves(stats)],
                "params": [np.asarray(a, np.float64).ravel().tolist() for a in t.leaves(t.split_params(new.student)[0])]}
print("REPORT " + json.dumps(results))
"""


def test_two_device_sharded_step_equals_the_one_device_step():
  # Global-batch statistics under a sharded batch (an all-reduce: SyncBN), so the 2-device step is the 1-device one.
  env = pod.env(2)
  out = subprocess.run(
    [sys.executable, "-c", SHARDED], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads([line for line in out.stdout.splitlines() if line.startswith("REPORT ")][-1][len("REPORT ") :])
  one, two = r["1"], r["2"]
  np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
  np.testing.assert_allclose(two["grad_norm"], one["grad_norm"], rtol=1e-4)
  # dino's step updated the student's statistics twice (global, local crops), the teacher's once, on each mesh.
  half = len(one["counts"]) // 2
  assert one["counts"] == two["counts"] == [2] * half + [1] * half
  assert len(one["stats"]) == len(two["stats"]) > 0
  for a, b in zip(two["stats"], one["stats"]):  # both networks' running statistics: the global batch's
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Parameters after one Adam step (lr 1e-2): Adam divides by |g|, so a weight whose gradient is ~0 moves by an
  # amount float32 summation order decides; 1% of the learning rate bounds it (per-device BN moves them by ~lr).
  for a, b in zip(two["params"], one["params"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  "change, field",
  [
    ({"model.arch": "resnet20"}, "config.model.arch"),
    ({"method": "simdinov2"}, "config.model.arch"),
    ({"method": "dinov2"}, "config.model.arch"),
    ({"evals.attention.final": True}, "config.evals.attention"),
    ({"evals.segmentation.every": 5}, "config.evals.segmentation"),
    ({"model.resnet_width": -1}, "config.model.resnet_width"),
  ],
)
def test_config_refuses_what_a_resnet_cannot_do_in_one_line(change, field):
  config = resnet_config()
  for key, value in change.items():
    *path, last = key.split(".")
    node = config
    for p in path:
      node = node[p]
    node[last] = value
  with pytest.raises(ConfigError) as e:
    config_lib.validate(config, num_devices=1)
  assert str(e.value).startswith(field + ":") and "\n" not in str(e.value), str(e.value)


def test_config_accepts_a_resnet_with_pooled_feature_evaluators():
  config = resnet_config()
  for name in ("knn", "linear", "fewshot", "retrieval"):
    config.evals[name].final = True
  config_lib.validate(config, num_devices=1)


def test_resnet_run_exports_torchvision_state_dict_that_init_from_and_load_backbone_read(tmp_path):
  # A ResNet run's --format=torch export is torchvision's state dict (weights + running statistics, no fc): it loads
  # strictly into our torchvision importer, config.init_from reads it as the run's own backbone names, and
  # load_backbone gives the workdir's features from it (evaluation mode).
  from conftest import checkpoint_at_init

  from simdino_jax import export
  from simdino_jax.backbone import load_backbone
  from simdino_jax.io import restore
  from simdino_jax.io.torchvision_resnet import load_resnet_state_dict
  from simdino_jax.tree import named_leaves

  config = resnet_config()
  workdir = str(tmp_path / "run")
  _, state = checkpoint_at_init(config, workdir)
  out = export.export(workdir, str(tmp_path / "rn.npz"), fmt="torch")
  assert "torchvision.models.resnet18()" in out["constructor"] and "maxpool = torch.nn.Identity()" in out["constructor"]
  from simdino_jax.io import formats

  sd = formats.load_arrays(out["output"])
  assert "bn1.running_mean" in sd and "layer1.0.conv1.weight" in sd and not any(k.startswith("fc.") for k in sd)
  imported = load_resnet_state_dict(sd, strict=True)
  teacher = {
    k[len("backbone/") :]: np.asarray(v) for k, v in named_leaves(state.teacher).items() if k.startswith("backbone/")
  }
  assert set(imported.params) == set(teacher)
  for k, v in teacher.items():
    np.testing.assert_array_equal(imported.params[k], v, err_msg=k)

  arrays, description = restore.load_init_arrays(out["output"])
  assert description.startswith("torchvision ResNet weights file")
  loaded, notes = restore.match_init_arrays(named_leaves(state.student), arrays)
  assert {n for n in loaded if n.startswith("backbone/")} == {
    n for n in named_leaves(state.student) if n.startswith("backbone/")
  }

  x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  from_workdir = load_backbone(workdir)(x)  # jitted, evaluation mode
  assert set(from_workdir) == {"cls"} and from_workdir["cls"].shape == (2, 32)
  want = imported.build()(x, use_running_average=True)  # the exported file's network, eagerly
  np.testing.assert_allclose(from_workdir["cls"], want, rtol=1e-5, atol=1e-6)


def test_evaluate_refuses_a_dense_evaluator_named_for_a_resnet():
  from simdino_jax import evaluate

  config = resnet_config()
  with pytest.raises(ConfigError, match=r"^config\.evals\.attention: the 'attention' evaluator reads"):
    evaluate._prepare(config, "knn,attention", num_devices=1)
  assert evaluate._prepare(config, "knn,retrieval", num_devices=1) == ["knn", "retrieval"]
