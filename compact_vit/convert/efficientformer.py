"""EfficientFormer V1 / V2 checkpoints -> `models.efficientformer` / `models.efficientformer_v2`.

Two namings load:
* timm's (`stem.conv1`, `stages.3.blocks.4.token_mixer.qkv`, `head_dist`): module names already
  match, so only the fixes below apply;
* the authors' (snap-research/EfficientFormer: `patch_embed.0`, `network.6.4.token_mixer.qkv`,
  `layer_scale_1`, `dist_head`, V2's `nn.Sequential` indices such as `q.0` / `proj.1`), renamed
  to timm's here. `network` alternates stages (even index) and downsampling embeddings (odd).

Then: `attention_bias_idxs` buffers (index tables the model computes itself) are dropped, and an
`attention_biases` table of another grid (weights trained at another image size) is resampled to the
model's grid, bicubic with antialiasing over the (|dy|, |dx|) offset grid per head, as timm's
`resize_rel_pos_bias_table_levit`.
"""
from __future__ import annotations

import math
import re
from typing import Callable

import jax
import numpy as np
from flax import linen as nn

from compact_vit.convert.core import StateDict, register_converter
from compact_vit.errors import UserError
from compact_vit.models import efficientformer, efficientformer_v2

HEADS = ("head", "head_dist")


def resample_attention_biases(biases: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """(heads, S*S) bias table over a square S x S offset grid -> (heads, grid[0] * grid[1])."""
  heads, length = biases.shape
  side = math.isqrt(length)
  if side * side != length:
    raise UserError(f"Cannot resample attention_biases of shape {biases.shape}: its {length} "
                    "offsets do not form a square grid.")
  table = jax.image.resize(biases.reshape(heads, side, side).astype(np.float32),
                           (heads, *grid), method="bicubic", antialias=True)
  return np.asarray(table).reshape(heads, -1).astype(biases.dtype)


def _network_to_stages(key: str, block_key: Callable[[str], str],
                       downsample_key: Callable[[str], str]) -> str:
  """Authors' `network.{n}.rest` -> timm's `stages.{n/2}.blocks.{block_key(rest)}` for even n,
  `stages.{(n+1)/2}.downsample.{downsample_key(rest)}` for odd n; other keys unchanged."""
  match = re.match(r"network\.(\d+)\.(.*)$", key)
  if not match:
    return key
  index, rest = int(match.group(1)), match.group(2)
  if index % 2 == 0:
    return f"stages.{index // 2}.blocks." + block_key(rest)
  return f"stages.{(index + 1) // 2}.downsample." + downsample_key(rest)


def _apply(key: str, rules) -> str:
  for pattern, replacement in rules:
    key = re.sub(pattern, replacement, key)
  return key


_V1_STEM = [(r"^patch_embed\.0\.", "stem.conv1."), (r"^patch_embed\.1\.", "stem.norm1."),
            (r"^patch_embed\.3\.", "stem.conv2."), (r"^patch_embed\.4\.", "stem.norm2.")]
_V1_BLOCK = [(r"layer_scale_(\d)$", r"ls\1.gamma")]
_V1_DOWNSAMPLE = [(r"^proj\.", "conv.")]

_V2_STEM = [(r"^patch_embed\.0\.", "stem.conv1.conv."), (r"^patch_embed\.1\.", "stem.conv1.bn."),
            (r"^patch_embed\.3\.", "stem.conv2.conv."), (r"^patch_embed\.4\.", "stem.conv2.bn.")]
_V2_ATTENTION = [  # relative to token_mixer. / attn.; order matters (q.proj before proj)
    (r"^q\.local\.0\.", "q.local."), (r"^q\.proj\.0\.", "q.proj.conv."),
    (r"^q\.proj\.1\.", "q.proj.bn."),
    (r"^(q|k|v|v_local|stride_conv)\.0\.", r"\1.conv."),
    (r"^(q|k|v|v_local|stride_conv)\.1\.", r"\1.bn."),
    (r"^proj\.1\.", "proj.conv."), (r"^proj\.2\.", "proj.bn.")]
_V2_BLOCK = [(r"layer_scale_(\d)$", r"ls\1.gamma"),
             (r"mlp\.fc1\.", "mlp.fc1.conv."), (r"mlp\.norm1\.", "mlp.fc1.bn."),
             (r"mlp\.mid\.", "mlp.mid.conv."), (r"mlp\.mid_norm\.", "mlp.mid.bn."),
             (r"mlp\.fc2\.", "mlp.fc2.conv."), (r"mlp\.norm2\.", "mlp.fc2.bn.")]
_V2_DOWNSAMPLE = [(r"^(proj|conv)\.", "conv.conv."), (r"^(norm|bn)\.", "conv.bn.")]


def _v2_block_key(rest: str) -> str:
  match = re.match(r"(\d+)\.token_mixer\.(.*)$", rest)
  if match:
    return f"{match.group(1)}.token_mixer." + _apply(match.group(2), _V2_ATTENTION)
  return _apply(rest, _V2_BLOCK)


def _v2_downsample_key(rest: str) -> str:
  if rest.startswith("attn."):
    return "attn." + _apply(rest[len("attn."):], _V2_ATTENTION)
  return _apply(rest, _V2_DOWNSAMPLE)


def _is_authors(state_dict: StateDict) -> bool:
  return any(k.startswith(("network.", "patch_embed.")) for k in state_dict)


def _finish(state_dict: StateDict, grid_of) -> StateDict:
  """Drops index buffers; resamples bias tables whose length differs from the model's grid."""
  out = {}
  for key, value in state_dict.items():
    if key.endswith("attention_bias_idxs"):
      continue
    if key.endswith("attention_biases") and value.ndim == 2:
      grid = grid_of(key)
      if value.shape[1] != grid[0] * grid[1]:
        value = resample_attention_biases(value, grid)
    out[key] = value
  return out


@register_converter(list(efficientformer.VARIANTS), head=HEADS)
def prepare_efficientformer(state_dict: StateDict, model: nn.Module) -> StateDict:
  """Authors' naming -> timm's; index buffers dropped; bias tables resampled to `img_size`/32."""
  if _is_authors(state_dict):
    renamed = {}
    for key, value in state_dict.items():
      key = _apply(key, _V1_STEM).replace("dist_head.", "head_dist.")
      renamed[_network_to_stages(key, lambda rest: _apply(rest, _V1_BLOCK),
                                 lambda rest: _apply(rest, _V1_DOWNSAMPLE))] = value
    state_dict = renamed
  return _finish(state_dict, lambda key: model.feature_grid(32))


@register_converter(list(efficientformer_v2.VARIANTS), head=HEADS)
def prepare_efficientformer_v2(state_dict: StateDict, model: nn.Module) -> StateDict:
  """As V1, plus V2's Sequential indices -> ConvNorm names and (C, 1, 1) layer scales -> (C,).

  Bias grids: the stage-4 downsampling attention keys its input map (img_size/16); every other
  attention runs at img_size/32.
  """
  if _is_authors(state_dict):
    renamed = {}
    for key, value in state_dict.items():
      key = _apply(key, _V2_STEM).replace("dist_head.", "head_dist.")
      key = _network_to_stages(key, _v2_block_key, _v2_downsample_key)
      if key.endswith(".gamma") and value.ndim == 3:
        value = value.reshape(-1)
      renamed[key] = value
    state_dict = renamed
  return _finish(state_dict, lambda key: model.feature_grid(
      16 if ".downsample.attn." in key else 32))
