"""Training does not depend on the number of processes (issue 27, item 2; issue 29: the per-device groups).

The same tiny configs/demo.py runs (drop path 0.1, so every row of the batch draws its own randomness) train as one
process with two CPU devices and as a simulated 2-host pod (tests/pod.py: two python processes joined by
``jax.distributed``, one device each, CPU collectives over gloo): the metrics of every step and the final student and
teacher parameters must be bitwise equal. SimDINOv2 draws block masks and computes its coding rate per group of
consecutive rows of the global batch (``loss.groups=2``, the official ``reduce_cov=0``), reading the data through a
grain worker process; DINOv2 computes KoLeo per group (``dino.koleo_groups=2``, DINOv2's per-GPU KoLeo). A second
small pod checks that the trainer's rows (``trainer.process_batch_rows``) land where the one-process batch has them
when the mesh lists process 1 first.

Before the fix (pipeline.train_dataset gave process k the stream elements k, k + n, ... and drew masks per process;
the global batch was the one-process batch reordered, [0, 2, 4, 6, 1, 3, 5, 7], with other masks), measured with
this file on HEAD f90e6e2: step-1 loss -0.095830 on the pod vs -0.092352 on one process (3.8%), step 3 0.439022 vs
0.332738 (32%), final student parameters up to 3.0e-3 apart (teacher 2.2e-5). Run the same way, SimDINO with
``loss.groups=2`` differed by 3.2% at step 1 and DINOv2 (KoLeo per device) by 5.2%, KoLeo by 12%. With groups taken
over each process's own rows instead of the global batch's (a scratch copy of coding_rate / koleo_per_group splitting
into ``groups * jax.process_count()`` groups), this file failed for both runs: SimDINOv2 step-1 grad_norm 16.4727 on
one process vs 17.0180 on the pod, DINOv2 step-1 koleo 3.5018 vs 2.6615.
"""

import json
import math
import os

import numpy as np
import pod
import pytest

from simdino_jax.io import restore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = [
  "-m",
  "simdino_jax.train",
  f"--config={os.path.join(ROOT, 'configs', 'demo.py')}",
  "--config.total_steps=3",
  "--config.warmup_steps=1",
  "--config.batch_size=8",
  "--config.log_every=1",
  "--config.checkpoint_every=0",
  "--config.model.depth=1",
  "--config.head.hidden_dim=64",
  "--config.head.out_dim=32",
  "--config.model.drop_path_rate=0.1",
  "--config.evals.knn.final=False",
  "--config.evals.knn.at_init=False",
]
# Each run covers row-dependent parts (~20 s of CPU per process): drop path draws per-row randomness; SimDINOv2 draws
# block masks (on the 4x4 patch grid of the 16 px global crops) and computes one coding rate per group of consecutive
# rows of the global batch (loss.groups=2, the official reduce_cov=0: SimDINO's own grouped coding rate, which
# simdinov2_loss calls for the cls tokens); its pod reads the data through a grain worker process. DINOv2 with KoLeo
# on (koleo_weight 0.1) computes it per group of rows (dino.koleo_groups=2, DINOv2's per-GPU KoLeo), with iBOT's masks.
RUNS = {
  "simdinov2": ["--config.method=simdinov2", "--config.loss.groups=2"],
  "dinov2": [
    "--config.method=dinov2",
    "--config.dino.koleo_weight=0.1",
    "--config.dino.koleo_groups=2",
    "--config.head.num_prototypes=64",
  ],
}
POD_EXTRA = {"simdinov2": ["--config.data.num_workers=1"], "dinov2": []}  # the output does not depend on the workers
IGNORED = {"steps_per_sec", "images_per_sec"}  # wall-clock rates


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{(method, processes): workdir}. The one-process references run beside the pods (a pod's processes wait on each
  other anyway), one pod at a time (two pod processes at most)."""
  base = tmp_path_factory.mktemp("multihost_train")

  def start(method, processes):
    workdir, logs = base / f"{method}_{processes}p", base / f"{method}_{processes}p_logs"
    argv = [*COMMON, f"--workdir={workdir}", *RUNS[method], *(POD_EXTRA[method] if processes > 1 else [])]
    return workdir, logs, pod.start(argv, logs, processes, 2 // processes)  # two devices in all

  def finish(method, processes, started):
    _, logs, procs = started
    pod.finish(procs, logs, what=f"{method} training on {processes} process(es)")

  started = {(method, 1): start(method, 1) for method in RUNS}
  for method in RUNS:
    started[method, 2] = start(method, 2)
    finish(method, 2, started[method, 2])
  for method in RUNS:
    finish(method, 1, started[method, 1])
  return {key: workdir for key, (workdir, _, _) in started.items()}


def _records(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("method", list(RUNS))
def test_pod_trains_as_one_process(runs, method):
  """Every logged metric of every step and the final parameters equal one process's, bitwise: each device runs the
  same per-device program on the same rows in both layouts, and every cross-device sum has two terms, which add the
  same in either order (before the fix: the module docstring's numbers)."""
  one, two = _records(runs[method, 1]), _records(runs[method, 2])
  assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
  for a, b in zip(one, two):
    assert set(a) == set(b)
    for key in set(a) - IGNORED:
      assert math.isfinite(a[key]), (method, a["step"], key)
      assert b[key] == a[key], f"{method} step {a['step']} {key}: {a[key]} on one process, {b[key]} on the pod"
  for which in ("student", "teacher"):
    p1, step1, _ = restore.restore_params(str(runs[method, 1]), which=which, with_head=True)
    p2, step2, _ = restore.restore_params(str(runs[method, 2]), which=which, with_head=True)
    assert step1 == step2 == 3 and set(p1) == set(p2)
    for name in p1:
      np.testing.assert_array_equal(p2[name], p1[name], err_msg=f"{method} {which} {name}")


ROWS_CHECK = """
import jax, numpy as np
from jax.experimental import multihost_utils
from simdino_jax import sharding
from simdino_jax.train.trainer import process_batch_rows
sharding.maybe_initialize_distributed()
for devices in (jax.devices(), sorted(jax.devices(), key=lambda d: -d.process_index)):  # the second: process 1 first
  batch_sharding = sharding.batch_sharding(sharding.make_mesh((('data', -1),), devices))
  rows = process_batch_rows(batch_sharding, 8)
  local = {'x': rows.astype(np.int32)}  # each local row holds the global row it is meant for
  gathered = multihost_utils.process_allgather(sharding.to_global(local, batch_sharding)['x'], tiled=True)
  assert gathered.tolist() == list(range(8)), (jax.process_index(), rows, gathered)
  print(jax.process_index(), [d.process_index for d in devices], rows.tolist(), flush=True)
"""


def test_process_rows_land_in_one_process_order(tmp_path):
  # The trainer feeds each process the rows its devices hold (trainer.process_batch_rows): on a 2 x 2 pod the global
  # batch array is rows 0..7 in order whether the mesh lists process 0's devices first (the default, as in the
  # training runs above) or process 1's (where the process index alone would put each process's rows in the wrong
  # place).
  procs = pod.start(["-c", ROWS_CHECK], tmp_path, 2, 2)
  pod.finish(procs, tmp_path, what="row placement check")
  logs = pod.log_tails(tmp_path, 2)
  assert "0 [0, 0, 1, 1] [0, 1, 2, 3]" in logs and "0 [1, 1, 0, 0] [4, 5, 6, 7]" in logs, logs
