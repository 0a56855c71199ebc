"""The search-method registry: `register(name)`, `get(name)`, `SearchResult`, `write_result`."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from compact_vit import paths
from compact_vit.errors import UserError

_METHODS: dict[str, Callable[..., "SearchResult"]] = {}


@dataclasses.dataclass
class SearchResult:
  best: dict[str, Any]
  candidates: list[dict[str, Any]]
  train_command: str  # the shell command that trains (or fine-tunes) the winner


def register(name: str):
  def wrap(fn):
    _METHODS[name] = fn
    return fn
  return wrap


def get(name: str):
  if name not in _METHODS:
    raise UserError(f"Unknown config.search.method {name!r}. Available: "
                    f"{', '.join(sorted(_METHODS))}.")
  return _METHODS[name]


def write_result(workdir: str, method: str, result: SearchResult) -> str:
  """Writes workdir/search.json (atomically) and returns its path."""
  paths.makedirs(workdir)
  path = paths.join(workdir, "search.json")
  payload = {"method": method, "best": result.best, "candidates": result.candidates,
             "train_command": result.train_command}
  paths.write_text(path, json.dumps(payload, indent=2, default=float))
  return path
