"""One process of a simulated evaluation pod, run by tests/test_eval_multiprocess.py (not a test itself).

``python tests/eval_pod_driver.py OUT_DIR NAME[,NAME...] DATA [default|reversed]``: joins the pod described by
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (none: a single process), builds the tiny
test ViT from a fixed seed (the same weights on every process, replicated), evaluates it on DATA/digits.npz (a slice
of ``digits``), DATA/shapes (a segmentation folder), DATA/DAVIS (a DAVIS-layout folder), DATA/retrieval and
DATA/maskcut, written by the test, with the evaluators ``NAME`` through ``runner.run_round`` (the path
``evaluate.py`` and the trainer take) and, on process 0, writes OUT_DIR/results.json (the evaluators' results),
OUT_DIR/features.npz (the shared "cls" features and labels of both splits, as every process gathered them) and the
evaluators' own files (attention arrays) under OUT_DIR/eval.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest (the tiny config), before jax starts

from conftest import make_tiny_config

from simdino_jax import sharding


def config_for(names, data):
  from simdino_jax import evals

  c = make_tiny_config()
  c.eval.batch_size = 64
  c.evals.knn = evals.declare("knn", ks=(5, 20))
  c.evals.linear = evals.declare(
    "linear", protocol="frozen", n_last_blocks=1, epochs=10, batch_size=32, lrs=(1e-2, 1e-1)
  )
  # DINO's protocol: fresh random views every epoch, shuffled training order, the batch split over every device.
  c.evals.linear_dino = evals.declare(
    "linear", protocol="dino", n_last_blocks=1, avgpool=True, epochs=2, batch_size=32, lrs=(0.3, 3.0)
  )
  c.evals.fewshot = evals.declare("fewshot", shots=(1, 5), fractions=(0.05,), num_splits=2)
  c.evals.attention = evals.declare("attention", num_images=5)
  # SyncBN-like batch statistics over the global batch, views split over the devices, window logits gathered.
  seg = dict(source=f"folder:{data}/shapes", num_classes=3, iterations=3, crop_size=32, batch_size=4, lr=0.01)
  c.evals.segmentation = evals.declare("segmentation", num_images=0, **seg)
  c.evals.davis = evals.declare("davis", data_dir=f"{data}/DAVIS", short_side=48, size_multiple=16, overlay_frames=0)
  c.evals.retrieval = evals.declare(
    "retrieval", dataset="folder", data_dir=f"{data}/retrieval", protocol="center_crop", image_size=16, batch_size=4
  )
  c.evals.maskcut = evals.declare(
    "maskcut", images=f"{data}/maskcut/images", annotations=f"{data}/maskcut/instances.json", image_size=32
  )
  c.evals.maskcut.update(num_pictures=0, batch_size=4, memory_gb=1.0)
  c.evals = {name: c.evals[name] for name in names}  # only what this run evaluates
  return c


def main(out_dir: str, names: list[str], data: str, mesh_order: str = "default") -> None:
  sharding.maybe_initialize_distributed()
  import jax
  import numpy as np
  from flax import nnx

  from simdino_jax import evals
  from simdino_jax.data import sources
  from simdino_jax.evals import runner
  from simdino_jax.models.network import build_backbone

  config = config_for(names, data)
  # One jitted initialisation (eagerly, every parameter's init would compile a program of its own).
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_backbone(config.model, rngs=nnx.Rngs(0))))
  state = jax.jit(lambda: nnx.split(build_backbone(config.model, rngs=nnx.Rngs(0)))[1])()
  # "reversed": the mesh lists the last process's devices first, so the batch rows of process k are not the k-th block
  # of the global batch (as a pod's device order may be): the gathered rows must still come back in dataset order.
  devices = jax.devices()[::-1] if mesh_order == "reversed" else jax.devices()
  mesh = sharding.make_mesh(config.mesh, devices)
  param_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  params = jax.tree.map(
    lambda v, s: jax.make_array_from_callback(np.shape(v), s, lambda index: np.asarray(v)[index]), state, param_sharding
  )
  digits = np.load(os.path.join(data, "digits.npz"))

  def source(split):
    return sources.ArraySource(digits[f"{split}_images"], digits[f"{split}_labels"], name=split, num_classes=10)

  ctx = runner.Context(
    config,
    graphdef=graphdef,
    param_sharding=param_sharding,
    mesh=mesh,
    train_source=source("train"),
    test_source=source("test"),
    out_dir=os.path.join(out_dir, "eval"),
  )
  results = runner.run_round(ctx, evals.build(config, names), params)
  feats = ctx.shared_features(params, (("cls",),))
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump({"processes": jax.process_count(), "devices": jax.device_count(), "results": results}, f, indent=1)
    np.savez(
      os.path.join(out_dir, "features.npz"),
      **{f"{split}_{k}": v for split, (f, y) in feats.items() for k, v in (("cls", f["cls"]), ("labels", y))},
    )


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2].split(","), *sys.argv[3:])
