"""NASViT: a weight-sharing supernet of MBConv and transformer stages, and its subnets.

Paper: Gong et al., "NASViT: Neural Architecture Search for Efficient Vision Transformers with
Gradient Conflict-Aware Supernet Training", ICLR 2022; authors' code facebookresearch/NASViT
(misc/config.py for the space, models/attentive_nas_dynamic_model.py and models/modules/ for the
blocks, main.py for the sandwich step, misc/loss_ops.py for the α-divergence).

Space (`SPACE`, misc/config.py): resolution {192, 224, 256, 288}; first conv {16, 24}; stages
mb1..mb7 with width / depth / kernel / expansion choices (squeeze-excitation in mb3, mb5..mb7);
mb4..mb7 start with an MBConv block and continue with transformer blocks; last conv {1792, 1984}
after a x6 expansion (the `use_v3_head`). One `NASViT` module serves both roles: with the full
space it is the supernet, and a subnet given to `__call__` (`subnet=` dict of int arrays: traced
values) selects widths, depths, kernels and expansions by masks over the largest shapes, so every
subnet at one resolution shares one compilation; with a space of single choices (`subnet_space`)
it is a standalone subnet with smaller weight tensors (`slice_params` cuts them out of the
supernet's: first channels, centre of the kernel, first blocks).

Blocks, as the authors' dynamic modules:
* MBConv: [1x1 -> BN -> swish] -> kxk depthwise -> BN -> swish -> [SE: mean -> 1x1 -> ReLU ->
  1x1 -> hard sigmoid] -> 1x1 -> BN, hidden width make_divisible(in x expand, 8); every MBConv has
  a shortcut: identity, or (first block of a stage) 2x2 average pooling when strided and a 1x1
  conv when the active in and out widths differ. The last BN's scale starts at zero.
* Transformer (`DynamicSwinTransformerBlock` with a window covering the whole map): LayerNorm over
  tokens and channels together (torch `F.layer_norm(x, x.shape[1:])`), attention with head dim 8
  on q and k, v expanded x4 (head dim 32) and passed through a 3x3 depthwise conv, relative
  position bias (window 18), talking-heads projections before (`proj_l`) and after (`proj_w`) the
  softmax, swish, projection back; then two LN -> MLP (ratio 1, swish) branches (mlp2 first).
  Switchable layer scaling: each branch is scaled by `rescale_*[d, N % 8, :C] * 8 / C` (d the
  stage's active depth, N the number of tokens, C the active width), tables of (10, 8, C).

Files: the search space is `nasvit_space.py`; the sandwich rule, gradient projection and the
α-divergence are `compact_vit/objectives/nasvit.py`; this file holds the blocks, the model,
weight slicing and BatchNorm recalibration.

Training and evaluation: the sandwich objective resizes the batch per pass (bicubic, as the
authors' `F.interpolate`) to a resolution of `objective.resolutions`: the largest subnet at the
largest, the smallest at the smallest, random subnets at a random one (`lax.switch` over the
resolutions, so one compilation per step function). `recalibrate_batch_stats` recomputes a
subnet's BatchNorm statistics as the authors' calibration (training-mode passes over a few
batches, momentum-free cumulative average) before evaluating it.

Departures: BatchNorm keeps running statistics with momentum 0.1 during training, moved by the
largest subnet's pass only (the authors train with momentum 0 and always recalibrate); running
and recalibrated variances are the biased batch variance (torch stores the unbiased one); JAX's
bicubic kernel uses a = -0.5 (torch -0.75); the model itself does not resize its input (it runs
at its input's size; the objective and `recalibrate_batch_stats` resize); drop path applies to the
transformer branches. `nasvit_a0`..`a5` are defined by searching this supernet under each MACs
target (208, 309, 421, 528, 591, 757 M), not taken from the paper (its appendix does not list them
and the authors release no subnet definitions). The released supernet checkpoint converts with
`compact_vit.convert.load_pytorch_state_dict("nasvit_supernet", state_dict)` (tested on the
authors' key names and layouts, rebuilt from their module code: the released file itself was not
downloaded here, so its numbers are not reproduced).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from compact_vit.errors import UserError
from compact_vit.models.registry import register
from compact_vit.models.nasvit_space import (  # noqa: F401  (Stage, sample_subnet: re-exported)
    SPACE, TINY_SPACE, Space, Stage, as_arrays, largest, sample_subnet, smallest, subnet_space)
from compact_vit.nn.layers import (BN_EPS, DropPath, Dtype, check_input_size, check_settings,
                                   dense, depthwise_conv2d, make_divisible, settings_problems,
                                   spatial_mean)


HEAD_EXPAND = 6  # final_expand_layer: last stage width x 6
HEAD_DIM = 8  # q / k head dim; v heads are V_EXPAND x wider
V_EXPAND = 4
WINDOW = 18  # the authors' relative-position window (covers every map of the space)
SE_REDUCTION = 4


def _divisible(value):
  """The authors' make_divisible (divisor 8, min_value 1)."""
  return make_divisible(value, 8, min_value=1)


# ----------------------------------------------------------------------------- masked layers

def active_choice(sub: Mapping[str, jax.Array] | None, key: str, stage: int | None = None):
  """The supernet's active choice `key` (of `stage`) from a subnet dict of arrays; None for a
  standalone subnet (sub is None), whose shapes are its choices."""
  if sub is None:
    return None
  return sub[key] if stage is None else sub[key][stage]


def _channel_mask(active, size: int, dtype) -> jax.Array | None:
  """(size,) 1 for the first `active` channels; None when nothing is masked (active is None)."""
  if active is None:
    return None
  return (jnp.arange(size) < active).astype(dtype)


def _apply_mask(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  return x if mask is None else x * mask.astype(x.dtype)


class MaskedBatchNorm(nn.Module):
  """BatchNorm (torch eps 1e-5, momentum 0.1) whose running statistics move only for active
  channels of active blocks, and whose output is zero outside the channel mask. NHWC.
  `momentum` 1.0 makes the running statistics the batch's (recalibration)."""
  scale_init: Any = nn.initializers.ones
  dtype: Dtype = jnp.float32
  momentum: float = 0.1

  @nn.compact
  def __call__(self, x, mask=None, train=False, active=True):
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,))
    xf = x.astype(jnp.float32)
    if train:
      mean, var = xf.mean((0, 1, 2)), xf.var((0, 1, 2))
      if not self.is_initializing():
        update = jnp.asarray(active) & (True if mask is None else mask > 0)
        m = self.momentum
        ra_mean.value = jnp.where(update, (1 - m) * ra_mean.value + m * mean, ra_mean.value)
        ra_var.value = jnp.where(update, (1 - m) * ra_var.value + m * var, ra_var.value)
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * jax.lax.rsqrt(var + BN_EPS) * scale + bias
    return _apply_mask(y.astype(self.dtype), mask)


class TokenChannelNorm(nn.Module):
  """The authors' LayerNorm over tokens and active channels together (torch
  `F.layer_norm(x, x.shape[1:])` with a per-channel affine), eps 1e-5; zero outside the mask.
  x: (B, N, C)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    xf = x.astype(jnp.float32)
    m = jnp.ones((c,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    n = m.sum() * x.shape[1]
    mean = (xf * m).sum((1, 2), keepdims=True) / n
    var = (((xf - mean) * m) ** 2).sum((1, 2), keepdims=True) / n
    y = ((xf - mean) * jax.lax.rsqrt(var + BN_EPS) * scale + bias) * m
    return y.astype(self.dtype)


def _conv(features, kernel=1, strides=1, name=None, dtype=jnp.float32, bias=False):
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=strides, padding=((pad, pad), (pad, pad)),
                 use_bias=bias, dtype=dtype, name=name,
                 kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))


class DepthwiseConv(nn.Module):
  """k x k depthwise conv, no bias, padding (k - 1) // 2; `kmask` (k, k, 1, 1) keeps a centred
  smaller kernel. (B, H, W, C) -> (B, H/s, W/s, C)."""
  kernel_size: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, kmask=None):
    c, k = x.shape[-1], self.kernel_size
    kernel = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                        (k, k, 1, c))
    if kmask is not None:
      kernel = kernel * kmask
    pad = (k - 1) // 2
    return depthwise_conv2d(x, kernel.astype(self.dtype), (self.stride,) * 2,
                            ((pad, pad), (pad, pad)))


def _fit_channels(x: jax.Array, c: int) -> jax.Array:
  """x (..., C) zero-padded or cut to c channels (the cut ones are masked zeros)."""
  if x.shape[-1] >= c:
    return x[..., :c]
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, c - x.shape[-1])])


class MBConv(nn.Module):
  """Inverted residual with shortcut (module docstring). x (B, H, W, in_max) -> (B, H/s, W/s,
  out_max), and the output channel mask.

  Max shapes: hidden make_divisible(in_max * expand_max), `kernel_max` kernel. `sub` = (in, out,
  kernel, expand) active values (traced) or None (standalone: shapes are the subnet's).
  `first`: the stage's first block (its shortcut may pool and project)."""
  out_max: int
  kernel_max: int
  expand_max: int
  stride: int
  se: bool
  first: bool
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.1

  @nn.compact
  def __call__(self, x, in_mask, sub, train, active):
    in_max = x.shape[-1]
    hidden_max = _divisible(in_max * self.expand_max) if self.expand_max > 1 else in_max
    hidden_mask = out_mask = kmask = se_mask = None
    if sub is not None:
      c_in, c_out, k, e = sub
      hidden = _divisible(c_in * e) if self.expand_max > 1 else c_in
      hidden_mask = _channel_mask(hidden, hidden_max, x.dtype)
      out_mask = _channel_mask(c_out, self.out_max, x.dtype)
      r = jnp.abs(jnp.arange(self.kernel_max) - self.kernel_max // 2) <= k // 2
      kmask = (r[:, None] & r[None, :]).astype(x.dtype)[:, :, None, None]
    bn = functools.partial(MaskedBatchNorm, dtype=self.dtype, momentum=self.bn_momentum)
    y = x
    if self.expand_max > 1:
      y = _conv(hidden_max, name="inverted_bottleneck", dtype=self.dtype)(y)
      y = nn.swish(bn(name="inverted_bottleneck_bn")(y, hidden_mask, train, active))
    y = DepthwiseConv(self.kernel_max, self.stride, self.dtype, name="depth_conv")(y, kmask)
    y = nn.swish(bn(name="depth_conv_bn")(y, hidden_mask, train, active))
    if self.se:
      mid_max = _divisible(hidden_max // SE_REDUCTION)
      if sub is not None:
        se_mask = _channel_mask(_divisible(hidden // SE_REDUCTION), mid_max, x.dtype)
      s = spatial_mean(y, keepdims=True)
      s = nn.relu(_apply_mask(_conv(mid_max, name="se_reduce", dtype=self.dtype, bias=True)(s),
                              se_mask))
      s = _conv(hidden_max, name="se_expand", dtype=self.dtype, bias=True)(s)
      y = y * nn.relu6(s + 3.0) / 6.0
    y = _conv(self.out_max, name="point_linear", dtype=self.dtype)(y)
    y = bn(name="point_linear_bn", scale_init=nn.initializers.zeros)(y, out_mask, train, active)
    shortcut = x
    if self.first:
      if self.stride > 1:
        pad = x.shape[1] % 2
        shortcut = nn.avg_pool(x, window_shape=(self.stride,) * 2, strides=(self.stride,) * 2,
                               padding=((pad, pad), (pad, pad)), count_include_pad=True)
      if sub is not None:  # the supernet: a 1x1 projection when the active widths differ
        proj = _apply_mask(_conv(self.out_max, name="shortcut", dtype=self.dtype)(shortcut),
                           out_mask)
        shortcut = jnp.where(sub[0] == sub[1], _fit_channels(shortcut, self.out_max), proj)
      elif in_max != self.out_max:
        shortcut = _conv(self.out_max, name="shortcut", dtype=self.dtype)(shortcut)
    return shortcut + y, out_mask


class TransformerBlock(nn.Module):
  """The authors' transformer block (module docstring). x: (B, H, W, C_max); `mask` (C_max,) or
  None; `width` the active width (traced) or None; `depth` the stage's active depth (row of the
  switchable layer-scale tables)."""
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, width, depth, train=False):
    b, h, w, c = x.shape
    n, heads = h * w, c // HEAD_DIM
    if h > WINDOW or w > WINDOW:
      raise UserError(f"NASViT attention covers maps of at most {WINDOW}x{WINDOW}; this input "
                      f"gives {h}x{w}. Use an input of at most {WINDOW * 16} pixels.")
    width = c if width is None else width
    vmask = None if mask is None else jnp.repeat(mask, V_EXPAND)
    hmask = _channel_mask(None if mask is None else width // HEAD_DIM, heads, x.dtype)
    linear = lambda features, name: dense(features, name, self.dtype, jnp.float32)
    drop = DropPath(self.drop_path_rate)
    table = lambda name: self.param(name, nn.initializers.constant(1e-4), (10, 8, c))
    scale = lambda name: (table(name)[depth, n % 8] * 8.0 / width).astype(self.dtype)
    shortcut = x.reshape(b, n, c)
    y = TokenChannelNorm(self.dtype, name="norm1")(shortcut, mask)
    q = _apply_mask(linear(c, "q")(y), mask).reshape(b, n, heads, HEAD_DIM)
    k = _apply_mask(linear(c, "k")(y), mask).reshape(b, n, heads, HEAD_DIM)
    v = _apply_mask(linear(c * V_EXPAND, "v")(y), vmask).reshape(b, h, w, c * V_EXPAND)
    v = DepthwiseConv(3, dtype=self.dtype, name="vconv")(v).reshape(b, n, heads, -1)
    logits = jnp.einsum("bqhd,bkhd->bqkh", q * HEAD_DIM**-0.5, k).astype(jnp.float32)
    rpb = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                     ((2 * WINDOW - 1) ** 2, heads))
    logits = logits + rpb[jnp.asarray(_relative_index(h, w))]
    logits = _apply_mask(linear(heads, "proj_l")(_apply_mask(logits, hmask)), hmask)
    attn = jax.nn.softmax(logits, axis=2)
    attn = _apply_mask(linear(heads, "proj_w")(_apply_mask(attn, hmask)), hmask)
    y = jnp.einsum("bqkh,bkhd->bqhd", attn.astype(v.dtype), v).reshape(b, n, c * V_EXPAND)
    y = _apply_mask(linear(c, "proj")(nn.swish(y)), mask)
    x = shortcut + drop(y * scale("rescale_attn"), train)
    mlp_scale = scale("rescale_mlp")  # shared by both MLP branches, as the authors'
    for norm, mlp in (("norm3", "mlp2"), ("norm2", "mlp1")):
      y = TokenChannelNorm(self.dtype, name=norm)(x, mask)
      y = nn.swish(_apply_mask(linear(c, f"{mlp}_fc1")(y), mask))
      y = _apply_mask(linear(c, f"{mlp}_fc2")(y), mask)
      x = x + drop(y * mlp_scale, train)
    return x.reshape(b, h, w, c)


@functools.lru_cache(maxsize=None)
def _relative_index(h: int, w: int) -> np.ndarray:
  """(h*w, h*w) rows of the (2*WINDOW-1)^2 relative-position table for an h x w map (the
  authors' window-18 index cropped to the map)."""
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ys, xs = ys.ravel(), xs.ravel()
  dy = ys[:, None] - ys[None, :] + WINDOW - 1
  dx = xs[:, None] - xs[None, :] + WINDOW - 1
  return dy * (2 * WINDOW - 1) + dx


class NASViT(nn.Module):
  """NASViT supernet (full `space`) or standalone subnet (single-choice `space`).

  `__call__(x, train=False, subnet=None)`: x (B, H, W, 3) NHWC at `img_size`; `subnet` (supernet
  only) a dict as `sample_subnet` returns (python or traced ints), default the largest. Returns
  logits (B, num_classes) float32."""
  num_classes: int = 1000
  img_size: int = 224
  space: Space = SPACE
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.1

  def __post_init__(self):
    check_settings("NASViT", settings_problems(self, ("drop_rate", "drop_path_rate")))
    super().__post_init__()

  @property
  def is_supernet(self) -> bool:
    s = self.space
    return len(s.first_conv) > 1 or len(s.last_conv) > 1 or any(
        len(c) > 1 for st in s.stages for c in (st.widths, st.depths, st.kernels, st.expands))

  @nn.compact
  def __call__(self, x, train: bool = False, subnet: Mapping[str, Any] | None = None):
    check_input_size(self, x)
    masked = self.is_supernet
    if subnet is None:
      subnet = largest(self.space)
    elif not masked:
      raise UserError("`subnet=` selects a subnet of the supernet; this model is a standalone "
                      "subnet already.")
    sub = as_arrays(subnet) if masked else None
    bn = functools.partial(MaskedBatchNorm, dtype=self.dtype, momentum=self.bn_momentum)
    c0 = max(self.space.first_conv)
    mask = _channel_mask(active_choice(sub, "first_conv"), c0, self.dtype)
    x = _conv(c0, 3, 2, name="first_conv", dtype=self.dtype)(x.astype(self.dtype))
    x = nn.swish(bn(name="first_conv_bn")(x, mask, train))
    c_in = active_choice(sub, "first_conv")
    n_blocks = sum(max(s.depths) for s in self.space.stages)
    rates = np.linspace(0.0, self.drop_path_rate, n_blocks)
    block = 0
    for si, st in enumerate(self.space.stages):
      depth = sub["depth"][si] if masked else max(st.depths)
      for bi in range(max(st.depths)):
        name = f"stage{si + 1}_block{bi}"
        active = (bi < depth) if masked else True
        if st.transformer and bi > 0:
          y = TransformerBlock(drop_path_rate=float(rates[block]), dtype=self.dtype, name=name)(
              x, mask, width=active_choice(sub, "width", si), depth=depth, train=train)
        else:
          choice = (c_in, sub["width"][si], sub["kernel"][si], sub["expand"][si]) if masked else None
          y, mask = MBConv(out_max=max(st.widths), kernel_max=max(st.kernels),
                           expand_max=max(st.expands), stride=st.stride if bi == 0 else 1,
                           se=st.se, first=bi == 0, dtype=self.dtype,
                           bn_momentum=self.bn_momentum, name=name)(
                               x, mask, sub=choice, train=train, active=active)
          c_in = active_choice(sub, "width", si)
        x = y if bi == 0 or not masked else jnp.where(active, y, x)
        block += 1
    c_head = max(self.space.stages[-1].widths) * HEAD_EXPAND
    hmask = _channel_mask(None if sub is None else sub["width"][-1] * HEAD_EXPAND, c_head,
                          self.dtype)
    x = _conv(c_head, name="final_expand", dtype=self.dtype)(x)
    x = spatial_mean(nn.swish(bn(name="final_expand_bn")(x, hmask, train)), keepdims=True)
    c_last = max(self.space.last_conv)
    x = _conv(c_last, name="feature_mix", dtype=self.dtype)(x)
    x = _apply_mask(nn.swish(x), _channel_mask(active_choice(sub, "last_conv"), c_last, self.dtype))
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x.reshape(x.shape[0], c_last))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x).astype(jnp.float32)


def slice_params(tree: Mapping[str, Any], like: Mapping[str, Any]) -> dict[str, Any]:
  """Supernet variables cut to a standalone subnet's shapes (`like`: its abstract variables):
  first channels / rows on every axis, the centre of conv kernels, blocks missing in `like` left
  out."""
  out = {}
  for k, v in like.items():
    if isinstance(v, Mapping):
      out[k] = slice_params(tree[k], v)
      continue
    src = np.asarray(tree[k])
    index = []
    for axis, n in enumerate(v.shape):
      if k == "kernel" and src.ndim == 4 and axis < 2:
        start = (src.shape[axis] - n) // 2
        index.append(slice(start, start + n))
      else:
        index.append(slice(0, n))
    out[k] = src[tuple(index)]
  return out


def resize_images(images: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C) -> (B, size, size, C) bicubic without antialiasing (the authors'
  `F.interpolate(x, size, mode='bicubic')`; JAX's cubic uses a = -0.5 where torch uses -0.75).
  Unchanged when already at `size`."""
  if images.shape[1] == size and images.shape[2] == size:
    return images
  shape = (images.shape[0], size, size, images.shape[3])
  return jax.image.resize(images, shape, "bicubic", antialias=False).astype(images.dtype)


def recalibrate_batch_stats(model: NASViT, variables: Mapping[str, Any], arch: Mapping[str, Any],
                            batches) -> dict[str, Any]:
  """BatchNorm statistics of one subnet, recomputed as the authors do before evaluating it:
  forward `batches` (an iterable of (B, H, W, 3) images) in training mode through the subnet and
  set every running mean / variance to the plain (momentum-free) average of its per-batch mean /
  biased variance. Images are resized to `arch["resolution"]` when given (default the model's
  img_size). `arch` is a subnet dict (`sample_subnet` keys, python or array ints; ignored apart
  from its resolution for a standalone model). Entries the subnet does not use (masked channels,
  inactive blocks) keep their values. Returns `variables` with the new `batch_stats`."""
  arch = dict(arch)
  size = int(arch.pop("resolution", model.img_size))
  calib = model.clone(img_size=size, bn_momentum=1.0, drop_rate=0.0, drop_path_rate=0.0)
  sub = as_arrays(arch) if model.is_supernet else None

  @jax.jit
  def batch_moments(v, x, sub):
    _, new = calib.apply(v, resize_images(x, size), train=True, subnet=sub,
                         mutable=["batch_stats"])
    return new["batch_stats"]

  average, n = None, 0
  for x in batches:  # cumulative average (torch momentum=None): unused entries stay exact
    stats = batch_moments(variables, jnp.asarray(x, jnp.float32), sub)
    n += 1
    average = stats if average is None else jax.tree.map(
        lambda m, s: m + (s - m) / n, average, stats)
  if n == 0:
    raise UserError("recalibrate_batch_stats needs at least one batch of training images.")
  return dict(variables, batch_stats=average)


# ----------------------------------------------------------------------------- variants
# A0..A5: found by `search.py --config configs/nasvit_search.py` in this supernet under each MACs
# target (the paper's 208, 309, 421, 528, 591, 757 M), not the paper's own subnets (MACs by
# `compact_vit.profile` in the comments; every one within 10% of its target, A5 8.5% below).
# The search moves every choice list together, so its grid is coarse: A0, A1, A2 and A4 are one
# subnet at four resolutions, A3 and A5 another at two. nasvit_smallest: 189.8 M MACs, 8.56 M
# params at 192; nasvit_largest: 1881.7 M MACs, 17.71 M params at 288.
SUBNETS: dict[str, dict[str, Any]] = {
    "nasvit_a0": dict(resolution=192, first_conv=16, last_conv=1792,
                     width=(16, 24, 32, 64, 112, 160, 208), depth=(1, 3, 3, 3, 4, 4, 3),
                     kernel=(3, 3, 3, 3, 3, 3, 3), expand=(1, 4, 4, 4, 4, 6, 6)),  # 212.7 M
    "nasvit_a1": dict(resolution=224, first_conv=16, last_conv=1792,
                     width=(16, 24, 32, 64, 112, 160, 208), depth=(1, 3, 3, 3, 4, 4, 3),
                     kernel=(3, 3, 3, 3, 3, 3, 3), expand=(1, 4, 4, 4, 4, 6, 6)),  # 308.9 M
    "nasvit_a2": dict(resolution=256, first_conv=16, last_conv=1792,
                     width=(16, 24, 32, 64, 112, 160, 208), depth=(1, 3, 3, 3, 4, 4, 3),
                     kernel=(3, 3, 3, 3, 3, 3, 3), expand=(1, 4, 4, 4, 4, 6, 6)),  # 414.3 M
    "nasvit_a3": dict(resolution=256, first_conv=16, last_conv=1792,
                     width=(16, 24, 32, 64, 112, 168, 208), depth=(1, 3, 4, 4, 5, 4, 4),
                     kernel=(3, 3, 3, 3, 3, 3, 3), expand=(1, 4, 4, 4, 4, 6, 6)),  # 504.6 M
    "nasvit_a4": dict(resolution=288, first_conv=16, last_conv=1792,
                     width=(16, 24, 32, 64, 112, 160, 208), depth=(1, 3, 3, 3, 4, 4, 3),
                     kernel=(3, 3, 3, 3, 3, 3, 3), expand=(1, 4, 4, 4, 4, 6, 6)),  # 563.0 M
    "nasvit_a5": dict(resolution=288, first_conv=16, last_conv=1792,
                     width=(16, 24, 32, 64, 112, 168, 208), depth=(1, 3, 4, 4, 5, 4, 4),
                     kernel=(3, 3, 3, 3, 3, 3, 3), expand=(1, 4, 4, 4, 4, 6, 6)),  # 692.7 M
    "nasvit_smallest": dict(resolution=192, **smallest(SPACE)),
    "nasvit_largest": dict(resolution=288, **largest(SPACE)),
}


def _standalone(subnet: Mapping[str, Any], **overrides) -> NASViT:
  fields = dict(img_size=subnet["resolution"], space=subnet_space(subnet))
  fields.update(overrides)
  return NASViT(**fields)


register("nasvit_supernet")(NASViT)
register("nasvit_supernet_tiny")(functools.partial(NASViT, space=TINY_SPACE, img_size=16))
for _name, _subnet in SUBNETS.items():
  register(_name)(functools.partial(_standalone, _subnet))
