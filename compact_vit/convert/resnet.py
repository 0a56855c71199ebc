"""ResNet / ResNeXt checkpoints in timm's naming (NASViT's swsl ResNeXt-101 teachers) ->
`models.resnet`. Module names already match timm's (`layer1.0.downsample.0` is `layer1_0/
downsample_0`), so nothing needs renaming; this registers the converter (classifier `fc`)."""
from __future__ import annotations

from flax import linen as nn

from compact_vit.convert.core import StateDict, register_converter
from compact_vit.models.resnet import VARIANTS


@register_converter(list(VARIANTS), head=("fc",))
def prepare_resnet(state_dict: StateDict, model: nn.Module) -> StateDict:
  """Nothing to fix: the names are timm's."""
  del model
  return state_dict
