"""Architecture search and slimming, driven by `search.py`.

A method is `fn(config, workdir) -> SearchResult`, registered by name and chosen by
`config.search.method`. `run` dispatches and writes `workdir/search.json`:
{"method", "best": {...architecture, params, macs, score...}, "candidates": [...], "train_command"}.
"""
from __future__ import annotations

import json

import ml_collections

from compact_vit import paths
from compact_vit.errors import UserError
from compact_vit.search import evolution, nasvit, tf_tas, vit_slim  # noqa: F401  (they register)
from compact_vit.search.registry import SearchResult, get, register, write_result

__all__ = ["SearchResult", "get", "register", "run", "write_result"]


def run(config: ml_collections.ConfigDict, workdir: str) -> SearchResult:
  """Runs `config.search.method`, writes search.json, prints where and how to train the winner."""
  if "search" not in config or "method" not in config.search:
    raise UserError("This config has no config.search.method; search.py needs a search config "
                    "(configs/*_search.py).")
  method = config.search.method
  fn = get(method)  # an unknown method fails here, before the workdir is touched
  paths.check_workdir(workdir)  # a malformed gs:// path, a missing bucket: before any search
  result = fn(config, workdir)
  path = write_result(workdir, method, result)
  print(f"Best: {json.dumps(result.best, default=float)}", flush=True)
  print(f"Wrote {path}. Train the winner with:\n  {result.train_command}", flush=True)
  return result


