"""NASViT's search space (facebookresearch/NASViT misc/config.py): the choices per stage, the
largest and smallest subnets, uniform sampling, and the single-choice space of one subnet.

A subnet is a dict: `first_conv`, `last_conv` (ints) and `width`, `depth`, `kernel`, `expand` (one
per stage), as python ints or int32 arrays (traced, so that sampling does not recompile).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Stage:
  """Choices of one stage: widths, depths, kernel sizes, expansion ratios; stride; transformer
  stage (blocks after the first are transformer blocks); squeeze-excitation in its MBConvs."""
  widths: tuple[int, ...]
  depths: tuple[int, ...]
  kernels: tuple[int, ...]
  expands: tuple[int, ...]
  stride: int
  transformer: bool = False
  se: bool = False


@dataclasses.dataclass(frozen=True)
class Space:
  first_conv: tuple[int, ...]
  stages: tuple[Stage, ...]
  last_conv: tuple[int, ...]
  resolutions: tuple[int, ...] = (192, 224, 256, 288)


SPACE = Space(
    first_conv=(16, 24),
    stages=(Stage((16, 24), (1, 2), (3, 5), (1,), 1),
            Stage((24, 32), (3, 4, 5), (3, 5), (4, 5, 6), 2),
            Stage((32, 40), (3, 4, 5, 6), (3,), (4, 5, 6), 2, se=True),
            Stage((64, 72), (3, 4, 5, 6), (3,), (4, 5, 6), 2, True),
            Stage((112, 120, 128), (3, 4, 5, 6, 7, 8, 9), (3,), (4, 5, 6), 2, True, True),
            Stage((160, 168, 176, 184), (3, 4, 5, 6, 7, 8), (3,), (6,), 1, True, True),
            Stage((208, 216, 224), (3, 4, 5, 6), (3,), (6,), 2, True, True)),
    last_conv=(1792, 1984))
# A small space of the same structure for `:quick` and the tests (inputs of 16..32 pixels).
TINY_SPACE = Space(
    first_conv=(8, 16),
    stages=(Stage((8, 16), (1, 2), (3, 5), (1,), 1),
            Stage((16, 24), (1, 2), (3,), (2, 3), 2, se=True),
            Stage((24, 32), (2, 3), (3,), (2,), 2, True, True)),
    last_conv=(32, 48), resolutions=(16, 32))
def _extreme(space: Space, pick) -> dict[str, Any]:
  return dict(first_conv=pick(space.first_conv), last_conv=pick(space.last_conv),
              **{k: tuple(pick(getattr(s, k + "s")) for s in space.stages)
                 for k in ("width", "depth", "kernel", "expand")})


largest = functools.partial(_extreme, pick=max)  # the largest subnet of a space
smallest = functools.partial(_extreme, pick=min)


def sample_subnet(key: jax.Array, space: Space) -> dict[str, jax.Array]:
  """A uniformly random subnet as int32 arrays (traceable): first_conv, last_conv scalars;
  width/depth/kernel/expand (num_stages,)."""
  keys = iter(jax.random.split(key, 2 + 4 * len(space.stages)))
  pick = lambda choices: jax.random.choice(next(keys), jnp.asarray(choices, jnp.int32))
  out = {"first_conv": pick(space.first_conv), "last_conv": pick(space.last_conv)}
  for k in ("width", "depth", "kernel", "expand"):
    out[k] = jnp.stack([pick(getattr(s, k + "s")) for s in space.stages])
  return out


def as_arrays(subnet: Mapping[str, Any]) -> dict[str, jax.Array]:
  """A subnet dict (python or traced ints) as int32 arrays, the form `sample_subnet` returns."""
  return {k: jnp.asarray(v, jnp.int32) for k, v in subnet.items()}


def subnet_space(subnet: Mapping[str, Any], space: Space = SPACE) -> Space:
  """The single-choice space of a subnet (python ints): a standalone model's `space`."""
  stages = tuple(dataclasses.replace(s, widths=(int(w),), depths=(int(d),), kernels=(int(k),),
                                     expands=(int(e),))
                 for s, w, d, k, e in zip(space.stages, subnet["width"], subnet["depth"],
                                          subnet["kernel"], subnet["expand"]))
  return Space((int(subnet["first_conv"]),), stages, (int(subnet["last_conv"]),),
               space.resolutions)
