"""AutoFormer search space on the host: sampling, mutation, crossover, cost limits.

An architecture is a JSON-friendly dict {embed_dim, depth, num_heads: [per layer], mlp_ratios:
[per layer]} (`compact_vit.models.autoformer.arch_arrays` turns it into the supernet's inputs).
Randomness comes from a `numpy.random.Generator`, so a search is a function of its seed and resumes
exactly from a saved generator state. Operators follow the authors' evolution.py.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping

import numpy as np

from compact_vit.errors import UserError
from compact_vit.models import autoformer
from compact_vit.models.autoformer import SearchSpace

Arch = dict[str, Any]


def arch_key(arch: Mapping[str, Any]) -> str:
  """Canonical string of an architecture (dictionary key, de-duplication)."""
  depth = int(arch["depth"])
  return json.dumps([int(arch["embed_dim"]), depth, [int(h) for h in arch["num_heads"][:depth]],
                     [float(r) for r in arch["mlp_ratios"][:depth]]])


def _choice(rng: np.random.Generator, values) -> Any:
  value = values[int(rng.integers(len(values)))]
  return value.item() if hasattr(value, "item") else value


def random_arch(space: SearchSpace, rng: np.random.Generator) -> Arch:
  """Uniform: a depth, then each layer's MLP ratio and heads, then one embed dim."""
  depth = int(_choice(rng, space.depths))
  return {"embed_dim": int(_choice(rng, space.embed_dims)), "depth": depth,
          "num_heads": [int(_choice(rng, space.num_heads)) for _ in range(depth)],
          "mlp_ratios": [float(_choice(rng, space.mlp_ratios)) for _ in range(depth)]}


def mutate(arch: Mapping[str, Any], space: SearchSpace, rng: np.random.Generator, *,
           layer_prob: float = 0.2, structure_prob: float = 0.4) -> Arch:
  """AutoFormer's mutation: with `structure_prob` a new depth (new layers drawn at random),
  each layer's MLP ratio and heads with `layer_prob`, with `structure_prob` a new embed dim."""
  depth = int(arch["depth"])
  ratios, heads = list(arch["mlp_ratios"][:depth]), list(arch["num_heads"][:depth])
  if rng.random() < structure_prob:
    new_depth = int(_choice(rng, space.depths))
    extra = max(new_depth - depth, 0)
    ratios = (ratios + [float(_choice(rng, space.mlp_ratios)) for _ in range(extra)])[:new_depth]
    heads = (heads + [int(_choice(rng, space.num_heads)) for _ in range(extra)])[:new_depth]
    depth = new_depth
  ratios = [float(_choice(rng, space.mlp_ratios)) if rng.random() < layer_prob else r
            for r in ratios]
  heads = [int(_choice(rng, space.num_heads)) if rng.random() < layer_prob else h for h in heads]
  embed = arch["embed_dim"]
  if rng.random() < structure_prob:
    embed = int(_choice(rng, space.embed_dims))
  return {"embed_dim": int(embed), "depth": depth, "num_heads": heads, "mlp_ratios": ratios}


def crossover(a: Mapping[str, Any], b: Mapping[str, Any], rng: np.random.Generator) -> Arch:
  """Each gene (embed dim, each layer's heads and MLP ratio) from either parent, which must
  have the same depth (the authors pair parents of equal length)."""
  if a["depth"] != b["depth"]:
    raise ValueError("crossover needs parents of the same depth")
  pick = lambda x, y: x if rng.random() < 0.5 else y  # noqa: E731
  depth = int(a["depth"])
  return {"embed_dim": int(pick(a["embed_dim"], b["embed_dim"])), "depth": depth,
          "num_heads": [int(pick(x, y)) for x, y in zip(a["num_heads"], b["num_heads"])],
          "mlp_ratios": [float(pick(x, y)) for x, y in zip(a["mlp_ratios"], b["mlp_ratios"])]}


@dataclasses.dataclass(frozen=True)
class Limits:
  """Parameter limits in millions (as the authors' --min-param-limits/--param-limits) and an
  optional GMACs limit; 0 means no limit."""
  min_params_m: float = 0.0
  max_params_m: float = 0.0
  max_gmacs: float = 0.0

  def allows(self, params: int, macs: int) -> bool:
    if self.max_params_m and params > self.max_params_m * 1e6:
      return False
    if self.max_gmacs and macs > self.max_gmacs * 1e9:
      return False
    return params >= self.min_params_m * 1e6


class Costs:
  """Parameters / MACs of subnets of one supernet, memoised by architecture."""

  def __init__(self, supernet: autoformer.AutoFormerSupernet):
    self.kwargs = dict(num_classes=supernet.num_classes, img_size=supernet.img_size,
                       patch_size=supernet.patch_size, head_dim=supernet.head_dim,
                       relative_position=supernet.relative_position,
                       max_relative_position=supernet.max_relative_position)
    self._memo: dict[str, tuple[int, int]] = {}

  def __call__(self, arch: Mapping[str, Any]) -> tuple[int, int]:
    key = arch_key(arch)
    if key not in self._memo:
      self._memo[key] = (autoformer.count_subnet_params(arch, **self.kwargs),
                         autoformer.count_subnet_macs(arch, **self.kwargs))
    return self._memo[key]


def _extreme(space: SearchSpace, pick: Callable) -> Arch:
  depth = pick(space.depths)
  return {"embed_dim": pick(space.embed_dims), "depth": depth,
          "num_heads": [pick(space.num_heads)] * depth,
          "mlp_ratios": [pick(space.mlp_ratios)] * depth}


def check_satisfiable(space: SearchSpace, limits: Limits, costs: Costs) -> None:
  """UserError before any work if no subnet of the space can meet `limits` (costs grow with every
  choice, so the smallest and largest subnets bound them)."""
  (lo_p, lo_m), (hi_p, hi_m) = costs(_extreme(space, min)), costs(_extreme(space, max))
  problems = []
  if limits.max_params_m and lo_p > limits.max_params_m * 1e6:
    problems.append(f"the smallest subnet has {lo_p / 1e6:.3f}M parameters, above "
                    f"max_params_m={limits.max_params_m}")
  if limits.min_params_m and hi_p < limits.min_params_m * 1e6:
    problems.append(f"the largest subnet has {hi_p / 1e6:.3f}M parameters, below "
                    f"min_params_m={limits.min_params_m}")
  if limits.max_gmacs and lo_m > limits.max_gmacs * 1e9:
    problems.append(f"the smallest subnet needs {lo_m / 1e9:.3f} GMACs, above "
                    f"max_gmacs={limits.max_gmacs}")
  if limits.max_params_m and limits.min_params_m > limits.max_params_m:
    problems.append(f"min_params_m={limits.min_params_m} > max_params_m={limits.max_params_m}")
  if problems:
    raise UserError("The search constraints cannot be met: " + "; ".join(problems) + ". This "
                    f"space spans {lo_p / 1e6:.3f}M-{hi_p / 1e6:.3f}M parameters and "
                    f"{lo_m / 1e9:.3f}-{hi_m / 1e9:.3f} GMACs; change --config.search.min_params_m"
                    " / max_params_m / max_gmacs.")


def sample_valid(space: SearchSpace, rng: np.random.Generator, limits: Limits, costs: Costs,
                 *, max_tries: int = 10000) -> Arch:
  """A random architecture within `limits` (rejection sampling)."""
  for _ in range(max_tries):
    arch = random_arch(space, rng)
    if limits.allows(*costs(arch)):
      return arch
  raise UserError(f"No subnet within the limits {limits} in {max_tries} random draws; the limits "
                  "admit too small a corner of the space. Widen --config.search.*_params_m.")


def record(arch: Mapping[str, Any], costs: Costs, score: float, **extra) -> dict[str, Any]:
  """The JSON record of a scored candidate."""
  params, macs = costs(arch)
  return {"arch": dict(arch), "params": params, "gmacs": macs / 1e9, "score": float(score),
          **extra}


def train_command(retrain_config: str, arch: Mapping[str, Any]) -> str:
  """`train.py` command training `arch` from scratch as a standalone `AutoFormerViT`."""
  depth = int(arch["depth"])
  heads = "(" + ",".join(str(int(h)) for h in arch["num_heads"][:depth]) + ",)"
  ratios = "(" + ",".join(str(float(r)) for r in arch["mlp_ratios"][:depth]) + ",)"
  return (f"python train.py --config {retrain_config} --config.model.embed_dim="
          f"{int(arch['embed_dim'])} --config.model.depth={depth} "
          f"--config.model.num_heads='{heads}' --config.model.mlp_ratios='{ratios}'")
