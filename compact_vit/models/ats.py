"""ATS: Adaptive Token Sampling, parameter-free, on DeiT.

Paper: Fayyaz et al., "Adaptive Token Sampler For Vision Transformers", ECCV 2022
(arXiv 2111.15667); code: adaptivetokensampling/ATS (libs/models/transformers/ats_block.py).

An ATS block scores the patch tokens by significance S_j ∝ (Σ_heads A_cls,j)·‖V_j‖ (the class
token's attention times the norm of the value over all heads), sorts them, takes the min-max
normalised cumulative sum as a CDF, samples it at K−1 evenly spaced points from its first
positive value to 1, maps each point to the nearest CDF entry (inverse transform sampling) and
keeps the distinct tokens. The class token always stays. Only the selected tokens' queries go
through the rest of the block (attention over all current keys, projection, MLP), as in the
authors' code, which is where the MACs are saved. No parameters are added, so converted DeiT
weights work off the shelf and fine-tune with the ordinary classification objective.

Static shapes (departure from the authors' code): each ATS block outputs a fixed K slots (class
token + K−1 samples); duplicate samples leave their slot masked (a `jnp.where` key mask with the
self-connection kept) instead of shrinking the tensor, so one compilation serves every image and
the MACs are those of K tokens whatever the image. The authors run ATS in blocks 3–11 with K = 197
and let the number of distinct tokens vary per image (≈2.9 GFLOPs on average for DeiT-S, i.e.
≈0.63× DeiT-S); the default here is ATS in blocks 3, 6, 9 with K = 176, 144, 116 (at most 175,
143, 115 distinct patches), 3.70 GMACs = 0.805× DeiT-S's for every image, a static upper bound
of the adaptive count: on images whose CDF concentrates, fewer slots are valid and the rest compute
masked tokens. The kept slots per stage are sown as `kept_positions` / `kept_valid`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from compact_vit.errors import UserError
from compact_vit.models.registry import register
from compact_vit.nn.layers import Block, DropPath, Dtype, dense, drop_path_rates, layer_norm
from compact_vit.models.vit import VisionTransformer
from compact_vit.nn import tokens as tok

VARIANTS: dict[str, dict] = {
    "ats_deit_s": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16,
                       ats_blocks=(3, 6, 9), num_tokens=(176, 144, 116)),
}


def inverse_transform_sample(significance: jax.Array, num_samples: int
                             ) -> tuple[jax.Array, jax.Array]:
  """ATS's sampling: significance (B, n) >= 0 -> (index (B, num_samples), valid (B, num_samples)).

  Sorts ascending, normalises the cumulative sum to [0, 1], places `num_samples` points evenly from
  its smallest positive value to 1, picks for each the nearest CDF entry (first on ties), and
  keeps each distinct pick once: `index` holds the distinct tokens (original positions, in
  increasing significance) then padding (`valid` False). An all-zero row picks one token.
  """
  significance = significance.astype(jnp.float32)
  n = significance.shape[-1]
  total = jnp.sum(significance, axis=-1, keepdims=True)
  scores = significance / jnp.where(total > 0, total, 1.0)
  order = jnp.argsort(scores, axis=-1)
  cdf = jnp.cumsum(jnp.take_along_axis(scores, order, axis=-1), axis=-1)
  span = cdf[:, -1:] - cdf[:, :1]
  cdf = (cdf - cdf[:, :1]) / jnp.where(span > 0, span, 1.0)
  start = jnp.min(jnp.where(cdf > 0, cdf, jnp.inf), axis=-1, keepdims=True)
  start = jnp.where(jnp.isfinite(start), start, 0.0)
  steps = jnp.arange(num_samples, dtype=jnp.float32) / max(num_samples - 1, 1)
  ys = start + steps * (1.0 - start)  # (B, S)
  picks = jnp.argmin(jnp.abs(ys[:, :, None] - cdf[:, None, :]), axis=-1)  # (B, S) sorted slots
  slots, valid = tok.unique_fixed(picks, fill_value=n)
  index = jnp.take_along_axis(order, jnp.minimum(slots, n - 1), axis=-1)
  return index, valid


class ATSAttention(nn.Module):
  """Attention that samples its queries: `layers.Attention`'s `qkv`/`proj` parameters.

  x (B, N, C) normed, mask (B, N) bool or None (valid slots of the previous stage) ->
  (out (B, K, C) for the selected queries, valid (B, K) bool, slots (B, K) int into N; slot 0 is
  the class token). Keys are all N input tokens (masked ones excluded).
  """
  num_tokens: int
  num_heads: int
  qkv_bias: bool = True
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False):
    batch, n_in, dim = x.shape
    qkv = dense(3 * dim, "qkv", self.dtype, self.param_dtype, use_bias=self.qkv_bias)(x)
    q, k, v = tok.split_qkv(qkv, self.num_heads)
    masking = {} if mask is None else {"key_mask": mask}
    cls_logits = jnp.einsum("bqhd,bkhd->bhqk", q[:, :1] * q.shape[-1]**-0.5, k)
    cls_attn = tok.attention_weights(cls_logits, query_index=jnp.zeros((batch, 1), jnp.int32),
                                     **masking)
    value_norm = jnp.linalg.norm(v.reshape(batch, n_in, dim).astype(jnp.float32), axis=-1)
    significance = jnp.sum(cls_attn[:, :, 0], axis=1) * value_norm  # (B, N)
    if mask is not None:
      significance = jnp.where(mask, significance, 0.0)
    index, valid = inverse_transform_sample(jax.lax.stop_gradient(significance[:, 1:]),
                                            self.num_tokens - 1)
    slots = jnp.concatenate([jnp.zeros((batch, 1), index.dtype), index + 1], axis=1)
    valid = jnp.concatenate([jnp.ones((batch, 1), bool), valid], axis=1)
    out = tok.attend(tok.gather_tokens(q, slots), k, v, query_index=slots, **masking)
    out = dense(dim, "proj", self.dtype, self.param_dtype)(out)
    return nn.Dropout(self.proj_drop_rate, deterministic=not train)(out), valid, slots


class ATSBlock(nn.Module):
  """Pre-norm transformer block with adaptive token sampling; `layers.Block`'s parameter names.

  x (B, N, C), mask (B, N) bool or None -> (x (B, K, C), valid (B, K), slots (B, K)); the residual
  stream is gathered at the selected slots.
  """
  num_tokens: int
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False):
    y = layer_norm("norm1", self.dtype, self.param_dtype)(x)
    y, valid, slots = ATSAttention(self.num_tokens, self.num_heads, self.qkv_bias,
                                   self.proj_drop_rate, self.dtype, self.param_dtype,
                                   name="attn")(y, mask, train)
    x = tok.gather_tokens(x, slots) + DropPath(self.drop_path_rate, name="drop_path1")(y, train)
    return tok.mlp_residual(self, x, train), valid, slots


class ATSViT(VisionTransformer):
  """DeiT with ATS blocks at `ats_blocks`, block `ats_blocks[s]` keeping `num_tokens[s]` slots
  (class token included). `__call__(x, train=False)` -> logits (B, num_classes) float32; the same
  sampling runs in training (it is deterministic and parameter-free)."""
  ats_blocks: tuple[int, ...] = (3, 6, 9)
  num_tokens: tuple[int, ...] = (176, 144, 116)

  def __post_init__(self):
    tok.check_plain_vit(self, "ATS")
    blocks, counts = tuple(self.ats_blocks), tuple(self.num_tokens)
    num_patches = self.grid_size[0] * self.grid_size[1]
    if (not blocks or list(blocks) != sorted(set(blocks)) or blocks[0] < 0
        or blocks[-1] >= self.depth):
      raise UserError(f"ats_blocks={blocks} must be increasing block indices in [0, {self.depth}).")
    if len(counts) != len(blocks):
      raise UserError(f"num_tokens={counts} needs one count per ATS block {blocks}.")
    previous = (num_patches + 1,) + counts
    if any(k < 3 for k in counts) or any(k > before for before, k in zip(previous, counts)):
      raise UserError(f"num_tokens={counts} must be non-increasing, >= 3 and <= {num_patches + 1} "
                      "(the class token plus the patches).")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dtype = jnp.dtype(self.dtype)
    x = tok.embed(self, x, train)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])  # 0 = class token
    common = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                  proj_drop_rate=self.proj_drop_rate, dtype=dtype, param_dtype=self.param_dtype)
    mask = None
    for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
      if i in self.ats_blocks:
        count = self.num_tokens[self.ats_blocks.index(i)]
        x, valid, slots = ATSBlock(count, drop_path_rate=rate, name=f"blocks_{i}", **common)(
            x, mask, train)
        mask = valid if mask is None else valid & tok.gather_tokens(mask, slots)
        positions = tok.gather_tokens(positions, slots)
        self.sow("intermediates", "kept_positions", positions)
        self.sow("intermediates", "kept_valid", mask)
      else:
        x = Block(attn_drop_rate=self.attn_drop_rate, drop_path_rate=rate, name=f"blocks_{i}",
                  **common)(x, mask, train)
    return tok.classify(self, tok.final_norm(self, x), train)


for _name, _fields in VARIANTS.items():
  register(_name)(functools.partial(ATSViT, **_fields))
