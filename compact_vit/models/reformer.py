"""Reformer-ViT: a DeiT-layout classifier with LSH attention and reversible layers.

Paper: Kitaev, Kaiser and Levskaya, "Reformer: The Efficient Transformer", ICLR 2020
(arXiv 2001.04451); reference code google/trax (`trax/models/reformer/reformer.py`,
`trax/layers/research/efficient_attention.py`, `trax/layers/reversible.py`). The ViT layout
(patch embedding, class token, learned position embedding, pre-norm blocks, LayerNorm + linear
head, drop path rising linearly with depth) follows DeiT / timm (`compact_vit.models.vit`).

Layer l: F = LayerNorm -> shared-QK attention (LSH, `compact_vit.nn.lsh_attention`, or its dense
O(N^2) counterpart with the same parameters) -> projection; G = LayerNorm -> MLP (optionally in
chunks of `ff_chunk_len` tokens). `reversible=True`: the embedded tokens are duplicated into two
streams (X1, X2) and every layer maps them to Y1 = X1 + F(X2), Y2 = X2 + G(Y1)
(`compact_vit.nn.reversible`, one custom VJP over the whole stack); the head reads the average of
the two streams, as trax's Reformer encoder (`_XYAvg`). `reversible=False`: ordinary pre-norm
residual blocks x + F(x), x + G(x) over the same branches.

Parameters: the branches are Flax modules applied as pure functions of explicit parameters; their
per-layer parameters are created by one `self.param('blocks', ...)` and stacked on a leading depth
axis (`blocks/attn_branch/...`, `blocks/ffn_branch/...`, e.g. qk kernel (depth, C, C)), which is
what the reversible custom VJP and `lax.scan` consume. Stacked LayerNorm scales and biases are 2-D,
so configs exempt `blocks/.../(bias|scale)` from weight decay by name.

Randomness: dropout and drop path come from the 'dropout' stream, one key per layer, which the
reversible backward pass replays. LSH rotations are drawn per call: from the 'sample' stream when
`train=True` (new rotations every step, as trax draws a new hash key per training call), else from
a fixed key, so evaluation is deterministic. The backward pass reuses the forward pass's bucket
indices (saved per layer, int32 (B, H, n_hashes, Np)), as trax does, instead of re-hashing.

Departures: shared-QK attention (as Reformer) replaces DeiT's separate q/k projections, and the
dense path keeps Reformer's conventions (unit-length keys, the −1e5 self penalty), so one set of
parameters runs either way; with LSH, the class token attends only to the tokens of its buckets;
drop path on both branches is DeiT's (trax's Reformer has none); the two residual streams are
float32 whatever the compute `dtype`, because inversion subtracts branch outputs and bfloat16
streams would accumulate reconstruction error over depth. Logits are float32.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from compact_vit.models.registry import register
from compact_vit.nn.layers import (Dtype, Mlp, PatchEmbed, check_input_size, check_settings,
                                   dense, drop_path_rates, layer_norm, linear_init,
                                   settings_problems, to_pair)
from compact_vit.nn.lsh_attention import (bucket_factors, dense_shared_qk_attention,
                                           lsh_self_attention, padded_length, random_rotations)
from compact_vit.nn.reversible import chunked_feed_forward, residual_stack, reversible_stack

# Variant table: name -> fields of ReformerViT (DeiT-Ti/S/B widths, depths and heads).
VARIANTS: dict[str, dict] = {
    "reformer_vit_ti16": dict(embed_dim=192, depth=12, num_heads=3, patch_size=16),
    "reformer_vit_s16": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16),
    "reformer_vit_b16": dict(embed_dim=768, depth=12, num_heads=12, patch_size=16),
}
EVAL_HASH_SEED = 0  # LSH rotations with train=False (or without a 'sample' stream) use this key


class AttentionBranch(nn.Module):
  """F: LayerNorm -> shared-QK attention -> proj -> dropout. x (B, N, C) -> (out, buckets).

  `qk` is the shared query/key projection, `v` the values. `attention='lsh'` hashes with rotations
  drawn from `hash_key` unless `buckets` (from an earlier call on the same tokens) are given, and
  returns the buckets (B, H, n_hashes, Np); 'dense' returns None for them.
  """
  num_heads: int
  attention: str = "lsh"
  n_hashes: int = 2
  chunk_len: int = 64
  n_buckets: int | None = None
  qkv_bias: bool = True
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, hash_key: jax.Array, buckets: jax.Array | None = None,
               train: bool = False) -> tuple[jax.Array, jax.Array | None]:
    batch, length, dim = x.shape
    heads, head_dim = self.num_heads, dim // self.num_heads
    y = layer_norm("norm1", self.dtype, self.param_dtype)(x)
    split_heads = lambda t: t.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)
    qk = split_heads(dense(dim, "qk", self.dtype, self.param_dtype, use_bias=self.qkv_bias)(y))
    v = split_heads(dense(dim, "v", self.dtype, self.param_dtype, use_bias=self.qkv_bias)(y))
    drop_key = self.make_rng("dropout") if train and self.attn_drop_rate > 0 else None
    if self.attention == "lsh":
      factors = bucket_factors(length, self.chunk_len, self.n_buckets)
      rotations = None
      if buckets is None:
        rotations = random_rotations(hash_key, heads, head_dim, self.n_hashes, factors)
      out, buckets = lsh_self_attention(
          qk, v, chunk_len=self.chunk_len, factors=factors, rotations=rotations, buckets=buckets,
          dropout_rate=self.attn_drop_rate, dropout_key=drop_key)
    else:
      out = dense_shared_qk_attention(qk, v, dropout_rate=self.attn_drop_rate,
                                      dropout_key=drop_key)
    out = out.transpose(0, 2, 1, 3).reshape(batch, length, dim)
    out = dense(dim, "proj", self.dtype, self.param_dtype)(out)
    return nn.Dropout(self.proj_drop_rate, deterministic=not train)(out), buckets


class FeedForwardBranch(nn.Module):
  """G: LayerNorm -> Mlp (fc1, exact GELU, fc2, dropouts). x (B, N, C) -> (B, N, C)."""
  mlp_ratio: float = 4.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = layer_norm("norm2", self.dtype, self.param_dtype)(x)
    return Mlp(int(x.shape[-1] * self.mlp_ratio), drop_rate=self.proj_drop_rate, dtype=self.dtype,
               param_dtype=self.param_dtype, name="mlp")(y, train)


def drop_path(x: jax.Array, rate: jax.Array, key: jax.Array) -> jax.Array:
  """Stochastic depth with a traced `rate`: x (B, ...) per sample zeroed or scaled 1/(1 - rate)."""
  keep_prob = 1.0 - rate
  keep = jax.random.bernoulli(key, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / keep_prob.astype(x.dtype), jnp.zeros_like(x))


class ReformerViT(nn.Module):
  """Reformer-ViT classifier (see the module docstring).

  `__call__(x, train=False)`: x (B, H, W, 3) float32 NHWC, normalised, (H, W) = img_size; returns
  logits (B, num_classes) float32. `attention`: 'lsh' or 'dense' (same parameters);
  `reversible`: reversible layers (memory independent of depth) or ordinary residual blocks.
  LSH: `n_hashes` rounds, `chunk_len` sorted tokens per chunk, `n_buckets` None for
  2 * ceil(N / chunk_len) (factorised above 128). `ff_chunk_len` > 0 runs the MLP that many
  tokens at a time (rematerialised per chunk). `global_pool`: 'token' (class token) or 'avg'.
  """
  num_classes: int = 1000
  img_size: int | tuple[int, int] = 224
  patch_size: int | tuple[int, int] = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  attention: str = "lsh"
  reversible: bool = True
  n_hashes: int = 2
  chunk_len: int = 64
  n_buckets: int | None = None
  ff_chunk_len: int = 0
  global_pool: str = "token"
  drop_rate: float = 0.0
  pos_drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    problems = settings_problems(self, ("drop_rate", "pos_drop_rate", "attn_drop_rate",
                                         "proj_drop_rate", "drop_path_rate"))
    if self.depth < 1:
      problems.append(f"depth={self.depth} is not positive")
    if self.embed_dim % self.num_heads:
      problems.append(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
    if self.attention not in ("lsh", "dense"):
      problems.append(f"attention={self.attention!r} is not 'lsh' or 'dense'")
    if self.n_hashes < 1 or self.chunk_len < 1:
      problems.append(f"n_hashes={self.n_hashes} and chunk_len={self.chunk_len} must be >= 1")
    if self.n_buckets is not None and (self.n_buckets < 1 or (self.n_buckets > 1 and
                                                             self.n_buckets % 2)):
      problems.append(f"n_buckets={self.n_buckets} must be None, 1 or a positive even number")
    if self.ff_chunk_len < 0:
      problems.append(f"ff_chunk_len={self.ff_chunk_len} is negative (0 = no chunking)")
    if self.global_pool not in ("token", "avg"):
      problems.append(f"global_pool={self.global_pool!r} is not 'token' or 'avg'")
    if any(s % p for s, p in zip(to_pair(self.img_size), to_pair(self.patch_size))):
      problems.append(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
    if not problems and self.attention == "lsh":
      tokens = self.num_tokens
      factors = bucket_factors(tokens, self.chunk_len, self.n_buckets)
      keys = self.n_hashes * (math.prod(factors) + 1)
      if keys * padded_length(tokens, self.chunk_len) >= 2**31:
        problems.append(f"{tokens} tokens with n_hashes={self.n_hashes} and "
                        f"chunk_len={self.chunk_len} overflow LSH's int32 sort keys; raise "
                        "chunk_len or set fewer n_buckets")
    check_settings("ReformerViT", problems)
    super().__post_init__()

  @property
  def num_tokens(self) -> int:
    """Sequence length: patches plus the class token."""
    (h, w), (ph, pw) = to_pair(self.img_size), to_pair(self.patch_size)
    return (h // ph) * (w // pw) + 1

  def _branches(self, dtype: jnp.dtype) -> tuple[AttentionBranch, FeedForwardBranch]:
    """The two branch modules, unbound (parent=None): applied as pure functions of parameters."""
    attn = AttentionBranch(
        num_heads=self.num_heads, attention=self.attention, n_hashes=self.n_hashes,
        chunk_len=self.chunk_len, n_buckets=self.n_buckets, qkv_bias=self.qkv_bias,
        attn_drop_rate=self.attn_drop_rate, proj_drop_rate=self.proj_drop_rate, dtype=dtype,
        param_dtype=self.param_dtype, parent=None)
    ffn = FeedForwardBranch(mlp_ratio=self.mlp_ratio, proj_drop_rate=self.proj_drop_rate,
                            dtype=dtype, param_dtype=self.param_dtype, parent=None)
    return attn, ffn

  def _init_blocks(self, rng: jax.Array, attn: AttentionBranch,
                   ffn: FeedForwardBranch) -> dict[str, Any]:
    """Per-layer branch parameters stacked on a leading depth axis (jitted: eager dispatch of the
    vmapped initialisers is slow). The attention branch is initialised on its dense path, which
    creates the same parameters without hashing."""
    x = jnp.zeros((1, 1, self.embed_dim), jnp.float32)
    attn = attn.clone(attention="dense", parent=None)

    def one_layer(key):
      k_attn, k_ffn = jax.random.split(key)
      return {"attn_branch": attn.init(k_attn, x, jax.random.key(0))["params"],
              "ffn_branch": ffn.init(k_ffn, x)["params"]}
    return jax.jit(jax.vmap(one_layer))(jax.random.split(rng, self.depth))

  def _layer_context(self, train: bool) -> dict[str, jax.Array]:
    """Per-layer PRNG keys and drop-path rates, each with a leading depth axis."""
    depth = self.depth
    needs_dropout = train and max(self.attn_drop_rate, self.proj_drop_rate,
                                  self.drop_path_rate) > 0
    dropout_key = self.make_rng("dropout") if needs_dropout else jax.random.key(0)
    use_sample = train and self.attention == "lsh" and self.has_rng("sample")
    hash_key = self.make_rng("sample") if use_sample else jax.random.key(EVAL_HASH_SEED)
    return {"key": jax.random.split(dropout_key, depth),
            "hash": jax.random.split(hash_key, depth),
            "rate": jnp.asarray(drop_path_rates(self.drop_path_rate, depth), jnp.float32)}

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_input_size(self, x)
    dtype, dim = jnp.dtype(self.dtype), self.embed_dim
    x = PatchEmbed(self.patch_size, dim, dtype=dtype, param_dtype=self.param_dtype,
                   name="patch_embed")(x.astype(dtype))
    cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, dim),
                           self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(dtype), (x.shape[0], 1, dim)), x], 1)
    pos_embed = self.param("pos_embed", linear_init, (1, x.shape[1], dim), self.param_dtype)
    x = nn.Dropout(self.pos_drop_rate, deterministic=not train)(x + pos_embed.astype(dtype))
    x = x.astype(jnp.float32)  # residual streams in float32 (see the module docstring)

    attn, ffn = self._branches(dtype)
    blocks = self.param("blocks", self._init_blocks, attn, ffn)
    drop_paths = train and self.drop_path_rate > 0

    def f(params, x, ctx, buckets):
      k_drop, k_path = jax.random.split(jax.random.fold_in(ctx["key"], 0))
      y, buckets = attn.apply({"params": params}, x, ctx["hash"], buckets, train,
                              rngs={"dropout": k_drop} if train else None)
      return (drop_path(y, ctx["rate"], k_path) if drop_paths else y), buckets

    def g(params, x, ctx, saved):
      del saved
      k_drop, k_path = jax.random.split(jax.random.fold_in(ctx["key"], 1))
      apply = lambda chunk, key: ffn.apply({"params": params}, chunk, train,
                                           rngs={"dropout": key} if train else None)
      y = chunked_feed_forward(apply, x, self.ff_chunk_len, k_drop if train else None)
      return (drop_path(y, ctx["rate"], k_path) if drop_paths else y), None

    context = self._layer_context(train)
    if self.reversible:
      y1, y2 = reversible_stack(f, g, blocks["attn_branch"], blocks["ffn_branch"], x, x, context)
      x = (y1 + y2) / 2
    else:
      x = residual_stack(f, g, blocks["attn_branch"], blocks["ffn_branch"], x, context)

    x = x.astype(dtype)
    if self.global_pool == "avg":
      x = layer_norm("fc_norm", dtype, self.param_dtype)(x[:, 1:].mean(1))
    else:
      x = layer_norm("norm", dtype, self.param_dtype)(x)[:, 0]
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    return dense(self.num_classes, "head", dtype, self.param_dtype)(x).astype(jnp.float32)


for _name, _fields in VARIANTS.items():
  register(_name)(functools.partial(ReformerViT, **_fields))
