"""NASViT supernet checkpoints (facebookresearch/NASViT, `AttentiveNasDynamicModel` naming) ->
`models.nasvit`.

The authors number blocks globally (`blocks.{i}`) and wrap every layer (`.conv.conv.weight`,
`.bn.bn.*`, `.linear.linear.*`); this renames them to the Flax modules (`stage{s}_block{b}/...`)
and drops what the model does not use: the BatchNorms' `bn_tracking` copies, the transformer's
`relative_position_index` buffer, the MBConvs' frozen `rescale` vector and the shortcut convs of
blocks that are not first in their stage (created but never applied there). A standalone subnet
(`nasvit_a0`, ...) takes its weights from the converted supernet with `models.nasvit.slice_params`.
"""
from __future__ import annotations

import re

from flax import linen as nn

from compact_vit.convert.core import StateDict, register_converter

_DROP = re.compile(r"(bn_tracking\.|relative_position_index$|mobile_inverted_conv\.rescale$)")
_RENAMES = [  # (authors' suffix, Flax module path), applied to the key after the block prefix
    (r"mobile_inverted_conv\.(inverted_bottleneck|depth_conv|point_linear)\.conv\.conv\.", r"\1."),
    (r"mobile_inverted_conv\.(inverted_bottleneck|depth_conv|point_linear)\.bn\.bn\.", r"\1_bn."),
    (r"mobile_inverted_conv\.depth_conv\.se\.fc\.(reduce|expand)\.", r"se_\1."),
    (r"shortcut\.conv\.conv\.", "shortcut."),
    (r"attn\.(q|k|v|proj|proj_l|proj_w)\.linear\.", r"\1."),
    (r"attn\.(vconv\.|relative_position_bias_table$)", r"\1"),
    (r"(mlp[12])\.linear([12])\.linear\.", r"\1_fc\2."),
    (r"last_conv\.(final_expand|feature_mix)_layer\.", r"\1."),
    (r"(first_conv|final_expand|feature_mix)\.conv\.conv\.", r"\1."),
    (r"(first_conv|final_expand)\.bn\.bn\.", r"\1_bn."),
    (r"classifier\.linear\.linear\.", "classifier."),
]


@register_converter(["nasvit_supernet", "nasvit_supernet_tiny"], head=("classifier",))
def prepare_nasvit(state_dict: StateDict, model: nn.Module) -> StateDict:
  """Authors' names -> Flax module paths (module docstring)."""
  blocks = [(s, b) for s, st in enumerate(model.space.stages, 1) for b in range(max(st.depths))]
  out = {}
  for key, value in state_dict.items():
    key = key.removeprefix("module.")
    if _DROP.search(key):
      continue
    match = re.match(r"blocks\.(\d+)\.(.*)$", key)
    if match:
      i, key = int(match.group(1)), match.group(2)
      if i >= len(blocks):
        out[f"blocks.{i}.{key}"] = value  # reported as unexpected
        continue
      stage, block = blocks[i]
      if key.startswith("shortcut.") and block > 0:
        continue
      prefix = f"stage{stage}_block{block}."
    else:
      prefix = ""
    for pattern, repl in _RENAMES:
      key = re.sub("^" + pattern, repl, key)
    out[prefix + key] = value
  return out
