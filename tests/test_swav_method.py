"""The `swav` method (methods/swav.py) against main_swav.py's training loop, and DINO's Softmax(batch) teacher end to
end. References are NumPy transcriptions of facebookresearch/swav main_swav.py (``train``, ``distributed_sinkhorn``,
one GPU) and of torch.optim.AdamW, and the DINO appendix's Softmax(batch) code."""

import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simdino_jax import config as config_lib
from simdino_jax import optim
from simdino_jax.errors import ConfigError
from simdino_jax.methods import dino as dino_method
from simdino_jax.methods import swav as swav_method
from simdino_jax.train import setup as setup_lib
from simdino_jax.tree import named_leaves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(method="swav", **overrides):
  c = runpy.run_path(os.path.join(ROOT, "configs", "demo.py"))["get_config"]()
  c.method = method
  c.batch_size, c.total_steps, c.warmup_steps = 4, 8, 1
  c.model.depth, c.model.embed_dim = 1, 24
  c.head.hidden_dim, c.head.out_dim, c.head.num_prototypes = 32, 8, 16
  c.data.num_local = 1
  c.update_from_flattened_dict(overrides)
  return c


def np_normalize(x, axis=-1):  # torch F.normalize
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def np_log_softmax(x):
  z = x - x.max(1, keepdims=True)
  return z - np.log(np.exp(z).sum(1, keepdims=True))


def np_sinkhorn(out, epsilon=0.05, iters=3):  # main_swav.py distributed_sinkhorn, world_size 1
  Q = np.exp(out / epsilon).T
  B, K = Q.shape[1], Q.shape[0]
  Q /= Q.sum()
  for _ in range(iters):
    Q /= Q.sum(axis=1, keepdims=True)
    Q /= K
    Q /= Q.sum(axis=0, keepdims=True)
    Q /= B
  return (Q * B).T


def np_swav_iteration(embedding, W, queue, crops_for_assign, temperature):
  """main_swav.py train()'s loop body on one GPU: embedding (bs, V, D) (the crops concatenated in the official
  layout are embedding[:, v]), W (K, D) the (normalised) prototypes, queue (A, L, D) or None (before
  epoch_queue_starts). Returns (loss, new queue)."""
  bs, n_crops = embedding.shape[:2]
  output = embedding @ W.T
  queue = None if queue is None else queue.copy()
  use_the_queue, loss = False, 0.0
  for i, crop_id in enumerate(crops_for_assign):
    out = output[:, crop_id]
    if queue is not None:
      if use_the_queue or not np.all(queue[i, -1, :] == 0):
        use_the_queue = True
        out = np.concatenate([queue[i] @ W.T, out])
      queue[i, bs:] = queue[i, :-bs].copy()
      queue[i, :bs] = embedding[:, crop_id]
    q = np_sinkhorn(out)[-bs:]
    subloss = 0.0
    for v in np.delete(np.arange(n_crops), crop_id):
      subloss -= np.mean(np.sum(q * np_log_softmax(output[:, v] / temperature), axis=1))
    loss += subloss / (n_crops - 1)
  return loss / len(crops_for_assign), queue


def test_swav_loss_with_queue_start_matches_the_official_loop_body():
  """The method's loss over 5 steps, 1 step per epoch, queue_start_epoch 1, a queue of 2 batches: no queue at step 0
  (official: created at epoch_queue_starts), filled at steps 1-2, in use from step 3; the losses and the queue equal
  the official loop's at every step."""
  c = tiny(**{"swav.queue_length": 8, "swav.queue_start_epoch": 1.0, "swav.crops_for_assign": (0, 2)})
  c.data.num_local = 2
  config_lib.validate(c, num_devices=1)
  loss_fn = jax.jit(swav_method.make_swav_loss(c, steps_per_epoch=1))
  state = swav_method.swav_state(c)
  assert state["queue"].shape == (2, 8, 8)
  rng = np.random.default_rng(0)
  ref_queue = None
  for step in range(5):
    emb = np_normalize(rng.standard_normal((4, 4, 8)))  # (B, V = 2 global + 2 local, D)
    W = np_normalize(rng.standard_normal((16, 8)))
    if step >= 1 and ref_queue is None:  # if queue_length > 0 and epoch >= epoch_queue_starts and queue is None
      ref_queue = np.zeros((2, 8, 8))
    ref, ref_queue = np_swav_iteration(emb, W, ref_queue, (0, 2), 0.1)
    student = {"cls": {"z": jnp.asarray(emb, jnp.float32), "logits": jnp.asarray(emb @ W.T, jnp.float32)}}
    student["cls"]["prototypes"] = jnp.asarray(W, jnp.float32)
    loss, metrics, state = loss_fn(student, None, state, jnp.int32(step))
    np.testing.assert_allclose(float(loss), ref, rtol=2e-5)
    assert float(metrics["queue_in_use"]) == float(step >= 3)
    expected = np.zeros((2, 8, 8)) if ref_queue is None else ref_queue
    np.testing.assert_allclose(np.asarray(state["queue"]), expected, atol=1e-6)


def np_adamw(p, g, m, v, t, lr, wd, b1=0.9, b2=0.999, eps=1e-8):  # torch.optim.AdamW.step for one tensor
  p = p * (1 - lr * wd)
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  return p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps), m, v


def np_sgd(p, g, buf, lr, wd, momentum=0.9):  # torch.optim.SGD.step (dampening 0, no Nesterov), one tensor
  d = g + wd * p
  buf = d.copy() if buf is None else momentum * buf + d
  return p - lr * buf, buf


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_prototypes_follow_the_official_normalise_then_step_loop(optimizer):
  """Four iterations of main_swav.py's loop (normalise the prototypes in place, forward/backward at the normalised
  weights, p.grad = None while iteration < freeze_prototypes_niters = 2, then an AdamW or SGD-momentum step with weight
  decay) against our chain (unit-norm init, freeze, project_unit_norm last): the same prototypes enter every forward,
  the frozen iterations move nothing (no decay, no Adam step counted, no momentum buffer started), and ours are
  unit-norm after every step."""
  c = tiny(**{"swav.freeze_prototypes_iters": 2, "optim.name": optimizer})
  rng = np.random.default_rng(1)
  z = jnp.asarray(np_normalize(rng.standard_normal((6, 8))), jnp.float32)
  target = jax.nn.softmax(jnp.asarray(rng.standard_normal((6, 16)), jnp.float32) * 3)

  @jax.jit
  def grad_fn(w):  # any smooth loss of the scores z . w_k; the loop structure is what is compared
    return jax.grad(lambda w: -jnp.sum(target * jax.nn.log_softmax(z @ w.T / 0.1)))(w)

  w0 = rng.uniform(-1 / np.sqrt(8), 1 / np.sqrt(8), (16, 8))  # nn.Linear's init, not normalised
  lr, wd = 0.05, 0.1
  o = c.optim
  o.clip_grad = 0.0
  params = {"head": {"prototypes": jnp.asarray(np_normalize(w0), jnp.float32)}}  # SwAVHead: normalised at init
  tx = optim.make_optimizer(
    o,
    params,
    lambda step: lr,
    lambda step: wd,
    freezes=swav_method.prototype_freezes(c, params, 1),
    unit_norm=swav_method.prototype_unit_norm(c, params),
  )
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  w, m, v, t, buf = w0.astype(np.float64), np.zeros_like(w0), np.zeros_like(w0), 0, None
  for iteration in range(4):
    w = np_normalize(w)  # w = nn.functional.normalize(w, dim=1, p=2); prototypes.weight.copy_(w)
    ours = np.asarray(params["head"]["prototypes"])
    np.testing.assert_allclose(ours, w, rtol=1e-5, atol=1e-6)  # the weights this iteration's forward sees (float32)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-6)
    g = np.asarray(grad_fn(jnp.asarray(w, jnp.float32)), np.float64)
    if iteration >= 2 and optimizer == "adamw":  # p.grad = None before freeze_prototypes_niters: skipped
      t += 1
      w, m, v = np_adamw(w, g, m, v, t, lr, wd)
    elif iteration >= 2:
      w, buf = np_sgd(w, g, buf, lr, wd)
    grads = {"head": {"prototypes": jnp.asarray(g, jnp.float32)}}
    updates, opt_state = update(grads, opt_state, params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    if iteration < 2:
      np.testing.assert_array_equal(np.asarray(params["head"]["prototypes"]), ours)  # frozen, bit for bit
  assert not np.allclose(np.asarray(params["head"]["prototypes"]), np_normalize(w0), atol=1e-3)  # they moved


def test_one_swav_step_keeps_unit_prototypes_freezes_them_and_fills_the_queue_from_its_start_epoch():
  """setup.build + make_step on a tiny ViT: finite losses, the teacher is the student, BN statistics included (no
  momentum encoder, even with the config's teacher.self_distillation True), unit prototypes after every step, frozen for
  freeze_prototypes_iters = 2 steps and moving after, the queue untouched before its start step (2), then filled
  (batch rows at the front) and in use once full (step 4)."""
  # head.use_bn (the recipes'): the teacher's BN statistics are the student's too (the official single model's, from
  # its forward on the global then the local crops; a teacher forward of its own would update them from the global
  # crops only), and the step runs no teacher forward.
  c = tiny(
    **{"swav.freeze_prototypes_iters": 2, "swav.queue_length": 8, "swav.queue_start_epoch": 1.0, "head.use_bn": True}
  )
  config_lib.validate(c, num_devices=1)
  s = setup_lib.build(c, num_train=8)  # 2 steps per epoch: the queue starts at step 2
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  state = setup_lib.init_state(s, setup_lib.state_sharding(s, mesh))
  step = setup_lib.make_step(s, mesh, donate=False)
  rng = np.random.default_rng(2)
  protos = [np.asarray(named_leaves(state.student)[swav_method.PROTOTYPES])]
  queue_rows, used = [], []
  for _ in range(5):
    batch = {
      "global": jnp.asarray(rng.standard_normal((4, 2, 16, 16, 3)), jnp.float32),
      "local": jnp.asarray(rng.standard_normal((4, 1, 8, 8, 3)), jnp.float32),
    }
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["momentum"]) == 0.0
    for a, b in zip(jax.tree_util.tree_leaves(state.student), jax.tree_util.tree_leaves(state.teacher)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    w = np.asarray(named_leaves(state.student)[swav_method.PROTOTYPES])
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-6)
    protos.append(w)
    queue = np.asarray(state.loss_state["queue"])
    queue_rows.append(int(np.sum(np.any(queue != 0, axis=-1)[0])))
    used.append(float(metrics["queue_in_use"]))
  np.testing.assert_array_equal(protos[0], protos[1])  # frozen during updates 0 and 1
  np.testing.assert_array_equal(protos[1], protos[2])
  assert not np.allclose(protos[2], protos[3])  # update 2 moves them
  assert queue_rows == [0, 0, 4, 8, 8]  # filled by steps 2 and 3 (4 rows each), full from step 4
  assert used == [0.0, 0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("swav.queue_length", 6, "config.swav.queue_length: must be 0 or a multiple of batch_size=4"),
    ("swav.crops_for_assign", (0, 3), "config.swav.crops_for_assign"),
    ("swav.epsilon", 0.0, "config.swav.epsilon"),
    ("optim.freeze_mode", "zero_lr", "config.optim.freeze_mode"),
  ],
)
def test_swav_config_errors_name_the_field(field, value, match):
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(tiny(**{field: value}), num_devices=1)


def np_softmax_batch_appendix(t, tau):
  """DINO appendix, "Details on the Softmax(batch) variant": SwAV's Sinkhorn-Knopp code with num_iters=1
  (x = exp(x / tau); c = sum(x, dim=0); x /= c; n = sum(x, dim=1); x /= n) over the teacher's rows."""
  x = np.exp(t / tau)
  x /= x.sum(axis=0, keepdims=True)
  return x / x.sum(axis=1, keepdims=True)


def test_softmax_batch_teacher_end_to_end():
  """dino.centering="softmax_batch" validates and the method's loss (the one setup.build compiles into the step) uses
  the appendix's operation over the global batch (both global views' rows); the centre stays untouched."""
  c = tiny("dino", **{"dino.centering": "softmax_batch"})
  config_lib.validate(c, num_devices=1)
  loss_fn = dino_method.make_dino_loss(c, steps_per_epoch=1, with_patches=False)
  rng = np.random.default_rng(3)
  t, s = rng.standard_normal((4, 2, 16)), rng.standard_normal((4, 3, 16))
  state = dino_method.dino_state(c, with_patches=False)
  loss, _, new_state = jax.jit(loss_fn)(
    {"cls": {"logits": jnp.asarray(s, jnp.float32)}, "backbone_cls": jnp.zeros((4, 2, 8))},
    {"cls": {"logits": jnp.asarray(t, jnp.float32)}},
    state,
    jnp.int32(0),
  )
  q = np_softmax_batch_appendix(t.reshape(8, 16), c.dino.warmup_teacher_temp).reshape(4, 2, 16)
  logp = np_log_softmax((s / c.dino.student_temp).reshape(12, 16)).reshape(4, 3, 16)
  ref = np.mean([-np.sum(q[:, i] * logp[:, j], axis=1).mean() for i in range(2) for j in range(3) if i != j])
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(new_state["center"]), np.asarray(state["center"]))
  with pytest.raises(ConfigError, match="config.dino.centering: must be one of"):
    config_lib.validate(tiny("dino", **{"dino.centering": "softmax"}), num_devices=1)
