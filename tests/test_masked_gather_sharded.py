"""The masked-patch gather on a data-parallel mesh: SimDINOv2's step on 4 simulated CPU devices, each shard packing
its own masked tokens (train/step.py masked_gather), equals the single-device step that packs the whole batch, and
its HLO gathers no activation across devices.

One subprocess (the device count is fixed when JAX starts) prints a JSON report; tiny sizes, ~1 min on 2 cores.
"""

import json
import os
import subprocess
import sys

import pod
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 4

SCRIPT = r"""
import json, re, sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
from conftest import make_tiny_config
from test_step import fixed_batch
from simdino_jax import methods, sharding
from simdino_jax.data.masking import batch_masks
from simdino_jax.train import trainer
from simdino_jax.train.step import make_train_step
assert jax.device_count() == {n}, jax.devices()


def config(mesh):
  c = make_tiny_config()
  c.method = "simdinov2"
  c.mesh = mesh
  c.batch_size = 32
  c.model.depth = 1
  c.model.drop_path_rate = 0.0
  return c


def batch(c, seed):
  b = {{k: np.asarray(v) for k, v in fixed_batch(c, seed=seed).items()}}
  n = (c.data.global_size // 4) ** 2
  rng = np.random.default_rng(seed)
  b["mask"] = batch_masks(rng, c.batch_size * 2, 4, 4, ratio_min_max=tuple(c.masking.ratio)).reshape(-1, 2, n)
  return b


batches = [batch(config([("data", -1)]), s) for s in (0, 1)]
report = {{}}
ref = trainer.Trainer(config([("data", -1)]), "/nonexistent").setup
cfg = ref.config
step = jax.jit(make_train_step(
  ref.graphdef, ref.loss_fn, ref.tx, lr_fn=ref.lr_fn, wd_fn=ref.wd_fn, momentum_fn=ref.momentum_fn,
  mask_positions=methods.mask_positions(cfg),
  mask_tokens=methods.masked_token_budget(cfg, host_batch=cfg.batch_size, shards=1)))
state = jax.jit(ref.init_fn)()
ref_metrics = []
for b in batches:
  state, m = step(state, b)
  ref_metrics.append({{k: float(v) for k, v in m.items()}})
report["reference"] = ref_metrics
report["patch_tokens"] = dict(
  per_crop_bound=cfg.batch_size * 2 * methods.mask_positions(cfg),
  one_shard=methods.masked_token_budget(cfg, host_batch=cfg.batch_size, shards=1),
  per_device=methods.masked_token_budget(cfg, host_batch=cfg.batch_size, shards={n}))

tr = trainer.Trainer(config([("data", -1)]), "/nonexistent")
state = tr.init_state()
gb = [sharding.to_global(b, tr.batch_sharding) for b in batches]
compiled = tr.compiled_step().lower(state, gb[0]).compile()
hlo = compiled.as_text()
metrics = []
for b in gb:
  state, m = compiled(state, b)
  metrics.append({{k: float(v) for k, v in m.items()}})
report["sharded"] = metrics
report["all_gathers"] = [l.strip()[:160] for l in hlo.splitlines() if re.search(r" all-gather(-start)?\(", l)]
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
  env = pod.env(NUM_DEVICES)
  script = SCRIPT.format(tests=os.path.join(ROOT, "tests"), n=NUM_DEVICES)
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("REPORT ")][-1]
  return json.loads(line[len("REPORT ") :])


def test_sharded_masked_step_equals_the_single_device_step(report):
  assert len(report["sharded"]) == len(report["reference"]) == 2
  for got, want in zip(report["sharded"], report["reference"]):
    assert got.keys() == want.keys()
    for key in want:
      assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (key, got[key], want[key])
  assert report["reference"][0]["patch_align"] > 0  # the masked-patch term was computed, not empty


def test_masked_gather_moves_no_activation_between_devices(report):
  assert report["all_gathers"] == [], report["all_gathers"]


def test_each_shard_gathers_fewer_tokens_than_every_crop_would(report):
  t = report["patch_tokens"]
  assert t["one_shard"] < t["per_crop_bound"] / 2
  assert t["per_device"] * 4 < t["per_crop_bound"]
