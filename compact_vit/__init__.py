"""compact_vit: compact vision transformers in JAX/Flax.

`create_model(name, pretrained=False, **overrides)` is the timm-style entry point: the Flax module
of `compact_vit.models.create_model`, or with `pretrained` (True for the model's published
weights, or `hf-hub:OWNER/NAME`, a checkpoint file, a converted directory) `(model, variables)`.

Importing the package applies the project's XLA CPU settings (`compact_vit.xla.set_cpu_defaults`)
when JAX's backends have not started yet: flags the user set in XLA_FLAGS win, and
`COMPACT_VIT_NO_CPU_DEFAULTS=1` turns this off (`compact_vit.xla.set_cpu_defaults_on_import`).
"""
from compact_vit import xla as _xla

_xla.set_cpu_defaults_on_import()


def create_model(name: str, pretrained: bool | str = False, **overrides):
  """The registered model `name` with `overrides`; with `pretrained`, `(model, variables)`.

  `pretrained=True` loads the model's default published checkpoint
  (`compact_vit.convert.published.DEFAULTS`), downloaded from the Hugging Face Hub and converted
  once; a string names other weights (`hf-hub:timm/deit_small_patch16_224.fb_in1k`, a PyTorch
  checkpoint file or a `python -m compact_vit.convert` directory). A model without published
  weights raises a UserError listing those that have them.
  """
  if not pretrained:
    from compact_vit.models import create_model as create  # pylint: disable=import-outside-toplevel
    return create(name, **overrides)
  from compact_vit.convert.hub import load_pretrained  # pylint: disable=import-outside-toplevel
  return load_pretrained(name, pretrained, **overrides)
