"""PyTorch checkpoints (timm and the authors' repositories) -> Flax variables.

`load_pytorch_state_dict(name, state_dict)` converts an in-memory state dict;
`python -m compact_vit.convert --model NAME --checkpoint FILE --out DIR` converts a file and writes
it with `compact_vit.checkpointing.save_variables`. Each family's fixes live in
`convert/<family>.py`, registered with `register_converter` and imported below.

Published weights by name (`convert/hub.py`, `convert/published.py`): `resolve_init_from(spec,
model_name=..., **overrides)` turns `hf-hub:OWNER/NAME`, a checkpoint file or a converted directory
into a converted directory (downloading and converting once), `load_pretrained(name, pretrained,
**overrides)` returns `(model, variables)`, and `published_top1(spec, ...)` the ImageNet top-1
published for a checkpoint.
"""
from compact_vit.convert.core import (load_pytorch_state_dict, read_state_dict,
                                      register_converter)
from compact_vit.convert import vit  # noqa: F401  registers the ViT / DeiT converter
from compact_vit.convert import efficientformer, regnet  # noqa: F401  EfficientFormer V1/V2, RegNetY
from compact_vit.convert import resnet  # noqa: F401  ResNet / ResNeXt (NASViT's teachers)
from compact_vit.convert import sepvit  # noqa: F401  registers the SepViT converter
from compact_vit.convert import uninet  # noqa: F401  registers the UniNet converter
from compact_vit.convert import token_reduction  # noqa: F401  DynamicViT, ATS, PatchMerger
from compact_vit.convert import autoformer  # noqa: F401  AutoFormer / TF-TAS (authors' keys)
from compact_vit.convert import nasvit  # noqa: F401  NASViT supernet

from compact_vit.convert.hub import load_pretrained, resolve_init_from
from compact_vit.convert.published import default_spec, published, published_top1

__all__ = ["default_spec", "load_pretrained", "load_pytorch_state_dict", "published",
           "published_top1", "read_state_dict", "register_converter", "resolve_init_from"]
