"""Shared-QK LSH self-attention (Reformer) and the dense shared-QK attention it approximates.

Kitaev, Kaiser and Levskaya, "Reformer: The Efficient Transformer", ICLR 2020 (arXiv 2001.04451).
The reference implementation is google/trax, `trax/layers/research/efficient_attention.py`
(`LSHSelfAttention`, `hash_vecs`, `attend`, `mask_self_attention`); this follows it. Per batch
element and head, with `qk`, `v` of shape (B, H, N, D):

1. Pad N to Np, a multiple of `chunk_len`; padded positions are masked keys.
2. Hash each shared query/key vector in `n_hashes` rounds: bucket = argmax([xR; -xR]) for a random
   rotation R of shape (D, n_buckets / 2) per round and head (angular LSH). Default n_buckets =
   2 * Np / chunk_len, factorised as trax does above 128 buckets (the bucket index is then a
   mixed-radix number over several smaller argmaxes). Masked positions go to an extra bucket.
3. Sort the n_hashes * Np (round, bucket, position) keys; bucket indices and the permutation carry
   no gradient.
4. Split the sorted sequence into chunks of `chunk_len`; every chunk attends to itself and to the
   previous chunk (one chunk of look-back; the first chunk looks back at the last one, as trax).
   Keys are the queries normalised to unit length (x / rms(x) / sqrt(D)), so logits are
   q_i . q_j / |q_j|, computed and soft-maxed in float32.
5. Masked keys get `finfo(float32).min` through `jnp.where`. A query's own position gets its logit
   minus 1e5: the finite penalty of the paper and trax, so that a token attends to itself only
   when nothing else is in its window. A query may always see itself, so no softmax row is ever
   fully masked (padded queries attend to something and are cropped).
6. Undo the sort and combine the rounds with weights softmax_r(logsumexp of round r's logits).

Departures from trax: rotations are drawn per head and shared by the batch (trax: per head and per
example), so an example's output does not depend on its position in the batch; the caller passes
them in (`random_rotations`); attention dropout draws one mask entry per weight (trax broadcasts
it). As in trax, keys duplicated across rounds are not de-duplicated (the paper's N_{i,j}
correction is not applied).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SELF_ATTENTION_PENALTY = 1e5  # Reformer's logit penalty for attending to one's own position
MAX_UNFACTORED_BUCKETS = 128


def padded_length(length: int, chunk_len: int) -> int:
  """`length` rounded up to a multiple of `chunk_len`."""
  return -(-length // chunk_len) * chunk_len


def bucket_factors(length: int, chunk_len: int, n_buckets: int | None = None) -> tuple[int, ...]:
  """Bucket counts per hashing factor (their product is the number of buckets).

  `n_buckets` None: 2 * padded_length / chunk_len, factorised into two even factors when above
  128 (trax's rule). An explicit `n_buckets` is used as one factor (it must be 1 or even).
  """
  if n_buckets is None:
    n_buckets = 2 * max(1, padded_length(length, chunk_len) // chunk_len)
    if n_buckets > MAX_UNFACTORED_BUCKETS:
      first = 2**math.ceil(math.log2(math.sqrt(n_buckets)))
      return first, 2 * (n_buckets // (2 * first))
  if n_buckets != 1 and n_buckets % 2:
    raise ValueError(f"n_buckets={n_buckets} must be 1 or even.")
  return (n_buckets,)


def rotation_shape(num_heads: int, head_dim: int, n_hashes: int,
                   factors: tuple[int, ...]) -> tuple[int, int, int, int]:
  """Shape (H, D, n_hashes, sum(factors) / 2) of the random rotations for `factors`."""
  return num_heads, head_dim, n_hashes, sum(f // 2 for f in factors)


def random_rotations(key: jax.Array, num_heads: int, head_dim: int, n_hashes: int,
                     factors: tuple[int, ...]) -> jax.Array:
  """Gaussian random rotations (H, D, n_hashes, sum(factors) / 2), float32."""
  return jax.random.normal(key, rotation_shape(num_heads, head_dim, n_hashes, factors),
                           jnp.float32)


def hash_buckets(qk: jax.Array, rotations: jax.Array, factors: tuple[int, ...]) -> jax.Array:
  """Bucket of every vector in every round: qk (B, H, N, D) -> int32 (B, H, n_hashes, N).

  Per factor f: argmax over the 2 * (f/2) values [xR_f; -xR_f]; factors combine as a
  mixed-radix number. One bucket (factors == (1,)) puts everything in bucket 0.
  """
  batch, heads, length, _ = qk.shape
  n_hashes = rotations.shape[2]
  if factors == (1,):
    return jnp.zeros((batch, heads, n_hashes, length), jnp.int32)
  rotated = jnp.einsum("bhnd,hdrk->bhrnk", qk.astype(jnp.float32), rotations)
  buckets, offset, radix = 0, 0, 1
  for factor in factors:
    part = rotated[..., offset:offset + factor // 2]
    index = jnp.argmax(jnp.concatenate([part, -part], axis=-1), axis=-1).astype(jnp.int32)
    buckets = buckets + radix * index
    offset += factor // 2
    radix *= factor
  return buckets


@jax.custom_vjp
def _permute(x: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
  """x (..., L, D) reordered along L by `perm` (..., L); its gradient is a gather by `inverse`."""
  del inverse
  return jnp.take_along_axis(x, perm[..., None], axis=-2)


def _permute_fwd(x, perm, inverse):
  return _permute(x, perm, inverse), inverse


def _permute_bwd(inverse, grad):
  # Autodiff of a gather is a scatter-add; for a permutation the gather by the inverse is the same.
  return jnp.take_along_axis(grad, inverse[..., None], axis=-2), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def _unit_keys(x: jax.Array) -> jax.Array:
  """x / rms(x) / sqrt(D) = x / |x| (trax's `length_normalized` then 1/sqrt(D)), in x.dtype."""
  x32 = x.astype(jnp.float32)
  scale = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
  return (x32 * scale / math.sqrt(x.shape[-1])).astype(x.dtype)


def _with_previous_chunk(x: jax.Array) -> jax.Array:
  """(B, H, C, L, ...) -> (B, H, C, 2L, ...): chunk c - 1 (cyclically) followed by chunk c."""
  return jnp.concatenate([jnp.roll(x, 1, axis=2), x], axis=3)


def _masked_softmax_logits(logits: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                           k_valid: jax.Array) -> jax.Array:
  """Masks invalid keys with finfo.min (never a query's own position) and penalises self."""
  is_self = q_pos == k_pos
  logits = jnp.where(k_valid | is_self, logits, jnp.finfo(logits.dtype).min)
  return jnp.where(is_self, logits - SELF_ATTENTION_PENALTY, logits)


def _softmax_and_logsumexp(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Softmax over the last axis and its log-normaliser (keepdims).

  Normalised by division, not by exp(logits - logsumexp): when only (penalised, duplicated) self
  entries remain, the logits sit near -1e5, where float32 rounding of logsumexp would leave the
  weights off by ~0.4%.
  """
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  unnormalised = jnp.exp(logits - peak)
  total = jnp.sum(unnormalised, axis=-1, keepdims=True)
  return unnormalised / total, peak + jnp.log(total)


def _dropout(weights: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if rate == 0.0 or key is None:
    return weights
  keep = jax.random.bernoulli(key, 1.0 - rate, weights.shape)
  return jnp.where(keep, weights / (1.0 - rate), jnp.zeros_like(weights))


def lsh_self_attention(qk: jax.Array, v: jax.Array, *, chunk_len: int,
                       factors: tuple[int, ...], rotations: jax.Array | None = None,
                       buckets: jax.Array | None = None, mask: jax.Array | None = None,
                       dropout_rate: float = 0.0,
                       dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Shared-QK LSH self-attention (see the module docstring for the algorithm).

  qk: (B, H, N, D) shared queries/keys; v: (B, H, N, Dv). `factors`: from `bucket_factors`.
  Either `rotations` (H, D, n_hashes, sum(factors) / 2) to hash with, or `buckets`
  (B, H, n_hashes, Np) from an earlier call on the same positions (the backward pass of a
  reversible stack replays the forward pass's buckets, as trax does). `mask`: optional (B, N) bool,
  True for tokens that may be attended to. Dropout (on the attention weights) only with a key.
  Returns (out (B, H, N, Dv) in v.dtype, buckets int32 (B, H, n_hashes, Np)).
  """
  batch, heads, length, _ = qk.shape
  padded = padded_length(length, chunk_len)
  valid = jnp.ones((batch, length), bool) if mask is None else mask.astype(bool)
  if padded != length:
    pad = [(0, 0), (0, 0), (0, padded - length), (0, 0)]
    qk, v = jnp.pad(qk, pad), jnp.pad(v, pad)
    valid = jnp.pad(valid, [(0, 0), (0, padded - length)])
  valid = jnp.broadcast_to(valid[:, None, :], (batch, heads, padded))
  n_buckets = math.prod(factors)

  if buckets is None:
    if rotations is None:
      raise ValueError("lsh_self_attention needs `rotations` or `buckets`.")
    buckets = hash_buckets(qk, rotations, factors)
    buckets = jnp.where(valid[:, :, None, :], buckets, n_buckets)  # padding: an extra bucket
  buckets = jax.lax.stop_gradient(buckets.astype(jnp.int32))
  n_hashes = buckets.shape[2]
  if n_hashes * (n_buckets + 1) * padded >= 2**31:
    raise ValueError(f"{n_hashes} hash rounds x {n_buckets + 1} buckets x {padded} positions "
                     "overflow the int32 sort keys; use fewer buckets or a longer chunk_len.")

  # Sort (round, bucket, position) keys; `ticker` indexes the n_hashes * Np (round, position) pairs.
  rounds = jnp.arange(n_hashes, dtype=jnp.int32)[:, None] * (n_buckets + 1)
  sort_keys = ((buckets + rounds) * padded + jnp.arange(padded, dtype=jnp.int32))
  sort_keys = sort_keys.reshape(batch, heads, n_hashes * padded)
  ticker = jnp.broadcast_to(jnp.arange(n_hashes * padded, dtype=jnp.int32), sort_keys.shape)
  _, sticker = jax.lax.sort_key_val(sort_keys, ticker)
  _, undo_sort = jax.lax.sort_key_val(sticker, ticker)
  sticker, undo_sort = jax.lax.stop_gradient(sticker), jax.lax.stop_gradient(undo_sort)
  positions = sticker % padded

  def tile_rounds(x):  # (B, H, Np, D) -> (B, H, n_hashes * Np, D)
    x = jnp.broadcast_to(x[:, :, None], (batch, heads, n_hashes) + x.shape[2:])
    return x.reshape(batch, heads, n_hashes * padded, x.shape[-1])

  n_chunks = n_hashes * padded // chunk_len
  chunked = lambda x: x.reshape(batch, heads, n_chunks, chunk_len, *x.shape[3:])
  sq = chunked(_permute(tile_rounds(qk), sticker, undo_sort))
  sv = chunked(_permute(tile_rounds(v), sticker, undo_sort))
  q_pos = chunked(positions)
  k_valid = _with_previous_chunk(chunked(jnp.take_along_axis(valid, positions, axis=-1)))
  k_pos = _with_previous_chunk(q_pos)

  keys = _with_previous_chunk(_unit_keys(sq))
  logits = jnp.einsum("bhcqd,bhckd->bhcqk", sq, keys, preferred_element_type=jnp.float32)
  logits = _masked_softmax_logits(logits, q_pos[..., :, None], k_pos[..., None, :],
                                  k_valid[..., None, :])
  weights, lse = _softmax_and_logsumexp(logits)
  weights = _dropout(weights, dropout_rate, dropout_key)
  out = jnp.einsum("bhcqk,bhckd->bhcqd", weights.astype(v.dtype), _with_previous_chunk(sv))

  # Back to (round, position) order; combine the rounds by their softmax normalisers.
  out = _permute(out.reshape(batch, heads, n_hashes * padded, -1), undo_sort, sticker)
  lse = _permute(lse.reshape(batch, heads, n_hashes * padded, 1), undo_sort, sticker)
  out = out.reshape(batch, heads, n_hashes, padded, -1)
  if n_hashes > 1:
    round_weights = jax.nn.softmax(lse.reshape(batch, heads, n_hashes, padded, 1), axis=2)
    out = jnp.sum(out.astype(jnp.float32) * round_weights, axis=2).astype(v.dtype)
  else:
    out = out[:, :, 0]
  return out[:, :, :length], buckets


def dense_shared_qk_attention(qk: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                              dropout_rate: float = 0.0,
                              dropout_key: jax.Array | None = None) -> jax.Array:
  """Full O(N^2) attention with LSH attention's conventions: unit-length shared keys, the −1e5
  self penalty, masked keys by `jnp.where` and never a fully masked row.

  qk: (B, H, N, D); v: (B, H, N, Dv); mask: optional (B, N) bool. Returns (B, H, N, Dv).
  """
  length = qk.shape[2]
  logits = jnp.einsum("bhqd,bhkd->bhqk", qk, _unit_keys(qk), preferred_element_type=jnp.float32)
  k_valid = jnp.ones((qk.shape[0], length), bool) if mask is None else mask.astype(bool)
  positions = jnp.arange(length)
  logits = _masked_softmax_logits(logits, positions[:, None], positions[None, :],
                                  k_valid[:, None, None, :])
  weights = _dropout(jax.nn.softmax(logits, axis=-1), dropout_rate, dropout_key)
  return jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v)
