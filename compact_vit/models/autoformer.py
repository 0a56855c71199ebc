"""AutoFormer: a weight-entangled ViT supernet, and the searched AutoFormer / TF-TAS subnets.

Papers: Chen et al., "AutoFormer: Searching Transformers for Visual Recognition", ICCV 2021
(arXiv 2107.00651; microsoft/Cream AutoFormer/); Zhou et al., "Training-free Transformer
Architecture Search", CVPR 2022 (arXiv 2203.12217; decemberzhou/TF_TAS). Both use the same
supernet: a ViT whose embed dim (shared by all layers), depth, and per-layer number of heads and
MLP ratio are searched; attention uses 64-dim heads (`change_qkv`), 2-D relative position
embeddings on keys and values (`relative_position`) plus the absolute one, pre-norm blocks with
LayerNorm eps 1e-5, and average pooling of the patch tokens after the final norm (`gp`), as the
authors' commands (`--gp --change_qkv --relative_position`).

Weight entanglement: a subnet uses the leading slice `W[:in, :out]` of every largest weight. The
fused qkv kernel is stored as the authors' (`qkv_super`): output column `3 * p + t` is position `p`
of q (t=0), k (t=1) or v (t=2), so a subnet with `h` heads uses the leading `3 * 64 * h` columns.

`AutoFormerSupernet` computes at the largest size under masks (embed channels, heads, hidden units,
active depth), with the architecture passed to `apply` as arrays
(`apply(v, x, arch=arch_arrays(...))`),
so one compilation serves every subnet. `AutoFormerViT` is the standalone per-layer-dimension ViT;
`extract_subnet` slices supernet weights into it (same logits as the masked supernet).

Departures from the authors' code:
* The relative-position terms are computed per table row and gathered (q·table, then index;
  attention summed into distance bins, then ·table): the same values as the authors' gather of an
  (N, N, 64) embedding, with fewer multiply-accumulates (their FLOP count ignores these terms).
* The supernet's largest dims are the largest choices (T: embed 240, not the authors' 256 of
  unused channels); a released supernet converts by the same leading slice.
* Dropout is not rescaled by embed_dim / super_embed_dim (the authors' default rates are 0).
* Drop path rises over the model's own depth (the authors' retrain mode uses the supernet depth).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from compact_vit.models.registry import register
from compact_vit.nn.layers import (DropPath, Dtype, PatchEmbed, check_input_size,
                                   check_settings, dense, drop_path_rates, exporting, gelu,
                                   linear_init, settings_problems, to_pair)

LN_EPS = 1e-5  # torch.nn.LayerNorm default, as the authors' LayerNormSuper


# ----------------------------------------------------------------------------- variant tables

@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Choices of one AutoFormer search space (experiments/supernet/supernet-*.yaml)."""
  embed_dims: tuple[int, ...]
  depths: tuple[int, ...]
  num_heads: tuple[int, ...]
  mlp_ratios: tuple[float, ...]

  def model_fields(self) -> dict[str, Any]:
    return dict(embed_dims=self.embed_dims, depths=self.depths, num_heads=self.num_heads,
                mlp_ratios=self.mlp_ratios)


SPACES: dict[str, SearchSpace] = {
    "t": SearchSpace((192, 216, 240), (12, 13, 14), (3, 4), (3.5, 4.0)),
    "s": SearchSpace((320, 384, 448), (12, 13, 14), (5, 6, 7), (3.0, 3.5, 4.0)),
    "b": SearchSpace((528, 576, 624), (14, 15, 16), (9, 10), (3.0, 3.5, 4.0)),
}

# Published subnets: embed dim, per-layer heads and MLP ratios (depth = their length).
# AutoFormer: experiments/subnet/AutoFormer-*.yaml (T has MLP ratio 3.0 in a {3.5, 4} space, as
# published). TF-TAS: experiments/subnet_autoformer/TF_TAS-*.yaml.
SUBNETS: dict[str, dict[str, Any]] = {
    "autoformer_t": dict(embed_dim=192, num_heads=(3,) * 10 + (4, 3, 3),
                         mlp_ratios=(3.5, 3.5, 3.0, 3.5, 3.0, 3.0, 4.0, 4.0, 3.5, 4.0, 3.5, 4.0,
                                     3.5)),
    "autoformer_s": dict(embed_dim=384, num_heads=(6, 6, 5, 7, 5, 5, 5, 6, 6, 7, 7, 6, 7),
                         mlp_ratios=(3.0, 3.5, 3.0, 3.5) + (4.0,) * 7 + (3.5, 4.0)),
    "autoformer_b": dict(embed_dim=576,
                         num_heads=(9, 9, 9, 9, 9, 10, 9, 9, 10, 9, 10, 9, 9, 10),
                         mlp_ratios=(3.5, 3.5, 4.0, 3.5, 4.0, 3.5, 3.5, 3.0, 4.0, 4.0, 3.0, 4.0,
                                     3.0, 3.5)),
    "tftas_t": dict(embed_dim=192, num_heads=(4, 3, 3, 3, 3, 4, 4, 3, 3, 3, 4, 3, 3),
                    mlp_ratios=(3.5, 4.0, 3.5, 3.5, 4.0, 3.5, 3.5, 3.5, 4.0, 4.0, 4.0, 4.0, 3.5)),
    "tftas_s": dict(embed_dim=384, num_heads=(6, 6, 6, 6, 7, 6, 5, 7, 5, 5, 5, 7, 6, 7),
                    mlp_ratios=(4.0, 4.0, 4.0, 3.0, 4.0, 3.0, 3.0, 3.5, 4.0, 3.5, 3.5, 4.0, 3.0,
                                3.5)),
    "tftas_b": dict(embed_dim=576, num_heads=(9, 10, 10, 10, 10, 10, 10, 9, 9, 10, 9, 9, 9, 9, 9),
                    mlp_ratios=(3.0, 3.5, 4.0, 4.0, 3.0, 4.0, 3.0, 3.0, 3.5, 3.0, 3.0, 3.5, 4.0,
                                3.0, 4.0)),
}


# ----------------------------------------------------------------------------- architectures

def hidden_features(embed_dim: int, mlp_ratio: float) -> int:
  """MLP hidden units of a layer, `int(embed_dim * mlp_ratio)` as the authors."""
  return int(embed_dim * mlp_ratio)


def arch_of(name: str) -> dict[str, Any]:
  """A published subnet as an architecture dict {embed_dim, depth, num_heads, mlp_ratios}."""
  sub = SUBNETS[name]
  return dict(embed_dim=sub["embed_dim"], depth=len(sub["num_heads"]),
              num_heads=list(sub["num_heads"]), mlp_ratios=list(sub["mlp_ratios"]))


def arch_arrays(arch: Mapping[str, Any], max_depth: int) -> dict[str, np.ndarray]:
  """Host architecture dict -> the int32 arrays `AutoFormerSupernet.apply(..., arch=)` takes.

  {embed_dim: (), depth: (), num_heads: (max_depth,), mlp_hidden: (max_depth,)}; layers past
  `depth` are padded with the last layer's values (they are inactive).
  """
  depth = int(arch["depth"])
  heads = list(arch["num_heads"])[:depth]
  hidden = [hidden_features(arch["embed_dim"], r) for r in list(arch["mlp_ratios"])[:depth]]
  pad = max_depth - depth
  return {"embed_dim": np.asarray(arch["embed_dim"], np.int32),
          "depth": np.asarray(depth, np.int32),
          "num_heads": np.asarray(heads + heads[-1:] * pad, np.int32),
          "mlp_hidden": np.asarray(hidden + hidden[-1:] * pad, np.int32)}


def count_subnet_params(arch: Mapping[str, Any], *, num_classes: int = 1000, img_size: int = 224,
                        patch_size: int = 16, head_dim: int = 64, relative_position: bool = True,
                        max_relative_position: int = 14) -> int:
  """Parameters of the standalone subnet (= `profile.count_params` of `AutoFormerViT`)."""
  e = arch["embed_dim"]
  (gh, gw), (ph, pw) = _grid(img_size, patch_size), to_pair(patch_size)
  total = ph * pw * 3 * e + e + e + (gh * gw + 1) * e + 2 * e + e * num_classes + num_classes
  rel = 4 * (2 * max_relative_position + 2) * head_dim if relative_position else 0
  for heads, ratio in zip(arch["num_heads"][:arch["depth"]], arch["mlp_ratios"][:arch["depth"]]):
    q, h = heads * head_dim, hidden_features(e, ratio)
    total += 4 * e + (e + 1) * 3 * q + (q + 1) * e + (e + 1) * h + (h + 1) * e + rel
  return total


def count_subnet_macs(arch: Mapping[str, Any], *, num_classes: int = 1000, img_size: int = 224,
                      patch_size: int = 16, head_dim: int = 64, relative_position: bool = True,
                      max_relative_position: int = 14) -> int:
  """Multiply-accumulates per image (= `profile.count_macs` of `AutoFormerViT`, batch 1)."""
  e = arch["embed_dim"]
  (gh, gw), (ph, pw) = _grid(img_size, patch_size), to_pair(patch_size)
  n = gh * gw
  t = n + 1
  rows = 2 * max_relative_position + 2
  total = n * ph * pw * 3 * e + e * num_classes
  for heads, ratio in zip(arch["num_heads"][:arch["depth"]], arch["mlp_ratios"][:arch["depth"]]):
    q, h = heads * head_dim, hidden_features(e, ratio)
    total += t * e * 3 * q + 2 * t * t * q + t * q * e + 2 * t * e * h
    if relative_position:
      total += 4 * t * rows * q
  return total


def _grid(img_size, patch_size) -> tuple[int, int]:
  (h, w), (ph, pw) = to_pair(img_size), to_pair(patch_size)
  return h // ph, w // pw


def relative_position_index(grid: tuple[int, int], max_distance: int) -> tuple[np.ndarray, ...]:
  """(rows, cols) index tables (T, T), T = 1 + gh*gw, into the (2M+2, d) embedding tables.

  Distances between patch rows (cols) clipped to [-M, M] map to 1..2M+1; 0 is the class token's
  row and column, as the authors' RelativePosition2D_super.
  """
  gh, gw = grid
  pos = np.arange(gh * gw)
  out = []
  for coord in (pos // gw, pos % gw):
    dist = np.clip(coord[None, :] - coord[:, None], -max_distance, max_distance) + max_distance + 1
    out.append(np.pad(dist, ((1, 0), (1, 0))).astype(np.int32))
  return tuple(out)


# ----------------------------------------------------------------------------- blocks

class LayerNorm(nn.Module):
  """LayerNorm over the first `n` channels: x (..., C) with zeros beyond `n` -> same, zeros kept.

  `mask` (C,) bool marks the active channels (None: all); statistics in float32.
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    dim = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (dim,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (dim,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    if mask is None:
      mean = x32.mean(-1, keepdims=True)
      var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    else:
      count = mask.sum().astype(jnp.float32)
      mean = x32.sum(-1, keepdims=True) / count
      var = jnp.where(mask, jnp.square(x32 - mean), 0.0).sum(-1, keepdims=True) / count
    y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPS) * scale + bias
    if mask is not None:
      y = jnp.where(mask, y, 0.0)
    return y.astype(self.dtype)


class RelativePosition2D(nn.Module):
  """The two (2M+2, head_dim) tables (vertical, horizontal) of one relative embedding."""
  rows: int
  head_dim: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    shape = (self.rows, self.head_dim)
    return (self.param("embeddings_table_v", linear_init, shape, self.param_dtype),
            self.param("embeddings_table_h", linear_init, shape, self.param_dtype))


class Attention(nn.Module):
  """Multi-head attention with `num_heads` heads of `head_dim`, 2-D relative positions.

  x: (B, T, C) -> (B, T, C). `head_mask` (num_heads,) bool zeroes the outputs of inactive heads;
  `embed_mask` (C,) zeroes inactive output channels. `rel_index`: the two (T, T) index tables.
  """
  num_heads: int
  head_dim: int = 64
  relative_position: bool = True
  max_relative_position: int = 14
  qkv_bias: bool = True
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, rel_index=None, head_mask=None, embed_mask=None, train=False):
    batch, tokens, dim = x.shape
    heads, hd = self.num_heads, self.head_dim
    qkv = dense(3 * heads * hd, "qkv", self.dtype, self.param_dtype, use_bias=self.qkv_bias)(x)
    qkv = qkv.reshape(batch, tokens, heads, hd, 3)  # column 3p+t, p = head * hd + d
    q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]  # (B, T, H, D)
    scale = hd ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    rel_tables = None
    if self.relative_position:
      rows = 2 * self.max_relative_position + 2
      rel_k = RelativePosition2D(rows, hd, self.param_dtype, name="rel_pos_embed_k")()
      rel_v = RelativePosition2D(rows, hd, self.param_dtype, name="rel_pos_embed_v")()
      rel_tables = rel_v
      for table, index in zip(rel_k, rel_index):
        per_row = jnp.einsum("bqhd,rd->bhqr", q, table.astype(self.dtype))
        if exporting():  # gather and scatter as one-hot matmuls, which ONNX runtimes run
          logits = logits + jnp.einsum("bhqr,qkr->bhqk", per_row,
                                       jax.nn.one_hot(index, rows, dtype=per_row.dtype))
          continue
        logits = logits + jnp.take_along_axis(
            per_row, jnp.broadcast_to(index, per_row.shape[:2] + index.shape), axis=-1)
    weights = jax.nn.softmax(logits.astype(jnp.float32) * scale, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.drop_rate, deterministic=not train)(weights)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    if rel_tables is not None:
      query = jnp.arange(tokens)[:, None]
      for table, index in zip(rel_tables, rel_index):
        if exporting():
          bins = jnp.einsum("bhqk,qkr->bhqr", weights,
                            jax.nn.one_hot(index, table.shape[0], dtype=weights.dtype))
        else:
          bins = jnp.zeros(weights.shape[:3] + (table.shape[0],), weights.dtype)
          bins = bins.at[:, :, query, index].add(weights, mode="promise_in_bounds")  # per bin
        out = out + jnp.einsum("bhqr,rd->bqhd", bins, table.astype(self.dtype))
    if head_mask is not None:
      out = jnp.where(head_mask[:, None], out, 0.0)
    out = dense(dim, "proj", self.dtype, self.param_dtype)(out.reshape(batch, tokens, heads * hd))
    out = nn.Dropout(self.drop_rate, deterministic=not train)(out)
    return out if embed_mask is None else jnp.where(embed_mask, out, 0.0)


class Block(nn.Module):
  """Pre-norm AutoFormer layer: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))).

  x: (B, T, C) -> (B, T, C). `masks` (supernet only): {'embed': (C,), 'heads': (num_heads,),
  'hidden': (hidden_features,)} bool; inactive channels stay exactly zero.
  """
  num_heads: int
  hidden_features: int
  head_dim: int = 64
  relative_position: bool = True
  max_relative_position: int = 14
  qkv_bias: bool = True
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, rel_index=None, masks=None, train=False):
    masks = masks or {}
    embed = masks.get("embed")
    y = LayerNorm(self.dtype, self.param_dtype, name="attn_layer_norm")(x, embed)
    y = Attention(self.num_heads, self.head_dim, self.relative_position,
                  self.max_relative_position, self.qkv_bias, self.drop_rate, self.dtype,
                  self.param_dtype, name="attn")(y, rel_index, masks.get("heads"), embed, train)
    x = x + DropPath(self.drop_path_rate, name="drop_path1")(y, train)
    y = LayerNorm(self.dtype, self.param_dtype, name="ffn_layer_norm")(x, embed)
    y = gelu(dense(self.hidden_features, "fc1", self.dtype, self.param_dtype)(y))
    if masks.get("hidden") is not None:
      y = jnp.where(masks["hidden"], y, 0.0)
    y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
    y = dense(x.shape[-1], "fc2", self.dtype, self.param_dtype)(y)
    y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
    if embed is not None:
      y = jnp.where(embed, y, 0.0)
    return x + DropPath(self.drop_path_rate, name="drop_path2")(y, train)


class _Common(nn.Module):
  """Fields and pieces shared by the supernet and the standalone subnet."""
  num_classes: int = 1000
  img_size: int | tuple[int, int] = 224
  patch_size: int | tuple[int, int] = 16
  head_dim: int = 64
  relative_position: bool = True
  max_relative_position: int = 14
  qkv_bias: bool = True
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _problems(self) -> list[str]:
    problems = settings_problems(self, ("drop_rate", "drop_path_rate"))
    if any(s % p for s, p in zip(to_pair(self.img_size), to_pair(self.patch_size))):
      problems.append(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
    return problems

  def _embed(self, x, dim, embed_mask):
    """Patches + class token + absolute position: (B, H, W, 3) -> (B, 1 + N, dim)."""
    dtype = jnp.dtype(self.dtype)
    x = PatchEmbed(self.patch_size, dim, dtype=dtype, param_dtype=self.param_dtype,
                   name="patch_embed")(x.astype(dtype))
    cls = self.param("cls_token", linear_init, (1, 1, dim), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (x.shape[0], 1, dim)), x], axis=1)
    pos = self.param("pos_embed", linear_init, (1, x.shape[1], dim), self.param_dtype)
    x = x + pos.astype(dtype)
    return x if embed_mask is None else jnp.where(embed_mask, x, 0.0)

  def _block(self, i, rate, heads, hidden):
    return Block(heads, hidden, self.head_dim, self.relative_position, self.max_relative_position,
                 self.qkv_bias, self.drop_rate, rate, jnp.dtype(self.dtype), self.param_dtype,
                 name=f"blocks_{i}")

  def _rel_index(self):
    if not self.relative_position:
      return None
    return tuple(jnp.asarray(i) for i in relative_position_index(
        _grid(self.img_size, self.patch_size), self.max_relative_position))

  def _head(self, x, embed_mask):
    """Final norm, mean over patch tokens, classifier: (B, T, C) -> (B, num_classes) float32."""
    x = LayerNorm(jnp.dtype(self.dtype), self.param_dtype, name="norm")(x, embed_mask)
    x = x[:, 1:].mean(1)
    return dense(self.num_classes, "head", jnp.dtype(self.dtype), self.param_dtype)(x).astype(
        jnp.float32)


class AutoFormerViT(_Common):
  """A standalone AutoFormer subnet: one embed dim, per-layer heads and MLP ratios.

  `__call__(x, train=False)`: x (B, H, W, 3) NHWC normalised -> logits (B, num_classes) float32.
  `num_heads` / `mlp_ratios` hold one value per layer (an int / float repeats); a smaller `depth`
  keeps the first layers.
  """
  embed_dim: int = 192
  depth: int = 13
  num_heads: int | tuple[int, ...] = 3
  mlp_ratios: float | tuple[float, ...] = 4.0

  def __post_init__(self):
    problems = self._problems()
    for name in ("num_heads", "mlp_ratios"):
      value = getattr(self, name)
      if isinstance(value, (tuple, list)) and len(value) < self.depth:
        problems.append(f"{name} has {len(value)} entries for depth={self.depth}")
    check_settings("AutoFormerViT", problems)
    super().__post_init__()

  def layer_dims(self) -> list[tuple[int, float]]:
    """[(heads, mlp_ratio)] per layer."""
    def per_layer(v):
      return list(v)[:self.depth] if isinstance(v, (tuple, list)) else [v] * self.depth
    return list(zip(per_layer(self.num_heads), per_layer(self.mlp_ratios)))

  @property
  def arch(self) -> dict[str, Any]:
    dims = self.layer_dims()
    return dict(embed_dim=self.embed_dim, depth=self.depth, num_heads=[h for h, _ in dims],
                mlp_ratios=[r for _, r in dims])

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_input_size(self, x)
    x = self._embed(x, self.embed_dim, None)
    rel_index = self._rel_index()
    rates = drop_path_rates(self.drop_path_rate, self.depth)
    for i, ((heads, ratio), rate) in enumerate(zip(self.layer_dims(), rates)):
      x = self._block(i, rate, heads, hidden_features(self.embed_dim, ratio))(
          x, rel_index, None, train)
    return self._head(x, None)


class AutoFormerSupernet(_Common):
  """The weight-entangled supernet over a search space (fields: the choices).

  `__call__(x, train=False, arch=None)`: `arch` is `arch_arrays(...)` (traced arrays are fine:
  one compilation serves every subnet); None runs the largest subnet. Logits (B, C) float32.
  """
  embed_dims: tuple[int, ...] = SPACES["t"].embed_dims
  depths: tuple[int, ...] = SPACES["t"].depths
  num_heads: tuple[int, ...] = SPACES["t"].num_heads
  mlp_ratios: tuple[float, ...] = SPACES["t"].mlp_ratios

  def __post_init__(self):
    problems = self._problems()
    for name in ("embed_dims", "depths", "num_heads", "mlp_ratios"):
      if not getattr(self, name) or min(getattr(self, name)) <= 0:
        problems.append(f"{name}={getattr(self, name)} must list positive choices")
    check_settings("AutoFormerSupernet", problems)
    super().__post_init__()

  @property
  def space(self) -> SearchSpace:
    return SearchSpace(tuple(self.embed_dims), tuple(self.depths), tuple(self.num_heads),
                       tuple(self.mlp_ratios))

  @property
  def max_depth(self) -> int:
    return max(self.depths)

  def largest_arch(self) -> dict[str, Any]:
    depth = self.max_depth
    return dict(embed_dim=max(self.embed_dims), depth=depth,
                num_heads=[max(self.num_heads)] * depth, mlp_ratios=[max(self.mlp_ratios)] * depth)

  def subnet_fields(self, arch: Mapping[str, Any]) -> dict[str, Any]:
    """Fields of the `AutoFormerViT` holding `arch` (plus this supernet's shared fields)."""
    shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(_Common)
              if f.name not in ("parent", "name")}
    return dict(shared, embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]),
                num_heads=tuple(int(h) for h in arch["num_heads"][:arch["depth"]]),
                mlp_ratios=tuple(float(r) for r in arch["mlp_ratios"][:arch["depth"]]))

  def sample_arch(self, key: jax.Array) -> dict[str, jax.Array]:
    """A uniformly sampled subnet as `arch_arrays` (traceable): depth, one embed dim, and each
    layer's heads and MLP ratio drawn independently (the authors' sample_configs)."""
    k_depth, k_embed, k_heads, k_ratio = jax.random.split(key, 4)
    embed_idx = jax.random.randint(k_embed, (), 0, len(self.embed_dims))
    ratio_idx = jax.random.randint(k_ratio, (self.max_depth,), 0, len(self.mlp_ratios))
    hidden = np.array([[hidden_features(e, r) for r in self.mlp_ratios] for e in self.embed_dims],
                      np.int32)
    return {"embed_dim": jnp.asarray(self.embed_dims, jnp.int32)[embed_idx],
            "depth": jax.random.choice(k_depth, jnp.asarray(self.depths, jnp.int32)),
            "num_heads": jax.random.choice(k_heads, jnp.asarray(self.num_heads, jnp.int32),
                                           (self.max_depth,)),
            "mlp_hidden": jnp.asarray(hidden)[embed_idx, ratio_idx]}

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               arch: Mapping[str, jax.Array] | None = None) -> jax.Array:
    check_input_size(self, x)
    if arch is None:
      arch = arch_arrays(self.largest_arch(), self.max_depth)
    max_embed, max_heads = max(self.embed_dims), max(self.num_heads)
    max_hidden = max(hidden_features(e, r) for e in self.embed_dims for r in self.mlp_ratios)
    embed = jnp.arange(max_embed) < arch["embed_dim"]
    x = self._embed(x, max_embed, embed)
    rel_index = self._rel_index()
    rates = drop_path_rates(self.drop_path_rate, self.max_depth)
    for i, rate in enumerate(rates):
      masks = {"embed": embed, "heads": jnp.arange(max_heads) < arch["num_heads"][i],
               "hidden": jnp.arange(max_hidden) < arch["mlp_hidden"][i]}
      y = self._block(i, rate, max_heads, max_hidden)(x, rel_index, masks, train)
      x = jnp.where(i < arch["depth"], y, x)
    return self._head(x, embed)


def extract_subnet(supernet: AutoFormerSupernet, params: Any,
                   arch: Mapping[str, Any]) -> tuple[AutoFormerViT, dict[str, Any]]:
  """(standalone model, its params): every weight the leading slice of the supernet's."""
  model = AutoFormerViT(**supernet.subnet_fields(arch))
  x = jax.ShapeDtypeStruct((1, *to_pair(model.img_size), 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  def take(path, shape):
    leaf = params
    for key in path:
      leaf = leaf[key.key]
    return leaf[tuple(slice(0, s) for s in shape.shape)]
  return model, jax.tree_util.tree_map_with_path(take, shapes)


# ----------------------------------------------------------------------------- registry

for _size, _space in SPACES.items():
  register(f"autoformer_supernet_{_size}")(
      functools.partial(AutoFormerSupernet, **_space.model_fields()))
for _name, _sub in SUBNETS.items():
  register(_name)(functools.partial(AutoFormerViT, embed_dim=_sub["embed_dim"],
                                    depth=len(_sub["num_heads"]), num_heads=_sub["num_heads"],
                                    mlp_ratios=_sub["mlp_ratios"]))
