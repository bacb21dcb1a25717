r"""Compiled cost of a recipe's train step without running it: XLA's memory and FLOP analysis of the jitted step
(train/setup.py make_step, the program training runs), on whatever backend this process has (a CPU will do).

  python benchmarks/accumulation_cost.py [--config configs/simdino_vitb16_in1k_1gpu.py] [--set FIELD=VALUE ...] \
      [--peak_tflops 989] [--mfu 0.4]

Two programs are compiled from abstract shapes (no parameter is initialised, no batch drawn): the recipe's step
(with its ``accumulation_steps`` K: its memory) and the plain step at the micro-batch (batch_size / K, K = 1: its
FLOPs; XLA's cost analysis counts a loop body once, so the accumulated program's own figure would be one
micro-batch's). Prints one JSON line: the state's bytes and parameter count, the step's argument / output / alias /
temporary bytes and their peak (arguments + outputs - aliased + temporaries), the FLOPs per micro-batch, per image
and per step (K x the micro-batch's; "exact" mode adds one student forward, not included), and the step time /
images per second / run time those FLOPs give at ``--mfu`` of ``--peak_tflops``. Everything is ESTIMATED FROM THE
COMPILED PROGRAM: the memory is the compiling backend's buffer assignment (a GPU's differs), the time assumes the
MFU. Lower XLA's LLVM optimisation (XLA_FLAGS=--xla_backend_optimization_level=0) to compile faster on a CPU: the
HLO passes, the buffer assignment and the cost analysis do not depend on it.
"""

from __future__ import annotations

import ast
import json
import os
import runpy
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

_CONFIG = flags.DEFINE_string(
  "config", os.path.join(ROOT, "configs", "simdino_vitb16_in1k_1gpu.py"), "Recipe file (get_config)."
)
_SET = flags.DEFINE_multi_string("set", [], "Config override FIELD=VALUE (Python literal for non-strings).")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 1_281_167, "Training examples (ImageNet-1k's): the schedules' length.")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "Peak TFLOP/s of the GPU (H100 SXM dense bfloat16: 989).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Assumed model FLOP utilisation for the time estimate.")


def load_config(path: str, overrides):
  config = runpy.run_path(path)["get_config"]()
  for item in overrides:
    field, value = item.split("=", 1)
    node = config
    *parents, last = field.split(".")
    for name in parents:
      node = node[name]
    node[last] = value if isinstance(node[last], str) else ast.literal_eval(value)
  return config


def abstract_batch(config):
  import jax
  import jax.numpy as jnp

  from simdino_jax import methods

  d, b = config.data, config.batch_size
  batch = {
    "global": jax.ShapeDtypeStruct((b, d.num_global, d.global_size, d.global_size, 3), jnp.float32),
    "local": jax.ShapeDtypeStruct((b, d.num_local, d.local_size, d.local_size, 3), jnp.float32),
  }
  if methods.get_method(config.method).uses_masks:
    batch["mask"] = jax.ShapeDtypeStruct((b, d.num_global, methods.num_patches(config)), jnp.bool_)
  return batch


def compiled_step(config, num_train: int):
  import jax

  from simdino_jax import config as config_lib
  from simdino_jax import sharding
  from simdino_jax.train import setup as setup_lib

  config_lib.validate(config, num_devices=jax.device_count())
  setup = setup_lib.build(config, num_train)
  mesh = sharding.make_mesh(config.mesh)
  step = setup_lib.make_step(setup, mesh)
  return setup, step.lower(setup.abstract_state, abstract_batch(config)).compile()


def main(argv):
  del argv
  import jax
  import numpy as np

  config = load_config(_CONFIG.value, _SET.value)
  k = config.get("accumulation_steps", 1)
  t0 = time.time()
  setup, compiled = compiled_step(config, _NUM_TRAIN.value)
  mem = compiled.memory_analysis()
  whole = compiled.cost_analysis()
  whole = whole[0] if isinstance(whole, (list, tuple)) else whole
  compile_s = time.time() - t0

  micro = config.copy_and_resolve_references()
  micro.batch_size, micro.accumulation_steps = config.batch_size // k, 1
  _, micro_compiled = compiled_step(micro, _NUM_TRAIN.value)
  analysis = micro_compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  flops_micro = float(analysis["flops"]) * jax.device_count()

  leaves = jax.tree_util.tree_leaves(setup.abstract_state)
  state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
  student = jax.tree_util.tree_leaves(setup.abstract_state.student)
  steps_total = setup.durations.total_steps
  flops_step = flops_micro * k
  step_s = flops_step / (_PEAK.value * 1e12 * _MFU.value)
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  gb = 1e9
  print(
    json.dumps(
      dict(
        config=os.path.relpath(_CONFIG.value, ROOT),
        overrides=list(_SET.value),
        batch_size=config.batch_size,
        accumulation_steps=k,
        accumulation_mode=config.get("accumulation_mode", "micro"),
        micro_batch=config.batch_size // k,
        model_dtype=config.model.dtype,
        student_parameters=int(sum(int(np.prod(x.shape)) for x in student)),
        state_gb=round(state_bytes / gb, 3),
        argument_gb=round(mem.argument_size_in_bytes / gb, 3),
        output_gb=round(mem.output_size_in_bytes / gb, 3),
        alias_gb=round(mem.alias_size_in_bytes / gb, 3),
        temp_gb=round(mem.temp_size_in_bytes / gb, 3),
        peak_gb=round(peak / gb, 3),
        flops_per_micro_batch=flops_micro,
        flops_per_image=flops_micro / (config.batch_size // k),
        flops_per_step=flops_step,
        flops_accumulated_program=float(whole["flops"]) * jax.device_count(),  # its loop body counted once
        assumed=dict(peak_tflops=_PEAK.value, mfu=_MFU.value),
        step_s=round(step_s, 3),
        images_per_s=round(config.batch_size / step_s, 1),
        run_hours=round(step_s * steps_total / 3600, 1),
        total_steps=steps_total,
        backend=jax.default_backend(),
        compile_s=round(compile_s, 1),
        jax=jax.__version__,
        note="estimated from the compiled program, not measured on a GPU",
      )
    )
  )


if __name__ == "__main__":
  app.run(main)
