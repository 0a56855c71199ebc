"""EfficientFormer (V1): MetaFormer stages of pool-mixer conv blocks, then attention at 1/32.

Paper: Li et al., "EfficientFormer: Vision Transformers at MobileNet Speed", NeurIPS 2022,
arXiv 2206.01191. Structure, names and defaults follow timm's `efficientformer.py` (itself a port of
snap-research/EfficientFormer `models/efficientformer.py`), so both checkpoints convert by renaming
(`compact_vit.convert.efficientformer`).

Layout, NHWC: stem (two 3x3/2 conv + BN + ReLU) -> 4 stages (stage i > 0 starts with a 3x3/2
conv + BN). Every block is MB4D (x + LS(avgpool3(x) - x), then x + LS(ConvMlp(x)), ConvMlp = 1x1,
BN, GELU, 1x1, BN), except the last `num_vit` blocks of stage 4, which run on the flattened tokens
as MB3D (pre-LN attention with a learned relative-position bias, then pre-LN MLP). Final LN, mean
over tokens, `head` and `head_dist`.

Departures from timm and the paper:
* The attention-bias grid follows `img_size` (timm fixes it to 7x7, i.e. 224 inputs);
  `compact_vit.convert` resamples the bias tables when loading weights trained at another size.
  `img_size` must be a multiple of 32.
* `train=True` returns `DistilledLogits(head, head_dist)` when `distillation` (timm: only after
  `set_distilled_training()`); `train=False` returns their average, as timm and the authors' code.
* Logits are float32 whatever the compute `dtype`; attention softmax runs in float32.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from compact_vit.errors import UserError
from compact_vit.models.registry import register
from compact_vit.nn.layers import (DropPath, Dtype, LayerScale, Mlp, batch_norm,
                                   check_input_size, check_settings, classifier_heads, conv_init, dense,
                                   dot_product_attention, drop_path_rates, gelu, pool2d,
                                   settings_problems, to_pair)

# Variant table: name -> fields of EfficientFormer (widths, depths and MB3D blocks per the paper).
VARIANTS: dict[str, dict] = {
    "efficientformer_l1": dict(embed_dims=(48, 96, 224, 448), depths=(3, 2, 6, 4), num_vit=1),
    "efficientformer_l3": dict(embed_dims=(64, 128, 320, 512), depths=(4, 4, 12, 6), num_vit=4),
    "efficientformer_l7": dict(embed_dims=(96, 192, 384, 768), depths=(6, 6, 18, 8), num_vit=8),
}
LN_EPS = 1e-5  # torch's LayerNorm default, used by timm and the authors here


def relative_bias_index(query_grid: tuple[int, int], key_grid: tuple[int, int],
                        query_stride: int = 1) -> np.ndarray:
  """(Nq, Nk) int32 index into a (key_grid[0] * key_grid[1]) bias table: |dy| * W + |dx|.

  Query i sits at (query_stride * row, query_stride * col) of the key grid (stride 2 for
  EfficientFormerV2's downsampling attention). Row-major tokens, as torch's flatten of NCHW.
  """
  qy, qx = np.meshgrid(np.arange(query_grid[0]) * query_stride,
                       np.arange(query_grid[1]) * query_stride, indexing="ij")
  ky, kx = np.meshgrid(np.arange(key_grid[0]), np.arange(key_grid[1]), indexing="ij")
  dy = np.abs(qy.reshape(-1, 1) - ky.reshape(1, -1))
  dx = np.abs(qx.reshape(-1, 1) - kx.reshape(1, -1))
  return (dy * key_grid[1] + dx).astype(np.int32)


def check_img_size(model_name: str, img_size, multiple: int = 32) -> tuple[int, int]:
  """Validates `img_size` for a 32x-downsampling model; returns it as a pair."""
  size = to_pair(img_size)
  if min(size) < multiple or any(s % multiple for s in size):
    raise UserError(f"{model_name}: img_size={img_size} must be a positive multiple of {multiple} "
                    f"(the network downsamples {multiple}x); e.g. 224, 256 or 384.")
  return size


class Attention(nn.Module):
  """Multi-head attention with a learned bias per head and relative offset (|dy|, |dx|).

  x: (B, H*W, C) tokens of a (H, W) = `grid` map -> (B, H*W, C). `qkv` is laid out per head as
  [q (key_dim), k (key_dim), v (attn_ratio * key_dim)], as timm. `attention_biases`: (heads, H*W).
  """
  grid: tuple[int, int]
  num_heads: int = 8
  key_dim: int = 32
  attn_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, dim = x.shape
    heads, key_dim, val_dim = self.num_heads, self.key_dim, int(self.attn_ratio * self.key_dim)
    qkv = dense(heads * (2 * key_dim + val_dim), "qkv", self.dtype, self.param_dtype)(x)
    qkv = qkv.reshape(batch, tokens, heads, 2 * key_dim + val_dim)
    q, k, v = jnp.split(qkv.transpose(0, 2, 1, 3), [key_dim, 2 * key_dim], axis=-1)  # (B, h, N, d)
    biases = self.param("attention_biases", nn.initializers.zeros,
                        (heads, self.grid[0] * self.grid[1]), self.param_dtype)
    bias = biases[:, relative_bias_index(self.grid, self.grid)]  # (heads, N, N)
    x = dot_product_attention(q, k, v, bias=bias)  # (B, heads, N, val_dim)
    x = x.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * val_dim)
    return dense(dim, "proj", self.dtype, self.param_dtype)(x)


class ConvMlp(nn.Module):
  """1x1 conv `fc1` -> BN `norm1` -> GELU -> drop -> 1x1 conv `fc2` -> BN `norm2` -> drop.

  x: (B, H, W, C) -> (B, H, W, C).
  """
  hidden_features: int
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(nn.Conv, kernel_size=(1, 1), kernel_init=conv_init, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    norm = functools.partial(batch_norm, train=train, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    drop = nn.Dropout(self.drop_rate, deterministic=not train)
    dim = x.shape[-1]
    x = norm("norm1")(conv(self.hidden_features, name="fc1")(x))
    x = drop(gelu(x))
    return drop(norm("norm2")(conv(dim, name="fc2")(x)))


class MetaBlock2d(nn.Module):
  """MB4D: x + LS(avgpool3x3(x) - x), then x + LS(ConvMlp(x)). x: (B, H, W, C) -> same shape.

  The pooling excludes the zero padding from its averages (count_include_pad=False), as timm.
  """
  mlp_ratio: float = 4.0
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_scale_init: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    pooled = pool2d(x, 3, strides=1, padding=1, kind="avg")
    y = LayerScale(self.layer_scale_init, self.param_dtype, name="ls1")(pooled - x)
    x = x + DropPath(self.drop_path_rate, name="drop_path1")(y, train)
    y = ConvMlp(int(dim * self.mlp_ratio), self.drop_rate, self.dtype, self.param_dtype,
                name="mlp")(x, train)
    y = LayerScale(self.layer_scale_init, self.param_dtype, name="ls2")(y)
    return x + DropPath(self.drop_path_rate, name="drop_path2")(y, train)


class MetaBlock1d(nn.Module):
  """MB3D: x + LS(Attn(LN(x))), then x + LS(Mlp(LN(x))). x: (B, H*W, C) tokens -> same shape."""
  grid: tuple[int, int]
  mlp_ratio: float = 4.0
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_scale_init: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    norm = functools.partial(nn.LayerNorm, epsilon=LN_EPS, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    y = Attention(self.grid, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="token_mixer")(norm(name="norm1")(x))
    y = LayerScale(self.layer_scale_init, self.param_dtype, name="ls1")(y)
    x = x + DropPath(self.drop_path_rate, name="drop_path1")(y, train)
    y = Mlp(int(dim * self.mlp_ratio), drop_rate=self.drop_rate, dtype=self.dtype,
            param_dtype=self.param_dtype, name="mlp")(norm(name="norm2")(x), train)
    y = LayerScale(self.layer_scale_init, self.param_dtype, name="ls2")(y)
    return x + DropPath(self.drop_path_rate, name="drop_path2")(y, train)


def conv3x3_s2(features: int, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Conv:
  """3x3 conv, stride 2, padding 1, with bias (torch's default init)."""
  return nn.Conv(features, (3, 3), strides=2, padding=((1, 1), (1, 1)), kernel_init=conv_init,
                 dtype=dtype, param_dtype=param_dtype, name=name)


class Stem(nn.Module):
  """Two 3x3/2 convs (`conv1`, `conv2`), each + BN (`norm1`, `norm2`) + ReLU: (B, H, W, 3) ->
  (B, H/4, W/4, features); the first conv has features // 2 outputs."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, features in enumerate((self.features // 2, self.features), start=1):
      x = conv3x3_s2(features, f"conv{i}", self.dtype, self.param_dtype)(x)
      x = nn.relu(batch_norm(f"norm{i}", train, self.dtype, self.param_dtype)(x))
    return x


class Downsample(nn.Module):
  """3x3/2 conv `conv` + BN `norm`: (B, H, W, C) -> (B, H/2, W/2, features)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = conv3x3_s2(self.features, "conv", self.dtype, self.param_dtype)(x)
    return batch_norm("norm", train, self.dtype, self.param_dtype)(x)


class Stage(nn.Module):
  """Optional `downsample`, then one block per drop path rate: MB4D, with the last `num_vit` as
  MB3D on the flattened tokens. (B, H, W, C) -> (B, H', W', dim), or (B, H'*W', dim) when
  num_vit > 0.

  Block modules are named as timm's `blocks.{j}`, where timm's weightless `Flat` takes one index.
  """
  dim: int
  downsample: bool
  num_vit: int
  drop_path_rates: Sequence[float]
  mlp_ratio: float = 4.0
  drop_rate: float = 0.0
  layer_scale_init: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.downsample:
      x = Downsample(self.dim, self.dtype, self.param_dtype, name="downsample")(x, train)
    num_conv = len(self.drop_path_rates) - self.num_vit
    grid = x.shape[1:3]
    for j, rate in enumerate(self.drop_path_rates):
      block = dict(mlp_ratio=self.mlp_ratio, drop_rate=self.drop_rate, drop_path_rate=rate,
                   layer_scale_init=self.layer_scale_init, dtype=self.dtype,
                   param_dtype=self.param_dtype)
      if j < num_conv:
        x = MetaBlock2d(**block, name=f"blocks_{j}")(x, train)
        continue
      if j == num_conv:  # Flat: (B, H, W, C) -> (B, H*W, C), row-major as torch's flatten
        grid = tuple(x.shape[1:3])
        x = x.reshape(x.shape[0], -1, x.shape[-1])
      x = MetaBlock1d(grid, **block, name=f"blocks_{j + 1}")(x, train)
    return x


RATES = ("drop_rate", "head_drop_rate", "drop_path_rate")  # EfficientFormer V1 and V2's dropouts


def distilled_heads(model, x: jax.Array, train: bool):
  """`head` (+ `head_dist` with `model.distillation`) on pooled features x (B, C)."""
  return classifier_heads(model.num_classes, x, x if model.distillation else None, train,
                          jnp.dtype(model.dtype), model.param_dtype)


class EfficientFormer(nn.Module):
  """EfficientFormer V1 classifier.

  `__call__(x, train=False)`: x (B, H, W, 3) float32 NHWC, normalised, (H, W) = img_size (a
  multiple of 32). Returns logits (B, num_classes) float32; with `distillation` and `train=True`,
  `DistilledLogits(head, head_dist)`; with `train=False` their average.

  Module names follow timm's state-dict keys (`stem/conv1`, `stages_3/blocks_4/token_mixer`, ...):
  in the last stage the block index skips the position of timm's `Flat` module. `num_vit` MB3D
  blocks close the last stage. Drop path rises linearly over all blocks from 0 to
  `drop_path_rate`; `drop_rate` is dropout in the MLPs (timm's proj_drop) and `head_drop_rate`
  before the heads.
  """
  num_classes: int = 1000
  img_size: int | tuple[int, int] = 224
  embed_dims: Sequence[int] = (48, 96, 224, 448)
  depths: Sequence[int] = (3, 2, 6, 4)
  num_vit: int = 1
  mlp_ratio: float = 4.0
  layer_scale_init: float = 1e-5
  distillation: bool = True
  drop_rate: float = 0.0
  head_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    problems = settings_problems(self, RATES)
    if len(self.embed_dims) != len(self.depths) or not self.depths:
      problems.append(f"embed_dims={tuple(self.embed_dims)} and depths={tuple(self.depths)} "
                      "need one entry per stage")
    elif not 1 <= self.num_vit <= self.depths[-1]:
      problems.append(f"num_vit={self.num_vit} is not in [1, depths[-1]={self.depths[-1]}]")
    check_settings("EfficientFormer", problems)
    check_img_size("EfficientFormer", self.img_size)
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
    last = len(self.depths) - 1
    for i, (dim, depth) in enumerate(zip(self.embed_dims, self.depths)):
      start = sum(self.depths[:i])
      x = Stage(dim, downsample=i > 0, num_vit=self.num_vit if i == last else 0,
                drop_path_rates=tuple(rates[start:start + depth]), mlp_ratio=self.mlp_ratio,
                drop_rate=self.drop_rate, layer_scale_init=self.layer_scale_init, dtype=dtype,
                param_dtype=pdt, name=f"stages_{i}")(x, train)

    x = nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=pdt, name="norm")(x)
    x = nn.Dropout(self.head_drop_rate, deterministic=not train)(x.mean(axis=1))
    return distilled_heads(self, x, train)


for _name, _fields in VARIANTS.items():
  register(_name)(functools.partial(EfficientFormer, **_fields))
