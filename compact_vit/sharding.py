"""Device mesh and shardings: data parallel by default, FSDP and tensor parallelism by rules.

`config.mesh` maps the axis names `data`, `fsdp` and `model` to sizes (one may be -1: the rest of the
devices), e.g. {'data': -1, 'fsdp': 1, 'model': 1} (data parallel, the default) or
{'data': 2, 'fsdp': -1, 'model': 1} (FSDP within groups, data parallel across them).

* The batch is split over `data` x `fsdp` (leading dimension).
* Every leaf of the train state (parameters, optimizer moments, EMA) gets a PartitionSpec from its
  path ('params/blocks_0/attn/qkv/kernel', 'opt_state/1/0/mu/blocks_0/attn/qkv/kernel', ...):
  1. `model` (tensor parallel, Megatron-style): the first of `rules` whose regex matches the path
     names per-dimension axes, e.g. qkv/fc1 kernels split their output features, proj/fc2 their
     input features. Applied only where the dimension is divisible by the axis size.
  2. `fsdp`: the largest remaining dimension of every leaf with ndim >= 2 that the fsdp size
     divides is split over `fsdp` (ZeRO-3 style: XLA all-gathers a weight where it is used and
     reduce-scatters its gradient). 1-D leaves (biases, norms) and scalars stay replicated.
  Axes of size 1 are left out, so with the default mesh everything is replicated.
Optimizer moments have the parameters' paths as suffixes, so they follow their parameters.

BatchNorm statistics computed inside a jit over a batch sharded on the mesh are global-batch
statistics: the compiler inserts the cross-device reductions, so BatchNorm is synchronised.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from compact_vit.errors import UserError

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# (path regex, axis per dimension): tensor-parallel splits of the transformer blocks' matmuls.
# Names follow compact_vit/nn/layers.py (timm's naming), so every ViT-like family matches.
DEFAULT_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"attn/qkv/kernel$", (None, "model")),
    (r"attn/qkv/bias$", ("model",)),
    (r"attn/proj/kernel$", ("model", None)),
    (r"mlp/fc1/kernel$", (None, "model")),
    (r"mlp/fc1/bias$", ("model",)),
    (r"mlp/fc2/kernel$", ("model", None)),
)


def make_mesh(mesh_cfg: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
  """Builds a mesh from {axis name: size}; one size may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  names = tuple(mesh_cfg.keys())
  unknown = sorted(set(names) - set(AXES))
  if unknown:
    raise UserError(f"config.mesh {dict(mesh_cfg)}: unknown axes {unknown}; use {', '.join(AXES)}.")
  sizes = [int(s) for s in mesh_cfg.values()]
  if sizes.count(-1) > 1:
    raise UserError(f"config.mesh {dict(mesh_cfg)}: at most one axis may be -1.")
  if any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"config.mesh {dict(mesh_cfg)}: sizes must be positive or -1.")
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


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch is split (the product of the batch axes' sizes)."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, what: str = "batch_size",
                     grad_accum: int = 1) -> None:
  """Fails early when the global batch cannot be split evenly over devices, processes and
  accumulation steps."""
  shards = batch_shards(mesh) * grad_accum
  if batch_size % shards or batch_size % jax.process_count():
    accum = f" x {grad_accum} accumulation steps" if grad_accum > 1 else ""
    raise UserError(
        f"config.{what}={batch_size} is not divisible by the {batch_shards(mesh)} data-parallel "
        f"devices{accum} ({jax.process_count()} processes); set --config.{what} to a multiple of "
        f"{shards}.")


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Process-local numpy batch → global jax.Arrays sharded over the batch axes."""
  sharding = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def path_str(path) -> str:
  """A key path as 'a/b/0/c' (dict keys, attributes and sequence indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def spec_for(path: str, shape: Sequence[int], mesh: jax.sharding.Mesh,
             rules: Sequence[tuple[str, Sequence[str | None]]] = DEFAULT_RULES) -> P:
  """The PartitionSpec of one leaf: `rules` for the `model` axis, then the largest free dimension
  that the `fsdp` size divides (ndim >= 2 only). Axes of size 1 or absent are never used."""
  sizes = dict(mesh.shape)
  axes: list[str | None] = [None] * len(shape)
  for pattern, dims in rules:
    if re.search(pattern, path):
      if len(dims) == len(shape):
        for i, axis in enumerate(dims):
          if axis and sizes.get(axis, 1) > 1 and shape[i] % sizes[axis] == 0:
            axes[i] = axis
      break
  fsdp = sizes.get("fsdp", 1)
  if fsdp > 1 and len(shape) >= 2:
    free = [i for i in range(len(shape)) if axes[i] is None and shape[i] % fsdp == 0]
    if free:
      axes[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
  while axes and axes[-1] is None:
    axes.pop()
  return P(*axes)


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, Sequence[str | None]]] = DEFAULT_RULES) -> Any:
  """NamedShardings for every leaf of the train state (see the module docstring)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, spec_for(path_str(path), np.shape(leaf), mesh, rules)),
      abstract_state)


def rules_from_config(config) -> tuple[tuple[str, tuple[str | None, ...]], ...]:
  """`config.sharding_rules` ([regex, [axis or None per dim]] pairs) if set, else DEFAULT_RULES."""
  rules = config.sharding_rules
  if not rules:
    return DEFAULT_RULES
  out = []
  for rule in rules:
    pattern, dims = rule
    bad = [a for a in dims if a not in (None, "model")]
    if bad:
      raise UserError(f"config.sharding_rules: {rule} names axes {bad}; rules may use 'model' "
                      "(fsdp is applied automatically to the largest free dimension).")
    out.append((str(pattern), tuple(dims)))
  return tuple(out)


def per_device_bytes(tree: Any) -> int:
  """Bytes of one device's shards of a tree of jax.Arrays (device 0's share; even splits)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard_shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard_shape) * leaf.dtype.itemsize
  return total
