"""ViT-Slim: soft-mask slimming of a ViT, and the standalone slim ViT it extracts.

Paper: Chavan et al., "Vision Transformer Slimming: Multi-Dimension Searching in Continuous
Optimization Space", CVPR 2022 (arXiv 2201.00814); authors' code Arnav0400/ViT-Slim
(`models/layers.py`, `models/base_model.py`).

* `MaskedViT` (`vit_slim_masked_*`): a DeiT whose parameter names equal `models.vit`'s (so DeiT
  weights load by tree merge) plus learnable soft masks ζ, as the authors: `blocks_i/attn/zeta`
  (heads, head_dim), initialised at 1, multiplying q, k and v alike; `blocks_i/mlp/zeta`
  (hidden,), initialised at 1, after the GELU; `blocks_i/patch_zeta` (tokens,), initialised at 3
  and passed through tanh, multiplying the normalised input of attention and of the MLP.
  `searched=True` uses the ζ values as given (binary masks, no tanh): the authors' `is_searched`.
* `binarize_masks` keeps a global `budget` fraction of each dimension (threshold = the
  `(1 - budget)` quantile of all ζ of that kind, as `calculate_search_threshold`); patch masks are
  OR-ed from the last layer backwards (`compress_patch`). `extract` cuts the weights down.
* `SlimViT` (`vit_slim_deit_s`): the extracted model with smaller weight tensors: per layer,
  per-head kept dims `head_dims` (heads of equal width are batched) and MLP width `mlp_hidden`.

Departures: the class token's patch mask is always kept (the authors may drop it, which makes the
class head read a zeroed token); pruned patch tokens are not removed physically (a masked token
still acts as a key with the qkv bias, so removal would change the function): `SlimViT` multiplies
them by 0 as the masked model does, and its MACs count them. Extraction therefore defaults to
`budget_patch=1.0`. The registered `vit_slim_deit_s` uses a uniform 0.7 of every dimension (45 of 64
dims per head, 1075 of 1536 MLP units): a searched model's exact dims come from its `model.json`.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from compact_vit.errors import UserError
from compact_vit.models.registry import register
from compact_vit.nn.layers import (DropPath, Dtype, Mlp, PatchEmbed, check_input_size,
                                   check_settings, dense, drop_path_rates, gelu, layer_norm,
                                   linear_init, settings_problems, to_pair)

# Variant table: DeiT-S dims; the slim default keeps 0.7 of every attention head and MLP.
DEIT_S = dict(embed_dim=384, depth=12, num_heads=6, patch_size=16)
DEFAULT_BUDGET = 0.7


def uniform_dims(embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 budget: float = DEFAULT_BUDGET) -> dict[str, tuple]:
  """`head_dims`, `mlp_hidden` keeping `budget` of every head and MLP (rounded)."""
  head = round(embed_dim // num_heads * budget)
  return dict(head_dims=((head,) * num_heads,) * depth,
              mlp_hidden=(round(embed_dim * mlp_ratio * budget),) * depth)


class _ViTBase(nn.Module):
  """Fields and stem/head shared by the masked and the extracted ViT (class token, token pool)."""
  num_classes: int = 1000
  img_size: int | tuple[int, int] = 224
  patch_size: int | tuple[int, int] = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _check(self, problems: list[str]) -> None:
    """UserError listing `problems` (the subclass's) and those of the shared fields, if any."""
    problems = settings_problems(self, ("drop_rate", "drop_path_rate")) + problems
    if self.embed_dim % self.num_heads:
      problems.append(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
    if any(s % p for s, p in zip(to_pair(self.img_size), to_pair(self.patch_size))):
      problems.append(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
    check_settings(type(self).__name__, problems)

  @property
  def num_tokens(self) -> int:
    (h, w), (ph, pw) = to_pair(self.img_size), to_pair(self.patch_size)
    return (h // ph) * (w // pw) + 1

  def _embed(self, x: jax.Array) -> jax.Array:
    check_input_size(self, x)
    dtype, dim = jnp.dtype(self.dtype), self.embed_dim
    x = PatchEmbed(self.patch_size, dim, dtype=dtype, param_dtype=self.param_dtype,
                   name="patch_embed")(x.astype(dtype))
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, dim), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (x.shape[0], 1, dim)), x], axis=1)
    pos_embed = self.param("pos_embed", linear_init, (1, x.shape[1], dim), self.param_dtype)
    return x + pos_embed.astype(dtype)

  def _head(self, x: jax.Array, train: bool) -> jax.Array:
    x = layer_norm("norm", self.dtype, self.param_dtype)(x)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x[:, 0])
    return dense(self.num_classes, "head", self.dtype, self.param_dtype)(x).astype(jnp.float32)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """q, k, v (B, N, H, D) -> (B, N, H, D); float32 logits and softmax."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k).astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class _SlimBlock(nn.Module):
  """Pre-norm block with token masks on the attention and MLP inputs.

  Masked mode (`head_dims is None`): soft masks ζ as in the module docstring. Extracted mode:
  `head_dims` (per head, any widths <= embed_dim / num_heads), `mlp_hidden` units and a fixed
  0/1 `token_mask`. x: (B, N, C) -> (B, N, C).
  """
  num_heads: int
  mlp_hidden: int
  head_dims: tuple[int, ...] | None = None
  token_mask: tuple[int, ...] | None = None
  searched: bool = False
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    batch, tokens, dim = x.shape
    full_head = dim // self.num_heads
    if self.head_dims is None:
      zeta = self.param("patch_zeta", nn.initializers.constant(3.0), (tokens,), self.param_dtype)
      token_mask = zeta if self.searched else jnp.tanh(zeta)
    elif self.token_mask is not None:
      token_mask = jnp.asarray(self.token_mask, jnp.float32)
    else:
      token_mask = None
    scale_tokens = (lambda y: y) if token_mask is None else (
        lambda y: y * token_mask.astype(y.dtype)[None, :, None])
    norm = functools.partial(layer_norm, dtype=self.dtype, param_dtype=self.param_dtype)
    drop_path = DropPath(self.drop_path_rate)

    y = scale_tokens(norm("norm1")(x))
    if self.head_dims is None:
      y = _MaskedAttention(self.num_heads, self.dtype, self.param_dtype, name="attn")(y)
    else:
      y = _SlimAttention(self.head_dims, full_head, self.dtype, self.param_dtype, name="attn")(y)
    x = x + drop_path(y, train)
    y = scale_tokens(norm("norm2")(x))
    if self.head_dims is None:
      y = _MaskedMlp(self.mlp_hidden, self.dtype, self.param_dtype, name="mlp")(y)
    elif self.mlp_hidden:
      y = Mlp(self.mlp_hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(y)
    else:  # every unit pruned: only fc2's bias is left
      y = jnp.broadcast_to(self.param("mlp_bias", nn.initializers.zeros, (dim,),
                                      self.param_dtype).astype(y.dtype), y.shape)
    return x + drop_path(y, train)


class _MaskedAttention(nn.Module):
  """timm attention with q, k, v multiplied by ζ (heads, head_dim). (B, N, C) -> (B, N, C)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    zeta = self.param("zeta", nn.initializers.ones, (self.num_heads, head_dim), self.param_dtype)
    qkv = dense(3 * dim, "qkv", self.dtype, self.param_dtype)(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim) * zeta.astype(qkv.dtype)
    out = _attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], head_dim**-0.5)
    return dense(dim, "proj", self.dtype, self.param_dtype)(out.reshape(batch, tokens, dim))


class _SlimAttention(nn.Module):
  """Attention whose heads keep `head_dims` dims each; the scale stays `full_head_dim ** -0.5`.

  `qkv` outputs (3, sum(head_dims)); consecutive heads of equal width run as one batched einsum.
  (B, N, C) -> (B, N, C).
  """
  head_dims: tuple[int, ...]
  full_head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, dim = x.shape
    total = sum(self.head_dims)
    if total == 0:  # every head pruned: only proj's bias is left
      bias = self.param("proj_bias", nn.initializers.zeros, (dim,), self.param_dtype)
      return jnp.broadcast_to(bias.astype(x.dtype), x.shape)
    qkv = dense(3 * total, "qkv", self.dtype, self.param_dtype)(x).reshape(batch, tokens, 3, total)
    outs, start = [], 0
    for width, group in itertools.groupby(self.head_dims):
      heads = len(list(group))
      if width:
        part = qkv[..., start:start + heads * width].reshape(batch, tokens, 3, heads, width)
        outs.append(_attend(part[:, :, 0], part[:, :, 1], part[:, :, 2],
                            self.full_head_dim**-0.5).reshape(batch, tokens, heads * width))
      start += heads * width
    return dense(dim, "proj", self.dtype, self.param_dtype)(jnp.concatenate(outs, axis=-1))


class _MaskedMlp(nn.Module):
  """fc1 -> GELU -> × ζ (hidden,) -> fc2. (B, N, C) -> (B, N, C)."""
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    zeta = self.param("zeta", nn.initializers.ones, (self.hidden,), self.param_dtype)
    y = gelu(dense(self.hidden, "fc1", self.dtype, self.param_dtype)(x))
    return dense(x.shape[-1], "fc2", self.dtype, self.param_dtype)(y * zeta.astype(y.dtype))


class MaskedViT(_ViTBase):
  """DeiT with ViT-Slim's soft masks. (B, H, W, 3) -> logits (B, num_classes) float32."""
  searched: bool = False

  def __post_init__(self):
    self._check([])
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = self._embed(x)
    hidden = int(self.embed_dim * self.mlp_ratio)
    for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
      x = _SlimBlock(self.num_heads, hidden, searched=self.searched, drop_path_rate=rate,
                     dtype=self.dtype, param_dtype=self.param_dtype, name=f"blocks_{i}")(x, train)
    return self._head(x, train)


class SlimViT(_ViTBase):
  """The extracted standalone ViT: per layer `head_dims` (num_heads widths), `mlp_hidden`, and
  optionally `token_masks` (per layer, 0/1 per token, class token first).
  (B, H, W, 3) -> logits (B, num_classes) float32."""
  head_dims: Any = None  # tuple (depth) of tuples (num_heads)
  mlp_hidden: Any = None  # tuple (depth)
  token_masks: Any = None  # None or tuple (depth) of tuples (tokens)

  def __post_init__(self):
    # JSON (model.json) gives lists: freeze them into hashable tuples.
    freeze = lambda v: tuple(freeze(u) for u in v) if isinstance(v, (list, tuple)) else int(v)
    for field in ("head_dims", "mlp_hidden", "token_masks"):
      value = getattr(self, field)
      if value is not None:
        object.__setattr__(self, field, freeze(value))
    problems = []
    if self.head_dims is None or self.mlp_hidden is None:
      problems.append("head_dims and mlp_hidden are required")
    else:
      if len(self.head_dims) != self.depth or len(self.mlp_hidden) != self.depth:
        problems.append(f"head_dims and mlp_hidden need depth={self.depth} entries")
      full = self.embed_dim // max(self.num_heads, 1)
      if any(len(h) != self.num_heads or not all(0 <= d <= full for d in h)
             for h in self.head_dims):
        problems.append(f"each head_dims entry needs num_heads={self.num_heads} widths in "
                        f"[0, {full}]")
    if self.token_masks is not None and (
        len(self.token_masks) != self.depth or
        any(len(m) != self.num_tokens for m in self.token_masks)):
      problems.append(f"token_masks needs depth={self.depth} rows of {self.num_tokens} tokens")
    self._check(problems)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = self._embed(x)
    for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
      x = _SlimBlock(self.num_heads, self.mlp_hidden[i], head_dims=self.head_dims[i],
                     token_mask=None if self.token_masks is None else self.token_masks[i],
                     drop_path_rate=rate, dtype=self.dtype, param_dtype=self.param_dtype,
                     name=f"blocks_{i}")(x, train)
    return self._head(x, train)


register("vit_slim_masked_deit_s")(functools.partial(MaskedViT, **DEIT_S))
register("vit_slim_deit_s")(functools.partial(
    SlimViT, **DEIT_S, **uniform_dims(DEIT_S["embed_dim"], DEIT_S["depth"], DEIT_S["num_heads"])))


# ----------------------------------------------------------------------------- masks and extraction

def mask_values(params: Mapping[str, Any]) -> dict[str, list[np.ndarray]]:
  """Per-layer ζ as numpy: {'attn': [(H, D)], 'mlp': [(hidden,)], 'patch': [tanh ζ (N,)]}."""
  blocks = sorted((k for k in params if k.startswith("blocks_")), key=lambda k: int(k[7:]))
  return {"attn": [np.asarray(params[b]["attn"]["zeta"]) for b in blocks],
          "mlp": [np.asarray(params[b]["mlp"]["zeta"]) for b in blocks],
          "patch": [np.tanh(np.asarray(params[b]["patch_zeta"])) for b in blocks]}


def sparsity_l1(params: Mapping[str, Any]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Σ|ζ_attn|, Σ|ζ_mlp|, Σ|tanh ζ_patch| over all layers (the authors' `get_sparsity_loss`)."""
  blocks = [v for k, v in params.items() if k.startswith("blocks_")]
  attn = sum(jnp.abs(b["attn"]["zeta"]).sum() for b in blocks)
  mlp = sum(jnp.abs(b["mlp"]["zeta"]).sum() for b in blocks)
  patch = sum(jnp.abs(jnp.tanh(b["patch_zeta"])).sum() for b in blocks)
  return attn, mlp, patch


def _threshold(values: list[np.ndarray], budget: float) -> float:
  flat = np.sort(np.concatenate([v.reshape(-1) for v in values]))
  return float(flat[min(int((1.0 - budget) * flat.size), flat.size - 1)])


def binarize_masks(params: Mapping[str, Any], budget_attn: float, budget_mlp: float,
                   budget_patch: float) -> dict[str, Any]:
  """`params` with every ζ replaced by 0/1 (for `MaskedViT(searched=True)`), keeping the global
  `budget` fraction of each kind (ties at the threshold are kept, as the authors)."""
  for name, b in (("budget_attn", budget_attn), ("budget_mlp", budget_mlp),
                  ("budget_patch", budget_patch)):
    if not 0.0 < b <= 1.0:
      raise UserError(f"{name}={b} must be in (0, 1].")
  z = mask_values(params)
  t_attn, t_mlp = _threshold(z["attn"], budget_attn), _threshold(z["mlp"], budget_mlp)
  t_patch = _threshold(z["patch"], budget_patch)
  patch, keep = [], np.zeros_like(z["patch"][0], bool)
  for layer in reversed(z["patch"]):  # a token kept later is kept in every earlier layer
    keep = keep | (layer >= t_patch)
    keep[0] = True  # the class token
    patch.insert(0, keep.copy())
  out = jax.tree.map(np.asarray, dict(params))
  for i in range(len(z["attn"])):
    b = dict(out[f"blocks_{i}"])
    b["attn"] = dict(b["attn"], zeta=(z["attn"][i] >= t_attn).astype(np.float32))
    b["mlp"] = dict(b["mlp"], zeta=(z["mlp"][i] >= t_mlp).astype(np.float32))
    b["patch_zeta"] = patch[i].astype(np.float32)
    out[f"blocks_{i}"] = b
  return out


def extract(binary_params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Binarised `MaskedViT` params -> (`SlimViT` params, its overrides head_dims / mlp_hidden /
  token_masks). Heads are reordered by kept width (widest first) so equal widths batch."""
  p = jax.tree.map(np.asarray, dict(binary_params))
  blocks = sorted((k for k in p if k.startswith("blocks_")), key=lambda k: int(k[7:]))
  out = {k: v for k, v in p.items() if not k.startswith("blocks_")}
  head_dims, mlp_hidden, token_masks = [], [], []
  for name in blocks:
    b = p[name]
    keep = b["attn"]["zeta"] > 0.5  # (H, D)
    heads, head_dim = keep.shape
    order = sorted(range(heads), key=lambda h: -int(keep[h].sum()))
    cols = np.concatenate([h * head_dim + np.flatnonzero(keep[h]) for h in order]).astype(int)
    head_dims.append(tuple(int(keep[h].sum()) for h in order))
    qkv_k = b["attn"]["qkv"]["kernel"].reshape(-1, 3, heads * head_dim)[:, :, cols]
    qkv_b = b["attn"]["qkv"]["bias"].reshape(3, heads * head_dim)[:, cols]
    new = {"norm1": b["norm1"], "norm2": b["norm2"]}
    if cols.size:
      new["attn"] = {"qkv": {"kernel": qkv_k.reshape(qkv_k.shape[0], -1),
                             "bias": qkv_b.reshape(-1)},
                     "proj": {"kernel": b["attn"]["proj"]["kernel"][cols],
                              "bias": b["attn"]["proj"]["bias"]}}
    else:
      new["attn"] = {"proj_bias": b["attn"]["proj"]["bias"]}
    units = np.flatnonzero(b["mlp"]["zeta"] > 0.5)
    mlp_hidden.append(int(units.size))
    if units.size:
      new["mlp"] = {"fc1": {"kernel": b["mlp"]["fc1"]["kernel"][:, units],
                            "bias": b["mlp"]["fc1"]["bias"][units]},
                    "fc2": {"kernel": b["mlp"]["fc2"]["kernel"][units],
                            "bias": b["mlp"]["fc2"]["bias"]}}
    else:
      new["mlp_bias"] = b["mlp"]["fc2"]["bias"]
    token_masks.append(tuple(int(t > 0.5) for t in b["patch_zeta"]))
    out[name] = new
  all_kept = all(all(m) for m in token_masks)
  overrides = {"head_dims": tuple(head_dims), "mlp_hidden": tuple(mlp_hidden),
               "token_masks": None if all_kept else tuple(token_masks)}
  return out, overrides


def merge_pretrained(masked_params: Mapping[str, Any], vit_params: Mapping[str, Any]) -> dict:
  """`MaskedViT` params with every weight taken from a `VisionTransformer` (masks kept at init)."""
  def merge(dst, src, path):
    out = {}
    for k, v in dst.items():
      if isinstance(v, Mapping):
        out[k] = merge(v, src.get(k, {}), path + (k,))
      elif k in ("zeta", "patch_zeta"):
        out[k] = v
      elif k not in src or np.shape(src[k]) != np.shape(v):
        raise UserError(f"The DeiT checkpoint does not fit the masked model at "
                        f"{'/'.join(path + (k,))}: expected shape {np.shape(v)}.")
      else:
        out[k] = np.asarray(src[k])
    return out
  return merge(jax.tree.map(np.asarray, dict(masked_params)), vit_params, ())
