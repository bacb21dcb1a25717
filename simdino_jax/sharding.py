"""Device mesh from the config, the shardings the trainer places arrays with, and the multi-host start-up.

Batches are split along their leading (batch) axis over EVERY mesh axis: "data" and "fsdp" both act as data
parallelism for activations. Parameters, the teacher and the optimizer state get a sharding per leaf from
``config.sharding.rules``, a list of ``(regex, rule)`` pairs matched against the leaf's name as
``simdino_jax.tree.path_str`` writes it (``student/backbone/blocks/0/attn/qkv/kernel``,
``opt_state/1/mu/backbone/pos_embed``, ``step``, ``rng``); the first regex that matches the WHOLE name
(``re.fullmatch``) wins, and a leaf no regex matches is replicated. Rules:

  "replicate"  a full copy on every device.
  "fsdp"       split along the leaf's largest axis that the size of the mesh axis "fsdp" divides, when the leaf
               has at least ``config.sharding.fsdp_min_size`` elements (smaller leaves, scalars and leaves with
               no such axis are replicated). Without an "fsdp" mesh axis (or with size 1) this is "replicate".

The default, ``((".*", "fsdp"),)``, therefore replicates everything on the default mesh ``(("data", -1),)`` and
shards every big leaf once the mesh has an "fsdp" axis, e.g. ``(("data", -1), ("fsdp", 2))``. The step is the
same program either way: XLA gathers a sharded parameter where it is used and reduces its gradient back onto the
shards. Which operand XLA gathers is its cost model's choice: with tiny per-device batches (a few rows per device,
e.g. the heads' cls rows) it may gather the activations over the "fsdp" axis instead of the weight; at realistic
sizes only parameters are gathered (tests/test_sharding.py checks the compiled step).

On a data-only mesh with replicated parameters the compiled step holds all-reduces only, as long as the losses
reduce over the batch: the coding rate's and the collapse monitor's "rows x rows" Gram forms (taken when the
per-group batch is smaller than the feature dimension) all-gather their (small) feature matrix.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from simdino_jax.errors import ConfigError, SimdinoError
from simdino_jax.tree import path_str

RULES = ("replicate", "fsdp")
FSDP_AXIS = "fsdp"
MESH_AXES = ("data", FSDP_AXIS)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with the named axes; one size may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(name for name, _ in axes)
  sizes = [size for _, size in axes]
  fixed = math.prod(s for s in sizes if s != -1)
  sizes = [len(devices) // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ConfigError(f"config.mesh: axes {list(axes)} give {math.prod(sizes)} devices, have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over all mesh axes (data parallel), the rest replicated."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_global(batch: dict, sharding: NamedSharding) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded over the batch axis (multi-process safe)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


# -- parameter / optimizer-state shardings ---------------------------------------------------------------------


def compile_rules(rules: Sequence[Sequence[str]]) -> list[tuple[re.Pattern, str]]:
  """[(compiled regex, rule)]; ConfigError (naming config.sharding.rules) for a malformed pair, a regex that does
  not compile or an unknown rule name."""
  compiled = []
  for i, pair in enumerate(rules):
    if isinstance(pair, str) or len(pair) != 2:
      raise ConfigError(f"config.sharding.rules[{i}]: expected a (regex, rule) pair, got {pair!r}")
    pattern, rule = pair
    if rule not in RULES:
      raise ConfigError(f"config.sharding.rules[{i}]: unknown rule {rule!r} for {pattern!r}; choose one of {RULES}")
    try:
      compiled.append((re.compile(pattern), rule))
    except (re.error, TypeError) as e:
      raise ConfigError(f"config.sharding.rules[{i}]: regex {pattern!r} does not compile ({e})") from None
  return compiled


def fsdp_spec(shape: Sequence[int], axis_size: int, min_size: int, axis_name: str = FSDP_AXIS) -> P:
  """P() or the spec splitting the largest axis (the last of equal ones) that ``axis_size`` divides."""
  if axis_size <= 1 or math.prod(shape) < min_size:
    return P()
  candidates = [(size, i) for i, size in enumerate(shape) if size % axis_size == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  return P(*([None] * axis + [axis_name]))


def leaf_spec(name: str, shape: Sequence[int], rules: list[tuple[re.Pattern, str]], axis_size: int, min_size: int) -> P:
  """The PartitionSpec of one leaf: the first rule whose regex matches the whole name; none: replicated."""
  for pattern, rule in rules:
    if pattern.fullmatch(name):
      if rule == "fsdp":
        return fsdp_spec(shape, axis_size, min_size)
      return P()
  return P()


def infer_shardings(
  abstract_tree: Any, mesh: Mesh, rules: Sequence[Sequence[str]], *, fsdp_min_size: int = 2**16
) -> Any:
  """A NamedSharding per leaf of ``abstract_tree`` (arrays or ``jax.ShapeDtypeStruct``, e.g. from
  ``jax.eval_shape``), from ``rules`` (see the module docstring)."""
  compiled = compile_rules(rules)
  axis_size = dict(mesh.shape).get(FSDP_AXIS, 1)
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: NamedSharding(
      mesh, leaf_spec(path_str(path), np.shape(leaf), compiled, axis_size, fsdp_min_size)
    ),
    abstract_tree,
  )


def state_shardings(abstract_state: Any, mesh: Mesh, config) -> Any:
  """``infer_shardings`` with ``config.sharding`` (rules, fsdp_min_size)."""
  return infer_shardings(
    abstract_state, mesh, [tuple(r) for r in config.sharding.rules], fsdp_min_size=config.sharding.fsdp_min_size
  )


def describe(shardings: Any, abstract_tree: Any) -> dict[str, str]:
  """{leaf name: 'shape spec'} for the leaves that are not replicated (for logs)."""
  out = {}
  for (path, s), leaf in zip(
    jax.tree_util.tree_flatten_with_path(shardings)[0], jax.tree_util.tree_leaves(abstract_tree)
  ):
    if any(a is not None for a in s.spec):
      out[path_str(path)] = f"{tuple(np.shape(leaf))} {tuple(s.spec)}"
  return out


def is_sharded(s: NamedSharding) -> bool:
  return any(a is not None for a in s.spec)


def cast_sharded(tree: Any, shardings: Any, dtype) -> Any:
  """Floating leaves of ``tree`` that ``shardings`` splits over a mesh axis, cast to ``dtype`` while still split.

  Mixed precision with fsdp: the network computes in bfloat16 but the parameters are float32 shards; casting each
  shard before XLA gathers it where it is used halves the all-gather traffic (the constraint keeps the cast on the
  shards, so the gather moves ``dtype``). Replicated leaves are left as they are (nothing to gather; the network
  casts them itself). Differentiable: the gradient flows back to the float32 leaf."""

  def cast(x, s):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype or not is_sharded(s):
      return x
    return jax.lax.with_sharding_constraint(x.astype(dtype), s)

  return jax.tree_util.tree_map(cast, tree, shardings)


# -- multi-host start-up ---------------------------------------------------------------------------------------


def _int_env(name: str, default: int = 0) -> int:
  try:
    return int(os.environ.get(name, default))
  except ValueError:
    return default


def _tpu_hosts() -> int:
  """Number of hosts of this TPU slice as far as the environment tells (0: not a TPU VM or unknown)."""
  for var in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):  # GKE, and set by some launchers on TPU VMs
    if os.environ.get(var):
      return len([h for h in os.environ[var].split(",") if h.strip()])
  # A Cloud TPU VM (Google PCI devices): ask the metadata server for the slice's workers.
  if os.environ.get("TPU_SKIP_MDS_QUERY") is not None:
    return 0
  try:
    import glob

    google = [p for p in glob.glob("/sys/bus/pci/devices/*/vendor") if open(p).read().strip() == "0x1ae0"]
  except OSError:
    return 0
  if not google:
    return 0
  try:
    import urllib.request

    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    req = urllib.request.Request(
      f"http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints",
      headers={"Metadata-Flavor": "Google"},
    )
    with urllib.request.urlopen(req, timeout=5) as r:
      return len([w for w in r.read().decode().split(",") if w.strip()])
  except Exception:  # pylint: disable=broad-except  (no metadata server: a single host, as far as we can tell)
    return 0


# What jax's SlurmCluster needs (the coordinator is the step's first node, its port derived from SLURM_JOB_ID).
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _launcher_runs_one_process_per_host() -> bool:
  """Whether Open MPI or SLURM started one process per host (launch/slurm.sbatch's layout). JAX assumes one process
  per GPU under both and shows each process only the GPU numbered by its local rank; checked in JAX's order."""
  if "OMPI_MCA_orte_hnp_uri" in os.environ:
    return _int_env("OMPI_COMM_WORLD_LOCAL_SIZE") == 1
  if all(v in os.environ for v in _SLURM_VARS):
    nodes = _int_env("SLURM_STEP_NUM_NODES") or _int_env("SLURM_NNODES")
    return nodes > 0 and _int_env("SLURM_NTASKS") == nodes
  return False


def distributed_environment() -> str | None:
  """Which multi-process launcher this process runs under ("coordinator", "slurm", "openmpi", "tpu"), or None
  on a single host. ``SIMDINO_DISTRIBUTED=0`` forces None, ``=1`` forces "forced" (JAX detects the cluster;
  ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` are passed on when set)."""
  forced = os.environ.get("SIMDINO_DISTRIBUTED", "").strip().lower()
  if forced in ("0", "false", "no"):
    return None
  if forced in ("1", "true", "yes"):
    return "forced"
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "coordinator"
  if all(v in os.environ for v in _SLURM_VARS) and _int_env("SLURM_NTASKS") > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in os.environ and _int_env("OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS") or _tpu_hosts() > 1:
    return "tpu"
  return None


class DistributedSetupError(SimdinoError, RuntimeError):
  """The multi-process environment is incomplete or wrong (a JAX_* variable missing or out of range, a coordinator
  that cannot be reached); the message names the variable."""


_POD_HINT = (
  "set JAX_COORDINATOR_ADDRESS=HOST:PORT (process 0's host), JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=0..N-1 (one per "
  "process) on every process, or none of them for a single process (docs/distributed.md)"
)


def _pod_variables() -> dict:
  """{"num_processes", "process_id"} from JAX_NUM_PROCESSES / JAX_PROCESS_ID where set; DistributedSetupError
  naming the variable when one is not an integer in range (a silent 0 would start two processes 0)."""
  kwargs = {}
  for name, key, low in (("JAX_NUM_PROCESSES", "num_processes", 1), ("JAX_PROCESS_ID", "process_id", 0)):
    if name not in os.environ:
      continue
    text = os.environ[name]
    try:
      kwargs[key] = int(text)
    except ValueError:
      raise DistributedSetupError(f"{name}={text!r} is not an integer; {_POD_HINT}") from None
    if kwargs[key] < low:
      raise DistributedSetupError(f"{name}={text} must be >= {low}; {_POD_HINT}")
  n, k = kwargs.get("num_processes"), kwargs.get("process_id")
  if n is not None and k is not None and k >= n:
    raise DistributedSetupError(f"JAX_PROCESS_ID={k} must be below JAX_NUM_PROCESSES={n}; {_POD_HINT}")
  return kwargs


def maybe_initialize_distributed() -> bool:
  """Call ``jax.distributed.initialize()`` when this process is one of several (TPU pod slice, SLURM with more
  than one task, Open MPI, or ``JAX_COORDINATOR_ADDRESS`` set, with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` when
  no launcher provides them); a no-op on a single host. Returns whether it initialised.

  Must run before anything touches the devices (first thing in ``main``). Also turns on
  ``jax_threefry_partitionable`` so that random numbers (parameter init, drop path) do not depend on how the
  arrays are sharded, and a sharded initialisation equals the single-device one.

  A missing or malformed ``JAX_*`` variable, or a coordinator that cannot be joined, raises DistributedSetupError
  (one line naming the variable) instead of JAX's traceback: the entry points print it and exit 1.
  """
  jax.config.update("jax_threefry_partitionable", True)
  env = distributed_environment()
  if env is None or jax.distributed.is_initialized():
    return False
  kwargs = _pod_variables() if env in ("coordinator", "forced") else {}
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except  (JAX's ValueError / XlaRuntimeError: one line instead)
    text = " ".join(str(e).split())
    if "Number of processes must be defined" in text:
      raise DistributedSetupError(f"JAX_NUM_PROCESSES is not set (JAX_COORDINATOR_ADDRESS is); {_POD_HINT}") from None
    if "process id of the current process must be defined" in text:
      raise DistributedSetupError(f"JAX_PROCESS_ID is not set (JAX_COORDINATOR_ADDRESS is); {_POD_HINT}") from None
    where = f"JAX_COORDINATOR_ADDRESS={os.environ['JAX_COORDINATOR_ADDRESS']}" if env == "coordinator" else env
    raise DistributedSetupError(f"could not join the multi-process run ({where}): {text[:300]}") from None
  if "JAX_LOCAL_DEVICE_IDS" not in os.environ and _launcher_runs_one_process_per_host():
    # One process per host trains on all the host's GPUs, not only the one of its local rank (0).
    jax.config.update("jax_cuda_visible_devices", "all")
    jax.config.update("jax_rocm_visible_devices", "all")
  return True


def process_0_says(key: str, message: str = "", timeout_s: float = 600) -> str:
  """Process 0's ``message`` on every process of a multi-process run (the others pass anything and block until
  process 0 has spoken, at most ``timeout_s``); ``message`` itself on a single process.

  Through the coordination service's key-value store, not an XLA collective: nothing is compiled, so a decision
  such as the workdir lock's reaches every process before any program is built. Each ``key`` is said once per run.
  """
  if jax.process_count() == 1:
    return message
  from jax._src import distributed  # pylint: disable=g-import-not-at-top  (the client jax.distributed started)

  client = distributed.global_state.client
  key = f"simdino_jax/{key}"
  if jax.process_index() == 0:
    client.key_value_set(key, message)
    return message
  return client.blocking_key_value_get(key, int(timeout_s * 1000))
