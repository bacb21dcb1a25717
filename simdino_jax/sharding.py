"""Device mesh from the config and the shardings the trainer places arrays with.

Batches are sharded over every mesh axis along their leading (batch) axis; parameters and optimizer state are
replicated (fully-sharded parameters come with the scale-out work).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with the named axes; one size may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(name for name, _ in axes)
  sizes = [size for _, size in axes]
  fixed = math.prod(s for s in sizes if s != -1)
  sizes = [len(devices) // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(f"config.mesh: axes {list(axes)} give {math.prod(sizes)} devices, have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over all mesh axes (data parallel), the rest replicated."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_global(batch: dict, sharding: NamedSharding) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded over the batch axis (multi-process safe)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
