"""AutoFormer / TF-TAS checkpoints, authors' naming (microsoft/Cream AutoFormer
model/supernet_transformer.py, decemberzhou/TF_TAS model/autoformer_space.py) ->
`models.autoformer`.

The released checkpoints (e.g. AutoFormer-T `supernet-tiny.pth`) hold the supernet class at its
SUPERNET size (T: embed 256, 14 layers). Converting for a standalone subnet (`autoformer_t`, ...,
or any `AutoFormerViT` given by overrides) or for a supernet (`autoformer_supernet_*`) renames
`patch_embed_super.*` -> `patch_embed.*`, keeps the leading slice of every weight (weight
entanglement; the fused qkv keeps the authors' interleaved row order, which the model uses) and
drops the layers past the model's depth. A checkpoint smaller than the model is a shape mismatch.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from compact_vit.convert.core import StateDict, _flatten, _torch_key, register_converter
from compact_vit.models.autoformer import SPACES, SUBNETS
from compact_vit.nn.layers import to_pair


def _torch_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
  """torch key -> torch-layout shape of every parameter of `model`."""
  x = jnp.zeros((1, *to_pair(model.img_size), 3), jnp.float32)
  out = {}
  for path, leaf in _flatten(jax.eval_shape(model.init, jax.random.key(0), x)).items():
    shape = tuple(leaf.shape)
    if path[-1] == "kernel":  # Flax (*k, I, O) -> torch (O, I, *k)
      shape = (shape[-1], shape[-2], *shape[:-2])
    out[_torch_key(path)] = shape
  return out


@register_converter(list(SUBNETS) + [f"autoformer_supernet_{s}" for s in SPACES], head=("head",))
def prepare_autoformer(state_dict: StateDict, model: nn.Module) -> StateDict:
  """Renames the authors' keys, slices every weight to the model's size, drops extra layers."""
  shapes = _torch_shapes(model)
  depth = getattr(model, "depth", None) or max(model.depths)
  out = {}
  for key, value in state_dict.items():
    key = key.replace("patch_embed_super.", "patch_embed.", 1)
    layer = re.match(r"blocks\.(\d+)\.", key)
    if layer and int(layer.group(1)) >= depth:
      continue
    want = shapes.get(key)
    if want is not None and len(want) == value.ndim and all(
        w <= v for w, v in zip(want, value.shape)):
      value = np.asarray(value)[tuple(slice(0, w) for w in want)]
    out[key] = value
  return out
