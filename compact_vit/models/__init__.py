"""The model zoo: every architecture family, registered by name.

`create_model(name, **overrides) -> flax.linen.Module` and `list_models()` (compact_vit/models/
registry.py). A family file (one per architecture) imports only `compact_vit.nn`, the registry and
JAX/Flax: nothing about losses, optimizers, data or search. The families are imported here, in
order, so that importing `compact_vit.models` registers every name.
"""
from compact_vit.models.registry import accepted_overrides, create_model, list_models, register
from compact_vit.models import vit  # noqa: F401
from compact_vit.models import efficientformer  # noqa: F401
from compact_vit.models import efficientformer_v2  # noqa: F401
from compact_vit.models import regnet  # noqa: F401
from compact_vit.models import resnet  # noqa: F401
from compact_vit.models import sepvit  # noqa: F401
from compact_vit.models import uninet  # noqa: F401
from compact_vit.models import reformer  # noqa: F401
from compact_vit.models import autoformer  # noqa: F401
from compact_vit.models import vit_slim  # noqa: F401
from compact_vit.models import nasvit  # noqa: F401
from compact_vit.models import dynamic_vit  # noqa: F401
from compact_vit.models import ats  # noqa: F401
from compact_vit.models import patch_merger  # noqa: F401

__all__ = ["accepted_overrides", "create_model", "list_models", "register"]
