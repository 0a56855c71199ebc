"""ResNet and ResNeXt: the convolutional teachers NASViT distils from.

Papers: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv 1512.03385);
Xie et al., "Aggregated Residual Transformations for Deep Neural Networks" (ResNeXt), CVPR 2017
(arXiv 1611.05431); the teachers' weights are Yalniz et al.'s semi-weakly supervised ones
(arXiv 1905.00546), timm's `resnext101_32x4d.fb_swsl_ig1b_ft_in1k` and
`resnext101_32x8d.fb_swsl_ig1b_ft_in1k`, the two teachers of facebookresearch/NASViT main.py.
Structure and names follow timm's `resnet.py` (the torchvision layout), so timm checkpoints
convert by renaming alone (`compact_vit.convert.resnet`).

Layout, NHWC: stem 7x7/2 conv `conv1` -> `bn1` -> ReLU -> 3x3/2 max pool; four stages `layer1`..
`layer4` of bottleneck blocks (1x1 `conv1`/`bn1` -> ReLU -> grouped 3x3 `conv2`/`bn2`, stride 2 in
the first block of stages 2-4 (ResNet v1.5, as timm) -> ReLU -> 1x1 `conv3`/`bn3` to 4x the
stage's planes; shortcut `downsample_0` (1x1/s conv) + `downsample_1` (BN) where the shape
changes), ReLU after the sum -> global average pool -> `fc`. Bottleneck width:
floor(planes * base_width / 64) * cardinality.

Departures from timm: none in the forward pass; logits are float32 whatever the compute `dtype`.
At initialisation `bn3` keeps scale 1 (timm zero-initialises it) and `fc`'s bias starts at zero
(torch: uniform +-1/sqrt(fan_in)): the model is meant to be loaded from a converted checkpoint, as
a teacher.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from compact_vit.models.registry import register
from compact_vit.nn.layers import (DropPath, Dtype, batch_norm, check_input_size, check_settings,
                                   drop_path_rates, pool2d, settings_problems, spatial_mean,
                                   to_pair)
from compact_vit.nn.layers import conv_init as torch_default_init

# Variant table: name -> fields of ResNet (timm's resnet50, resnext50_32x4d, resnext101_32x{4,8}d).
VARIANTS: dict[str, dict] = {
    "resnet50": dict(depths=(3, 4, 6, 3)),
    "resnext50_32x4d": dict(depths=(3, 4, 6, 3), cardinality=32, base_width=4),
    "resnext101_32x4d": dict(depths=(3, 4, 23, 3), cardinality=32, base_width=4),
    "resnext101_32x8d": dict(depths=(3, 4, 23, 3), cardinality=32, base_width=8),
}
EXPANSION = 4  # a bottleneck's output channels per plane

# timm's init: convs kaiming normal (fan_out, ReLU); the classifier keeps torch's nn.Linear weight
# init (kaiming uniform, a=sqrt(5): variance 1/(3 fan_in)).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Bottleneck(nn.Module):
  """(B, H, W, C_in) -> (B, H/stride, W/stride, planes * 4)."""
  planes: int
  stride: int = 1
  cardinality: int = 1
  base_width: int = 64
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    width = int(self.planes * self.base_width / 64) * self.cardinality
    out = self.planes * EXPANSION
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    norm = functools.partial(batch_norm, train=train, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    shortcut = x
    y = nn.relu(norm("bn1")(conv(width, (1, 1), name="conv1")(x)))
    y = conv(width, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)),
             feature_group_count=self.cardinality, name="conv2")(y)
    y = nn.relu(norm("bn2")(y))
    y = norm("bn3")(conv(out, (1, 1), name="conv3")(y))
    if self.stride != 1 or x.shape[-1] != out:
      shortcut = norm("downsample_1")(conv(out, (1, 1), strides=self.stride,
                                           name="downsample_0")(x))
    return nn.relu(DropPath(self.drop_path_rate, name="drop_path")(y, train) + shortcut)


class ResNet(nn.Module):
  """ResNet / ResNeXt classifier.

  `__call__(x, train=False)`: x (B, H, W, 3) float32 NHWC, normalised, (H, W) = img_size (any size
  of at least 32; 224 for the published weights). Returns logits (B, num_classes) float32.
  """
  num_classes: int = 1000
  img_size: int | tuple[int, int] = 224
  depths: Sequence[int] = (3, 4, 6, 3)
  cardinality: int = 1
  base_width: int = 64
  stem_width: int = 64
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    problems = settings_problems(self, ("drop_rate", "drop_path_rate"))
    if len(self.depths) != 4 or min(self.depths) < 1:
      problems.append(f"depths={tuple(self.depths)} must be four stages of at least one block")
    if self.cardinality < 1 or self.base_width < 1:
      problems.append(f"cardinality={self.cardinality} and base_width={self.base_width} must be "
                      ">= 1")
    if min(to_pair(self.img_size)) < 32:
      problems.append(f"img_size={self.img_size} is smaller than the network's stride (32)")
    check_settings("ResNet", problems)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_input_size(self, x)
    dtype, pdt = jnp.dtype(self.dtype), self.param_dtype
    x = nn.Conv(self.stem_width, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False,
                kernel_init=conv_init, dtype=dtype, param_dtype=pdt, name="conv1")(x.astype(dtype))
    x = nn.relu(batch_norm("bn1", train, dtype, pdt)(x))
    x = pool2d(x, 3, strides=2, padding=1, kind="max")
    rates = iter(drop_path_rates(self.drop_path_rate, sum(self.depths)))
    for i, depth in enumerate(self.depths):
      for j in range(depth):
        x = Bottleneck(planes=64 * 2 ** i, stride=2 if i > 0 and j == 0 else 1,
                       cardinality=self.cardinality, base_width=self.base_width,
                       drop_path_rate=next(rates), dtype=dtype, param_dtype=pdt,
                       name=f"layer{i + 1}_{j}")(x, train)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(spatial_mean(x))
    return nn.Dense(self.num_classes, kernel_init=torch_default_init, dtype=dtype, param_dtype=pdt,
                    name="fc")(x).astype(jnp.float32)


for _name, _fields in VARIANTS.items():
  register(_name)(functools.partial(ResNet, **_fields))
