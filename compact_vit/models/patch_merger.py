"""PatchMerger: a ViT that merges its patch tokens into a few learned ones halfway through.

Paper: Renggli et al., "Learning to Merge Tokens in Vision Transformers", arXiv 2202.12015 (no
official code). After block `merge_after` (6 of 12) the N patch tokens X become M
(`num_merged_tokens`, 8) tokens Y = softmax(W LN(X)ᵀ) X, with learned queries W (M, C) and the
softmax over the N inputs for each output; the remaining blocks run on M tokens (+ class token),
which roughly halves the MACs.

Departures from the paper: the paper's ViTs pool globally; here the class token (and timm's
class-token head) is kept and passes the merger unchanged, so timm/DeiT ViT weights load directly
(`compact_vit.convert`; the merger then starts freshly initialised). The logits carry no
temperature (the paper gives none).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from compact_vit.errors import UserError
from compact_vit.models.registry import register
from compact_vit.nn.layers import Block, Dtype, drop_path_rates, layer_norm, linear_init
from compact_vit.models.vit import VisionTransformer
from compact_vit.nn import tokens as tok

_SMALL = dict(embed_dim=384, depth=12, num_heads=6, patch_size=16)
_BASE = dict(embed_dim=768, depth=12, num_heads=12, patch_size=16)
VARIANTS: dict[str, dict] = {
    "patchmerger_vit_s16": _SMALL,
    "patchmerger_vit_b16": _BASE,
}


class PatchMerger(nn.Module):
  """x (B, N, C) -> (B, M, C): M softmax-weighted averages of the N tokens, weights from learned
  `queries` (M, C) against the LayerNormed tokens (`norm`); the average is of the raw tokens."""
  num_merged_tokens: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    queries = self.param("queries", linear_init, (self.num_merged_tokens, x.shape[-1]),
                         self.param_dtype)
    logits = jnp.einsum("mc,bnc->bmn", queries.astype(self.dtype),
                        layer_norm("norm", self.dtype, self.param_dtype)(x))
    weights = tok.attention_weights(logits[:, None])[:, 0].astype(x.dtype)  # softmax over N
    return jnp.einsum("bmn,bnc->bmc", weights, x)


class PatchMergerViT(VisionTransformer):
  """ViT with a `PatchMerger` (`patch_merger`) after block `merge_after`.

  `__call__(x, train=False)` -> logits (B, num_classes) float32.
  """
  num_merged_tokens: int = 8
  merge_after: int = 6

  def __post_init__(self):
    tok.check_plain_vit(self, "PatchMerger", cudnn_attention=True)
    if not 0 < self.merge_after < self.depth:
      raise UserError(f"merge_after={self.merge_after} must be in [1, {self.depth - 1}] "
                      f"(a block index boundary of the depth-{self.depth} model).")
    if self.num_merged_tokens < 1:
      raise UserError(f"num_merged_tokens={self.num_merged_tokens} must be positive.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dtype = jnp.dtype(self.dtype)
    x = tok.embed(self, x, train)
    for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
      if i == self.merge_after:
        merged = PatchMerger(self.num_merged_tokens, dtype, self.param_dtype,
                             name="patch_merger")(x[:, 1:])
        x = jnp.concatenate([x[:, :1], merged], axis=1)
      x = Block(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                drop_path_rate=rate, attn_drop_rate=self.attn_drop_rate,
                proj_drop_rate=self.proj_drop_rate, dtype=dtype, param_dtype=self.param_dtype,
                attention=self.attention, name=f"blocks_{i}")(x, train=train)
    return tok.classify(self, tok.final_norm(self, x), train)


for _name, _fields in VARIANTS.items():
  register(_name)(functools.partial(PatchMergerViT, **_fields))
