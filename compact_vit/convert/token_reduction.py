"""Token-reduction families (DynamicViT, ATS, PatchMerger) from ViT / DeiT checkpoints.

The backbones keep `VisionTransformer`'s names, so a timm/DeiT checkpoint converts as for
`models.vit` (position embedding resampled to the model's grid). What a dense checkpoint lacks —
DynamicViT's `score_predictor.{i}` modules, PatchMerger's `patch_merger` — is filled in freshly
initialised (seed 0), so `python -m compact_vit.convert --model dynamicvit_deit_s --checkpoint
deit_small_patch16_224-cd65a155.pth --out DIR` gives a fine-tuning start. The DynamicViT authors'
released checkpoints (raoyongming/DynamicViT, `{'model': state_dict}` with `score_predictor.*`)
carry their predictors and load as they are. ATS adds no parameters.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from compact_vit.convert.core import StateDict, register_converter
from compact_vit.convert.vit import prepare_vit
from compact_vit.models import ats, dynamic_vit, patch_merger


def _fresh_modules(model: nn.Module) -> dict[str, nn.Module]:
  """torch-name prefix -> freshly initialisable submodule, for what a dense ViT lacks."""
  if isinstance(model, dynamic_vit.DynamicViT):
    return {f"score_predictor.{i}": dynamic_vit.ScorePredictor(param_dtype=model.param_dtype)
            for i in range(len(model.pruning_loc))}
  if isinstance(model, patch_merger.PatchMergerViT):
    return {"patch_merger": patch_merger.PatchMerger(model.num_merged_tokens,
                                                     param_dtype=model.param_dtype)}
  return {}


def _torch_layout(params, prefix: str) -> StateDict:
  """Flax params of one module -> torch-named arrays (kernel -> weight, transposed)."""
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    *module, leaf = [p.key for p in path]
    value = np.asarray(value)
    if leaf == "kernel":
      leaf, value = "weight", value.T
    elif leaf == "scale":
      leaf = "weight"
    out[".".join([prefix] + [re.sub(r"_(\d+)$", r".\1", m) for m in module] + [leaf])] = value
  return out


@register_converter(list(dynamic_vit.VARIANTS) + list(ats.VARIANTS) + list(patch_merger.VARIANTS))
def prepare_token_reduction(state_dict: StateDict, model: nn.Module) -> StateDict:
  """Resamples `pos_embed` as for ViT; adds freshly initialised modules the checkpoint lacks."""
  state_dict = dict(prepare_vit(state_dict, model))
  missing = {prefix: module for prefix, module in _fresh_modules(model).items()
             if not any(k.startswith(prefix + ".") for k in state_dict)}
  if not missing:
    return state_dict
  tokens = model.grid_size[0] * model.grid_size[1]
  x = jnp.zeros((1, tokens, model.embed_dim), jnp.float32)

  def init_all(key):  # one compilation for every missing module
    out = {}
    for i, (prefix, module) in enumerate(missing.items()):
      args = (x, jnp.ones((1, tokens))) if isinstance(module, dynamic_vit.ScorePredictor) else (x,)
      out[prefix] = module.init(jax.random.fold_in(key, i), *args)["params"]
    return out

  for prefix, params in jax.jit(init_all)(jax.random.key(0)).items():
    state_dict.update(_torch_layout(params, prefix))
  return state_dict
