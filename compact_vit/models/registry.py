"""The model registry: `register`, `create_model(name, **overrides)` and `list_models()`.

A family file registers one factory per name with `@register(name)`; a factory is any callable
`(**overrides) -> flax.linen.Module` whose defaults build the named variant (a
`functools.partial` of the module class is enough). The overrides a model accepts are the fields
of its module dataclass; `create_model` rejects any other key before building it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import linen as nn

from compact_vit.errors import UserError

Factory = Callable[..., nn.Module]
_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
  """Decorator registering `factory` under `name` (must be unique)."""
  def wrap(factory: Factory) -> Factory:
    if name in _REGISTRY:
      raise ValueError(f"Model {name!r} is registered twice.")
    _REGISTRY[name] = factory
    return factory
  return wrap


def list_models() -> list[str]:
  """Registered model names, sorted."""
  return sorted(_REGISTRY)


def accepted_overrides(name: str) -> list[str]:
  """The override keys `create_model(name, ...)` accepts: the module's dataclass fields."""
  module = _factory(name)()
  return sorted(f.name for f in dataclasses.fields(module) if f.name not in ("parent", "name"))


def create_model(name: str, **overrides: Any) -> nn.Module:
  """Builds the registered model `name`, with `overrides` replacing its default fields.

  Raises UserError for an unknown name (listing the available ones) or an unknown override key
  (listing the accepted ones).
  """
  accepted = accepted_overrides(name)
  unknown = sorted(set(overrides) - set(accepted))
  if unknown:
    raise UserError(f"Unknown override(s) {', '.join(unknown)} for model {name!r}. "
                    f"Accepted: {', '.join(accepted)}.")
  return _factory(name)(**overrides)


def _factory(name: str) -> Factory:
  if name not in _REGISTRY:
    raise UserError(f"Unknown model {name!r}. Available models: {', '.join(list_models())}.")
  return _REGISTRY[name]


