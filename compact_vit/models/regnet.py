"""RegNetY: the RegNetY-16GF teacher that DeiT and EfficientFormer distil from.

Paper: Radosavovic et al., "Designing Network Design Spaces", CVPR 2020, arXiv 2003.13678.
Structure and names follow timm's `regnet.py` (`regnety_160`, whose `deit_in1k` weights are the
teacher checkpoint of DeiT and EfficientFormer), so timm checkpoints convert as they are
(`compact_vit.convert.regnet`).

Layout, NHWC: stem 3x3/2 ConvNormAct (ReLU) -> 4 stages of Y blocks: 1x1 ConvNormAct, grouped 3x3
ConvNormAct (stride 2 in the first block of each stage), squeeze-excitation (reduction from the
block's *input* width, as timm and pycls), 1x1 ConvNorm, plus a shortcut (1x1/s ConvNorm when
the shape changes), ReLU -> global average pool -> `head/fc`.

The variant table lists the per-stage widths and depths that timm derives from the RegNet
parameters (w0=200, wa=106.23, wm=2.48, depth 18, group width 112).
Departures from timm: none in the forward pass; logits are float32 whatever the compute `dtype`.
At initialisation the last BatchNorm of each block keeps scale 1 (timm zero-initialises it): the
model is meant to be loaded from a converted checkpoint, as a teacher.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from compact_vit.models.registry import register
from compact_vit.nn.layers import (ConvNormAct, DropPath, Dtype, check_input_size,
                                   check_settings, drop_path_rates, settings_problems,
                                   spatial_mean, to_pair)

# Variant table: name -> fields of RegNet.
VARIANTS: dict[str, dict] = {
    "regnety_160": dict(widths=(224, 448, 1232, 3024), depths=(2, 4, 11, 1), group_size=112,
                        se_ratio=0.25),
}

# timm's init: convs normal(0, sqrt(2 / fan_out)), the classifier normal(0, 0.01).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
head_init = nn.initializers.normal(0.01)


class SqueezeExcite(nn.Module):
  """x * sigmoid(fc2(relu(fc1(mean_hw(x))))) with 1x1 convs `fc1` (-> `reduced`) and `fc2`."""
  reduced: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(nn.Conv, kernel_size=(1, 1), kernel_init=conv_init, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    s = spatial_mean(x, keepdims=True)
    s = conv(x.shape[-1], name="fc2")(nn.relu(conv(self.reduced, name="fc1")(s)))
    return x * nn.sigmoid(s)


class Bottleneck(nn.Module):
  """RegNetY block: (B, H, W, C_in) -> (B, H/stride, W/stride, features)."""
  features: int
  stride: int = 1
  group_size: int = 1
  se_ratio: float = 0.25
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_features = x.shape[-1]
    conv_norm = functools.partial(ConvNormAct, use_bias=False, kernel_init=conv_init,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
    shortcut = x
    x = conv_norm(self.features, act=nn.relu, name="conv1")(x, train)
    x = conv_norm(self.features, 3, strides=self.stride, groups=self.features // self.group_size,
                  act=nn.relu, name="conv2")(x, train)
    if self.se_ratio:
      x = SqueezeExcite(int(round(in_features * self.se_ratio)), self.dtype, self.param_dtype,
                        name="se")(x)
    x = conv_norm(self.features, name="conv3")(x, train)
    if in_features != self.features or self.stride != 1:
      shortcut = conv_norm(self.features, strides=self.stride, name="downsample")(shortcut, train)
    return nn.relu(DropPath(self.drop_path_rate, name="drop_path")(x, train) + shortcut)


class Stage(nn.Module):
  """Blocks `b1`, `b2`, ... (one per drop path rate); the first has stride 2."""
  features: int
  group_size: int
  se_ratio: float
  drop_path_rates: Sequence[float]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for j, rate in enumerate(self.drop_path_rates):
      x = Bottleneck(self.features, stride=2 if j == 0 else 1, group_size=self.group_size,
                     se_ratio=self.se_ratio, drop_path_rate=rate, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=f"b{j + 1}")(x, train)
    return x


class Head(nn.Module):
  """timm's ClassifierHead after pooling: the linear `fc`. (B, C) -> (B, num_classes)."""
  num_classes: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.num_classes, kernel_init=head_init, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="fc")(x)


class RegNet(nn.Module):
  """RegNetY classifier.

  `__call__(x, train=False)`: x (B, H, W, 3) float32 NHWC, normalised, (H, W) = img_size (any
  size; 224 for the published weights). Returns logits (B, num_classes) float32. Stage i is
  `s{i+1}` with blocks `b1`, `b2`, ... as timm.
  """
  num_classes: int = 1000
  img_size: int | tuple[int, int] = 224
  widths: Sequence[int] = (224, 448, 1232, 3024)
  depths: Sequence[int] = (2, 4, 11, 1)
  group_size: int = 112
  se_ratio: float = 0.25
  stem_width: int = 32
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    problems = settings_problems(self, ("drop_rate", "drop_path_rate"))
    if len(self.widths) != len(self.depths):
      problems.append(f"widths={tuple(self.widths)} and depths={tuple(self.depths)} differ in "
                      "length")
    if any(w % self.group_size for w in self.widths):
      problems.append(f"widths={tuple(self.widths)} are not multiples of "
                      f"group_size={self.group_size}")
    if min(to_pair(self.img_size)) < 2 ** (len(self.depths) + 1):
      problems.append(f"img_size={self.img_size} is smaller than the network's stride")
    check_settings("RegNet", problems)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_input_size(self, x)
    dtype, pdt = jnp.dtype(self.dtype), self.param_dtype
    x = ConvNormAct(self.stem_width, 3, strides=2, use_bias=False, act=nn.relu,
                    kernel_init=conv_init, dtype=dtype, param_dtype=pdt,
                    name="stem")(x.astype(dtype), train)
    rates = drop_path_rates(self.drop_path_rate, sum(self.depths))
    for i, (width, depth) in enumerate(zip(self.widths, self.depths)):
      start = sum(self.depths[:i])
      x = Stage(width, self.group_size, self.se_ratio, tuple(rates[start:start + depth]), dtype,
                pdt, name=f"s{i + 1}")(x, train)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(spatial_mean(x))
    return Head(self.num_classes, dtype, pdt, name="head")(x).astype(jnp.float32)


for _name, _fields in VARIANTS.items():
  register(_name)(functools.partial(RegNet, **_fields))
