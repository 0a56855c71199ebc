"""UniNet checkpoints in the authors' naming (Sense-X/UniNet uninet.py) -> `models.uninet`.

The authors' modules are `nn.Sequential`s addressed by index; ours are named. The table below maps
one to the other; everything else (conv and linear layouts, BatchNorm running statistics) is the
generic mapping of `compact_vit.convert.core`.
"""
from __future__ import annotations

import re

from flax import linen as nn

from compact_vit.convert.core import StateDict, register_converter
from compact_vit.models.uninet import VARIANTS

_BLOCK = r"^(blocks\.\d+)\."
_RENAMES = [(re.compile(pattern), replacement) for pattern, replacement in [
    (r"^stem\.0\.", "stem_conv."), (r"^stem\.1\.", "stem_norm."),
    (r"^head\.0\.", "final_conv."), (r"^head\.1\.", "final_norm."),
    # every block and DSM: [MaxPool +] 1x1 shortcut
    (_BLOCK + r"residual\.[01]\.", r"\1.shortcut."),
    # DWConvBlock (ours MBConvBlock): b1 = BN, 1x1, BN, GELU; b2 = dw, BN, GELU, SE, 1x1, BN
    (_BLOCK + r"b1\.0\.", r"\1.pre_norm."), (_BLOCK + r"b1\.1\.", r"\1.expand."),
    (_BLOCK + r"b1\.2\.", r"\1.expand_norm."), (_BLOCK + r"b2\.0\.", r"\1.dw."),
    (_BLOCK + r"b2\.1\.", r"\1.dw_norm."), (_BLOCK + r"b2\.3\.", r"\1.se."),
    (_BLOCK + r"b2\.4\.", r"\1.project."), (_BLOCK + r"b2\.5\.", r"\1.project_norm."),
    # LocalDSM: downsample = dw, BN, 1x1
    (_BLOCK + r"downsample\.0\.", r"\1.dw."), (_BLOCK + r"downsample\.1\.", r"\1.dw_norm."),
    (_BLOCK + r"downsample\.2\.", r"\1.project."),
    # LocalGlobalDSM: q = dw, BN, 1x1; kv and proj live in our `attn`
    (_BLOCK + r"q\.0\.", r"\1.q_dw."), (_BLOCK + r"q\.1\.", r"\1.q_dw_norm."),
    (_BLOCK + r"q\.2\.", r"\1.q_project."), (_BLOCK + r"(kv|proj)\.", r"\1.attn.\2."),
    # AttentionBlock: layer scales
    (_BLOCK + r"gamma_1$", r"\1.ls1.gamma"), (_BLOCK + r"gamma_2$", r"\1.ls2.gamma"),
]]


@register_converter(list(VARIANTS), head=("classifier",))
def prepare_uninet(state_dict: StateDict, model: nn.Module) -> StateDict:
  """Renames the authors' Sequential indices to our module names."""
  del model
  out = {}
  for key, value in state_dict.items():
    for pattern, replacement in _RENAMES:
      key, count = pattern.subn(replacement, key)
      if count:
        break
    out[key] = value
  return out
