"""Vision Transformer and DeiT.

Papers: Dosovitskiy et al., "An Image is Worth 16x16 Words", arXiv 2010.11929; Touvron et al.,
"Training data-efficient image transformers & distillation through attention", arXiv 2012.12877.
Structure, names and defaults follow timm's `vision_transformer.py` / `deit.py`, so timm and
facebookresearch/deit checkpoints convert by renaming (`compact_vit.convert`).

Departures from timm:
* Distilled models return `DistilledLogits(cls_logits, dist_logits)` (compact_vit.nn.layers)
  whenever `train=True` (timm only when `set_distilled_training(True)` was called); `train=False`
  returns their average, as timm.
* The input size is fixed by `img_size` (no dynamic resampling of the position embedding in the
  forward pass; `compact_vit.convert` resamples it once when loading a checkpoint of another size).
* Logits are returned in float32 whatever the compute `dtype`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from compact_vit.models.registry import register
from compact_vit.nn.layers import (ATTENTION_IMPLEMENTATIONS, Block, DistilledLogits, Dtype,
                                   PatchEmbed, check_input_size, check_settings, classifier_heads,
                                   drop_path_rates, layer_norm, linear_init, settings_problems,
                                   to_pair)

# Variant table: name -> fields of VisionTransformer. DeiT and the original ViT share the
# architecture at these sizes; only their released weights differ.
_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
VARIANTS: dict[str, dict] = {
    "deit_tiny_patch16_224": dict(_TINY, patch_size=16),
    "deit_small_patch16_224": dict(_SMALL, patch_size=16),
    "deit_base_patch16_224": dict(_BASE, patch_size=16),
    "deit_tiny_distilled_patch16_224": dict(_TINY, patch_size=16, distilled=True),
    "deit_small_distilled_patch16_224": dict(_SMALL, patch_size=16, distilled=True),
    "deit_base_distilled_patch16_224": dict(_BASE, patch_size=16, distilled=True),
    "vit_tiny_patch16_224": dict(_TINY, patch_size=16),
    "vit_small_patch16_224": dict(_SMALL, patch_size=16),
    "vit_base_patch16_224": dict(_BASE, patch_size=16),
}


class VisionTransformer(nn.Module):
  """ViT / DeiT classifier.

  `__call__(x, train=False)`: x (B, H, W, 3) float32 NHWC, normalised, with (H, W) = img_size.
  Returns logits (B, num_classes) in float32. With `distilled=True` and `train=True` it returns
  `DistilledLogits(cls_logits, dist_logits)` instead: the class-token head and the
  distillation-token head, each (B, num_classes); with `train=False`, their average.
  Contract for training rules: the tokens after the blocks and the final norm, (B, prefix +
  patches, embed_dim) (with global_pool='avg': before pooling and `fc_norm`), are sown as
  `intermediates/features` (read them with `mutable=["intermediates"]`).

  Tokens: [cls] (if class_token), [dist] (if distilled), then the patches; `pos_embed` covers all of
  them. `global_pool='avg'` averages the patch tokens and applies `fc_norm` instead of `norm`, as
  timm. `drop_rate` is the dropout before the head(s); drop path rises linearly from 0 at the first
  block to `drop_path_rate` at the last. `init_values` enables LayerScale (DeiT III). `remat`
  recomputes each block in the backward pass (`nn.remat`; same parameters, less activation memory).
  `attention='cudnn'` runs the blocks' attention as cuDNN's fused flash attention (NVIDIA GPU,
  bfloat16/float16 compute, attn_drop_rate 0; `layers.Attention`); the default 'xla' runs anywhere.
  """
  num_classes: int = 1000
  img_size: int | tuple[int, int] = 224
  patch_size: int | tuple[int, int] = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  init_values: float | None = None
  class_token: bool = True
  distilled: bool = False
  global_pool: str = "token"
  drop_rate: float = 0.0
  pos_drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str = "xla"

  def __post_init__(self):
    problems = settings_problems(self, ("drop_rate", "pos_drop_rate", "attn_drop_rate",
                                         "proj_drop_rate", "drop_path_rate"))
    if self.embed_dim % self.num_heads:
      problems.append(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
    if self.global_pool not in ("token", "avg"):
      problems.append(f"global_pool={self.global_pool!r} is not 'token' or 'avg'")
    if self.global_pool == "token" and not self.class_token:
      problems.append("global_pool='token' needs class_token=True")
    if self.distilled and (not self.class_token or self.global_pool != "token"):
      problems.append("distilled=True needs class_token=True and global_pool='token'")
    if any(s % p for s, p in zip(to_pair(self.img_size), to_pair(self.patch_size))):
      problems.append(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      problems.append(f"attention={self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    check_settings("VisionTransformer", problems)
    super().__post_init__()

  @property
  def grid_size(self) -> tuple[int, int]:
    """Patch grid (rows, columns) for `img_size`."""
    (h, w), (ph, pw) = to_pair(self.img_size), to_pair(self.patch_size)
    return h // ph, w // pw

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patches: class token and distillation token."""
    return int(self.class_token) + int(self.distilled)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | DistilledLogits:
    check_input_size(self, x)
    dtype, dim = jnp.dtype(self.dtype), self.embed_dim
    x = PatchEmbed(self.patch_size, dim, dtype=dtype, param_dtype=self.param_dtype,
                   name="patch_embed")(x.astype(dtype))
    prefix = []
    if self.class_token:  # timm: normal(std=1e-6)
      prefix.append(self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, dim),
                               self.param_dtype))
    if self.distilled:
      prefix.append(self.param("dist_token", linear_init, (1, 1, dim), self.param_dtype))
    prefix = [jnp.broadcast_to(t.astype(dtype), (x.shape[0], 1, dim)) for t in prefix]
    x = jnp.concatenate(prefix + [x], axis=1)
    pos_embed = self.param("pos_embed", linear_init, (1, x.shape[1], dim), self.param_dtype)
    x = nn.Dropout(self.pos_drop_rate, deterministic=not train)(x + pos_embed.astype(dtype))

    block = nn.remat(Block, static_argnums=(3,)) if self.remat else Block  # 3: `train`
    for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
      x = block(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                init_values=self.init_values, drop_path_rate=rate,
                attn_drop_rate=self.attn_drop_rate, proj_drop_rate=self.proj_drop_rate,
                dtype=dtype, param_dtype=self.param_dtype, attention=self.attention,
                name=f"blocks_{i}")(x, None, train)

    head_drop = nn.Dropout(self.drop_rate, deterministic=not train)
    if self.global_pool == "avg":
      self.sow("intermediates", "features", x)
      x = layer_norm("fc_norm", dtype, self.param_dtype)(x[:, self.num_prefix_tokens:].mean(1))
      return classifier_heads(self.num_classes, head_drop(x), None, train, dtype, self.param_dtype)
    x = layer_norm("norm", dtype, self.param_dtype)(x)
    self.sow("intermediates", "features", x)
    return classifier_heads(self.num_classes, head_drop(x[:, 0]),
                            head_drop(x[:, 1]) if self.distilled else None, train, dtype,
                            self.param_dtype)

for _name, _fields in VARIANTS.items():
  register(_name)(functools.partial(VisionTransformer, **_fields))
