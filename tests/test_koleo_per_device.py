"""DINOv2's KoLeo is per device: on 2 simulated devices our loss equals the mean over devices of the per-device
KoLeo (NumPy, transcribed from dinov2/loss/koleo_loss.py and ssl_meta_arch.py), not the KoLeo of the global batch.

ssl_meta_arch.py (facebookresearch/dinov2): ``koleo_loss = self.cfg.dino.koleo_loss_weight * sum(self.koleo_loss(p)
for p in student_cls_tokens.chunk(2))`` on each GPU's own rows; DDP then averages the gradients over the GPUs, so
the objective is the mean over devices. KoLeoLoss: normalise (eps 1e-8), nearest neighbour by the largest dot
product with the diagonal at -1, ``-log(PairwiseDistance(x, x[nn]) + eps).mean()`` (PairwiseDistance adds eps to
the difference).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pod
import pytest

from simdino_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from simdino_jax import config as config_lib
from simdino_jax.methods import dino
assert jax.device_count() == 2
config = config_lib.base_config()
config.method, config.dino.koleo_weight = "dinov2", 0.1
groups = dino.koleo_groups(config)
feats = np.random.default_rng(0).standard_normal((12, 2, 5)).astype(np.float32)  # (B, Mg, D)
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.device_put(feats, NamedSharding(mesh, P("data")))
value, grad = jax.jit(jax.value_and_grad(lambda f: dino.koleo(f, groups)))(x)
whole = jax.jit(lambda f: dino.koleo(f, 1))(x)
print("REPORT " + json.dumps(dict(groups=groups, feats=feats.tolist(), value=float(value), whole=float(whole),
                                  grad=np.asarray(grad).tolist())))
"""


def np_koleo(x, eps=1e-8):
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
  dots = x @ x.T
  np.fill_diagonal(dots, -1.0)
  nn = dots.argmax(axis=1)
  return -np.mean(np.log(np.linalg.norm(x - x[nn] + eps, axis=1) + eps))


def np_official_koleo(feats, devices):
  """Mean over devices of sum over the 2 global-crop chunks of KoLeo(that device's rows of that chunk)."""
  rows = np.split(feats.astype(np.float64), devices, axis=0)  # device d holds consecutive rows
  return np.mean([sum(np_koleo(r[:, i]) for i in range(r.shape[1])) for r in rows])


@pytest.fixture(scope="module")
def report():
  env = pod.env(2)
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )  # a hang guard, not a speed check
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads([l for l in out.stdout.splitlines() if l.startswith("REPORT ")][-1][len("REPORT ") :])


def test_koleo_on_two_devices_is_the_mean_of_the_per_device_koleo(report):
  feats = np.asarray(report["feats"])
  assert report["groups"] == 2  # dino.koleo_groups = 0: one group per device
  # float32 against float64 over 6-row groups of 5 features: 1e-5 relative is reassociation.
  np.testing.assert_allclose(report["value"], np_official_koleo(feats, 2), rtol=1e-5)
  # The global-batch KoLeo (the earlier behaviour) is a different objective on the same features.
  np.testing.assert_allclose(report["whole"], np_official_koleo(feats, 1), rtol=1e-5)
  assert abs(report["value"] - report["whole"]) > 1e-3


def test_koleo_gradient_is_the_average_of_the_per_device_gradients(report):
  # DDP: each device back-propagates its own KoLeo and the gradients are averaged over the 2 devices, so the
  # gradient of a row is 1/2 of its device's KoLeo gradient; central differences of the NumPy reference.
  feats = np.asarray(report["feats"], np.float64)
  grad = np.asarray(report["grad"])
  h = 1e-5
  for b, i, k in [(0, 0, 0), (5, 1, 3), (6, 0, 2), (11, 1, 4)]:
    up, down = feats.copy(), feats.copy()
    up[b, i, k] += h
    down[b, i, k] -= h
    fd = (np_official_koleo(up, 2) - np_official_koleo(down, 2)) / (2 * h)
    np.testing.assert_allclose(grad[b, i, k], fd, rtol=1e-3, atol=1e-4)


def test_koleo_groups_that_do_not_divide_the_batch_are_refused():
  config = config_lib.base_config()
  config.method, config.dino.koleo_weight, config.batch_size, config.dino.koleo_groups = "dinov2", 0.1, 12, 5
  with pytest.raises(config_lib.ConfigError, match="dino.koleo_groups"):
    config_lib.validate(config, num_devices=1)
