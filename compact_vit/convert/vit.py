"""ViT / DeiT checkpoints (timm and facebookresearch/deit share the naming) -> `models.vit`.

Module names already match timm's, so the only fix is the position embedding: when the
checkpoint's patch grid differs from the model's (e.g. 224 weights into an `img_size=384` model),
the patch part is resampled bicubically and the prefix tokens (cls, dist) are kept, as timm's
`resample_abs_pos_embed` (antialiased bicubic, align_corners=False).
"""
from __future__ import annotations

import math

import jax
import numpy as np
from flax import linen as nn

from compact_vit.convert.core import StateDict, register_converter
from compact_vit.errors import UserError
from compact_vit.models.vit import VARIANTS


def resample_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int],
                       num_prefix_tokens: int) -> np.ndarray:
  """(1, prefix + h*w, D) with a square h*w grid -> (1, prefix + new_grid[0]*new_grid[1], D)."""
  prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
  old = math.isqrt(patches.shape[1])
  if old * old != patches.shape[1]:
    raise UserError(f"Cannot resample pos_embed of shape {pos_embed.shape}: its "
                    f"{patches.shape[1]} patch positions do not form a square grid.")
  dim = patches.shape[-1]
  grid = jax.image.resize(patches.reshape(old, old, dim).astype(np.float32),
                          (*new_grid, dim), method="bicubic", antialias=True)
  resampled = np.asarray(grid).reshape(1, -1, dim).astype(pos_embed.dtype)
  return np.concatenate([prefix, resampled], axis=1)


@register_converter(list(VARIANTS), head=("head", "head_dist"))
def prepare_vit(state_dict: StateDict, model: nn.Module) -> StateDict:
  """Resamples `pos_embed` to the model's patch grid if its length differs."""
  pos_embed = state_dict.get("pos_embed")
  num_tokens = model.grid_size[0] * model.grid_size[1] + model.num_prefix_tokens
  if pos_embed is not None and pos_embed.ndim == 3 and pos_embed.shape[1] != num_tokens:
    state_dict = dict(state_dict, pos_embed=resample_pos_embed(
        pos_embed, model.grid_size, model.num_prefix_tokens))
  return state_dict
