"""Shared fixtures: a tiny config that trains in seconds on CPU; one XLA compilation cache for the session."""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Many tests train the same tiny config (in-process, or through the CLI in subprocesses, which inherit this
# environment), so a persistent cache shared by the whole session compiles each program once. A fresh directory per
# session: nothing carries over between runs. Set before any test module imports jax (jax reads it at import).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="simdino_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


# The suite's programs are tiny and run a few steps each, so XLA's compile time dominates it. SUITE_XLA_FLAGS cut a
# compilation's CPU: without LLVM's optimisation passes ~40% less (a step ~1.75x more); with XLA:CPU's former
# (non-MLIR) fusion emitters another ~55% (tiny SimDINO / DINO train steps: 4.4 -> 2.0 s and 4.9 -> 2.1 s of CPU, the
# step itself 11 vs 13 ms; benchmarks are not timed here). Subprocesses inherit them, those with a device count of
# their own through tests/pod.py's env(); test_demo.py alone runs XLA's defaults, as a user. The suite passes either
# way (SIMDINO_TEST_XLA_OPT=1 keeps XLA's defaults). Set before jax is imported.
SUITE_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
if os.environ.get("SIMDINO_TEST_XLA_OPT") != "1":
  _flags = os.environ.get("XLA_FLAGS", "").split()
  _names = {f.split("=")[0] for f in _flags}
  os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in SUITE_XLA_FLAGS if f.split("=")[0] not in _names])


def make_tiny_config():
  from simdino_jax import config as config_lib

  c = config_lib.base_config()
  c.method = "simdino"
  c.batch_size = 8
  c.total_steps = 4
  c.warmup_steps = 1
  c.log_every = 1
  c.data.source = "digits"
  c.data.num_global, c.data.num_local = 2, 2
  c.data.global_size, c.data.local_size = 16, 8
  c.model.variant = "mu/4"
  c.model.embed_dim, c.model.depth, c.model.num_heads = 32, 2, 2
  c.model.img_size = 16
  c.model.drop_path_rate = 0.1
  c.head.hidden_dim, c.head.out_dim, c.head.num_layers = 64, 16, 3
  c.loss.eps = 0.5
  c.optim.lr, c.optim.lr_scaling = 1e-3, "none"
  c.eval.batch_size = 64
  return c


def checkpoint_at_init(config, workdir):
  """Builds ``config``'s network at initialisation and commits it as the checkpoint of step 0 in ``workdir`` (what
  the evaluator tests evaluate); returns (trainer, state)."""
  from simdino_jax.io import checkpointing
  from simdino_jax.train import trainer

  tr = trainer.Trainer(config, workdir)
  state = tr.init_state()
  with tr.checkpointer() as ckpt:
    ckpt.save(0, state, checkpointing.config_dict(config))
    ckpt.wait()
  return tr, state


@pytest.fixture
def tiny_config():
  return make_tiny_config()
