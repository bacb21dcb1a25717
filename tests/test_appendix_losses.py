"""The loss components of DINO's appendix systems (MoCo-v2, BYOL, SwAV, Softmax(batch)) against NumPy float64
transcriptions of the official code: facebookresearch/moco moco/builder.py, deepmind-research byol/utils/helpers.py
and byol_experiment.py, facebookresearch/swav main_swav.py (lines quoted at each transcription). SwAV is transcribed
with its per-GPU queues and all-reduces simulated over 2 workers, so the global functions are checked against the
distributed original; a 2-device batch-sharded jit is checked against the 1-device result."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pod
import pytest

from simdino_jax.errors import ConfigError
from simdino_jax.losses import byol, moco, swav
from simdino_jax.losses.dino import sinkhorn_knopp, softmax_over_batch, teacher_targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def f32(x):
  return jnp.asarray(x, jnp.float32)


def np_normalize(x, eps=1e-12):  # torch F.normalize(x, dim=1)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def np_log_softmax(x):
  z = x - x.max(1, keepdims=True)
  return z - np.log(np.exp(z).sum(1, keepdims=True))


# ---- MoCo-v2 (builder.py forward / _dequeue_and_enqueue, main_moco.py CrossEntropyLoss) ----
def np_moco_loss(q, k, queue_ck, T):
  q, k = np_normalize(q), np_normalize(k)
  l_pos = np.einsum("nc,nc->n", q, k)[:, None]  # l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
  l_neg = np.einsum("nc,ck->nk", q, queue_ck)  # l_neg = torch.einsum("nc,ck->nk", [q, self.queue...])
  logits = np.concatenate([l_pos, l_neg], axis=1) / T  # logits = torch.cat([l_pos, l_neg], dim=1); logits /= T
  return -np.mean(np_log_softmax(logits)[:, 0])  # CrossEntropyLoss(logits, zeros)


def np_dequeue(queue_ck, ptr, keys):
  queue_ck = queue_ck.copy()
  batch_size = keys.shape[0]
  assert queue_ck.shape[1] % batch_size == 0
  queue_ck[:, ptr : ptr + batch_size] = keys.T  # self.queue[:, ptr : ptr + batch_size] = keys.T
  return queue_ck, (ptr + batch_size) % queue_ck.shape[1]  # ptr = (ptr + batch_size) % self.K


def test_info_nce_matches_moco_builder():
  rng = np.random.default_rng(0)
  n, c, k = 6, 8, 12
  q, key = rng.standard_normal((n, c)) * 3, rng.standard_normal((n, c))
  queue_ck = np_normalize(rng.standard_normal((c, k)).T).T  # torch.randn(dim, K) normalised over dim 0
  loss, metrics = jax.jit(lambda a, b, qu: moco.info_nce_loss(a, b, qu, temperature=0.2))(
    f32(q), f32(key), f32(queue_ck.T)
  )
  np.testing.assert_allclose(float(loss), np_moco_loss(q, key, queue_ck, 0.2), rtol=1e-5)
  logits = np.concatenate([np.sum(np_normalize(q) * np_normalize(key), 1)[:, None], np_normalize(q) @ queue_ck], 1)
  np.testing.assert_allclose(float(metrics["top1"]), np.mean(logits.argmax(1) == 0), rtol=1e-6)
  # Keys and queue are targets: no gradient reaches them.
  g_key, g_queue = jax.grad(lambda b, qu: moco.info_nce_loss(f32(q), b, qu)[0], argnums=(0, 1))(
    f32(key), f32(queue_ck.T)
  )
  assert not np.any(np.asarray(g_key)) and not np.any(np.asarray(g_queue))


def test_moco_queue_update_matches_dequeue_and_enqueue():
  rng = np.random.default_rng(1)
  c, k, n = 4, 12, 4
  queue_ck = rng.standard_normal((c, k))
  ours, ptr = f32(queue_ck.T), jnp.int32(0)
  ref, ref_ptr = queue_ck, 0
  update = jax.jit(moco.dequeue_and_enqueue)
  for step in range(4):  # the 4th write wraps to the start
    keys = rng.standard_normal((n, c))
    ours, ptr = update(ours, ptr, f32(keys))
    ref, ref_ptr = np_dequeue(ref, ref_ptr, keys)
    np.testing.assert_allclose(np.asarray(ours), ref.T, rtol=1e-6)
    assert int(ptr) == ref_ptr, step


def test_moco_queue_size_must_be_a_multiple_of_the_global_batch():
  moco.check_queue_size(65536, 256)
  with pytest.raises(ConfigError, match=r"^config\.moco\.queue_size: must be a multiple of the global batch size 48"):
    moco.check_queue_size(1000, 48)


# ---- BYOL (helpers.py regression_loss / l2_normalize, byol_experiment.py loss_fn) ----
def np_byol(p1, p2, z1, z2):
  def l2n(x, eps=1e-12):  # x * rsqrt(max(sum(x^2), epsilon))
    return x / np.sqrt(np.maximum(np.sum(x**2, -1, keepdims=True), eps))

  def regression_loss(x, y):  # jnp.sum((normed_x - normed_y)**2, axis=-1)
    return np.sum((l2n(x) - l2n(y)) ** 2, axis=-1)

  return np.mean(regression_loss(p1, z2) + regression_loss(p2, z1))  # repr_loss = mean(rl(p1,z2') + rl(p2,z1'))


def test_byol_loss_matches_byol_experiment():
  rng = np.random.default_rng(2)
  p1, p2, z1, z2 = (rng.standard_normal((5, 16)) * s for s in (1.0, 2.0, 0.5, 3.0))
  loss, metrics = jax.jit(byol.byol_loss)(f32(p1), f32(p2), f32(z1), f32(z2))
  ref = np_byol(p1, p2, z1, z2)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  cos = lambda a, b: np.sum(np_normalize(a) * np_normalize(b), 1)
  np.testing.assert_allclose(float(metrics["cosine"]), np.mean(cos(p1, z2) + cos(p2, z1)) / 2, rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda z: byol.byol_loss(f32(p1), f32(p2), z, f32(z2))[0])(f32(z1))
  assert not np.any(np.asarray(g))  # the target projections are stop-gradient


def test_byol_mlp_shapes_follow_networks_py():
  # networks.MLP: Linear(4096, bias) -> BatchNorm(scale, offset) -> relu -> Linear(256, no bias), projector on the
  # ResNet-50's 2048-d embedding: 2048*4096 + 4096 + 2*4096 + 4096*256 parameters.
  shapes = byol.mlp_param_shapes(2048)
  assert sum(int(np.prod(s)) for s in shapes.values()) == 9_449_472
  assert shapes["linear_1/w"] == (4096, 256) and "linear_1/b" not in shapes


# ---- SwAV (main_swav.py, simulated over workers) ----
def np_distributed_sinkhorn(outs, epsilon=0.05, iters=3):
  """distributed_sinkhorn on a list of per-worker scores; the all_reduces are sums over the workers."""
  world = len(outs)
  Qs = [np.exp(o / epsilon).T for o in outs]  # Q = torch.exp(out / args.epsilon).t()
  B = Qs[0].shape[1] * world  # B = Q.shape[1] * args.world_size
  K = Qs[0].shape[0]
  sum_Q = sum(Q.sum() for Q in Qs)  # dist.all_reduce(sum_Q)
  Qs = [Q / sum_Q for Q in Qs]
  for _ in range(iters):
    sum_of_rows = sum(Q.sum(axis=1, keepdims=True) for Q in Qs)  # dist.all_reduce(sum_of_rows)
    Qs = [Q / sum_of_rows / K for Q in Qs]
    Qs = [Q / Q.sum(axis=0, keepdims=True) / B for Q in Qs]  # Q /= torch.sum(Q, dim=0); Q /= B
  return [(Q * B).T for Q in Qs]


def np_swav_step(emb, W, queues, crops_for_assign, temperature=0.1):
  """One iteration of main_swav.py's train() on `world` workers: emb[w] (bs, V, D) normalised embeddings, W (K, D)
  prototypes, queues[w] (A, L/world, D) or None. Returns the DDP loss (mean over workers) and the new queues."""
  world = len(emb)
  bs, n_crops = emb[0].shape[:2]
  out = [e @ W.T for e in emb]  # (bs, V, K) = output[bs * v: bs * (v + 1)]
  use_the_queue = False
  losses = [0.0] * world
  new_queues = [None if q is None else q.copy() for q in queues]
  for i, crop_id in enumerate(crops_for_assign):
    outs = []
    for w in range(world):
      o = out[w][:, crop_id]
      if queues[w] is not None:
        if use_the_queue or not np.all(queues[w][i, -1, :] == 0):
          use_the_queue = True
          o = np.concatenate([queues[w][i] @ W.T, o])  # torch.cat((torch.mm(queue[i], prototypes.t()), out))
        new_queues[w][i, bs:] = queues[w][i, :-bs]  # queue[i, bs:] = queue[i, :-bs].clone()
        new_queues[w][i, :bs] = emb[w][:, crop_id]  # queue[i, :bs] = embedding[crop_id * bs: ...]
      outs.append(o)
    codes = [q[-bs:] for q in np_distributed_sinkhorn(outs)]  # q = distributed_sinkhorn(out)[-bs:]
    for w in range(world):
      subloss = 0.0
      for v in np.delete(np.arange(n_crops), crop_id):
        x = out[w][:, v] / temperature
        subloss -= np.mean(np.sum(codes[w] * np_log_softmax(x), axis=1))
      losses[w] += subloss / (n_crops - 1)
  return np.mean([loss / len(crops_for_assign) for loss in losses]), new_queues


def test_distributed_sinkhorn_matches_main_swav_over_two_workers():
  rng = np.random.default_rng(3)
  scores = np.tanh(rng.standard_normal((10, 7)))  # cosines in [-1, 1]
  ref = np.concatenate(np_distributed_sinkhorn([scores[:5], scores[5:]], epsilon=0.05, iters=3))
  got = np.asarray(jax.jit(swav.distributed_sinkhorn)(f32(scores)))
  np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)


def _swav_inputs(rng, world, bs, n_crops, d, k):
  emb = [np_normalize(rng.standard_normal((bs * n_crops, d))).reshape(bs, n_crops, d) for _ in range(world)]
  return emb, np_normalize(rng.standard_normal((k, d)))


def test_swav_loss_with_queue_matches_main_swav_per_gpu_queues():
  """Two workers of 3 images each, a queue of 12 (6 per worker): the queue is empty for 2 steps, then full. Our
  global batch and global FIFO give the official per-worker loss at every step, queue or not."""
  rng = np.random.default_rng(4)
  world, bs, n_crops, d, k, crops = 2, 3, 4, 5, 6, (0, 1)
  length = swav.effective_queue_length(13, world * bs)  # args.queue_length -= queue_length % (bs * world_size)
  assert length == 12
  ref_queues = [np.zeros((len(crops), length // world, d)) for _ in range(world)]
  queue = jnp.zeros((len(crops), length, d), jnp.float32)
  step = jax.jit(
    lambda s, q, w: swav.swav_loss(s, crops_for_assign=crops, temperature=0.1, epsilon=0.05, queue=q, prototypes=w)
  )
  used = []
  for _ in range(3):
    emb, W = _swav_inputs(rng, world, bs, n_crops, d, k)
    ref, ref_queues = np_swav_step(emb, W, ref_queues, crops)
    glob = np.concatenate(emb)  # (world * bs, V, D): device order is the global batch order
    loss, metrics = step(f32(glob @ W.T), queue, f32(W))
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    used.append(float(metrics["queue_in_use"]))
    queue = swav.update_queue(queue, f32(glob), crops)
    # The same rows as the union of the per-worker queues (the order differs, which Sinkhorn-Knopp ignores).
    for i in range(len(crops)):
      ours, theirs = np.asarray(queue[i]), np.concatenate([q[i] for q in ref_queues])
      np.testing.assert_allclose(ours[np.lexsort(ours.T)], theirs[np.lexsort(theirs.T)], atol=1e-6)
  assert used == [0.0, 0.0, 1.0]


def test_swav_loss_without_queue_and_single_assigned_crop():
  rng = np.random.default_rng(5)
  emb, W = _swav_inputs(rng, 1, 4, 3, 5, 7)
  ref, _ = np_swav_step(emb, W, [None], (1,), temperature=0.2)
  loss, _ = jax.jit(lambda s: swav.swav_loss(s, crops_for_assign=(1,), temperature=0.2))(f32(emb[0] @ W.T))
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_prototypes_frozen_before_freeze_prototypes_niters():
  grads = {"head": {"prototypes": {"kernel": jnp.ones((3, 4))}, "mlp": {"kernel": jnp.ones((2, 3))}}}
  at = jax.jit(lambda g, s: swav.freeze_prototypes(g, s, 313))
  before, after = at(grads, 312), at(grads, 313)
  assert not np.any(np.asarray(before["head"]["prototypes"]["kernel"]))
  assert np.all(np.asarray(before["head"]["mlp"]["kernel"]) == 1)
  assert np.all(np.asarray(after["head"]["prototypes"]["kernel"]) == 1)


def test_normalize_prototypes_gives_unit_rows():
  w = np.random.default_rng(6).standard_normal((5, 3))
  np.testing.assert_allclose(np.asarray(swav.normalize_prototypes(f32(w))), np_normalize(w), rtol=1e-6)


# ---- DINO appendix: Softmax(batch) ----
def np_softmax_batch(t, temp):
  """Our reading of the appendix's Softmax(batch): exp(t / T) normalised over the batch per prototype (softmax over
  the batch), then each sample normalised over K ("simple normalization", dino issue #49)."""
  x = np.exp(t / temp)
  x /= x.sum(axis=0, keepdims=True)
  return x / x.sum(axis=1, keepdims=True)


def test_softmax_over_batch_is_a_batch_softmax_then_row_normalisation():
  rng = np.random.default_rng(7)
  t = rng.standard_normal((8, 2, 6))  # (B, Mg, K): rows are every (image, view)
  got = np.asarray(jax.jit(lambda x: teacher_targets(x, mode="softmax_batch", temperature=0.1))(f32(t)))
  np.testing.assert_allclose(got, np_softmax_batch(t.reshape(-1, 6), 0.1).reshape(t.shape), rtol=2e-5, atol=1e-7)
  # It is one Sinkhorn-Knopp iteration.
  one_iter = np.asarray(jax.jit(lambda x: sinkhorn_knopp(x, 0.1, num_iters=1))(f32(t)))
  np.testing.assert_allclose(got, one_iter, rtol=2e-5, atol=1e-7)
  mask = np.arange(16).reshape(8, 2) % 3 != 0
  masked = np.asarray(jax.jit(lambda x, m: softmax_over_batch(x, 0.1, mask=m))(f32(t), jnp.asarray(mask)))
  np.testing.assert_allclose(masked[mask], np_softmax_batch(t[mask], 0.1), rtol=2e-5, atol=1e-7)
  assert not np.any(masked[~mask])


# ---- 2 devices: the batch-sharded jit computes the global quantities ----
SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path[:0] = [".", "tests"]  # the module imports tests/pod.py
from tests.test_appendix_losses import sharded_inputs, compute_all
assert jax.device_count() == 2
mesh = Mesh(np.array(jax.devices()), ("data",))
batch, replicated = sharded_inputs()
batch = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in batch.items()}
replicated = {k: jax.device_put(v, NamedSharding(mesh, P())) for k, v in replicated.items()}
out = jax.jit(compute_all)(batch, replicated)
print("REPORT " + json.dumps({k: np.asarray(v).tolist() for k, v in out.items()}))
"""


def sharded_inputs():
  rng = np.random.default_rng(8)
  b, v, d, k, length = 8, 3, 5, 6, 16
  emb = np_normalize(rng.standard_normal((b * v, d))).reshape(b, v, d)
  batch = {"q": f32(rng.standard_normal((b, d))), "k": f32(rng.standard_normal((b, d))), "emb": f32(emb)}
  batch["t"] = f32(rng.standard_normal((b, 2, k)))
  queue = np.concatenate([np_normalize(rng.standard_normal((2 * length, d)))]).reshape(2, length, d)
  replicated = {"queue": f32(queue), "W": f32(np_normalize(rng.standard_normal((k, d))))}
  replicated["moco_queue"] = f32(np_normalize(rng.standard_normal((length, d))))
  return batch, replicated


def compute_all(batch, rep):
  scores = jnp.einsum("bvd,kd->bvk", batch["emb"], rep["W"])
  mq, ptr = moco.dequeue_and_enqueue(rep["moco_queue"], jnp.int32(8), moco.l2_normalize(batch["k"]))
  return {
    "info_nce": moco.info_nce_loss(batch["q"], batch["k"], rep["moco_queue"])[0],
    "moco_queue": mq,
    "ptr": ptr,
    "byol": byol.byol_loss(batch["q"], batch["k"], batch["k"], batch["q"])[0],
    "swav": swav.swav_loss(scores, crops_for_assign=(0, 1), queue=rep["queue"], prototypes=rep["W"])[0],
    "swav_queue": swav.update_queue(rep["queue"], batch["emb"], (0, 1)),
    "softmax_batch": softmax_over_batch(batch["t"], 0.1),
  }


def test_two_device_sharded_batch_gives_the_one_device_values():
  env = pod.env(2)
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )  # a hang guard, not a speed check
  assert out.returncode == 0, out.stderr[-3000:]
  two = json.loads([line for line in out.stdout.splitlines() if line.startswith("REPORT ")][-1][len("REPORT ") :])
  one = jax.jit(compute_all)(*sharded_inputs())
  assert set(two) == set(one)
  for name, value in one.items():
    np.testing.assert_allclose(np.asarray(two[name]), np.asarray(value), rtol=1e-5, atol=1e-6, err_msg=name)


# ---- The official functions themselves (optional: SIMDINO_OFFICIAL_DIR, and SIMDINO_TORCH_PYTHON for torch) ----
def _clones():
  clones = os.environ.get("SIMDINO_OFFICIAL_DIR")
  if not clones:
    pytest.skip("needs SIMDINO_OFFICIAL_DIR (a folder holding the byol, moco and swav clones)")
  return clones


def test_byol_loss_equals_the_official_helpers_regression_loss():
  """byol/utils/helpers.py is JAX (imports absl and jax only): its regression_loss, composed as loss_fn does."""
  import importlib.util

  path = os.path.join(_clones(), "byol", "utils", "helpers.py")
  spec = importlib.util.spec_from_file_location("byol_official_helpers", path)
  helpers = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(helpers)
  rng = np.random.default_rng(9)
  p1, p2, z1, z2 = (f32(rng.standard_normal((6, 8))) for _ in range(4))
  official = jnp.mean(helpers.regression_loss(p1, z2) + helpers.regression_loss(p2, z1))
  np.testing.assert_allclose(float(byol.byol_loss(p1, p2, z1, z2)[0]), float(official), rtol=1e-6)


TORCH_SCRIPT = r"""
import ast, json, sys, types
import numpy as np, torch, torch.nn as nn
clones, data = sys.argv[1], json.loads(sys.stdin.read())
sys.path.insert(0, clones + "/moco")
from moco import builder
builder.concat_all_gather = lambda t: t  # one process: the gather is the identity
torch.Tensor.cuda = lambda self, *a, **k: self  # forward puts the labels on the GPU
torch.manual_seed(0)
c, k = data["dim"], data["K"]
model = builder.MoCo(lambda num_classes: nn.Linear(data["in"], num_classes), dim=c, K=k, m=0.999, T=0.2)
model._batch_shuffle_ddp = lambda x: (x, None)
model._batch_unshuffle_ddp = lambda x, idx: x
im_q, im_k = (torch.tensor(data[n], dtype=torch.float32) for n in ("im_q", "im_k"))
queue = model.queue.clone()
with torch.no_grad():
  qf, kf = model.encoder_q(im_q), model.encoder_k(im_k)  # the two encoders start equal
  logits, labels = model(im_q, im_k)
  loss = nn.CrossEntropyLoss()(logits, labels)
tree = ast.parse(open(clones + "/swav/main_swav.py").read())
fn = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "distributed_sinkhorn"][0]
ns = {"torch": torch, "dist": types.SimpleNamespace(all_reduce=lambda x: None),
      "args": types.SimpleNamespace(epsilon=0.05, sinkhorn_iterations=3, world_size=1)}
exec(compile(ast.Module(body=[fn], type_ignores=[]), "main_swav.py", "exec"), ns)
codes = ns["distributed_sinkhorn"](torch.tensor(data["scores"], dtype=torch.float32))
print("REPORT " + json.dumps(dict(queries=qf.tolist(), keys=kf.tolist(), queue=queue.tolist(), loss=float(loss),
                                  new_queue=model.queue.tolist(), ptr=int(model.queue_ptr), codes=codes.tolist())))
"""


def test_moco_and_swav_equal_the_official_torch_functions():
  """moco builder.MoCo.forward (+ CrossEntropyLoss) and _dequeue_and_enqueue, swav distributed_sinkhorn, run by
  torch on the same arrays (one process: the gathers and all-reduces are identities)."""
  clones, python = _clones(), os.environ.get("SIMDINO_TORCH_PYTHON")
  if not python:
    pytest.skip("needs SIMDINO_TORCH_PYTHON (a Python with torch)")
  rng = np.random.default_rng(10)
  data = {"dim": 4, "K": 12, "in": 6, "im_q": rng.standard_normal((3, 6)).tolist()}
  data["im_k"] = rng.standard_normal((3, 6)).tolist()
  data["scores"] = np.tanh(rng.standard_normal((5, 7))).tolist()
  out = subprocess.run(
    [python, "-c", TORCH_SCRIPT, clones],
    input=json.dumps(data),
    check=False,
    capture_output=True,
    text=True,
    timeout=600,
  )  # a hang guard, not a speed check
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads([line for line in out.stdout.splitlines() if line.startswith("REPORT ")][-1][len("REPORT ") :])
  queue = f32(np.asarray(r["queue"]).T)  # the official (C, K) buffer as (K, C) rows
  loss, _ = moco.info_nce_loss(f32(r["queries"]), f32(r["keys"]), queue, temperature=0.2)
  np.testing.assert_allclose(float(loss), r["loss"], rtol=1e-5)
  new, ptr = moco.dequeue_and_enqueue(queue, 0, moco.l2_normalize(f32(r["keys"])))
  assert int(ptr) == r["ptr"] == 3
  np.testing.assert_allclose(np.asarray(new), np.asarray(r["new_queue"]).T, rtol=1e-5, atol=1e-6)
  codes = swav.distributed_sinkhorn(f32(data["scores"]))
  np.testing.assert_allclose(np.asarray(codes), np.asarray(r["codes"]), rtol=1e-5, atol=1e-7)
