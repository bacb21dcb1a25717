"""The classic systems as methods (``moco_v2``, ``byol``) and DINO's Table 14 switches (``dino.loss="mse"``,
``head.predictor``), each against a float64 NumPy transcription of the official code fed the same network outputs:
facebookresearch/moco ``moco/builder.py`` (``forward``: logits and labels, ``_dequeue_and_enqueue``) with
``main_moco.py``'s ``nn.CrossEntropyLoss``; deepmind-research/byol ``byol_experiment.py`` (``loss_fn``'s
representation loss), ``utils/helpers.py`` and ``utils/networks.py`` (``MLP``); facebookresearch/dino
``main_dino.py`` (``DINOLoss.forward``)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_config
from flax import nnx

from simdino_jax import config as config_lib
from simdino_jax import methods, sharding
from simdino_jax.errors import ConfigError
from simdino_jax.methods import moco as moco_method
from simdino_jax.models.heads import MLP
from simdino_jax.train import setup as setup_lib
from simdino_jax.train.step import forward


def np_normalize(x, eps=1e-12):  # torch F.normalize(x, dim=1)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def np_log_softmax(x):
  z = x - x.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def f64(x):
  return np.asarray(x, np.float64)


def classic_config(method, **overrides):
  c = make_tiny_config()
  c.method = method
  c.data.num_local = 0
  c.model.drop_path_rate = 0.0  # the student's forward is then a function of its weights alone
  c.moco.queue_size = 32
  c.head.predictor_hidden_dim = 24
  c.update_from_flattened_dict(overrides)
  config_lib.validate(c, num_devices=1)
  return c


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  d = config.data
  return {
    "global": jnp.asarray(rng.standard_normal((config.batch_size, 2, d.global_size, d.global_size, 3)), jnp.float32),
    "local": jnp.zeros((config.batch_size, d.num_local, d.local_size, d.local_size, 3), jnp.float32),
  }


def outputs_fn(setup):
  """(student params, teacher params, batch) -> the step's forward outputs of both, computed apart from the step
  (drop path is off), one compiled program."""

  def run(student, teacher, batch):
    s = forward(nnx.merge(setup.graphdef, student), batch, key=None, student=True)
    return s, forward(nnx.merge(setup.graphdef, teacher), batch, key=None, student=False)

  return jax.jit(run)


def build(config):
  setup = setup_lib.build(config, num_train=64)
  mesh = sharding.make_mesh(config.mesh)
  state = setup_lib.init_state(setup, setup_lib.state_sharding(setup, mesh))
  return setup, state, setup_lib.make_step(setup, mesh, donate=False)


# ---- MoCo-v2 ----------------------------------------------------------------------------------------------------
def np_moco_forward(q, k, queue_ck, T):
  """builder.py forward from the encoders' outputs on: (logits, labels), then main_moco.py's CrossEntropyLoss."""
  q = np_normalize(q)  # q = nn.functional.normalize(q, dim=1)
  k = np_normalize(k)  # k = nn.functional.normalize(k, dim=1)
  l_pos = np.einsum("nc,nc->n", q, k)[:, None]  # l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
  l_neg = np.einsum("nc,ck->nk", q, queue_ck)  # l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
  logits = np.concatenate([l_pos, l_neg], axis=1) / T  # logits = torch.cat([l_pos, l_neg], dim=1); logits /= self.T
  labels = np.zeros(logits.shape[0], np.int64)  # labels = torch.zeros(logits.shape[0], dtype=torch.long)
  loss = -np.mean(np_log_softmax(logits)[np.arange(len(labels)), labels])  # criterion(output, target)
  return loss, k


def np_dequeue_and_enqueue(queue_ck, ptr, keys):
  queue_ck = queue_ck.copy()
  batch_size = keys.shape[0]  # keys = concat_all_gather(keys): the global batch
  assert queue_ck.shape[1] % batch_size == 0  # assert self.K % batch_size == 0
  queue_ck[:, ptr : ptr + batch_size] = keys.T  # self.queue[:, ptr : ptr + batch_size] = keys.T
  return queue_ck, (ptr + batch_size) % queue_ck.shape[1]  # ptr = (ptr + batch_size) % self.K


def test_moco_v2_steps_are_builder_forward_on_the_same_outputs_and_enqueue_the_teacher_keys():
  config = classic_config("moco_v2", **{"teacher.momentum": 0.9, "teacher.momentum_end": 0.9})
  setup, state, step = build(config)
  queue = f64(state.loss_state["queue"])
  np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-6)  # randn(dim, K) normalised over dim
  assert queue.shape == (32, config.head.out_dim) and int(state.loss_state["queue_ptr"]) == 0
  queue_ck, ptr = queue.T, 0
  outputs = outputs_fn(setup)
  for i in range(2):
    batch = random_batch(config, seed=i)
    s, t = outputs(state.student, state.teacher, batch)
    q, k = f64(s["cls"]), f64(t["cls"])
    ref_loss, keys = np_moco_forward(q[:, 0], k[:, 1], queue_ck, 0.2)  # query view 1, key view 2
    state, metrics = step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=1e-5)
    queue_ck, ptr = np_dequeue_and_enqueue(queue_ck, ptr, keys)
    assert int(state.loss_state["queue_ptr"]) == ptr == config.batch_size * (i + 1)
    np.testing.assert_allclose(f64(state.loss_state["queue"]), queue_ck.T, rtol=1e-5, atol=1e-6)
  # After one update the teacher (key encoder) differs from the student: the queue holds the teacher's keys.
  student_keys = np_normalize(f64(outputs(state.student, state.teacher, random_batch(config, seed=1))[0]["cls"])[:, 1])
  assert not np.allclose(student_keys, queue_ck.T[8:16], atol=1e-4)


def test_moco_v2_symmetric_averages_both_directions_and_enqueues_both_views():
  config = classic_config("moco_v2", **{"moco.symmetric": True})
  loss_fn = methods.get_method("moco_v2").make_loss(config, 1)
  state = moco_method.queue_state(config)
  rng = np.random.default_rng(0)
  q, k = rng.standard_normal((2, 8, 2, config.head.out_dim))
  value, metrics, new = jax.jit(loss_fn)(
    {"cls": jnp.asarray(q, jnp.float32)}, {"cls": jnp.asarray(k, jnp.float32)}, state, 0
  )
  queue_ck = f64(state["queue"]).T
  l12, k2 = np_moco_forward(q[:, 0], k[:, 1], queue_ck, 0.2)
  l21, k1 = np_moco_forward(q[:, 1], k[:, 0], queue_ck, 0.2)
  np.testing.assert_allclose(float(value), 0.5 * (l12 + l21), rtol=1e-5)
  ref_queue, ref_ptr = np_dequeue_and_enqueue(queue_ck, 0, np.concatenate([k2, k1]))
  np.testing.assert_allclose(f64(new["queue"]), ref_queue.T, rtol=1e-5, atol=1e-6)
  assert int(new["queue_ptr"]) == ref_ptr == 16


def test_moco_queue_is_a_function_of_the_seed():
  a, b = (moco_method.queue_state(classic_config("moco_v2", seed=s))["queue"] for s in (0, 0))
  c = moco_method.queue_state(classic_config("moco_v2", seed=1))["queue"]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


# ---- BYOL --------------------------------------------------------------------------------------------------------
def np_regression_loss(x, y):  # helpers.regression_loss with helpers.l2_normalize (epsilon 1e-12 on the square sum)
  nx = x / np.sqrt(np.maximum(np.sum(x * x, -1, keepdims=True), 1e-12))
  ny = y / np.sqrt(np.maximum(np.sum(y * y, -1, keepdims=True), 1e-12))
  return np.sum((nx - ny) ** 2, axis=-1)


def np_byol_repr_loss(online, target):
  """byol_experiment.py loss_fn: repr_loss = regression_loss(online prediction_view1, target projection_view2) +
  regression_loss(online prediction_view2, target projection_view1); jnp.mean(repr_loss)."""
  repr_loss = np_regression_loss(online["prediction_view1"], target["projection_view2"])
  repr_loss = repr_loss + np_regression_loss(online["prediction_view2"], target["projection_view1"])
  return np.mean(repr_loss)


def byol_views(out):
  p, z = f64(out["p"]), f64(out["z"])
  return {
    "projection_view1": z[:, 0],
    "projection_view2": z[:, 1],
    "prediction_view1": p[:, 0],
    "prediction_view2": p[:, 1],
  }


def test_byol_step_is_loss_fn_on_the_same_outputs_and_the_predictor_is_in_the_students_path_only():
  config = classic_config("byol")
  setup, state, step = build(config)
  batch = random_batch(config)
  s, t = outputs_fn(setup)(state.student, state.teacher, batch)
  new_state, metrics = step(state, batch)
  np.testing.assert_allclose(
    float(metrics["loss"]), np_byol_repr_loss(byol_views(s["cls"]), byol_views(t["cls"])), rtol=1e-5
  )
  assert int(new_state.step) == 1
  # The teacher's prediction is computed (one head for both) but never read: the loss is the same without it.
  loss_fn = setup.loss_fn
  no_prediction = {"cls": {"z": t["cls"]["z"], "p": jnp.full_like(t["cls"]["p"], jnp.nan)}}
  assert float(loss_fn(s, no_prediction, {}, 0)[0]) == float(loss_fn(s, t, {}, 0)[0])
  # The student's predictor is trained: the loss has a gradient on each of its weights.
  grads = jax.jit(
    jax.grad(lambda p: loss_fn(forward(nnx.merge(setup.graphdef, p), batch, key=None, student=True), t, {}, 0)[0])
  )(state.student)
  predictor_grads = [
    float(jnp.max(jnp.abs(g)))
    for path, g in jax.tree_util.tree_leaves_with_path(grads)
    if "'predictor'" in jax.tree_util.keystr(path)
  ]
  assert len(predictor_grads) == 3 and all(g > 0 for g in predictor_grads)


def np_byol_mlp(x, w1, b1, w2, scale=None, offset=None):
  """networks.MLP: hk.Linear(hidden, with_bias=True) -> hk.BatchNorm (training: batch mean / variance, eps 1e-5)
  -> relu -> hk.Linear(output, with_bias=False)."""
  out = x @ w1 + b1
  if scale is not None:
    mean = out.mean(0, keepdims=True)
    var = ((out - mean) ** 2).mean(0, keepdims=True)
    out = (out - mean) / np.sqrt(var + 1e-5) * scale + offset
  return np.maximum(out, 0) @ w2


@pytest.mark.parametrize("use_bn", [False, True])
def test_byol_mlp_is_networks_mlp(use_bn):
  mlp = MLP(12, 20, 6, use_bn=use_bn, out_bias=False, rngs=nnx.Rngs(params=0))
  assert mlp.fc2.bias is None  # the projector's / predictor's last Linear has no bias
  if use_bn:  # a trained BN: any scale and offset
    mlp.bn.scale[...] = jnp.linspace(0.5, 1.5, 20)
    mlp.bn.bias[...] = jnp.linspace(-0.2, 0.3, 20)
  x = np.random.default_rng(0).standard_normal((16, 12))
  bn = (f64(mlp.bn.scale[...]), f64(mlp.bn.bias[...])) if use_bn else ()
  ref = np_byol_mlp(x, f64(mlp.fc1.kernel[...]), f64(mlp.fc1.bias[...]), f64(mlp.fc2.kernel[...]), *bn)
  np.testing.assert_allclose(f64(mlp(jnp.asarray(x, jnp.float32))), ref, rtol=2e-5, atol=2e-5)
  # haiku's init: truncated normal with stddev 1/sqrt(fan_in), cut at 2 stddev; zero bias.
  w = f64(mlp.fc1.kernel[...])
  assert np.abs(w).max() <= 2 / np.sqrt(12) + 1e-6 and not np.any(f64(mlp.fc1.bias[...]))


# ---- DINO's Table 14 switches -------------------------------------------------------------------------------------
def np_dino_loss(student_output, teacher_output, center, student_temp, temp):
  """main_dino.py DINOLoss.forward on (B, views, K) arrays (chunks = views)."""
  student_out = student_output / student_temp
  teacher_out = np.exp(np_log_softmax((teacher_output - center) / temp))
  total_loss, n_loss_terms = 0.0, 0
  for iq in range(teacher_out.shape[1]):
    for v in range(student_out.shape[1]):
      if v == iq:
        continue  # we skip cases where student and teacher operate on the same view
      loss = np.sum(-teacher_out[:, iq] * np_log_softmax(student_out[:, v]), axis=-1)
      total_loss += loss.mean()
      n_loss_terms += 1
  return total_loss / n_loss_terms


def np_mse_loss(student_output, teacher_output, center):
  """Table 14 "MSE": helpers.regression_loss between the student's output of view v and the centred teacher output
  of view iq over DINOLoss's pairs, averaged as DINOLoss averages its terms."""
  total, n = 0.0, 0
  for iq in range(teacher_output.shape[1]):
    for v in range(student_output.shape[1]):
      if v != iq:
        total += np_regression_loss(student_output[:, v], teacher_output[:, iq] - center).mean()
        n += 1
  return total / n


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_dino_predictor_and_mse_loss_match_their_transcriptions(loss):
  config = make_tiny_config()
  config.method = "dino"
  config.head.num_prototypes = 32
  config.head.predictor, config.head.predictor_hidden_dim, config.dino.loss = True, 24, loss
  config_lib.validate(config, num_devices=1)
  setup = setup_lib.build(config, num_train=64)
  params = jax.jit(setup.init_fn)().student
  rng = np.random.default_rng(0)
  d = config.data
  batch = {
    "global": jnp.asarray(rng.standard_normal((8, 2, d.global_size, d.global_size, 3)), jnp.float32),
    "local": jnp.asarray(rng.standard_normal((8, d.num_local, d.local_size, d.local_size, 3)), jnp.float32),
  }
  s, t = outputs_fn(setup)(params, params, batch)
  net = nnx.merge(setup.graphdef, params)
  # The predictor is BYOL's MLP on the head's logits, and only the student's side reads it.
  pred = net.head.predictor
  ref_pred = np_byol_mlp(
    f64(s["cls"]["logits"]).reshape(-1, 32), *(f64(a[...]) for a in (pred.fc1.kernel, pred.fc1.bias, pred.fc2.kernel))
  )
  np.testing.assert_allclose(f64(s["cls"]["prediction"]).reshape(-1, 32), ref_pred, rtol=1e-4, atol=1e-5)
  center = rng.standard_normal((1, 32)) * 0.1
  value, metrics, new_state = setup.loss_fn(s, t, {"center": jnp.asarray(center, jnp.float32)}, 0)
  student_out, teacher_out = f64(s["cls"]["prediction"]), f64(t["cls"]["logits"])
  if loss == "ce":
    ref = np_dino_loss(student_out, teacher_out, center, 0.1, config.dino.warmup_teacher_temp)
  else:
    ref = np_mse_loss(student_out, teacher_out, center)
    assert "ce" not in metrics and float(metrics["mse"]) == float(value)
  np.testing.assert_allclose(float(value), ref, rtol=1e-5)
  # The centre keeps DINO's EMA of the teacher logits either way.
  np.testing.assert_allclose(
    f64(new_state["center"]), 0.9 * center + 0.1 * teacher_out.mean((0, 1))[None], rtol=1e-5, atol=1e-7
  )


# ---- config checks -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "method, overrides, message",
  [
    ("moco_v2", {"moco.queue_size": 36}, r"config\.moco\.queue_size: must be a multiple of the global batch size 8"),
    (
      "moco_v2",
      {"moco.queue_size": 24, "moco.symmetric": True},
      r"config\.moco\.queue_size: must be a multiple of 2 x",
    ),
    ("moco_v2", {"moco.temperature": 0.0}, r"config\.moco\.temperature: must be positive"),
    ("moco_v2", {"data.num_local": 2}, r"config\.data\.num_local: moco_v2 uses the two global crops only"),
    ("byol", {"data.num_local": 2}, r"config\.data\.num_local: byol uses the two global crops only"),
    ("byol", {"head.predictor_hidden_dim": 0}, r"config\.head\.predictor_hidden_dim: must be a positive integer"),
    ("dino", {"dino.loss": "l2"}, r"config\.dino\.loss: must be one of 'ce', 'mse'"),
    ("dinov2", {"dino.loss": "mse"}, r"config\.dino\.loss: 'mse' is DINO's Table 14 row, for method 'dino' only"),
    ("dino", {"dino.loss": "mse", "dino.centering": "sinkhorn_knopp"}, r"config\.dino\.loss: 'mse' regresses on"),
    ("dinov2", {"head.predictor": True}, r"config\.head\.predictor: the student predictor is for method 'dino'"),
  ],
)
def test_classic_fields_are_refused_in_one_line(method, overrides, message):
  c = make_tiny_config()
  c.method = method
  c.data.num_local = 0 if method in ("moco_v2", "byol") else 2
  c.moco.queue_size = 32
  c.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c, num_devices=1)
  assert re.match(message, str(e.value)) and "\n" not in str(e.value), str(e.value)


# ---- the published recipes ---------------------------------------------------------------------------------------
def load_recipe(name):
  import os
  import runpy

  return runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", name))["get_config"]()


def test_moco_v2_and_byol_resnet50_recipes_hold_the_official_values():
  m = load_recipe("moco_v2_resnet50_in1k.py")  # main_moco.py --lr 0.03 --batch-size 256 --mlp --moco-t 0.2 --cos
  assert (m.method, m.model.arch, m.batch_size, m.total_epochs, m.warmup_epochs) == ("moco_v2", "resnet50", 256, 200, 0)
  assert (m.optim.name, m.optim.lr, m.optim.momentum, m.optim.weight_decay, m.optim.weight_decay_end) == (
    "sgd",
    0.03,
    0.9,
    1e-4,
    1e-4,
  )
  assert (m.moco.queue_size, m.moco.temperature, m.moco.symmetric, m.head.out_dim) == (65536, 0.2, False, 128)
  assert (m.teacher.momentum, m.teacher.momentum_end) == (0.999, 0.999)
  assert (m.data.num_local, tuple(m.data.global_scale), m.data.augment.solarize_p) == (0, (0.2, 1.0), 0.0)
  b = load_recipe("byol_resnet50_in1k.py")  # byol/configs/byol.py presets for 1000 epochs, main_loop.py batch 4096
  assert (b.method, b.model.arch, b.batch_size, b.total_epochs, b.warmup_epochs) == ("byol", "resnet50", 4096, 1000, 10)
  assert (b.optim.name, b.optim.lr, b.optim.lars_eta, b.optim.momentum, b.optim.weight_decay) == (
    "lars",
    0.2,
    1e-3,
    0.9,
    1.5e-6,
  )
  assert (b.head.hidden_dim, b.head.out_dim, b.head.predictor_hidden_dim, b.head.use_bn) == (4096, 256, 4096, True)
  assert (b.teacher.momentum, b.teacher.momentum_end, tuple(b.data.global_scale)) == (0.996, 1.0, (0.08, 1.0))
  for c in (m, b):
    assert c.optim.min_lr == 0.0 and c.optim.clip_grad == 0.0
    config_lib.validate(c, num_devices=8)
