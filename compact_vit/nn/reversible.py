"""Reversible residual stacks whose backward pass rebuilds activations instead of storing them.

Gomez et al., "The Reversible Residual Network", NeurIPS 2017 (arXiv 1707.04585); Kitaev et al.,
"Reformer: The Efficient Transformer", ICLR 2020 (arXiv 2001.04451). Reference implementation:
google/trax `trax/layers/reversible.py` (`ReversibleHalfResidual`, `ReversibleSerial`).

Layer l maps (X1, X2) to Y1 = X1 + F_l(X2), Y2 = X2 + G_l(Y1). `reversible_stack` runs all layers
as one `lax.scan` inside one `jax.custom_vjp`: the forward pass keeps only the final (Y1, Y2) and
each layer's small `saved` values (e.g. LSH bucket indices); the backward pass walks the layers in
reverse, rebuilding X2 = Y2 - G(Y1) and X1 = Y1 - F(X2) while it back-propagates, so activation
memory is that of one layer whatever the depth. Parameters are explicit: per-layer pytrees
stacked on a leading depth axis.

Branches are pure functions `fn(params, x, context, saved) -> (out, saved)`:
* `params`: one layer's parameters; `x`: (B, N, C) stream; `context`: one layer's slice of a
  non-differentiable pytree (PRNG keys, drop-path rates). The backward pass passes the same
  `context` again, so dropout and drop path replay the same masks.
* `saved`: None on the forward pass, where the branch returns what it wants back (a pytree of
  arrays, or None); the backward pass hands that value to it again instead of None.
Branches must not close over traced values: pass them through `params` or `context`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

Branch = Callable[[Any, jax.Array, Any, Any], tuple[jax.Array, Any]]


def _forward(f: Branch, g: Branch, params: tuple[Any, Any], x1: jax.Array, x2: jax.Array,
             context: Any) -> tuple[tuple[jax.Array, jax.Array], Any]:
  def layer(carry, inputs):
    x1, x2 = carry
    (f_params, g_params), ctx = inputs
    fx, f_saved = f(f_params, x2, ctx, None)
    y1 = x1 + fx.astype(x1.dtype)
    gy, g_saved = g(g_params, y1, ctx, None)
    y2 = x2 + gy.astype(x2.dtype)
    return (y1, y2), (f_saved, g_saved)
  return jax.lax.scan(layer, (x1, x2), (params, context))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _reversible(f: Branch, g: Branch, params: tuple[Any, Any], x1: jax.Array, x2: jax.Array,
                context: Any) -> tuple[jax.Array, jax.Array]:
  return _forward(f, g, params, x1, x2, context)[0]


def _reversible_fwd(f, g, params, x1, x2, context):
  (y1, y2), saved = _forward(f, g, params, x1, x2, context)
  return (y1, y2), (params, y1, y2, context, saved)


def _reversible_bwd(f, g, residuals, cotangents):
  params, y1, y2, context, saved = residuals
  dy1, dy2 = cotangents

  def layer(carry, inputs):
    y1, y2, dy1, dy2 = carry
    (f_params, g_params), ctx, (f_saved, g_saved) = inputs
    gy, g_vjp = jax.vjp(lambda p, x: g(p, x, ctx, g_saved)[0].astype(y2.dtype), g_params, y1)
    x2 = y2 - gy
    dg_params, dy1_from_g = g_vjp(dy2)
    dy1 = dy1 + dy1_from_g
    fx, f_vjp = jax.vjp(lambda p, x: f(p, x, ctx, f_saved)[0].astype(y1.dtype), f_params, x2)
    x1 = y1 - fx
    df_params, dx2_from_f = f_vjp(dy1)
    return (x1, x2, dy1, dy2 + dx2_from_f), (df_params, dg_params)

  (_, _, dx1, dx2), grads = jax.lax.scan(layer, (y1, y2, dy1, dy2), (params, context, saved),
                                         reverse=True)
  return grads, dx1, dx2, None


_reversible.defvjp(_reversible_fwd, _reversible_bwd)


def reversible_stack(f: Branch, g: Branch, f_params: Any, g_params: Any, x1: jax.Array,
                     x2: jax.Array, context: Any, *,
                     memory_efficient: bool = True) -> tuple[jax.Array, jax.Array]:
  """Runs the reversible layers; returns (Y1, Y2) of the last one, each (B, N, C) like x1, x2.

  `f_params`, `g_params`, `context`: pytrees whose leaves have a leading depth axis (one slice per
  layer). `memory_efficient=False` runs the same computation under ordinary autodiff (every
  layer's activations stored); tests compare the two.
  """
  if memory_efficient:
    return _reversible(f, g, (f_params, g_params), x1, x2, context)
  return _forward(f, g, (f_params, g_params), x1, x2, context)[0]


def residual_stack(f: Branch, g: Branch, f_params: Any, g_params: Any, x: jax.Array,
                   context: Any) -> jax.Array:
  """The ordinary (non-reversible) residual stack over the same branches: per layer
  x = x + F(x), then x = x + G(x); ordinary autodiff, so activation memory grows with depth."""
  def layer(x, inputs):
    (f_params, g_params), ctx = inputs
    x = x + f(f_params, x, ctx, None)[0].astype(x.dtype)
    return x + g(g_params, x, ctx, None)[0].astype(x.dtype), None
  return jax.lax.scan(layer, x, ((f_params, g_params), context))[0]


def chunked_feed_forward(fn: Callable[[jax.Array, jax.Array | None], jax.Array], x: jax.Array,
                         chunk_len: int, key: jax.Array | None = None) -> jax.Array:
  """Applies a position-wise `fn(x_chunk, key)` to `chunk_len` tokens at a time.

  x: (B, N, C) -> (B, N, C'). Chunks run one after another under `jax.checkpoint`, so neither the
  forward nor the backward pass holds more than one chunk's hidden activations (e.g. the 4C-wide
  MLP hidden layer). N is zero-padded to a multiple of `chunk_len` and cropped back. Chunk i gets
  `fold_in(key, i)` (None stays None). `chunk_len` <= 0 or >= N: one call `fn(x, key)`.
  """
  batch, length = x.shape[:2]
  if chunk_len <= 0 or chunk_len >= length:
    return fn(x, key)
  n_chunks = -(-length // chunk_len)
  x = jnp.pad(x, [(0, 0), (0, n_chunks * chunk_len - length)] + [(0, 0)] * (x.ndim - 2))
  chunks = jnp.moveaxis(x.reshape(batch, n_chunks, chunk_len, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def one_chunk(chunk, index):
    return fn(chunk, None if key is None else jax.random.fold_in(key, index))

  out = jax.lax.map(lambda args: one_chunk(*args), (chunks, jnp.arange(n_chunks)))
  out = jnp.moveaxis(out, 0, 1).reshape(batch, n_chunks * chunk_len, *out.shape[3:])
  return out[:, :length]
