"""RegNetY checkpoints in timm's naming (DeiT's teacher `regnety_160-a5fe301d.pth` uses it) ->
`models.regnet`. Module names already match timm's, so nothing needs renaming; this registers the
converter (classifier `head.fc`)."""
from __future__ import annotations

from flax import linen as nn

from compact_vit.convert.core import StateDict, register_converter
from compact_vit.models.regnet import VARIANTS


@register_converter(list(VARIANTS), head=("head.fc",))
def prepare_regnet(state_dict: StateDict, model: nn.Module) -> StateDict:
  """Nothing to fix: the names are timm's (`read_state_dict` unwraps DeiT's {'model': ...})."""
  del model
  return state_dict
