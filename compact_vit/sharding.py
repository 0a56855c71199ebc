"""Device mesh and shardings: data parallel by default (batch over `data`, state replicated).

BatchNorm statistics computed inside a jit over a batch sharded on the mesh are global-batch
statistics: the compiler inserts the cross-device reductions, so BatchNorm is synchronised.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from compact_vit.errors import UserError

BATCH_AXES = ("data",)


def make_mesh(mesh_cfg: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
  """Builds a mesh from {axis name: size}; one size may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  names = tuple(mesh_cfg.keys())
  sizes = [int(s) for s in mesh_cfg.values()]
  if sizes.count(-1) > 1:
    raise UserError(f"config.mesh {dict(mesh_cfg)}: at most one axis may be -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise UserError(f"config.mesh {dict(mesh_cfg)} does not divide the {len(devices)} devices.")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise UserError(f"config.mesh {dict(mesh_cfg)} needs {math.prod(sizes)} devices, "
                    f"but {len(devices)} are available; set one axis to -1.")
  return jax.make_mesh(tuple(sizes), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=devices)


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
  return tuple(a for a in mesh.axis_names if a in BATCH_AXES)


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, what: str = "batch_size") -> None:
  """Fails early when the global batch cannot be split evenly over devices and processes."""
  shards = math.prod(mesh.shape[a] for a in batch_axes(mesh))
  if batch_size % shards or batch_size % jax.process_count():
    raise UserError(
        f"config.{what}={batch_size} is not divisible by the {shards} data-parallel devices "
        f"({jax.process_count()} processes); set --config.{what} to a multiple of {shards}.")


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Process-local numpy batch → global jax.Arrays sharded over the batch axes."""
  sharding = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh) -> Any:
  """Shardings for the train state: replicated (data parallel)."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)
