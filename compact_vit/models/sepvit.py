"""SepViT: Separable Vision Transformer.

Paper: Li et al., "SepViT: Separable Vision Transformer", arXiv 2203.15380. Structure, names and
numerics follow the authors' `classification/sepvit.py` (liwei109/SepViT), which the paper's numbers
come from, so their checkpoints convert by renaming (`compact_vit.convert.sepvit`).

Four stages. Each starts with a conv patch embedding + LayerNorm (7x7 stride 4 for the image, 3x3
stride 2 between stages, both overlapping with "same" padding) and runs SepViT blocks; a depthwise
3x3 conv position encoding (PEG, `x + dwconv(x)`) follows each stage's first block. A block is
`x + DropPath(SepAttn(LN(x)))`, then `x + DropPath(Mlp(LN(x)))`. Depthwise separable attention:

* Depthwise self-attention (DSA): the map is cut into `window_size`^2 windows; each window gets
  its own learnable window token (parameter `win_tokens`, one per window position) prepended, and
  MHSA runs inside each window over its ws^2 + 1 tokens; a shortcut adds its (normalised) input.
* Pointwise self-attention (PSA): the window tokens -> LayerNorm -> GELU -> linear give Q and K
  (one per window), V is each window's whole feature map (head by head); attention across
  windows mixes the maps of all windows, then a shortcut adds the DSA output; then `proj`.
* Where one window covers the whole map there are no window tokens and no PSA: the block is plain
  global MHSA over all tokens (with the same inner shortcut before `proj`).

Grouped self-attention is realised, as in the authors' code, by alternating 7 and 14 windows in
stages 2 and 3 (`window_sizes` of the variant table).

Departures from the authors' code:
* Any input size works. Maps not divisible by the window are zero-padded at the bottom/right to
  whole windows: in DSA padded tokens are masked out as keys, and in PSA the output at a position
  is attention over only the windows in which that position is real (a masked softmax over
  windows, per position); the padding is cropped before `proj`. Without padding (all released
  sizes at 224) this is exactly the authors' computation, which instead asserts a 224 input.
* `win_tokens` has one entry per window of the model's `img_size` (the authors fix it by 224);
  `compact_vit.convert` resamples 224 checkpoints to another grid. Whether a block is windowed or
  global is decided by the model's own map size.
* Logits are float32 whatever the compute `dtype`; attention softmax runs in float32.

LayerNorm epsilons as the authors': 1e-6 in blocks and the final norm, torch's default 1e-5 in the
patch embeddings and the window-token norm.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from compact_vit.models.registry import register
from compact_vit.nn.layers import (DropPath, Dtype, Mlp, check_input_size, check_settings,
                                   conv_general_dilated, dense, dot_product_attention,
                                   drop_path_rates, gelu, settings_problems, spatial_mean,
                                   to_pair)

# Variant table: name -> fields of SepViT (authors' SepViT_Lite/_Tiny/_Small/_Base). Windows per
# block: stage 1 [7], stage 2 [7, 14], stage 3 alternating 7/14, stage 4 [7, 7] (global at 224).
VARIANTS: dict[str, dict] = {
    "sepvit_lite": dict(embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), depths=(1, 2, 6, 2),
                        window_sizes=((7,), (7, 14), (7, 14) * 3, (7, 7))),
    "sepvit_t": dict(embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), depths=(1, 2, 6, 2),
                     window_sizes=((7,), (7, 14), (7, 14) * 3, (7, 7))),
    "sepvit_s": dict(embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24),
                     depths=(1, 2, 14, 2), window_sizes=((7,), (7, 14), (7, 14) * 7, (7, 7))),
    "sepvit_b": dict(embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32),
                     depths=(1, 2, 14, 2), window_sizes=((7,), (7, 14), (7, 14) * 7, (7, 7))),
}

BLOCK_LN_EPS = 1e-6  # the authors' norm_layer for blocks and the final norm
TORCH_LN_EPS = 1e-5  # nn.LayerNorm default: patch embeddings and the window-token norm


def conv_init(groups: int = 1) -> nn.initializers.Initializer:
  """The authors' conv init: normal(0, sqrt(2 / fan_out)), fan_out = kh * kw * out / groups."""
  def init(key, shape, dtype=jnp.float32):
    fan_out = shape[0] * shape[1] * shape[-1] // groups
    return math.sqrt(2.0 / fan_out) * jax.random.normal(key, shape, dtype)
  return init


def window_grid(map_size: tuple[int, int], window_size: int) -> tuple[int, int]:
  """Windows (rows, columns) covering a (H, W) map, the last ones padded: ceil(H/ws), ceil(W/ws)."""
  return -(-map_size[0] // window_size), -(-map_size[1] // window_size)


def window_partition(x: jax.Array, window_size: int) -> jax.Array:
  """(B, H, W, C), H and W multiples of ws -> (B, nW, ws*ws, C), windows and tokens row-major."""
  batch, height, width, dim = x.shape
  ws = window_size
  x = x.reshape(batch, height // ws, ws, width // ws, ws, dim).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, -1, ws * ws, dim)


def window_reverse(x: jax.Array, window_size: int, height: int, width: int) -> jax.Array:
  """Inverse of `window_partition`: (B, nW, ws*ws, C) -> (B, H, W, C)."""
  batch, dim, ws = x.shape[0], x.shape[-1], window_size
  x = x.reshape(batch, height // ws, width // ws, ws, ws, dim).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, height, width, dim)


def padding_mask(map_size: tuple[int, int], window_size: int) -> np.ndarray:
  """(nW, ws*ws) bool: True where a window position lies on the real (unpadded) map."""
  rows, cols = window_grid(map_size, window_size)
  real = np.zeros((rows * window_size, cols * window_size, 1), bool)
  real[:map_size[0], :map_size[1]] = True
  return np.asarray(window_partition(real[None], window_size)[0, ..., 0])


class SeparableAttention(nn.Module):
  """DSA within windows, then PSA across windows (or global MHSA when there is one window).

  `__call__(x, map_size, train)`: x (B, nW, T, C) normalised tokens: with `num_windows > 1`, each
  window is its token followed by its ws*ws map tokens (row-major, padded map), T = 1 + ws*ws;
  with one window, x is (B, 1, H*W, C). Returns the (B, H, W, C) map after `proj`, padding
  cropped. Module names follow the authors' (`DSA_qkv` -> `dsa_qkv`, `PSA_qk` -> `psa_qk`).
  """
  num_heads: int
  window_size: int
  num_windows: int
  qkv_bias: bool = True
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, map_size: tuple[int, int], train: bool = False) -> jax.Array:
    batch, num_windows, tokens, dim = x.shape
    heads, head_dim = self.num_heads, dim // self.num_heads
    scale = head_dim**-0.5
    attn_drop = nn.Dropout(self.attn_drop_rate, deterministic=not train)
    windowed = self.num_windows > 1
    height, width = map_size
    if windowed:
      rows, cols = window_grid(map_size, self.window_size)
      height_pad, width_pad = rows * self.window_size, cols * self.window_size
      real = padding_mask(map_size, self.window_size)  # (nW, ws*ws), numpy: static
      padded = not real.all()

    # Depthwise self-attention: MHSA inside each window (window token included).
    qkv = dense(3 * dim, "dsa_qkv", self.dtype, self.param_dtype, self.qkv_bias)(x)
    qkv = qkv.reshape(batch, num_windows, tokens, 3, heads, head_dim)
    qkv = qkv.transpose(3, 0, 1, 4, 2, 5)  # (3, B, nW, H, T, D)
    valid = None
    if windowed and padded:  # padded keys masked; the window token keeps every row non-empty
      keys = np.concatenate([np.ones((num_windows, 1), bool), real], axis=1)  # (nW, T)
      valid = keys[None, :, None, None, :]
    out = dot_product_attention(qkv[0], qkv[1], qkv[2], valid=valid, dropout=attn_drop,
                                scale=scale)
    out = out.transpose(0, 1, 3, 2, 4).reshape(x.shape) + x

    if windowed:
      # Pointwise self-attention: window tokens give Q, K; V is each window's feature map.
      win_tokens, maps = out[:, :, 0], out[:, :, 1:]  # (B, nW, C), (B, nW, ws*ws, C)
      win_tokens = nn.LayerNorm(epsilon=TORCH_LN_EPS, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="win_tokens_norm")(win_tokens)
      win_tokens = gelu(win_tokens)
      qk = dense(2 * dim, "psa_qk", self.dtype, self.param_dtype, self.qkv_bias)(win_tokens)
      qk = qk.reshape(batch, num_windows, 2, heads, head_dim)
      logits = jnp.einsum("bwhd,bvhd->bhwv", qk[:, :, 0] * scale, qk[:, :, 1])
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # (B, H, nW, nW)
      values = maps.reshape(batch, num_windows, -1, heads, head_dim)  # (B, nW, ws*ws, H, D)
      if padded:
        # At position t, a softmax over only the windows v where t is real equals A m / (A @ m):
        # the (B, H, nW, nW, ws*ws) weights are never materialised.
        real_f = jnp.asarray(real, jnp.float32)  # (nW, ws*ws)
        norm = jnp.einsum("bhwv,vt->bwth", weights, real_f)
        values = values * real_f[None, :, :, None, None].astype(values.dtype)
        weights = attn_drop(weights).astype(values.dtype)
        mixed = jnp.einsum("bhwv,bvthd->bwthd", weights, values)
        mixed = mixed / jnp.where(norm > 0, norm, 1.0)[..., None].astype(mixed.dtype)
      else:
        weights = attn_drop(weights).astype(values.dtype)
        mixed = jnp.einsum("bhwv,bvthd->bwthd", weights, values)
      out = mixed.reshape(maps.shape) + maps
      out = window_reverse(out, self.window_size, height_pad, width_pad)[:, :height, :width]
    else:
      out = out.reshape(batch, height, width, dim)
    out = dense(dim, "proj", self.dtype, self.param_dtype)(out)
    return nn.Dropout(self.proj_drop_rate, deterministic=not train)(out)


class SepViTBlock(nn.Module):
  """x + DropPath(SeparableAttention(LN(x))), then x + DropPath(Mlp(LN(x))); x (B, H, W, C).

  Windowed when the `window_size` windows do not cover the map in one (then `win_tokens` of shape
  (1, nW, 1, C), zeros at init, are prepended per window before `norm1`); global otherwise.
  """
  num_heads: int
  window_size: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    batch, height, width, dim = x.shape
    rows, cols = window_grid((height, width), self.window_size)
    num_windows = rows * cols
    if num_windows > 1:
      ws = self.window_size
      padded = jnp.pad(x, ((0, 0), (0, rows * ws - height), (0, cols * ws - width), (0, 0)))
      tokens = window_partition(padded, ws)  # (B, nW, ws*ws, C)
      win_tokens = self.param("win_tokens", nn.initializers.zeros, (1, num_windows, 1, dim),
                              self.param_dtype)
      win_tokens = jnp.broadcast_to(win_tokens.astype(x.dtype), (batch, num_windows, 1, dim))
      tokens = jnp.concatenate([win_tokens, tokens], axis=2)
    else:
      tokens = x.reshape(batch, 1, height * width, dim)
    norm = functools.partial(nn.LayerNorm, epsilon=BLOCK_LN_EPS, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    y = SeparableAttention(self.num_heads, self.window_size, num_windows, self.qkv_bias,
                           self.attn_drop_rate, self.drop_rate, self.dtype, self.param_dtype,
                           name="attn")(norm(name="norm1")(tokens), (height, width), train)
    x = x + DropPath(self.drop_path_rate, name="drop_path1")(y, train)
    y = Mlp(int(dim * self.mlp_ratio), drop_rate=self.drop_rate, dtype=self.dtype,
            param_dtype=self.param_dtype, name="mlp")(norm(name="norm2")(x), train)
    return x + DropPath(self.drop_path_rate, name="drop_path2")(y, train)


class ConvPatchEmbed(nn.Module):
  """Overlapping conv patch embedding + LayerNorm(eps 1e-5): (B, H, W, Cin) -> (B, H', W', C).

  kernel k, stride s, padding k // 2: H' = (H - 1) // s + 1.
  """
  embed_dim: int
  kernel_size: int
  stride: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = self.kernel_size // 2
    x = nn.Conv(self.embed_dim, (self.kernel_size,) * 2, strides=self.stride,
                padding=((pad, pad), (pad, pad)), dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=conv_init(), name="proj")(x)
    return nn.LayerNorm(epsilon=TORCH_LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="norm")(x)


class PosConv(nn.Module):
  """PEG (the authors' PosCNN): x + depthwise 3x3 conv(x), with bias. x (B, H, W, C)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    return x + nn.Conv(dim, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=dim,
                       dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=conv_init(groups=dim),
                       conv_general_dilated=conv_general_dilated, name="proj")(x)


class SepViT(nn.Module):
  """SepViT classifier.

  `__call__(x, train=False)`: x (B, H, W, 3) float32 NHWC, normalised, (H, W) = img_size (any size:
  maps are padded to whole windows). Returns logits (B, num_classes) in float32: final LayerNorm,
  mean over tokens, linear head. `drop_rate` is the dropout after patch embeddings, in the MLPs and
  after `proj` (the authors' `drop`); drop path rises linearly from 0 at the first block to
  `drop_path_rate` at the last. `window_sizes[k][i]` is the window of block i of stage k.
  """
  num_classes: int = 1000
  img_size: int | tuple[int, int] = 224
  embed_dims: Sequence[int] = (96, 192, 384, 768)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  depths: Sequence[int] = (1, 2, 6, 2)
  window_sizes: Sequence[Sequence[int]] = ((7,), (7, 14), (7, 14) * 3, (7, 7))
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    problems = settings_problems(self, ("drop_rate", "attn_drop_rate", "drop_path_rate"))
    stages = len(self.depths)
    if stages < 1 or not (len(self.embed_dims) == len(self.num_heads) == len(self.window_sizes)
                          == stages):
      problems.append(f"embed_dims, num_heads, depths and window_sizes need one entry per stage "
                      f"(got {len(self.embed_dims)}, {len(self.num_heads)}, {stages}, "
                      f"{len(self.window_sizes)})")
    else:
      for k, (dim, heads, depth, windows) in enumerate(
          zip(self.embed_dims, self.num_heads, self.depths, self.window_sizes)):
        if heads < 1 or dim % heads:
          problems.append(f"stage {k}: embed_dim {dim} is not divisible by num_heads {heads}")
        if depth < 1 or len(windows) != depth or min(windows, default=1) < 1:
          problems.append(f"stage {k}: window_sizes {tuple(windows)} needs {depth} positive sizes "
                          f"(one per block)")
    if min(to_pair(self.img_size)) < 1:
      problems.append(f"img_size={self.img_size} is not positive")
    check_settings("SepViT", problems)
    super().__post_init__()

  @property
  def stage_sizes(self) -> list[tuple[int, int]]:
    """Feature-map (H, W) of each stage for `img_size`: /4 (7x7 stride 4), then /2 per stage."""
    height, width = to_pair(self.img_size)
    sizes = []
    for k in range(len(self.depths)):
      stride = 4 if k == 0 else 2
      height, width = (height - 1) // stride + 1, (width - 1) // stride + 1
      sizes.append((height, width))
    return sizes

  def window_grids(self) -> list[list[tuple[int, int]]]:
    """Window grid (rows, cols) of every block, per stage; (1, 1) marks a global-attention block."""
    return [[window_grid(size, ws) for ws in windows]
            for size, windows in zip(self.stage_sizes, self.window_sizes)]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_input_size(self, x)
    dtype = jnp.dtype(self.dtype)
    x = x.astype(dtype)
    rates = iter(drop_path_rates(self.drop_path_rate, sum(self.depths)))
    for k, (dim, heads, windows) in enumerate(
        zip(self.embed_dims, self.num_heads, self.window_sizes)):
      x = ConvPatchEmbed(dim, 7 if k == 0 else 3, 4 if k == 0 else 2, dtype, self.param_dtype,
                         name=f"patch_embeds_{k}")(x)
      x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
      for i, ws in enumerate(windows):
        x = SepViTBlock(heads, ws, self.mlp_ratio, self.qkv_bias, self.drop_rate,
                        self.attn_drop_rate, next(rates), dtype, self.param_dtype,
                        name=f"blocks_{k}_{i}")(x, train)
        if i == 0:
          x = PosConv(dtype, self.param_dtype, name=f"pos_block_{k}")(x)
    x = nn.LayerNorm(epsilon=BLOCK_LN_EPS, dtype=dtype, param_dtype=self.param_dtype,
                     name="norm")(x)
    x = spatial_mean(x)
    return dense(self.num_classes, "head", dtype, self.param_dtype)(x).astype(jnp.float32)


for _name, _fields in VARIANTS.items():
  register(_name)(functools.partial(SepViT, **_fields))
