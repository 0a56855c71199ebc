"""Parameters, multiply-accumulates and inference throughput of a model.

`count_macs` follows the papers' (and fvcore's) convention: one MAC per multiply-add of every
matmul, einsum and convolution in the inference graph, read from the jaxpr; elementwise work,
softmax and normalisation are not counted (XLA's flop count would include them).

CLI: `python -m compact_vit.profile --model NAME [--batch B] [--img-size S]` prints one JSON line
with params, per-image GMACs and images/s (jitted inference on the default device). The CLI, like
`train.py`, `eval.py` and `search.py`, applies `compact_vit.xla.set_cpu_defaults()`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.extend import core as jax_core

from compact_vit import xla
from compact_vit.errors import UserError
from compact_vit.models import create_model
from compact_vit.nn.layers import to_pair


def count_params(params: Any) -> int:
  """Number of scalars in a pytree (e.g. `variables['params']`)."""
  return sum(int(np.size(x)) for x in jax.tree.leaves(params))


def count_macs(model: nn.Module, variables: Any, input_shape: tuple[int, ...]) -> float:
  """Multiply-accumulates of `model.apply(variables, x, train=False)` for x of `input_shape`.

  The total for the whole input, batch included (divide by the batch for per-image MACs).
  `variables` may be abstract (`jax.eval_shape(model.init, ...)`): nothing is computed.
  Counts `dot_general` (batch x lhs free x rhs free x contracting) and `conv_general_dilated`
  (output elements x kernel window x input channels per group), recursing into nested jaxprs:
  `scan` bodies count `length` times, `cond` its most expensive branch, `while` its body once
  (the trip count is unknown at trace time).
  """
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  return function_macs(lambda v, x: model.apply(v, x, train=False), variables, x)


def function_macs(fn: Any, *args: Any) -> float:
  """Multiply-accumulates of `fn(*args)` (arrays or `jax.ShapeDtypeStruct`s; nothing is computed),
  counted as `count_macs` does: e.g. one block or one layer of a model."""
  return float(_jaxpr_macs(jax.make_jaxpr(fn)(*args).jaxpr))


def _jaxpr_macs(jaxpr: Any) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_general_macs(eqn)
    elif name == "conv_general_dilated":
      total += _conv_macs(eqn)
    elif name == "scan":
      total += eqn.params["length"] * _jaxpr_macs(eqn.params["jaxpr"].jaxpr)
    elif name == "cond":
      total += max(_jaxpr_macs(b.jaxpr) for b in eqn.params["branches"])
    elif name in ("jit", "pjit") and eqn.params.get("name") == "depthwise_conv2d":
      # layers.depthwise_conv2d: a depthwise conv as shifted multiply-adds, kh*kw MACs per output.
      kernel = eqn.invars[1].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * kernel[0] * kernel[1]
    else:  # pjit, closed_call, custom_jvp_call, custom_vjp_call, remat, while, ...
      for sub in _sub_jaxprs(eqn.params):
        total += _jaxpr_macs(sub)
  return total


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
  subs = []
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax_core.ClosedJaxpr):
        subs.append(item.jaxpr)
      elif isinstance(item, jax_core.Jaxpr):
        subs.append(item)
  return subs


def _dot_general_macs(eqn: Any) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
  batch = math.prod(lhs[d] for d in lhs_batch)
  contract = math.prod(lhs[d] for d in lhs_contract)
  lhs_free = math.prod(s for d, s in enumerate(lhs) if d not in (*lhs_contract, *lhs_batch))
  rhs_free = math.prod(s for d, s in enumerate(rhs) if d not in (*rhs_contract, *rhs_batch))
  return batch * lhs_free * rhs_free * contract


def _conv_macs(eqn: Any) -> int:
  kernel = eqn.invars[1].aval.shape
  out_elements = math.prod(eqn.outvars[0].aval.shape)
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
  window = math.prod(kernel[d] for d in rhs_spec[2:])
  return out_elements * window * kernel[rhs_spec[1]]  # kernel in-dim is already C_in / groups


def images_per_sec(model: nn.Module, variables: Any, batch: int, img_size: int | tuple[int, int],
                   *, steps: int = 10, warmup: int = 2) -> float:
  """Jitted inference throughput (images/s) on the default device: `warmup` untimed calls
  (compilation included), then `steps` timed calls on one random float32 NHWC batch."""
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  variables = jax.device_put(variables)
  x = jax.random.normal(jax.random.key(0), (batch, *to_pair(img_size), 3), jnp.float32)
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(apply(variables, x))
  start = time.perf_counter()
  for _ in range(steps):
    out = apply(variables, x)
  jax.block_until_ready(out)
  return batch * steps / (time.perf_counter() - start)


def random_variables(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> Any:
  """Variables of the model's shapes filled from numpy: 0.02 N(0, 1), `batch_stats` ones.

  For timing only: the cost does not depend on the values, and this skips compiling the init,
  which takes minutes for large models on a small CPU.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape, jnp.float32))
  rng = np.random.default_rng(seed)
  return {
      collection: jax.tree.map(
          lambda s: (np.ones(s.shape) if collection == "batch_stats"
                     else 0.02 * rng.standard_normal(s.shape)).astype(s.dtype), tree)
      for collection, tree in shapes.items()}


def profile_model(name: str, batch: int = 32, img_size: int | None = None, steps: int = 10,
                  warmup: int = 2) -> dict[str, Any]:
  """Params, per-image GMACs and images/s of the registered model `name` (random variables)."""
  model = create_model(name, **({"img_size": img_size} if img_size else {}))
  shape = (1, *to_pair(model.img_size), 3)
  variables = random_variables(model, shape)
  return {
      "model": name,
      "params": count_params(variables["params"]),
      "gmacs": round(count_macs(model, variables, shape) / 1e9, 4),
      "images_per_sec": round(images_per_sec(model, variables, batch, model.img_size,
                                             steps=steps, warmup=warmup), 2),
      "batch": batch,
      "img_size": model.img_size,
  }


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; prints one JSON line (errors: one line on stderr, status 1)."""
  parser = argparse.ArgumentParser(prog="python -m compact_vit.profile", description=__doc__)
  parser.add_argument("--model", required=True, help="registered model name")
  parser.add_argument("--batch", type=int, default=32, help="batch for the throughput timing")
  parser.add_argument("--img-size", type=int, help="input size (default: the model's)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
  args = parser.parse_args(argv)
  xla.set_cpu_defaults()
  try:
    if args.batch < 1 or args.steps < 1:
      raise UserError("--batch and --steps must be at least 1.")
    result = profile_model(args.model, args.batch, args.img_size, args.steps, args.warmup)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
