"""SepViT checkpoints, authors' naming (liwei109/SepViT classification/sepvit.py) -> `models.sepvit`.

Renames `attn.DSA_qkv` -> `attn.dsa_qkv`, `attn.PSA_qk` -> `attn.psa_qk` and
`pos_block.K.proj.0` -> `pos_block.K.proj`; the rest maps generically. For a model whose
`img_size` is not the checkpoint's 224:

* `win_tokens` of a windowed block are resampled (bicubic, antialiased, as ViT position
  embeddings) from the checkpoint's square window grid to the model's grid;
* a block that is windowed in the checkpoint but global in the model (one window covers its
  smaller map) has no window tokens or PSA there, so its `win_tokens`, `attn.win_tokens_norm` and
  `attn.PSA_qk` are dropped;
* a block that is global in the checkpoint but windowed in the model (a larger map) has no PSA
  weights to load: that is reported as missing keys.
"""
from __future__ import annotations

import math
import re

import numpy as np
from flax import linen as nn

from compact_vit.convert.core import StateDict, register_converter
from compact_vit.convert.vit import resample_pos_embed
from compact_vit.errors import UserError
from compact_vit.models.sepvit import VARIANTS

_RENAMES = ((re.compile(r"\.attn\.DSA_qkv\."), ".attn.dsa_qkv."),
            (re.compile(r"\.attn\.PSA_qk\."), ".attn.psa_qk."),
            (re.compile(r"^pos_block\.(\d+)\.proj\.0\."), r"pos_block.\1.proj."))


def resample_win_tokens(win_tokens: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """(1, g*g, 1, C) window tokens on a square g x g grid -> (1, rows*cols, 1, C) for `grid`."""
  _, count, _, dim = win_tokens.shape
  if math.isqrt(count) ** 2 != count:
    raise UserError(f"Cannot resample win_tokens of shape {win_tokens.shape}: its {count} windows "
                    "do not form a square grid.")
  flat = resample_pos_embed(win_tokens.reshape(1, count, dim), grid, num_prefix_tokens=0)
  return flat.reshape(1, grid[0] * grid[1], 1, dim)


@register_converter(list(VARIANTS), head=("head",))
def prepare_sepvit(state_dict: StateDict, model: nn.Module) -> StateDict:
  """Renames the authors' keys and fits window tokens to the model's window grids."""
  out = {}
  for key, value in state_dict.items():
    for pattern, replacement in _RENAMES:
      key = pattern.sub(replacement, key)
    out[key] = value
  for k, grids in enumerate(model.window_grids()):
    for i, grid in enumerate(grids):
      prefix = f"blocks.{k}.{i}."
      tokens = out.get(prefix + "win_tokens")
      if tokens is None:
        continue
      if grid == (1, 1):
        out = {key: v for key, v in out.items() if not key.startswith(
            (prefix + "win_tokens", prefix + "attn.win_tokens_norm.", prefix + "attn.psa_qk."))}
      elif tokens.ndim == 4 and tokens.shape[1] != grid[0] * grid[1]:
        out[prefix + "win_tokens"] = resample_win_tokens(tokens, grid)
  return out
