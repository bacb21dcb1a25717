"""Evaluation figures do not depend on the number of processes (issue 26, item 7).

The same seeded tiny ViT is evaluated (k-NN, the frozen and DINO's linear protocols, few-shot, attention maps, linear
segmentation, DAVIS propagation, retrieval, MaskCut) by one process and by simulated 2-host pods: two python
processes on 127.0.0.1 joined by ``jax.distributed`` (the coordinator recipe of
``sharding.maybe_initialize_distributed``), one CPU device each, and once with two devices each listed in the mesh
last process first (tests/eval_pod_driver.py is one process). Every figure, the gathered features and the attention
arrays must equal the single process's.

Before the fix (process k fed the examples k, k + n, ... and the gathered features came back in another order) the
pod's figures differed; measured with this file's k-NN / linear / few-shot / attention part on the old
pipeline.eval_batches / runner.Context.extract (pod vs one process, both pod layouts alike): few-shot 5-shot 18.03 vs
24.18%, 1-shot 17.21 vs 15.57%, the frozen linear probe's lr 0.01 30.33 vs 31.15% (its best lr happened to agree),
gathered feature rows up to 0.36 apart, attention maps beside other images; k-NN and DINO's linear protocol (its
validation is order-free) agreed. Segmentation refused to run on several processes.
"""

import json
import os

import numpy as np
import pod
import pytest

from simdino_jax.data import sources

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, "eval_pod_driver.py")
IGNORED = {"seconds", "train_seconds", "val_seconds"}  # wall-clock times


def _start_pod(out_dir, data, names: str, mesh_order: str, processes: int, devices_per_process: int = 1) -> list:
  """Starts the driver as ``processes`` processes of one pod (``devices_per_process`` CPU devices each)."""
  return pod.start([DRIVER, str(out_dir), names, str(data), mesh_order], out_dir, processes, devices_per_process)


def _finish_pod(out_dir, procs, processes: int, devices_per_process: int = 1) -> dict:
  """Waits for a pod's processes; process 0's results.json (a failure shows each process's log tail)."""
  pod.finish(procs, out_dir, what=f"pod of {processes} process(es) x {devices_per_process} device(s)")
  with open(os.path.join(out_dir, "results.json")) as f:
    out = json.load(f)
  assert (out["processes"], out["devices"]) == (processes, processes * devices_per_process)
  return out["results"]


def _assert_same(a, b, where=""):
  """Equal JSON trees, floats to 1e-5 relative: float32 sums over a batch split across other devices differ in the
  last bits (a training loss by ~1e-7 relative), while one example scored differently moves an accuracy by 0.8 points
  (122 test images) and one pixel moves the mIoU by ~4e-4 relative."""
  if isinstance(a, dict):
    assert set(a) == set(b), where
    for k in a:
      if k not in IGNORED:
        _assert_same(a[k], b[k], f"{where}.{k}")
  elif isinstance(a, list):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_same(x, y, f"{where}[{i}]")
  elif isinstance(a, float):
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6), f"{where}: {a} on one process, {b} on the pod"
  else:
    assert a == b, f"{where}: {a!r} on one process, {b!r} on the pod"


# (processes, devices per process): the evaluators run, the mesh's device order. The reference and the pod of one
# device per process run every evaluator; the pod of two devices each (4 devices), for time, those that split a batch
# over the devices in their own way (few-shot and the frozen probe only read the shared features, compared row for
# row; retrieval and MaskCut are checked on the first pod), on a mesh listing process 1's devices first.
ALL = "knn,linear,linear_dino,fewshot,attention,segmentation,davis,retrieval,maskcut"
LAYOUTS = {
  (1, 1): (ALL, "default"),
  (2, 1): (ALL, "default"),
  (2, 2): ("knn,linear_dino,attention,segmentation,davis", "reversed"),  # process 1's devices first in the mesh
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{layout: (out_dir, results)}; the three runs go concurrently (the pods' processes wait on each other anyway)."""
  from test_davis import _write_davis
  from test_maskcut import _write_folder as _write_maskcut
  from test_retrieval import _write_folder as _write_retrieval
  from test_segmentation import _write_shapes

  data = tmp_path_factory.mktemp("data")
  _write_shapes(str(data / "shapes"), n_train=4, n_val=2, size=40)
  _write_davis(str(data / "DAVIS"), sequences=("alpha",))
  _write_retrieval(str(data / "retrieval"))
  _write_maskcut(str(data / "maskcut"))
  train, test = sources.load_digits("train"), sources.load_digits("test")
  n_train, n_test = 250, 122  # neither a multiple of the eval batch (64) nor of the processes: padding everywhere
  np.savez(
    data / "digits.npz",
    train_images=train.images[:n_train],
    train_labels=train.labels[:n_train],
    test_images=test.images[:n_test],
    test_labels=test.labels[:n_test],
  )
  dirs = {layout: tmp_path_factory.mktemp(f"pod{layout[0]}x{layout[1]}") for layout in LAYOUTS}
  started = {}
  try:
    for layout in LAYOUTS:
      started[layout] = _start_pod(dirs[layout], data, *LAYOUTS[layout], *layout)
  finally:  # a failed start still reaps the processes already running
    done = {layout: _finish_pod(dirs[layout], procs, *layout) for layout, procs in started.items()}
  return {layout: (dirs[layout], done[layout]) for layout in LAYOUTS}


@pytest.mark.parametrize("devices_per_process", [1, 2])
def test_two_process_pod_reports_the_single_process_figures(runs, devices_per_process):
  ref_dir, ref = runs[(1, 1)]
  pod_dir, pod = runs[(2, devices_per_process)]
  a, b = np.load(ref_dir / "features.npz"), np.load(pod_dir / "features.npz")
  for key in a.files:  # the gathered features in dataset order, row for row (same forward pass per example)
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_array_equal(b["train_labels"], a["train_labels"])
  attn_a = np.load(ref_dir / "eval" / "attention" / "attention.npz")
  attn_b = np.load(pod_dir / "eval" / "attention" / "attention.npz")
  for key in attn_a.files:  # each map beside its own image
    np.testing.assert_allclose(attn_b[key], attn_a[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert set(pod) == set(LAYOUTS[(2, devices_per_process)][0].split(","))
  _assert_same({name: ref[name] for name in pod}, pod)
