"""Sharding: the 8-device data-parallel and data x fsdp steps equal the single-device step, the declared
parameter / optimizer-state shardings, no all-gather in the data-parallel step's HLO, config errors, and the
multi-host start-up guard.

The multi-device checks run in ONE subprocess on 8 simulated CPU devices (the device count is fixed when JAX
starts); it prints a JSON report that the tests below read. Sizes are tiny: the process takes ~1 min on 2 cores.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import pod
import pytest
from jax.sharding import PartitionSpec as P

from simdino_jax import config as config_lib
from simdino_jax import sharding
from simdino_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 8
FSDP_MIN_SIZE = 512  # small enough that the tiny model has sharded leaves (pos_embed has 544 elements)
FSDP_RULES = [(".*pos_embed", "replicate"), (".*", "fsdp")]

SCRIPT = r"""
import json, re, sys, time
sys.path.insert(0, {tests!r})
t_start = time.time()
import jax, numpy as np
from conftest import make_tiny_config
from test_step import fixed_batch
from simdino_jax import methods, sharding
from simdino_jax.io import checkpointing
from simdino_jax.train import trainer
from simdino_jax.train.step import make_train_step
from simdino_jax.tree import named_leaves
assert jax.device_count() == {n}, jax.devices()


def config(mesh, rules=None):
  c = make_tiny_config()
  c.mesh = mesh
  # 8 examples per device: the loss's coding rate then takes the d x d covariance form and the collapse monitor
  # the D x D one (both all-reduce over the batch); fewer rows than features would take the rows x rows form,
  # which all-gathers the (small) feature matrix.
  c.batch_size = 64
  c.model.depth = 1
  if rules is not None:
    c.sharding.rules = rules
    c.sharding.fsdp_min_size = {min_size}
  return c


def host(tree):
  return {{k: np.asarray(v) for k, v in named_leaves(jax.device_get(tree)).items()}}


def max_diffs(a, b):
  # (max |a - b|, max over leaves of max |a - b| / max |b|, the worst leaf)
  assert a.keys() == b.keys()
  abs_d = max(float(np.max(np.abs(a[k] - b[k]), initial=0.0)) for k in b)
  rel = {{k: float(np.max(np.abs(a[k] - b[k]), initial=0.0) / max(float(np.max(np.abs(b[k]), initial=0.0)), 1e-30))
         for k in b}}
  worst = sorted(rel, key=rel.get)[-3:]
  return abs_d, rel[worst[-1]], [(k, rel[k]) for k in worst]


def all_gathers(hlo):
  return [line.strip()[:160] for line in hlo.splitlines() if re.search(r" all-gather(-start)?\(", line)]


batches = [{{k: np.asarray(v) for k, v in fixed_batch(config([("data", -1)]), seed=s).items()}} for s in (0, 1)]
report = {{}}

# Single-device reference: the same step function, jitted without shardings, on device 0.
t = time.time()
ref_tr = trainer.Trainer(config([("data", -1)]), "/nonexistent").setup
raw_step = make_train_step(ref_tr.graphdef, ref_tr.loss_fn, ref_tr.tx, lr_fn=ref_tr.lr_fn, wd_fn=ref_tr.wd_fn,
                           momentum_fn=ref_tr.momentum_fn, mask_positions=methods.mask_positions(ref_tr.config))
state = jax.jit(ref_tr.init_fn)()
ref_init = host(state)
ref_metrics = []
step = jax.jit(raw_step)
for b in batches:
  state, m = step(state, b)
  ref_metrics.append({{k: float(v) for k, v in m.items()}})
ref_final = host(state)
report["reference_s"] = time.time() - t

for name, mesh, rules in [("data8", [("data", -1)], None), ("data4_fsdp2", [("data", 4), ("fsdp", 2)], {rules!r})]:
  t = time.time()
  tr = trainer.Trainer(config(mesh, rules), "/nonexistent")
  state = tr.init_state()
  init_specs = {{k: str(tuple(v.sharding.spec)) for k, v in named_leaves(state).items()}}
  init_diff = max_diffs(host(state), ref_init)
  gb = [sharding.to_global(b, tr.batch_sharding) for b in batches]
  compiled = tr.compiled_step().lower(state, gb[0]).compile()
  hlo = compiled.as_text()
  metrics = []
  for b in gb:
    state, m = compiled(state, b)
    metrics.append({{k: float(v) for k, v in m.items()}})
  # Checkpoint round trip onto this mesh's shardings (the trainer's resume path).
  with checkpointing.Checkpointer({workdir!r} + "/" + name, async_save=False) as ckpt:
    ckpt.save(2, state)
    restored, _ = ckpt.restore_latest(tr.abstract_state())
  restore = dict(specs={{k: str(tuple(v.sharding.spec)) for k, v in named_leaves(restored).items()}},
                 diff=max_diffs(host(restored), host(state))[0])
  report[name] = dict(restore=restore,
      mesh=dict(tr.mesh.shape), seconds=time.time() - t,
      declared={{k: str(tuple(v.spec)) for k, v in named_leaves(tr.state_sharding).items()}},
      init_specs=init_specs,
      final_specs={{k: str(tuple(v.sharding.spec)) for k, v in named_leaves(state).items()}},
      shard_shapes={{k: list(v.addressable_shards[0].data.shape) for k, v in named_leaves(state).items()}},
      shapes={{k: list(v.shape) for k, v in named_leaves(state).items()}},
      init_diff=init_diff, final_diff=max_diffs(host(state), ref_final),
      metrics=metrics, all_gathers=all_gathers(hlo),
      collectives=sorted(set(re.findall(r"= \S+ (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)",
                                        hlo))))
report["ref_metrics"] = ref_metrics
report["total_s"] = time.time() - t_start
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  env = pod.env(NUM_DEVICES)
  script = SCRIPT.format(
    tests=os.path.join(ROOT, "tests"),
    n=NUM_DEVICES,
    min_size=FSDP_MIN_SIZE,
    rules=FSDP_RULES,
    workdir=str(tmp_path_factory.mktemp("checkpoints")),
  )
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("REPORT ")][-1]
  return json.loads(line[len("REPORT ") :])


def assert_metrics_match(metrics, reference):
  assert len(metrics) == len(reference) == 2
  for got, want in zip(metrics, reference):
    assert got.keys() == want.keys()
    for key in want:
      assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (key, got[key], want[key])


@pytest.mark.parametrize("case", ["data8", "data4_fsdp2"])
def test_sharded_step_equals_single_device_step(report, case):
  r = report[case]
  assert r["init_diff"][0] == 0.0  # partitionable threefry: the sharded init is bit-identical
  assert_metrics_match(r["metrics"], report["ref_metrics"])
  # Student, teacher, opt_state, ... after 2 steps (lr 1e-3): within 1% of one step everywhere. Not tighter: Adam
  # divides by sqrt(v), so float noise in a (near-)zero gradient becomes a visible update. The worst leaf is the qkv
  # bias, whose key part has an exactly zero gradient in exact arithmetic (softmax ignores a shift of the logits).
  abs_diff, rel_diff, worst = r["final_diff"]  # rel: max |diff| / max |reference| per leaf, worst leaf
  assert abs_diff < 1e-5 and rel_diff < 1e-3, worst


def test_data_parallel_state_is_replicated_and_step_has_no_all_gather(report):
  r = report["data8"]
  assert r["mesh"] == {"data": 8}
  assert set(r["declared"].values()) == {"()"}
  assert r["init_specs"] == r["final_specs"] == r["declared"]
  # Batch-major data parallelism with replicated parameters: gradients are all-reduced, nothing is gathered.
  assert r["all_gathers"] == [], r["all_gathers"]
  assert r["collectives"] == ["all-reduce"]


def expected_spec(name, shape):
  """The rule FSDP_RULES describes, written out independently of sharding.py."""
  if name.endswith("pos_embed") or len(shape) == 0 or math.prod(shape) < FSDP_MIN_SIZE:
    return "()"
  divisible = [(size, i) for i, size in enumerate(shape) if size % 2 == 0]
  if not divisible:
    return "()"
  axis = max(divisible)[1]
  return str(tuple([None] * axis + ["fsdp"]))


def test_fsdp_shardings_are_as_declared(report):
  r = report["data4_fsdp2"]
  assert r["mesh"] == {"data": 4, "fsdp": 2}
  declared, shapes = r["declared"], r["shapes"]
  assert declared == {k: expected_spec(k, shapes[k]) for k in shapes}
  assert r["init_specs"] == r["final_specs"] == declared  # created sharded, and the step keeps them
  assert r["restore"]["specs"] == declared and r["restore"]["diff"] == 0.0  # a checkpoint resumes onto them
  # Spot checks: big kernels split on their largest axis, optimizer moments like their parameter, small
  # leaves and the regex-replicated pos_embed whole.
  for prefix in ("student/", "teacher/", "opt_state/1/mu/", "opt_state/1/nu/"):
    assert declared[prefix + "backbone/blocks/0/attn/qkv/kernel"] == "(None, 'fsdp')"  # (32, 96)
    assert declared[prefix + "backbone/blocks/0/mlp/fc2/kernel"] == "('fsdp',)"  # (128, 32)
    assert declared[prefix + "backbone/blocks/0/mlp/fc1/bias"] == "()"  # 128 elements
    assert declared[prefix + "backbone/pos_embed"] == "()"  # (1, 17, 32): 544 elements, but the rule says so
  assert r["shard_shapes"]["student/backbone/blocks/0/attn/qkv/kernel"] == [32, 48]
  assert r["shard_shapes"]["opt_state/1/nu/backbone/blocks/0/mlp/fc2/kernel"] == [64, 32]
  assert declared["step"] == declared["rng"] == "()"
  sharded = [k for k, v in declared.items() if v != "()"]
  assert len(sharded) >= 20, sharded


def test_fsdp_step_gathers_parameters_not_activations(report):
  r = report["data4_fsdp2"]
  # The gathers are those of sharded parameters (as used: the patch-embedding kernel as (p*p*3, D)); none of a
  # batch-sharded activation (at tiny batches XLA's cost model may prefer those: see the module docstring of
  # simdino_jax/sharding.py). Gradients come back reduced (all-reduce or reduce-scatter).
  params = {tuple(shape) for k, shape in r["shapes"].items() if k.startswith("student/") and r["declared"][k] != "()"}
  allowed = params | {(math.prod(s[:-1]), s[-1]) for s in params}
  gathered = [
    tuple(int(d) for d in re.search(r"= \w+\[([\d,]*)\]", line).group(1).split(",") if d) for line in r["all_gathers"]
  ]
  assert gathered and set(gathered) <= allowed, (set(gathered) - allowed, r["all_gathers"])


# -- config errors (this process) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("sharding.rules", [(".*", "shard")], r"config\.sharding\.rules\[0\]: unknown rule 'shard'"),
    (
      "sharding.rules",
      [(".*pos_embed", "replicate"), ("blocks/(", "fsdp")],
      r"config\.sharding\.rules\[1\]: regex 'blocks/\(' does not compile",
    ),
    ("sharding.rules", [(".*", "fsdp", 2)], r"config\.sharding\.rules\[0\]: expected a \(regex, rule\) pair"),
    ("sharding.fsdp_min_size", -1, r"config\.sharding\.fsdp_min_size"),
    ("mesh", [("data", -1), ("fdsp", 1)], r"config\.mesh: axis names must be distinct, each 'data' or 'fsdp'"),
    ("mesh", [("data", -1), ("data", 1)], r"config\.mesh: axis names must be distinct"),
    ("mesh", [("data", 1), ("fsdp", 2)], r"config\.mesh: .* does not fit 1 devices"),
  ],
)
def test_bad_mesh_or_rule_is_a_config_error(tiny_config, tmp_path, field, value, match):
  tiny_config.update_from_flattened_dict({field: value})
  with pytest.raises(config_lib.ConfigError, match=match):
    trainer.Trainer(tiny_config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_per_process_batch_must_divide_over_local_devices(tiny_config):
  tiny_config.batch_size = 24  # 2 processes: 12 per process, and 8 local devices each
  with pytest.raises(
    config_lib.ConfigError,
    match=r"config\.batch_size: 24 over 2 processes gives 12 examples per "
    r"process, not divisible by its 8 local devices",
  ):
    config_lib.validate(tiny_config, num_devices=12, num_processes=2, num_local_devices=8)
  config_lib.validate(tiny_config, num_devices=4, num_processes=2)  # 12 per process over 2 local devices: fine


def test_fsdp_spec_rule():
  assert sharding.fsdp_spec((32, 96), 2, 1024) == P(None, "fsdp")
  assert sharding.fsdp_spec((128, 32), 2, 1024) == P("fsdp")
  assert sharding.fsdp_spec((64, 64), 2, 1024) == P(None, "fsdp")  # ties: the last axis
  assert sharding.fsdp_spec((6, 9), 4, 1) == P()  # no divisible axis
  assert sharding.fsdp_spec((2, 9, 12), 4, 1) == P(None, None, "fsdp")
  assert sharding.fsdp_spec((32, 96), 2, 4096) == P()  # too small
  assert sharding.fsdp_spec((32, 96), 1, 1) == P()  # no fsdp axis
  assert sharding.fsdp_spec((), 2, 0) == P()
  rules = sharding.compile_rules([(".*pos_embed.*", "replicate"), ("student/.*", "fsdp")])
  assert sharding.leaf_spec("student/backbone/pos_embed", (1, 17, 32), rules, 2, 1) == P()
  assert sharding.leaf_spec("student/backbone/cls_token", (1, 1, 32), rules, 2, 1) == P(None, None, "fsdp")
  assert sharding.leaf_spec("teacher/backbone/cls_token", (1, 1, 32), rules, 2, 1) == P()  # no rule: replicated
  assert sharding.leaf_spec("xstudent/a", (32,), rules, 2, 1) == P()  # the regex must match the whole name


def test_single_device_trainer_state_is_replicated(tiny_config, tmp_path):
  tiny_config.mesh = [("data", -1), ("fsdp", 1)]
  tiny_config.sharding.fsdp_min_size = 1
  tr = trainer.Trainer(tiny_config, str(tmp_path))
  specs = {s.spec for s in jax.tree_util.tree_leaves(tr.state_sharding)}
  assert specs == {P()}  # an fsdp axis of size 1 shards nothing


# -- multi-host start-up ---------------------------------------------------------------------------------------

LAUNCHER_VARS = (
  "JAX_COORDINATOR_ADDRESS",
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
  "OMPI_MCA_orte_hnp_uri",
  "OMPI_COMM_WORLD_SIZE",
  "MEGASCALE_COORDINATOR_ADDRESS",
  "TPU_PROCESS_ADDRESSES",
  "TPU_WORKER_HOSTNAMES",
  "SIMDINO_DISTRIBUTED",
)


@pytest.fixture
def clean_env(monkeypatch):
  for var in LAUNCHER_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # never ask a metadata server from a test
  return monkeypatch


def test_distributed_start_is_a_no_op_on_one_host(clean_env):
  calls = []
  clean_env.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert sharding.distributed_environment() is None
  slurm = dict(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="node1", SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0")
  for k, v in slurm.items():
    clean_env.setenv(k, v)
  assert sharding.distributed_environment() is None  # one SLURM task: nothing to coordinate
  assert sharding.maybe_initialize_distributed() is False
  assert calls == []
  assert jax.config.jax_threefry_partitionable


@pytest.mark.parametrize(
  "env,kind",
  [
    (
      dict(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="n[1-2]", SLURM_NTASKS="2", SLURM_PROCID="0", SLURM_LOCALID="0"),
      "slurm",
    ),
    (dict(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="4", JAX_PROCESS_ID="3"), "coordinator"),
    (dict(TPU_WORKER_HOSTNAMES="w0,w1,w2,w3"), "tpu"),
    (dict(TPU_WORKER_HOSTNAMES="w0"), None),
    (dict(OMPI_MCA_orte_hnp_uri="1.0;tcp://10.0.0.1:1", OMPI_COMM_WORLD_SIZE="2"), "openmpi"),
    (dict(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", SIMDINO_DISTRIBUTED="0"), None),
  ],
)
def test_distributed_start_detects_launchers(clean_env, env, kind):
  for k, v in env.items():
    clean_env.setenv(k, v)
  assert sharding.distributed_environment() == kind
  calls = []
  clean_env.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  clean_env.setattr(jax.distributed, "is_initialized", lambda: False)
  assert sharding.maybe_initialize_distributed() is (kind is not None)
  if kind == "coordinator":
    assert calls == [{"num_processes": 4, "process_id": 3}]
  else:
    assert calls == ([{}] if kind else [])
