"""UniNet: convolution and transformer stages found by unified architecture search.

Paper: Liu et al., "UniNet: Unified Architecture Search with Convolution, Transformer, and MLP",
ECCV 2022, arXiv 2207.05420 (not the v1 paper, arXiv 2110.04035, whose networks differ). Structure
and numerics follow the authors' `uninet.py` (Sense-X/UniNet), whose state dicts convert by
renaming (`compact_vit.convert.uninet`).

Stem: 3x3 stride-2 conv (32) + BN + GELU. Six stages (strides 1, 2, 2, 2, 1, 2); a downsampling
module (DSM) leads into every stage but the first:
* stages 1-4: MBConv blocks (`MBConvBlock`): [BN -> 1x1 expand -> BN -> GELU] -> depthwise 3x3
  -> BN -> GELU -> squeeze-excitation (hard sigmoid) -> 1x1 project -> BN (scale zero at init),
  plus the shortcut; the expand part is absent when the expansion is 1.
* stages 5-6: transformer blocks (`AttentionBlock`): x + dwconv3x3(x) (conv position embedding),
  then pre-norm MHSA and MLP (head_dim 32), each scaled by LayerScale (1e-6 at init).
* Local DSM (into stages 2-4): depthwise 3x3/s + BN + 1x1, plus MaxPool(3, s) + 1x1 shortcut.
* Local-Global DSM (into stages 5-6): queries from the local path (+ LayerNorm), keys and values
  from the full-resolution input (LayerNorm, linear), MHSA with head_dim 32, `proj`, plus the
  MaxPool + 1x1 shortcut (a plain 1x1 at stride 1).
Head: 1x1 conv to 1280 + BN + GELU, global average pool, dropout, linear classifier.

Departures from the authors' code: feature maps may be non-square (theirs reshape tokens to a
square map); the transformer block's unused downsampling branch (never built by their variants) is
not implemented; logits are float32 whatever the compute `dtype`. BatchNorm under a globally
sharded jit is synchronised across devices (the statistics are over the global batch).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from compact_vit.models.registry import register
from compact_vit.nn.layers import (DropPath, Dtype, LayerScale, Mlp, check_input_size,
                                   check_settings, conv_general_dilated, dense,
                                   dot_product_attention, drop_path_rates, gelu, make_divisible,
                                   pool2d, settings_problems, spatial_mean, to_pair)

# Variant table: name -> fields of UniNet (the authors' UniNetB0 ... UniNetB5, ECCV version).
_EXPANSION = (1, 4, 6, 3, 2, 5)
VARIANTS: dict[str, dict] = {
    "uninet_b0": dict(repeats=(1, 2, 4, 4, 4, 8), channels=(24, 48, 80, 128, 128, 256),
                      img_size=160),
    "uninet_b1": dict(repeats=(1, 2, 4, 4, 4, 8), channels=(24, 48, 80, 128, 128, 256),
                      img_size=224),
    "uninet_b2": dict(repeats=(2, 3, 6, 6, 6, 12), channels=(24, 48, 80, 128, 128, 256),
                      img_size=256),
    "uninet_b3": dict(repeats=(2, 3, 7, 7, 7, 14), channels=(24, 56, 96, 160, 160, 288),
                      img_size=288),
    "uninet_b4": dict(repeats=(2, 4, 9, 9, 9, 18), channels=(32, 64, 112, 192, 192, 352),
                      img_size=320),
    "uninet_b5": dict(repeats=(3, 5, 10, 10, 10, 20), channels=(32, 64, 112, 224, 224, 448),
                      img_size=384),
}

LN_EPS = 1e-5  # torch's default, as the authors' LayerNorms


def max_pool(x: jax.Array, stride: int) -> jax.Array:
  """MaxPool2d(3, stride, padding=1) on NHWC (padding is -inf, as torch)."""
  return pool2d(x, 3, strides=stride, padding=1, kind="max")


class _Layers:
  """Factories binding dtype / param_dtype / train, so the blocks below read like the paper."""

  def __init__(self, dtype: Dtype, param_dtype: Dtype, train: bool = False):
    self.dtype, self.param_dtype, self.train = dtype, param_dtype, train

  def conv(self, features: int, name: str, kernel: int = 1, stride: int = 1, groups: int = 1,
           bias: bool = True) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=bias, dtype=self.dtype,
                   param_dtype=self.param_dtype, kernel_init=_torch_conv_init,
                   conv_general_dilated=conv_general_dilated, name=name)

  def batch_norm(self, name: str, zero_init: bool = False) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not self.train, momentum=0.9, epsilon=1e-5,
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
                        name=name)

  def layer_norm(self, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name=name)


# torch's default conv init (kaiming_uniform, a=sqrt(5)): variance 1 / (3 fan_in), as the authors'.
_torch_conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class SqueezeExcitation(nn.Module):
  """x * hard_sigmoid(fc2(relu(fc1(mean_hw(x))))); fc1/fc2 are 1x1 convs, squeeze = C/4 -> x8."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    layers = _Layers(self.dtype, self.param_dtype)
    scale = spatial_mean(x, keepdims=True)
    scale = nn.relu(layers.conv(make_divisible(dim // 4, 8), "fc1")(scale))
    scale = layers.conv(dim, "fc2")(scale)
    return x * (jnp.clip(scale + 3.0, 0.0, 6.0) / 6.0)  # relu6(x + 3) / 6


class MBConvBlock(nn.Module):
  """The authors' DWConvBlock: inverted residual with SE and GELU. x (B, H, W, Cin) -> (B, H, W, C).

  Shortcut: identity, or MaxPool(3, 1) + 1x1 conv when the width changes (the stem -> stage 1).
  """
  features: int
  expansion: float
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers = _Layers(self.dtype, self.param_dtype, train)
    in_features = x.shape[-1]
    hidden = int(in_features * self.expansion)
    shortcut = x
    if in_features != self.features:
      shortcut = layers.conv(self.features, "shortcut")(max_pool(x, 1))
    if hidden != in_features:
      x = layers.batch_norm("pre_norm")(x)
      x = layers.conv(hidden, "expand", bias=False)(x)
      x = gelu(layers.batch_norm("expand_norm")(x))
    x = layers.conv(hidden, "dw", kernel=3, groups=hidden, bias=False)(x)
    x = gelu(layers.batch_norm("dw_norm")(x))
    x = SqueezeExcitation(self.dtype, self.param_dtype, name="se")(x)
    x = layers.conv(self.features, "project")(x)
    x = layers.batch_norm("project_norm", zero_init=True)(x)
    return shortcut + DropPath(self.drop_path_rate, name="drop_path")(x, train)


class AttentionBlock(nn.Module):
  """Transformer block with conv position embedding and LayerScale; x (B, H, W, C) -> same.

  x + dwconv3x3(x); then x + DropPath(gamma_1 * MHSA(LN(x))), x + DropPath(gamma_2 * Mlp(LN(x))).
  """
  expansion: float
  head_dim: int = 32
  init_values: float = 1e-6
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    batch, height, width, dim = x.shape
    layers = _Layers(self.dtype, self.param_dtype, train)
    x = x + layers.conv(dim, "pos_embed", kernel=3, groups=dim)(x)
    tokens = x.reshape(batch, height * width, dim)
    y = _Attention(dim // self.head_dim, self.attn_drop_rate, self.drop_rate, self.dtype,
                   self.param_dtype, name="attn")(layers.layer_norm("norm1")(tokens), None, train)
    y = LayerScale(self.init_values, self.param_dtype, name="ls1")(y)
    tokens = tokens + DropPath(self.drop_path_rate, name="drop_path1")(y, train)
    y = Mlp(int(dim * self.expansion), drop_rate=self.drop_rate, dtype=self.dtype,
            param_dtype=self.param_dtype, name="mlp")(layers.layer_norm("norm2")(tokens), train)
    y = LayerScale(self.init_values, self.param_dtype, name="ls2")(y)
    tokens = tokens + DropPath(self.drop_path_rate, name="drop_path2")(y, train)
    return tokens.reshape(batch, height, width, dim)


class _Attention(nn.Module):
  """MHSA with fused `qkv` (timm layout), or cross-attention with queries given and fused `kv`.

  q_in: (B, Nq, C) normalised queries (or the tokens for self-attention); kv_in: (B, Nk, Cin) or
  None. Returns (B, Nq, C) after `proj`. Softmax in float32.
  """
  num_heads: int
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_in: jax.Array, kv_in: jax.Array | None, train: bool = False) -> jax.Array:
    batch, queries, dim = q_in.shape
    heads, head_dim = self.num_heads, dim // self.num_heads
    if kv_in is None:
      qkv = dense(3 * dim, "qkv", self.dtype, self.param_dtype)(q_in)
      qkv = qkv.reshape(batch, queries, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
      q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, head_dim)
    else:
      q = q_in.reshape(batch, queries, heads, head_dim).transpose(0, 2, 1, 3)
      kv = dense(2 * dim, "kv", self.dtype, self.param_dtype)(kv_in)
      kv = kv.reshape(batch, kv_in.shape[1], 2, heads, head_dim).transpose(2, 0, 3, 1, 4)
      k, v = kv[0], kv[1]
    out = dot_product_attention(
        q, k, v, dropout=nn.Dropout(self.attn_drop_rate, deterministic=not train))
    out = out.transpose(0, 2, 1, 3).reshape(batch, queries, dim)
    out = dense(dim, "proj", self.dtype, self.param_dtype)(out)
    return nn.Dropout(self.proj_drop_rate, deterministic=not train)(out)


class LocalDSM(nn.Module):
  """Local downsampling: dw3x3/s + BN + 1x1, plus [MaxPool(3, s)] + 1x1. (B, H, W, Cin) ->
  (B, ceil(H/s), ceil(W/s), C)."""
  features: int
  stride: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers = _Layers(self.dtype, self.param_dtype, train)
    in_features = x.shape[-1]
    shortcut = x if self.stride == 1 else max_pool(x, self.stride)
    shortcut = layers.conv(self.features, "shortcut")(shortcut)
    x = layers.conv(in_features, "dw", kernel=3, stride=self.stride, groups=in_features)(x)
    x = layers.conv(self.features, "project")(layers.batch_norm("dw_norm")(x))
    return x + shortcut


class LocalGlobalDSM(nn.Module):
  """Local-global downsampling: queries = LN(1x1(BN(dw3x3/s(x)))), keys/values = kv(LN(x)) at full
  resolution, MHSA (head_dim 32) + `proj`, plus the [MaxPool(3, s)] + 1x1 shortcut.
  (B, H, W, Cin) -> (B, ceil(H/s), ceil(W/s), C)."""
  features: int
  stride: int
  head_dim: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers = _Layers(self.dtype, self.param_dtype, train)
    batch, in_features = x.shape[0], x.shape[-1]
    shortcut = x if self.stride == 1 else max_pool(x, self.stride)
    shortcut = layers.conv(self.features, "shortcut")(shortcut)
    q = layers.conv(in_features, "q_dw", kernel=3, stride=self.stride, groups=in_features)(x)
    q = layers.conv(self.features, "q_project")(layers.batch_norm("q_dw_norm")(q))
    out_shape = q.shape
    q = layers.layer_norm("q_norm")(q.reshape(batch, -1, self.features))
    kv = layers.layer_norm("kv_norm")(x.reshape(batch, -1, in_features))
    out = _Attention(self.features // self.head_dim, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="attn")(q, kv, train)
    return out.reshape(out_shape) + shortcut


class UniNet(nn.Module):
  """UniNet classifier.

  `__call__(x, train=False)`: x (B, H, W, 3) float32 NHWC, normalised, (H, W) = img_size. Returns
  logits (B, num_classes) in float32. Stage s has `repeats[s]` blocks of width `channels[s]` and
  expansion `expansion[s]`: MBConv for s < `num_conv_stages`, transformer blocks after; the DSM into
  stage s is Local for conv stages and Local-Global for transformer stages. Drop path rises linearly
  from 0 (first block) to `drop_path_rate` (last; DSMs have none); `drop_rate` is the dropout before
  the classifier; `attn_drop_rate` / `proj_drop_rate` apply inside the transformer blocks.
  """
  num_classes: int = 1000
  img_size: int | tuple[int, int] = 224
  repeats: Sequence[int] = (1, 2, 4, 4, 4, 8)
  expansion: Sequence[float] = _EXPANSION
  channels: Sequence[int] = (24, 48, 80, 128, 128, 256)
  strides: Sequence[int] = (1, 2, 2, 2, 1, 2)
  num_conv_stages: int = 4
  stem_dim: int = 32
  head_dim: int = 32
  final_dim: int = 1280
  init_values: float = 1e-6
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    problems = settings_problems(self, ("drop_rate", "attn_drop_rate", "proj_drop_rate",
                                         "drop_path_rate"))
    stages = len(self.channels)
    if not len(self.repeats) == len(self.expansion) == len(self.strides) == stages:
      problems.append(f"repeats, expansion, channels and strides need one entry per stage (got "
                      f"{len(self.repeats)}, {len(self.expansion)}, {stages}, {len(self.strides)})")
    if not 0 <= self.num_conv_stages <= stages:
      problems.append(f"num_conv_stages={self.num_conv_stages} is not in [0, {stages}]")
    if any(r < 1 for r in self.repeats) or any(s < 1 for s in self.strides):
      problems.append("repeats and strides must be positive")
    for s in range(self.num_conv_stages, stages):
      if self.channels[s] % self.head_dim:
        problems.append(f"stage {s} width {self.channels[s]} is not a multiple of "
                        f"head_dim={self.head_dim}")
    if min(to_pair(self.img_size)) < 1:
      problems.append(f"img_size={self.img_size} is not positive")
    check_settings("UniNet", problems)
    super().__post_init__()

  def layout(self) -> list[tuple[str, int]]:
    """The flat `blocks_j` sequence as (kind, stage): kind in local_dsm, local_global_dsm,
    mbconv, attention; the same order as the authors' `blocks` Sequential."""
    out = []
    for s, repeats in enumerate(self.repeats):
      conv = s < self.num_conv_stages
      if s:
        out.append(("local_dsm" if conv else "local_global_dsm", s))
      out += [("mbconv" if conv else "attention", s)] * repeats
    return out

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_input_size(self, x)
    dtype = jnp.dtype(self.dtype)
    layers = _Layers(dtype, self.param_dtype, train)
    x = layers.conv(self.stem_dim, "stem_conv", kernel=3, stride=2, bias=False)(x.astype(dtype))
    x = gelu(layers.batch_norm("stem_norm")(x))
    rates = iter(drop_path_rates(self.drop_path_rate, sum(self.repeats)))
    common = dict(dtype=dtype, param_dtype=self.param_dtype)
    for j, (kind, s) in enumerate(self.layout()):
      name = f"blocks_{j}"
      if kind == "local_dsm":
        x = LocalDSM(self.channels[s], self.strides[s], name=name, **common)(x, train)
      elif kind == "local_global_dsm":
        x = LocalGlobalDSM(self.channels[s], self.strides[s], self.head_dim, name=name,
                           **common)(x, train)
      elif kind == "mbconv":
        x = MBConvBlock(self.channels[s], self.expansion[s], next(rates), name=name,
                        **common)(x, train)
      else:
        x = AttentionBlock(self.expansion[s], self.head_dim, self.init_values, self.proj_drop_rate,
                           self.attn_drop_rate, next(rates), name=name, **common)(x, train)
    x = layers.conv(self.final_dim, "final_conv", bias=False)(x)
    x = spatial_mean(gelu(layers.batch_norm("final_norm")(x)))
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    return dense(self.num_classes, "classifier", dtype, self.param_dtype)(x).astype(jnp.float32)


for _name, _fields in VARIANTS.items():
  register(_name)(functools.partial(UniNet, **_fields))
