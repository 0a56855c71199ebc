"""Static-shape token operations shared by the token-reduction families (DynamicViT, ATS,
PatchMerger): attention re-normalised over a key policy with the self-connection kept, top-k
gathers with a compile-time `k`, masked means, a fixed-size per-row unique, and the ViT
embedding/classifier scaffolding those models share with `models.vit.VisionTransformer`.

Every function keeps shapes static: dropped tokens are masked (training) or gathered away with a
Python-int `k` (inference), so one compilation serves every image.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from compact_vit.nn.layers import (DropPath, Dtype, Mlp, PatchEmbed, check_input_size,
                                   classifier_heads, dense, layer_norm, linear_init)
from compact_vit.errors import UserError

POLICY_EPS = 1e-6  # DynamicViT's softmax_with_policy eps


# ----------------------------------------------------------------------------- selection

def gather_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
  """x (B, N, ...) and index (B, k) int -> (B, k, ...): x[b, index[b, i]] (take_along_axis)."""
  index = index[(...,) + (None,) * (x.ndim - 2)]  # not a reshape: jax2onnx 0.12 mistypes TopK's
  return jnp.take_along_axis(x, index, axis=1)    # int64 indices through Reshape


def top_k_indices(scores: jax.Array, k: int) -> jax.Array:
  """scores (B, N) -> (B, k) int32 indices of the k largest, best first; `k` is a Python int."""
  if not 0 < k <= scores.shape[-1]:
    raise UserError(f"Cannot keep k={k} of {scores.shape[-1]} tokens; use 1 <= k <= N.")
  return jax.lax.top_k(scores, k)[1]


def masked_mean(x: jax.Array, weights: jax.Array, axis: int = 1) -> jax.Array:
  """Σ x·w / Σ w over `axis`, keeping the axis; 0 (not NaN) where every weight is 0.

  x (B, N, C), weights (B, N) -> (B, 1, C). DynamicViT divides by Σ w unguarded (DynamicViT#6).
  """
  w = jnp.expand_dims(weights.astype(x.dtype), -1)
  total = jnp.sum(w, axis=axis, keepdims=True)
  total = jnp.where(total > 0, total, jnp.ones_like(total))
  return jnp.sum(x * w, axis=axis, keepdims=True) / total


def unique_fixed(index: jax.Array, fill_value: int) -> tuple[jax.Array, jax.Array]:
  """Per-row sorted unique values in a fixed-size array.

  index (B, S) int -> (values (B, S), valid (B, S) bool): each row's distinct values in increasing
  order, then `fill_value` (which must exceed every value) in the remaining slots, marked invalid.
  The static-shape counterpart of `np.unique` per row (jnp.unique(size=...) per row, vectorised).
  """
  ordered = jnp.sort(index, axis=-1)
  duplicate = jnp.concatenate(
      [jnp.zeros_like(ordered[:, :1], bool), ordered[:, 1:] == ordered[:, :-1]], axis=-1)
  values = jnp.sort(jnp.where(duplicate, fill_value, ordered), axis=-1)
  return values, values != fill_value


# ----------------------------------------------------------------------------- attention

def attention_weights(logits: jax.Array, *, key_mask: jax.Array | None = None,
                      policy: jax.Array | None = None,
                      query_index: jax.Array | None = None) -> jax.Array:
  """Softmax over keys of float32 `logits` (B, H, Q, K), restricted to kept keys.

  key_mask (B, K) bool: masked keys get `finfo.min` logits (`jnp.where`), exact softmax over the
  rest. policy (B, K) float in {0, 1}, differentiable (DynamicViT's straight-through decisions):
  A_ij = (exp(a_ij - max_i)·G_ij + eps/K) / (Σ_k exp(a_ik - max_i)·G_ik + eps), the paper's
  re-normalisation with eps = 1e-6, so a policy that sums to zero gives no NaN. Either way the
  self-connection is kept (G_ii = 1), so no row is fully masked: query q sits at key position
  `query_index[b, q]` (default: q, i.e. Q == K).
  """
  logits = logits.astype(jnp.float32)
  if key_mask is None and policy is None:
    return jax.nn.softmax(logits, axis=-1)
  batch, _, queries, keys = logits.shape
  if query_index is None:
    query_index = jnp.broadcast_to(jnp.arange(queries), (batch, queries))
  own = (query_index[:, None, :, None] == jnp.arange(keys))  # (B, 1, Q, K)
  if key_mask is not None:
    valid = key_mask.astype(bool)[:, None, None, :] | own
    return jax.nn.softmax(jnp.where(valid, logits, jnp.finfo(jnp.float32).min), axis=-1)
  gate = jnp.where(own, 1.0, policy.astype(jnp.float32)[:, None, None, :])
  shifted = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  weighted = shifted * gate
  return (weighted + POLICY_EPS / keys) / (jnp.sum(weighted, -1, keepdims=True) + POLICY_EPS)


def split_qkv(qkv: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Fused (B, N, 3C) in timm's (3, heads, head_dim) layout -> q, k, v, each (B, N, H, D)."""
  batch, tokens, three_dim = qkv.shape
  qkv = qkv.reshape(batch, tokens, 3, num_heads, three_dim // (3 * num_heads))
  return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, **mask_kwargs) -> jax.Array:
  """Scaled dot-product attention (B, Q, H, D) x (B, K, H, D) -> (B, Q, H*D); mask_kwargs go to
  `attention_weights`."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1]**-0.5, k)
  weights = attention_weights(logits, **mask_kwargs).astype(v.dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
  return out.reshape(*out.shape[:2], -1)


class PolicyBlock(nn.Module):
  """Pre-norm transformer block whose attention is re-normalised over a key `policy`.

  Same submodule and parameter names as `layers.Block` (norm1, attn/qkv, attn/proj, norm2,
  mlp/fc1, mlp/fc2; no LayerScale), so the same weights serve both. x (B, N, C), policy (B, N)
  float -> (B, N, C). Attention dropout is not applied (DeiT uses none).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, policy: jax.Array, train: bool = False) -> jax.Array:
    y = layer_norm("norm1", self.dtype, self.param_dtype)(x)
    y = PolicyAttention(self.num_heads, self.qkv_bias, self.proj_drop_rate, self.dtype,
                        self.param_dtype, name="attn")(y, policy, train)
    x = x + DropPath(self.drop_path_rate, name="drop_path1")(y, train)
    return mlp_residual(self, x, train)


def mlp_residual(block: nn.Module, x: jax.Array, train: bool) -> jax.Array:
  """The second half of a pre-norm block inside `block`'s scope, with `layers.Block`'s names:
  x + DropPath(Mlp(LN(x))) (`norm2`, `mlp`, `drop_path2`). `block` has mlp_ratio,
  proj_drop_rate, drop_path_rate, dtype and param_dtype."""
  y = layer_norm("norm2", block.dtype, block.param_dtype)(x)
  y = Mlp(int(x.shape[-1] * block.mlp_ratio), drop_rate=block.proj_drop_rate, dtype=block.dtype,
          param_dtype=block.param_dtype, name="mlp")(y, train)
  return x + DropPath(block.drop_path_rate, name="drop_path2")(y, train)


class PolicyAttention(nn.Module):
  """`layers.Attention` (same `qkv`/`proj` parameters) with DynamicViT's policy re-normalisation
  (see `attention_weights`). x (B, N, C), policy (B, N) float -> (B, N, C)."""
  num_heads: int
  qkv_bias: bool = True
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, policy: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    qkv = dense(3 * dim, "qkv", self.dtype, self.param_dtype, use_bias=self.qkv_bias)(x)
    y = attend(*split_qkv(qkv, self.num_heads), policy=policy)
    y = dense(dim, "proj", self.dtype, self.param_dtype)(y)
    return nn.Dropout(self.proj_drop_rate, deterministic=not train)(y)


# ----------------------------------------------------------------------------- ViT scaffolding

def check_plain_vit(model, family: str, cudnn_attention: bool = False) -> None:
  """Token-reduction families build on the plain class-token ViT: reject the other options
  (and attention='cudnn' unless `cudnn_attention`: masked or sampled attention needs 'xla')."""
  problems = []
  if model.attention != "xla" and not cudnn_attention:
    problems.append(f"attention={model.attention!r}")
  if model.distilled:
    problems.append("distilled=True")
  if model.global_pool != "token" or not model.class_token:
    problems.append(f"global_pool={model.global_pool!r}/class_token={model.class_token}")
  if model.init_values:
    problems.append(f"init_values={model.init_values}")
  if problems:
    raise UserError(f"{family} supports only the class-token ViT without LayerScale or a "
                    f"distillation token" + ("" if cudnn_attention else ", with attention='xla'")
                    + f"; drop {', '.join(problems)}.")


def embed(model, x: jax.Array, train: bool) -> jax.Array:
  """A ViT's input stem inside `model`'s compact scope: patches, class token, position embedding
  and its dropout, with `VisionTransformer`'s parameter names. x (B, H, W, 3) -> (B, 1 + N, C)."""
  check_input_size(model, x)
  dtype, dim = jnp.dtype(model.dtype), model.embed_dim
  x = PatchEmbed(model.patch_size, dim, dtype=dtype, param_dtype=model.param_dtype,
                 name="patch_embed")(x.astype(dtype))
  cls = model.param("cls_token", nn.initializers.normal(1e-6), (1, 1, dim), model.param_dtype)
  x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (x.shape[0], 1, dim)), x], axis=1)
  pos_embed = model.param("pos_embed", linear_init, (1, x.shape[1], dim), model.param_dtype)
  return nn.Dropout(model.pos_drop_rate, deterministic=not train)(x + pos_embed.astype(dtype))


def final_norm(model, x: jax.Array) -> jax.Array:
  """The final LayerNorm `norm` over all tokens (B, N, C) -> (B, N, C), sown as
  `intermediates/features` (the ViT family's contract for training rules)."""
  x = layer_norm("norm", jnp.dtype(model.dtype), model.param_dtype)(x)
  model.sow("intermediates", "features", x)
  return x


def classify(model, x: jax.Array, train: bool) -> jax.Array:
  """Head dropout and the linear `head` on the class token of normed tokens -> (B, classes) f32."""
  x = nn.Dropout(model.drop_rate, deterministic=not train)(x[:, 0])
  return classifier_heads(model.num_classes, x, None, train, jnp.dtype(model.dtype),
                          model.param_dtype)
