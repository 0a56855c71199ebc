"""Transformer building blocks shared by the ViT-like families (timm's layers, in Flax Linen).

Every module takes `dtype` (compute) and `param_dtype` (storage, float32 by default), so the trainer
can run bfloat16 compute on float32 parameters. Names of submodules and parameters follow timm's
state-dict keys (`qkv`, `proj`, `fc1`, `fc2`, `norm1`, `ls1/gamma`), which keeps
`compact_vit.convert` a renaming. Randomness (dropout, drop path) comes from the 'dropout' stream.

Departures from timm: attention softmax runs in float32 whatever the compute dtype (as torch
autocast does); `Attention` accepts a boolean key mask (see its docstring).

Speed (XLA on CPU, benchmarks/zoo.py): attention runs heads-major and normalises after the
weighted sum (`dot_product_attention`); depthwise convolutions run as shifted multiply-adds
(`conv_general_dilated`, passed to `nn.Conv`) and 3x3 pooling as shifted max / sum (`pool2d`),
since XLA's grouped convolution and reduce_window are many times slower there. Same parameters,
same results up to float32 rounding.

Export (`export_forms()`): within that context the same blocks trace to the forms an ONNX runtime
fuses instead: `jax.nn.gelu`, MatMul + softmax attention, reduce_window pooling, whole-map
average pools for spatial means and grouped convolutions (ONNX Gelu, MatMul, Softmax,
AveragePool/MaxPool, GlobalAveragePool, Conv). Same parameters, same logits.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from compact_vit.errors import UserError

Dtype = Any

# timm's ViT init: trunc_normal(std=.02) for linears and embeddings, zeros for biases; the patch
# conv keeps torch's default (kaiming_uniform with a=sqrt(5), i.e. variance 1/(3 fan_in)).
linear_init = nn.initializers.truncated_normal(stddev=0.02)
conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
LN_EPS = 1e-6


_EXPORT_FORMS = contextvars.ContextVar("compact_vit_export_forms", default=False)


@contextlib.contextmanager
def export_forms():
  """Within this context, models trace to the forms an ONNX runtime fuses (ONNX Gelu, MatMul
  attention with Softmax, AveragePool/MaxPool, grouped Conv) instead of the XLA:CPU forms; the
  parameters and the logits are the same. It acts when a function is traced: a function jitted
  outside the context keeps the forms it was traced with."""
  token = _EXPORT_FORMS.set(True)
  try:
    yield
  finally:
    _EXPORT_FORMS.reset(token)


def exporting() -> bool:
  """Whether `export_forms()` is active (the building blocks trace their export forms)."""
  return _EXPORT_FORMS.get()


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU as torch's nn.GELU computes it: x/2 (1 + erf(x / sqrt 2)). jax.nn.gelu's exact
  form uses erfc instead, which XLA lowers to several times the work (exp and a division): the
  largest elementwise cost of the convolutional families on CPU. Same values up to float32
  rounding (absolute error < 1e-7 for x < -5, where GELU is ~0). Under `export_forms()`,
  `jax.nn.gelu(approximate=False)` (one ONNX Gelu)."""
  if exporting():
    return jax.nn.gelu(x, approximate=False)
  return x * (0.5 * (1.0 + jax.lax.erf(x * np.asarray(0.5 ** 0.5, x.dtype))))


def to_pair(value: int | tuple[int, int]) -> tuple[int, int]:
  """`s` -> `(s, s)`; a pair stays as it is."""
  if isinstance(value, (tuple, list)):
    return int(value[0]), int(value[1])
  return int(value), int(value)


def check_input_size(model, x: jax.Array) -> None:
  """UserError, saying which `img_size` to build the model with, unless images x (B, H, W, C) have
  the model's `img_size` (an int or an (H, W) pair)."""
  if tuple(x.shape[1:3]) != to_pair(model.img_size):
    size = x.shape[1] if x.shape[1] == x.shape[2] else tuple(x.shape[1:3])
    raise UserError(f"Input images are {tuple(x.shape[1:3])} but the model was built for "
                    f"img_size={model.img_size}; create it with img_size={size}.")


def settings_problems(model, rates: tuple[str, ...]) -> list[str]:
  """The settings checks every classifier shares, as messages: a positive `num_classes`, each of the
  dropout `rates` (attribute names) in [0, 1), and a `dtype` that jnp.dtype understands."""
  problems = []
  if model.num_classes < 1:
    problems.append(f"num_classes={model.num_classes} is not positive")
  for name in rates:
    if not 0.0 <= getattr(model, name) < 1.0:
      problems.append(f"{name}={getattr(model, name)} is not in [0, 1)")
  try:
    jnp.dtype(model.dtype)
  except TypeError:
    problems.append(f"dtype={model.dtype!r} is not a dtype (e.g. jnp.bfloat16 or 'bfloat16')")
  return problems


def check_settings(family: str, problems: list[str]) -> None:
  """One UserError listing every problem found in a model's settings, if there is any."""
  if problems:
    raise UserError(f"Invalid {family} settings: " + "; ".join(problems) + ".")


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
  """LayerNorm with timm's ViT epsilon (1e-6); statistics are computed in float32."""
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, name=name)


def dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype,
          use_bias: bool = True) -> nn.Dense:
  """Linear layer with timm's ViT init."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=linear_init, bias_init=nn.initializers.zeros, name=name)


class DistilledLogits(NamedTuple):
  """The training-mode output of a model with a distillation head (DeiT, EfficientFormer): the
  class head's and the distillation head's logits, each (B, num_classes) float32. Objectives
  recognise it by type; at inference such models return the average of the two."""
  cls_logits: jax.Array
  dist_logits: jax.Array


def classifier_heads(num_classes: int, cls_features: jax.Array, dist_features: jax.Array | None,
                     train: bool, dtype: Dtype, param_dtype: Dtype) -> jax.Array | DistilledLogits:
  """The classifier `head` on cls_features (B, C), plus `head_dist` on dist_features when given;
  called inside a model's compact `__call__`. Returns float32 logits (B, num_classes); with a
  distillation head, `DistilledLogits` when `train`, else the average of the two heads."""
  logits = dense(num_classes, "head", dtype, param_dtype)(cls_features).astype(jnp.float32)
  if dist_features is None:
    return logits
  dist = dense(num_classes, "head_dist", dtype, param_dtype)(dist_features).astype(jnp.float32)
  return DistilledLogits(logits, dist) if train else (logits + dist) / 2


class DropPath(nn.Module):
  """Stochastic depth: zeroes the whole residual branch per sample with probability `rate`.

  Kept samples are scaled by 1/(1 - rate). Identity when `train` is False or `rate` is 0.
  x: (B, ...) -> (B, ...).
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep_prob = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, shape)
    return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


class LayerScale(nn.Module):
  """Per-channel learnable scale `gamma` (CaiT / DeiT III), initialised to `init_values`."""
  init_values: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param("gamma", nn.initializers.constant(self.init_values), (x.shape[-1],),
                       self.param_dtype)
    return x * gamma.astype(x.dtype)


class Mlp(nn.Module):
  """fc1 -> GELU (exact, erf) -> dropout -> fc2 -> dropout.

  x: (..., C) -> (..., out_features or C).
  """
  hidden_features: int
  out_features: int | None = None
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    out_features = self.out_features or x.shape[-1]
    x = dense(self.hidden_features, "fc1", self.dtype, self.param_dtype)(x)
    x = gelu(x)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    x = dense(out_features, "fc2", self.dtype, self.param_dtype)(x)
    return nn.Dropout(self.drop_rate, deterministic=not train)(x)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          bias: jax.Array | None = None, valid: jax.Array | None = None,
                          dropout: nn.Dropout | None = None,
                          scale: float | None = None) -> jax.Array:
  """softmax(scale * q k^T + bias, masked by `valid`) v, heads-major: q (..., Nq, D),
  k (..., Nk, D), v (..., Nk, Dv) -> (..., Nq, Dv); `bias`, `valid` (bool) broadcast to
  (..., Nq, Nk).

  `scale` defaults to D**-0.5. Logits and softmax are float32. The softmax is normalised after the
  weighted sum (divide the (Nq, Dv) output by the row sums, not the (Nq, Nk) weights), which saves
  a pass over the largest tensor: on CPU this is what makes XLA match PyTorch's fused attention.
  Dropout, when given, applies to the unnormalised weights (the same as dropping normalised ones).
  Invalid keys get `finfo(float32).min` logits via `jnp.where`; the caller keeps one valid key per
  row. Under `export_forms()`: matmul, softmax, matmul (ONNX MatMul and Softmax).
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if exporting():
    return matmul_attention(q * jnp.asarray(scale, q.dtype), k, v, bias=bias, valid=valid,
                            dropout=dropout)
  logits = jnp.einsum("...qd,...kd->...qk", q * jnp.asarray(scale, q.dtype), k)
  logits = logits.astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if valid is not None:
    logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  denominator = weights.sum(-1, keepdims=True)
  weights = weights.astype(v.dtype)
  if dropout is not None:
    weights = dropout(weights)
  out = jnp.einsum("...qk,...kd->...qd", weights, v)
  return (out.astype(jnp.float32) / denominator).astype(v.dtype)


def matmul_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     bias: jax.Array | None = None, valid: jax.Array | None = None,
                     dropout: nn.Dropout | None = None) -> jax.Array:
  """softmax(q k^T + bias, masked by `valid`) v for already scaled q, as two matmuls and a softmax
  (the form ONNX runtimes fuse): q (..., Nq, D), k (..., Nk, D), v (..., Nk, Dv) -> (..., Nq, Dv).
  Logits and softmax are float32; `bias`, `valid` and `dropout` as in `dot_product_attention`."""
  logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2)).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if valid is not None:
    logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  if dropout is not None:
    weights = dropout(weights)
  return jnp.matmul(weights, v)


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def check_cudnn_attention(dtype, mask, attn_drop_rate: float) -> None:
  """Why `Attention(implementation='cudnn')` cannot run here, as a UserError (at trace time)."""
  problems = []
  if jax.default_backend() != "gpu":
    problems.append(f"it runs only on NVIDIA GPUs and this backend is {jax.default_backend()}")
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    problems.append(f"it needs bfloat16 or float16 compute, not {jnp.dtype(dtype)} "
                    "(config.dtype='bfloat16')")
  if mask is not None:
    problems.append("it takes no key mask")
  if attn_drop_rate:
    problems.append(f"it has no attention dropout (attn_drop_rate={attn_drop_rate})")
  if problems:
    raise UserError("attention='cudnn' cannot be used: " + "; ".join(problems)
                    + ". Use attention='xla'.")


class Attention(nn.Module):
  """Multi-head self-attention; the fused `qkv` output is laid out as timm's (3, heads, head_dim).

  x: (B, N, C) -> (B, N, C). `mask`, optional (B, N) bool, marks the tokens that may be attended
  to (keys); masked keys get `finfo(float32).min` logits via `jnp.where` before the softmax. A
  query may always attend to itself, so no softmax row is ever fully masked: for a kept query the
  result equals attention over the kept tokens only; the output at a masked query is attention
  over the kept tokens plus itself and is meant to be ignored. Logits and softmax are float32.

  `implementation`: 'xla' (`dot_product_attention`, any backend and dtype) or 'cudnn'
  (`jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's fused flash attention on an
  NVIDIA GPU, bfloat16/float16 compute only, no mask, no attention dropout; the same parameters).
  """
  num_heads: int
  qkv_bias: bool = True
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    if self.implementation not in ATTENTION_IMPLEMENTATIONS:
      raise UserError(f"Attention implementation={self.implementation!r} is not one of "
                      f"{ATTENTION_IMPLEMENTATIONS}.")
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = dense(3 * dim, "qkv", self.dtype, self.param_dtype, use_bias=self.qkv_bias)(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    if self.implementation == "cudnn":
      check_cudnn_attention(qkv.dtype, mask, self.attn_drop_rate if train else 0.0)
      try:
        x = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                         implementation="cudnn")  # (B, N, heads, head_dim)
      except NotImplementedError as e:  # JAX's own checks of shapes, GPU and cuDNN version
        raise UserError(f"cuDNN flash attention refused these inputs ({e}); use "
                        "attention='xla'.") from e
    else:
      valid = None
      if mask is not None:
        valid = mask.astype(bool)[:, None, None, :] | np.eye(tokens, dtype=bool)  # (B, 1, N, N)
      dropout = nn.Dropout(self.attn_drop_rate, deterministic=not train)
      qkv = qkv.transpose(2, 0, 3, 1, 4)  # (3, B, heads, N, head_dim)
      # One ONNX Split under export_forms(), three Slices otherwise (the same values)
      q, k, v = (t[0] for t in jnp.split(qkv, 3)) if exporting() else (qkv[0], qkv[1], qkv[2])
      x = dot_product_attention(q, k, v, valid=valid, dropout=dropout)
      x = x.transpose(0, 2, 1, 3)
    x = dense(dim, "proj", self.dtype, self.param_dtype)(x.reshape(batch, tokens, dim))
    return nn.Dropout(self.proj_drop_rate, deterministic=not train)(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + DropPath(LS(Attn(LN(x)))), then x + DropPath(LS(Mlp(LN(x)))).

  x: (B, N, C) -> (B, N, C); `mask` is passed to `Attention`. LayerScale only if `init_values`.
  `attention` is `Attention`'s `implementation`.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  init_values: float | None = None
  drop_path_rate: float = 0.0
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    y = layer_norm("norm1", self.dtype, self.param_dtype)(x)
    y = Attention(num_heads=self.num_heads, qkv_bias=self.qkv_bias,
                  attn_drop_rate=self.attn_drop_rate, proj_drop_rate=self.proj_drop_rate,
                  dtype=self.dtype, param_dtype=self.param_dtype,
                  implementation=self.attention, name="attn")(y, mask, train)
    if self.init_values:
      y = LayerScale(self.init_values, param_dtype=self.param_dtype, name="ls1")(y)
    x = x + DropPath(self.drop_path_rate, name="drop_path1")(y, train)
    y = layer_norm("norm2", self.dtype, self.param_dtype)(x)
    y = Mlp(int(dim * self.mlp_ratio), drop_rate=self.proj_drop_rate, dtype=self.dtype,
            param_dtype=self.param_dtype, name="mlp")(y, train)
    if self.init_values:
      y = LayerScale(self.init_values, param_dtype=self.param_dtype, name="ls2")(y)
    return x + DropPath(self.drop_path_rate, name="drop_path2")(y, train)


class PatchEmbed(nn.Module):
  """Non-overlapping patches by a strided conv: (B, H, W, C) NHWC -> (B, H/p * W/p, embed_dim).

  Tokens are in row-major (h, w) order, as timm's flatten of NCHW. H and W must be multiples of p.
  """
  patch_size: int | tuple[int, int]
  embed_dim: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    patch = to_pair(self.patch_size)
    if x.shape[1] % patch[0] or x.shape[2] % patch[1]:
      raise UserError(f"Image size {x.shape[1:3]} is not a multiple of the patch size {patch}.")
    x = nn.Conv(self.embed_dim, patch, strides=patch, padding="VALID", use_bias=self.use_bias,
                dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_init,
                name="proj")(x)
    return x.reshape(x.shape[0], -1, self.embed_dim)


def make_divisible(value, divisor: int = 8, min_value: int | None = None):
  """TF-slim's channel rounding: the nearest multiple of `divisor`, at least `min_value` (default
  `divisor`), bumped up one `divisor` when rounding lost more than 10%. Python numbers give an
  int; int arrays (traced widths of a supernet) give an array."""
  min_value = divisor if min_value is None else min_value
  if isinstance(value, (int, float, np.integer, np.floating)):
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded
  rounded = jnp.maximum(min_value, (value + divisor // 2) // divisor * divisor)
  return jnp.where(rounded < 0.9 * value, rounded + divisor, rounded)


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
  """Stochastic depth rates, linear from 0 (first block) to `drop_path_rate` (last), as timm."""
  return [float(r) for r in np.linspace(0.0, drop_path_rate, depth)]


# ----------------------------------------------------------------------------- convolutional pieces
# Shared by the families with BatchNorm (EfficientFormer V1/V2, RegNet). NHWC throughout.

BN_EPS = 1e-5


def _window_slices(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
                   padding: Any, pad_value: float = 0.0):
  """Yields ((i, j), x_ij): for each window offset, the strided (B, H', W', C) slice of the padded
  NHWC `x` that the offset sees, so that a k x k window op is k*k elementwise ops."""
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:3], window, strides, padding)
  (top, bottom), (left, right) = padding
  x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=pad_value)
  out_h = (x.shape[1] - window[0]) // strides[0] + 1
  out_w = (x.shape[2] - window[1]) // strides[1] + 1
  for i in range(window[0]):
    for j in range(window[1]):
      yield (i, j), jax.lax.slice(
          x, (0, i, j, 0), (x.shape[0], i + (out_h - 1) * strides[0] + 1,
                            j + (out_w - 1) * strides[1] + 1, x.shape[3]), (1, *strides, 1))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, **kwargs) -> jax.Array:
  """`jax.lax.conv_general_dilated` that computes NHWC depthwise convolutions (kernel
  (kh, kw, 1, C), C groups, no dilation) as kh*kw shifted multiply-adds, which XLA fuses into one
  loop: on CPU its grouped convolution is 10x or more slower. Anything else goes to lax. Pass it
  to `nn.Conv(..., conv_general_dilated=conv_general_dilated)`; parameters are unchanged."""
  dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  channels = lhs.shape[-1]
  depthwise = (lhs.ndim == 4 and dims.lhs_spec == (0, 3, 1, 2) and dims.rhs_spec == (3, 2, 0, 1)
               and dims.out_spec == (0, 3, 1, 2) and feature_group_count == channels > 1
               and rhs.shape[2:] == (1, channels)
               and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))))
  if not depthwise or exporting():
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        **kwargs)
  if not isinstance(padding, str):
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  return depthwise_conv2d(lhs, rhs, tuple(int(s) for s in window_strides), padding)


@functools.partial(jax.jit, static_argnums=(2, 3))
def depthwise_conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                     padding: str | tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """NHWC depthwise convolution, x (B, H, W, C), kernel (kh, kw, 1, C), as kh*kw shifted
  multiply-adds. A jitted function of its own so that `compact_vit.profile.count_macs` finds it
  by name in the jaxpr and counts kh*kw MACs per output element (XLA inlines it)."""
  out = None
  for (i, j), patch in _window_slices(x, kernel.shape[:2], strides, padding):
    term = patch * kernel[i, j, 0]
    out = term if out is None else out + term
  return out


def pool2d(x: jax.Array, window: int, strides: int, padding: int, kind: str) -> jax.Array:
  """k x k `kind` ('max' or 'avg') pooling of NHWC `x` with symmetric zero / -inf `padding`, as
  torch's MaxPool2d and AvgPool2d(count_include_pad=False), computed as k*k shifted elementwise
  ops (faster than XLA's reduce_window on CPU). (B, H, W, C) -> (B, H', W', C). Under
  `export_forms()`, Flax's max_pool / avg_pool (ONNX MaxPool / AveragePool)."""
  if exporting():
    return _export_pool2d(x, window, strides, padding, kind)
  args = ((window, window), (strides, strides), ((padding, padding), (padding, padding)))
  if kind == "max":
    out = None
    for _, patch in _window_slices(x, *args, pad_value=-jnp.inf):
      out = patch if out is None else jnp.maximum(out, patch)
    return out
  total = sum(patch for _, patch in _window_slices(x, *args))
  ones = np.pad(np.ones(x.shape[1:3], np.float32), padding)  # real (not padding) positions
  count = sum(ones[i:i + strides * (total.shape[1] - 1) + 1:strides,
                   j:j + strides * (total.shape[2] - 1) + 1:strides]
              for i in range(window) for j in range(window))
  return total / jnp.asarray(count[None, :, :, None], x.dtype)


def _export_pool2d(x: jax.Array, window: int, strides: int, padding: int, kind: str) -> jax.Array:
  """`pool2d` as Flax's pooling, which jax2onnx lowers to MaxPool / AveragePool: a stride-1
  'same' average as avg_pool(padding='SAME', count_include_pad=False); otherwise an explicit pad
  (-inf for max) and a 'VALID' pool. Average pooling with stride > 1 and padding is the slices."""
  shape = (window, window)
  if kind == "max":
    if padding:
      x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                  constant_values=-jnp.inf)
    return nn.max_pool(x, window_shape=shape, strides=(strides, strides), padding="VALID")
  if strides == 1 and 2 * padding == window - 1:
    return nn.avg_pool(x, window_shape=shape, strides=(1, 1), padding="SAME",
                       count_include_pad=False)
  if not padding:
    return nn.avg_pool(x, window_shape=shape, strides=(strides, strides), padding="VALID")
  token = _EXPORT_FORMS.set(False)
  try:
    return pool2d(x, window, strides, padding, kind)
  finally:
    _EXPORT_FORMS.reset(token)


def spatial_mean(x: jax.Array, keepdims: bool = False) -> jax.Array:
  """Mean of NHWC `x` over its height and width: (B, H, W, C) -> (B, C), or (B, 1, 1, C) with
  `keepdims`. Under `export_forms()`, an average pool over the whole map (ONNX GlobalAveragePool,
  which onnxruntime runs in its blocked convolution layout, as in torch's exports) instead of
  ReduceSum and Div, which need the map in plain NCHW."""
  if exporting():
    out = nn.avg_pool(x, window_shape=tuple(x.shape[1:3]), padding="VALID")
    return out if keepdims else jnp.squeeze(out, axis=(1, 2))
  return x.mean(axis=(1, 2), keepdims=keepdims)


def batch_norm(name: str, train: bool, dtype: Dtype, param_dtype: Dtype) -> nn.BatchNorm:
  """torch's BatchNorm2d defaults (eps 1e-5, momentum 0.1 = Flax momentum 0.9); running statistics
  live in the `batch_stats` collection and are used when `train` is False. Flax updates the running
  variance with the biased batch variance (torch: unbiased), a difference that only matters for
  very small batches."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPS, dtype=dtype,
                      param_dtype=param_dtype, name=name)


class ConvNormAct(nn.Module):
  """timm's ConvNormAct: `conv` (k x k, stride, groups, 'same'-style padding (k - 1) // 2) -> `bn`
  (BatchNorm) -> `act` (None for none). x: (B, H, W, C) -> (B, ceil(H/s), ceil(W/s), features)."""
  features: int
  kernel_size: int = 1
  strides: int = 1
  groups: int = 1
  use_bias: bool = True
  act: Any = None
  kernel_init: Any = conv_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    pad = (self.kernel_size - 1) // 2
    x = nn.Conv(self.features, (self.kernel_size,) * 2, strides=self.strides,
                padding=((pad, pad), (pad, pad)), feature_group_count=self.groups,
                use_bias=self.use_bias, kernel_init=self.kernel_init, dtype=self.dtype,
                param_dtype=self.param_dtype, conv_general_dilated=conv_general_dilated,
                name="conv")(x)
    x = batch_norm("bn", train, self.dtype, self.param_dtype)(x)
    return x if self.act is None else self.act(x)
