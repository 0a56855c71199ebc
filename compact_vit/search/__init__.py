"""Architecture search and slimming, driven by `search.py`.

A method is `fn(config, workdir) -> SearchResult`, registered by name and chosen by
`config.search.method`. `run` dispatches and writes `workdir/search.json`:
{"method", "best": {...architecture, params, macs, score...}, "candidates": [...], "train_command"}.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import ml_collections

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
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "search.json")
  payload = {"method": method, "best": result.best, "candidates": result.candidates,
             "train_command": result.train_command}
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=2, default=float)
  os.replace(path + ".tmp", path)
  return path


def run(config: ml_collections.ConfigDict, workdir: str) -> SearchResult:
  """Runs `config.search.method`, writes search.json, prints where and how to train the winner."""
  if "search" not in config or "method" not in config.search:
    raise UserError("This config has no config.search.method; search.py needs a search config "
                    "(configs/*_search.py).")
  method = config.search.method
  result = get(method)(config, workdir)
  path = write_result(workdir, method, result)
  print(f"Best: {json.dumps(result.best, default=float)}", flush=True)
  print(f"Wrote {path}. Train the winner with:\n  {result.train_command}", flush=True)
  return result


# Method modules register on import.
from compact_vit.search import evolution  # noqa: E402,F401  pylint: disable=wrong-import-position
from compact_vit.search import tf_tas  # noqa: E402,F401  pylint: disable=wrong-import-position
from compact_vit.search import vit_slim  # noqa: E402,F401  pylint: disable=wrong-import-position
from compact_vit.search import nasvit  # noqa: E402,F401  pylint: disable=wrong-import-position
