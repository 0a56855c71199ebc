"""EfficientFormerV2: a 4-stage conv network with local FFNs and attention at 1/32.

Paper: Li et al., "Rethinking Vision Transformers for MobileNet Size and Speed", ICCV 2023,
arXiv 2212.08059. Structure, names and defaults follow timm's `efficientformer_v2.py` (a refactor of
snap-research/EfficientFormer `models/efficientformer_v2.py`), so both checkpoints convert by
renaming (`compact_vit.convert.efficientformer`).

Layout, NHWC: stem (two 3x3/2 ConvNormAct, GELU) -> 4 stages; stages 2-4 start with a 3x3/2
ConvNorm downsample, the one before stage 4 adds Attention2dDownsample (LGQuery: pooled +
depthwise-strided queries over full-resolution keys). Every block is x + LS(LocalFFN(x)) (1x1,
BN, GELU, dw3x3, BN, GELU, 1x1, BN; per-block expansion ratios), preceded in the last `num_vit`
blocks of stages 3 and 4 by x + LS(Attention2d(x)): talking-head attention with a learned
relative-position bias and a depthwise `v_local` term; in stage 3 it runs on a stride-2 map
(`stride_conv`) and is upsampled back bilinearly. Final BN, spatial mean, `head` + `head_dist`.

Departures from timm and the authors' code:
* `train=True` returns `DistilledLogits(head, head_dist)` when `distillation` (timm: only after
  `set_distilled_training()`); `train=False` returns their average.
* `img_size` must be a multiple of 32 (the stride-2 attention is upsampled back to the stage-3 map).
* Logits are float32 whatever the compute `dtype`; attention softmax runs in float32.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from compact_vit.models.registry import register
from compact_vit.models.efficientformer import (RATES, check_img_size, distilled_heads,
                                                relative_bias_index)
from compact_vit.nn.layers import (ConvNormAct, Dtype, DropPath, LayerScale, batch_norm, gelu,
                                   check_input_size, check_settings, conv_general_dilated,
                                   conv_init, drop_path_rates, exporting,
                                   settings_problems, spatial_mean, to_pair)

# Variant table: name -> fields of EfficientFormerV2. Expansion ratios are per block
# (timm's EfficientFormer_expansion_ratios); drop path is each variant's training default.
VARIANTS: dict[str, dict] = {
    "efficientformerv2_s0": dict(
        embed_dims=(32, 48, 96, 176), depths=(2, 2, 6, 4), num_vit=2, drop_path_rate=0.0,
        mlp_ratios=(4, 4, (4, 3, 3, 3, 4, 4), (4, 3, 3, 4))),
    "efficientformerv2_s1": dict(
        embed_dims=(32, 48, 120, 224), depths=(3, 3, 9, 6), num_vit=2, drop_path_rate=0.0,
        mlp_ratios=(4, 4, (4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4))),
    "efficientformerv2_s2": dict(
        embed_dims=(32, 64, 144, 288), depths=(4, 4, 12, 8), num_vit=4, drop_path_rate=0.02,
        mlp_ratios=(4, 4, (4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4))),
    "efficientformerv2_l": dict(
        embed_dims=(40, 80, 192, 384), depths=(5, 5, 15, 10), num_vit=6, drop_path_rate=0.1,
        mlp_ratios=(4, 4, (4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4),
                    (4, 4, 4, 3, 3, 3, 3, 4, 4, 4))),
}


def upsample2x_bilinear(x: jax.Array) -> jax.Array:
  """torch's Upsample(scale_factor=2, mode='bilinear', align_corners=False): (B, H, W, C) ->
  (B, 2H, 2W, C). Output 2i takes 3/4 of input i and 1/4 of i-1, output 2i+1 3/4 of i and 1/4 of
  i+1, with the border replicated."""
  if exporting() and isinstance(x.shape[0], int):  # one ONNX Resize (half-pixel, linear), the
    # same weights at 2x; jax2onnx's Resize needs a static batch, so a dynamic one keeps the slices
    return jax.image.resize(x, (x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3]),
                            "linear", antialias=False)

  def along(x, axis):
    prev = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis),
                            jax.lax.slice_in_dim(x, 0, -1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, None, axis=axis),
                           jax.lax.slice_in_dim(x, -1, None, axis=axis)], axis=axis)
    even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1)
    return out.reshape(*x.shape[:axis], 2 * x.shape[axis], *x.shape[axis + 1:])
  return along(along(x, 1), 2)


def _tokens(x: jax.Array, heads: int) -> jax.Array:
  """(B, H, W, heads * d) -> (B, H*W, heads, d): torch's reshape(B, heads, d, N) of NCHW."""
  return x.reshape(x.shape[0], -1, heads, x.shape[-1] // heads)


def _channels_first(x: jax.Array, heads: int) -> jax.Array:
  """(B, H, W, heads * d) -> (B, heads, d, H*W), timm's layout of q, k and v. In an ONNX export the
  transpose cancels against the one the Conv lowering puts after the convolution, and the
  matmuls below take these operands through their own transposes (onnxruntime's FusedMatMul)."""
  batch, height, width, channels = x.shape
  return jnp.transpose(x, (0, 3, 1, 2)).reshape(batch, heads, channels // heads, height * width)


def _channels_last(x: jax.Array, height: int, width: int) -> jax.Array:
  """(B, heads, d, H*W) -> (B, H, W, heads * d): the inverse of `_channels_first`."""
  return jnp.transpose(x.reshape(x.shape[0], -1, height, width), (0, 2, 3, 1))


class Attention2d(nn.Module):
  """Attention4D: talking-head attention with learned relative bias and a local value term.

  x: (B, H, W, C) -> (B, H, W, C). With `stride` 2 the attention runs on a (H/2, W/2) map made by
  a depthwise 3x3/2 `stride_conv` and is upsampled back (bilinear). `attention_biases`:
  (heads, h*w) for the attention grid (h, w). q, k: key_dim per head; v: attn_ratio * key_dim.
  """
  num_heads: int = 8
  key_dim: int = 32
  attn_ratio: float = 4.0
  stride: int | None = None  # None or 2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    heads = self.num_heads
    val_dim = int(self.attn_ratio * self.key_dim) * heads
    conv_norm = functools.partial(ConvNormAct, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.stride is not None:
      x = conv_norm(dim, 3, strides=self.stride, groups=dim, name="stride_conv")(x, train)
    batch, height, width, _ = x.shape
    q = conv_norm(heads * self.key_dim, name="q")(x, train)
    k = conv_norm(heads * self.key_dim, name="k")(x, train)
    v = conv_norm(val_dim, name="v")(x, train)
    v_local = conv_norm(val_dim, 3, groups=val_dim, name="v_local")(v, train)

    biases = self.param("attention_biases", nn.initializers.zeros, (heads, height * width),
                        self.param_dtype)
    bias = biases[:, relative_bias_index((height, width), (height, width))]  # (heads, N, N)
    # Talking heads: 1x1 convs across the head axis, before and after the softmax over keys.
    talk = functools.partial(nn.Conv, heads, (1, 1), kernel_init=conv_init, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    talk1, talk2 = talk(name="talking_head1"), talk(name="talking_head2")
    if exporting():  # timm's layout: heads-first MatMuls on channels-first q, k, v (ONNX
      # MatMul); the transposes around the talking-head convs cancel against the Conv lowering's
      heads_last, heads_first = (lambda t: jnp.transpose(t, (0, 2, 3, 1)),
                                 lambda t: jnp.transpose(t, (0, 3, 1, 2)))
      qt, kt, vt = (_channels_first(t, heads) for t in (q, k, v))  # (B, heads, d, N)
      logits = (jnp.matmul(jnp.swapaxes(qt, -1, -2), kt) * self.key_dim**-0.5).astype(jnp.float32)
      logits = heads_first(talk1(heads_last(logits + bias.astype(jnp.float32))))
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
      weights = heads_first(talk2(heads_last(weights)))
      out = _channels_last(jnp.matmul(vt, jnp.swapaxes(weights, -1, -2)), height, width)
    else:
      logits = jnp.einsum("bqhd,bkhd->bqkh", _tokens(q, heads) * self.key_dim**-0.5,
                          _tokens(k, heads)).astype(jnp.float32)
      logits = logits + jnp.transpose(bias, (1, 2, 0)).astype(jnp.float32)
      logits = talk1(logits).astype(jnp.float32)
      weights = talk2(jax.nn.softmax(logits, axis=2).astype(v.dtype))
      out = jnp.einsum("bqkh,bkhd->bqhd", weights, _tokens(v, heads))
      out = out.reshape(batch, height, width, val_dim)
    out = out + v_local
    if self.stride is not None:
      out = upsample2x_bilinear(out)
    return conv_norm(dim, name="proj")(gelu(out), train)


class LocalGlobalQuery(nn.Module):
  """LGQuery: x[:, ::2, ::2] (timm's AvgPool2d(1, 2)) + depthwise 3x3/2 conv `local`, then a 1x1
  ConvNorm `proj`. (B, H, W, C) -> (B, H/2, W/2, features). Under `export_forms()` the subsampling
  is timm's 1x1/2 pool (ONNX AveragePool, which onnxruntime keeps in its blocked layout; a strided
  Slice needs the map reordered to NCHW and back)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    local = nn.Conv(dim, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=dim,
                    kernel_init=conv_init, dtype=self.dtype, param_dtype=self.param_dtype,
                    conv_general_dilated=conv_general_dilated, name="local")(x)
    sub = nn.avg_pool(x, window_shape=(1, 1), strides=(2, 2)) if exporting() else x[:, ::2, ::2]
    return ConvNormAct(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="proj")(local + sub, train)


class Attention2dDownsample(nn.Module):
  """Attention4DDownsample: queries on the stride-2 grid (LGQuery), keys and values on the full
  (H, W) map. (B, H, W, C) -> (B, H/2, W/2, out_dim). `attention_biases`: (heads, H*W), indexed by
  the offset between the query's position (2i, 2j) and each key."""
  out_dim: int
  num_heads: int = 8
  key_dim: int = 16
  attn_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    heads = self.num_heads
    val_dim = int(self.attn_ratio * self.key_dim) * heads
    conv_norm = functools.partial(ConvNormAct, dtype=self.dtype, param_dtype=self.param_dtype)
    batch, height, width, _ = x.shape
    q = LocalGlobalQuery(heads * self.key_dim, self.dtype, self.param_dtype, name="q")(x, train)
    k = conv_norm(heads * self.key_dim, name="k")(x, train)
    v = conv_norm(val_dim, name="v")(x, train)
    v_local = conv_norm(val_dim, 3, strides=2, groups=val_dim, name="v_local")(v, train)

    biases = self.param("attention_biases", nn.initializers.zeros, (heads, height * width),
                        self.param_dtype)
    bias = biases[:, relative_bias_index(q.shape[1:3], (height, width), query_stride=2)]
    if exporting():  # as in Attention2d: heads-first MatMuls on channels-first q, k, v
      qt, kt, vt = (_channels_first(t, heads) for t in (q, k, v))
      logits = (jnp.matmul(jnp.swapaxes(qt, -1, -2), kt) * self.key_dim**-0.5).astype(jnp.float32)
      weights = jax.nn.softmax(logits + bias.astype(jnp.float32), axis=-1).astype(v.dtype)
      out = _channels_last(jnp.matmul(vt, jnp.swapaxes(weights, -1, -2)), *q.shape[1:3])
    else:
      logits = jnp.einsum("bqhd,bkhd->bhqk", _tokens(q, heads) * self.key_dim**-0.5,
                          _tokens(k, heads)).astype(jnp.float32)
      weights = jax.nn.softmax(logits + bias.astype(jnp.float32), axis=-1).astype(v.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, _tokens(v, heads))
      out = out.reshape(batch, *q.shape[1:3], val_dim)
    out = out + v_local
    return conv_norm(self.out_dim, name="proj")(gelu(out), train)


class Downsample(nn.Module):
  """3x3/2 ConvNorm `conv`, plus `attn` (Attention2dDownsample) when `use_attn`:
  (B, H, W, C) -> (B, H/2, W/2, features)."""
  features: int
  use_attn: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    out = ConvNormAct(self.features, 3, strides=2, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="conv")(x, train)
    if self.use_attn:
      out = out + Attention2dDownsample(self.features, dtype=self.dtype,
                                        param_dtype=self.param_dtype, name="attn")(x, train)
    return out


class LocalFFN(nn.Module):
  """timm's ConvMlpWithNorm with mid_conv: `fc1` 1x1 ConvNormAct (GELU) -> `mid` dw3x3
  ConvNormAct (GELU) -> drop -> `fc2` 1x1 ConvNorm -> drop. (B, H, W, C) -> same shape."""
  hidden_features: int
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv_norm = functools.partial(ConvNormAct, dtype=self.dtype, param_dtype=self.param_dtype)
    drop = nn.Dropout(self.drop_rate, deterministic=not train)
    dim, hidden = x.shape[-1], self.hidden_features
    x = conv_norm(hidden, act=gelu, name="fc1")(x, train)
    x = drop(conv_norm(hidden, 3, groups=hidden, act=gelu, name="mid")(x, train))
    return drop(conv_norm(dim, name="fc2")(x, train))


class Block(nn.Module):
  """x + LS(Attention2d(x)) if `use_attn`, then x + LS(LocalFFN(x)). (B, H, W, C) -> same."""
  mlp_ratio: float = 4.0
  use_attn: bool = False
  attn_stride: int | None = None
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_scale_init: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.use_attn:
      y = Attention2d(stride=self.attn_stride, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="token_mixer")(x, train)
      y = LayerScale(self.layer_scale_init, self.param_dtype, name="ls1")(y)
      x = x + DropPath(self.drop_path_rate, name="drop_path1")(y, train)
    y = LocalFFN(int(x.shape[-1] * self.mlp_ratio), self.drop_rate, self.dtype, self.param_dtype,
                 name="mlp")(x, train)
    y = LayerScale(self.layer_scale_init, self.param_dtype, name="ls2")(y)
    return x + DropPath(self.drop_path_rate, name="drop_path2")(y, train)


class Stem(nn.Module):
  """Two 3x3/2 ConvNormAct with GELU (`conv1`: features // 2, `conv2`: features)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, features in enumerate((self.features // 2, self.features), start=1):
      x = ConvNormAct(features, 3, strides=2, act=gelu, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=f"conv{i}")(x, train)
    return x


class Stage(nn.Module):
  """Optional `downsample` (with attention when `downsample_attn`), then `blocks_{j}`; the last
  `num_attn` blocks have attention, with stride `attn_stride`."""
  dim: int
  mlp_ratios: Sequence[float]
  drop_path_rates: Sequence[float]
  downsample: bool = True
  downsample_attn: bool = False
  num_attn: int = 0
  attn_stride: int | None = None
  drop_rate: float = 0.0
  layer_scale_init: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.downsample:
      x = Downsample(self.dim, self.downsample_attn, self.dtype, self.param_dtype,
                     name="downsample")(x, train)
    depth = len(self.mlp_ratios)
    for j, (ratio, rate) in enumerate(zip(self.mlp_ratios, self.drop_path_rates)):
      x = Block(ratio, use_attn=j >= depth - self.num_attn, attn_stride=self.attn_stride,
                drop_rate=self.drop_rate, drop_path_rate=rate,
                layer_scale_init=self.layer_scale_init, dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"blocks_{j}")(x, train)
    return x


class EfficientFormerV2(nn.Module):
  """EfficientFormerV2 classifier.

  `__call__(x, train=False)`: x (B, H, W, 3) float32 NHWC, normalised, (H, W) = img_size (a
  multiple of 32). Returns logits (B, num_classes) float32; with `distillation` and `train=True`,
  `DistilledLogits(head, head_dist)`; with `train=False` their average.

  `mlp_ratios` has one entry per stage: a number, or a tuple with one ratio per block. `num_vit`
  attention blocks end stages 3 and 4 (stage 3's at stride 2). Drop path rises linearly over all
  blocks from 0 to `drop_path_rate`; `drop_rate` is dropout in the FFNs, `head_drop_rate` before
  the heads.
  """
  num_classes: int = 1000
  img_size: int | tuple[int, int] = 224
  embed_dims: Sequence[int] = (32, 48, 96, 176)
  depths: Sequence[int] = (2, 2, 6, 4)
  mlp_ratios: Sequence[float | Sequence[float]] = (4, 4, 4, 4)
  num_vit: int = 2
  layer_scale_init: float = 1e-5
  distillation: bool = True
  drop_rate: float = 0.0
  head_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    problems = settings_problems(self, RATES)
    if not len(self.embed_dims) == len(self.depths) == len(self.mlp_ratios) == 4:
      problems.append(f"embed_dims={tuple(self.embed_dims)}, depths={tuple(self.depths)} and "
                      f"mlp_ratios need 4 entries (one per stage)")
    else:
      for i, (ratios, depth) in enumerate(zip(self.mlp_ratios, self.depths)):
        if isinstance(ratios, (tuple, list)) and len(ratios) != depth:
          problems.append(f"mlp_ratios[{i}] has {len(ratios)} entries for depths[{i}]={depth}")
      if not 0 <= self.num_vit <= min(self.depths[2:]):
        problems.append(f"num_vit={self.num_vit} is not in [0, min(depths[2:])]")
    check_settings("EfficientFormerV2", problems)
    check_img_size("EfficientFormerV2", self.img_size)
    super().__post_init__()

  def feature_grid(self, stride: int) -> tuple[int, int]:
    """(rows, columns) of the feature map at `stride` (4, 8, 16 or 32) for `img_size`."""
    return tuple(math.ceil(s / stride) for s in to_pair(self.img_size))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    check_input_size(self, x)
    dtype, pdt = jnp.dtype(self.dtype), self.param_dtype
    x = Stem(self.embed_dims[0], dtype, pdt, name="stem")(x.astype(dtype), train)
    rates = drop_path_rates(self.drop_path_rate, sum(self.depths))
    for i, (dim, depth, ratios) in enumerate(zip(self.embed_dims, self.depths, self.mlp_ratios)):
      start = sum(self.depths[:i])
      ratios = tuple(ratios) if isinstance(ratios, (tuple, list)) else (ratios,) * depth
      x = Stage(dim, ratios, tuple(rates[start:start + depth]), downsample=i > 0,
                downsample_attn=i >= 3, num_attn=self.num_vit if i >= 2 else 0,
                attn_stride=2 if i == 2 else None, drop_rate=self.drop_rate,
                layer_scale_init=self.layer_scale_init, dtype=dtype, param_dtype=pdt,
                name=f"stages_{i}")(x, train)

    x = batch_norm("norm", train, dtype, pdt)(x)
    x = nn.Dropout(self.head_drop_rate, deterministic=not train)(spatial_mean(x))
    return distilled_heads(self, x, train)


for _name, _fields in VARIANTS.items():
  register(_name)(functools.partial(EfficientFormerV2, **_fields))
