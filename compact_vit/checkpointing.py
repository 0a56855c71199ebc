"""Checkpoints: Orbax training checkpoints with exact resume, and standalone variable files.

Two kinds of checkpoint live here:

* Training checkpoints (`TrainCheckpointer`): an Orbax `CheckpointManager` under `WORKDIR/checkpoints`
  holding the whole train state (params, optimizer state, EMA, batch stats, step, RNG key), saved every
  `checkpoint_every` steps, at the end and on SIGTERM/SIGINT; the latest N are kept.
* Pretrained variables (`save_variables` / `load_variables`): a directory with `model.json` (model
  name and overrides) and `variables/` (an Orbax pytree of `params` and, where present,
  `batch_stats`). `python -m compact_vit.convert` writes these; `config.init_from` and `eval.py` read
  them.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from compact_vit.errors import UserError


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(_flatten(v, name))
    else:
      out[name] = v
  return out


def check_tree_matches(expected: Mapping[str, Any], got: Mapping[str, Any], what: str) -> None:
  """Raises UserError naming missing, unexpected and mis-shaped leaves (compared by shape)."""
  e, g = _flatten(expected), _flatten(got)
  missing = sorted(set(e) - set(g))
  unexpected = sorted(set(g) - set(e))
  shapes = sorted(
      f"{k}: expected {tuple(np.shape(e[k]))}, got {tuple(np.shape(g[k]))}"
      for k in set(e) & set(g) if tuple(np.shape(e[k])) != tuple(np.shape(g[k])))
  if missing or unexpected or shapes:
    parts = []
    if missing:
      parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
      parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
    if shapes:
      parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:20])}")
    raise UserError(f"{what} does not match the model. " + " | ".join(parts))


def save_variables(directory: str, variables: Mapping[str, Any], model_name: str,
                   overrides: Mapping[str, Any] | None = None) -> str:
  """Writes `directory/model.json` and `directory/variables` (Orbax). Returns the directory."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  tree = jax.tree.map(np.asarray, dict(variables))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, "variables"), tree, force=True)
  ckptr.wait_until_finished()
  with open(os.path.join(directory, "model.json"), "w") as f:
    json.dump({"model": model_name, "overrides": dict(overrides or {})}, f, indent=2)
  return directory


def load_variables(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads what `save_variables` wrote. Returns (variables as numpy arrays, model.json contents)."""
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, "model.json")
  if not os.path.exists(meta_path):
    raise UserError(
        f"{directory} is not a converted checkpoint (no model.json). Create one with "
        "`python -m compact_vit.convert --model NAME --checkpoint FILE --out DIR`.")
  with open(meta_path) as f:
    meta = json.load(f)
  tree = ocp.StandardCheckpointer().restore(os.path.join(directory, "variables"))
  return jax.tree.map(np.asarray, tree), meta


def params_sha256(params: Mapping[str, Any]) -> str:
  """Fingerprint of the parameter bytes (leaf names, dtypes, shapes and values, in name order)."""
  import hashlib
  digest = hashlib.sha256()
  for name, value in sorted(_flatten(params).items()):
    value = np.asarray(jax.device_get(value))
    digest.update(f"{name}:{value.dtype}:{value.shape};".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


class TrainCheckpointer:
  """Orbax CheckpointManager for the whole train state; keeps the latest `keep` steps."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores into the structure, dtypes and shardings of `abstract_state` (ShapeDtypeStructs)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"No checkpoint in {self.directory}: train first (python train.py ...) or "
                      "pass --config.init_from=DIR with a converted checkpoint.")
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except (ValueError, KeyError) as e:
      raise UserError(f"Checkpoint at step {step} in {self.directory} does not fit this config's "
                      f"model/optimizer ({e}). Use another --workdir or the config it was "
                      "trained with.") from e

  def restore_subtree(self, abstract_subtree: Mapping[str, Any], step: int | None = None) -> Any:
    """Restores only the top-level entries of `abstract_subtree` (e.g. params, batch_stats,
    ema_params) from a saved train state, without building the optimizer state."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"No checkpoint in {self.directory}: train first (python train.py ...) or "
                      "pass --config.init_from=DIR with a converted checkpoint.")
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype)
                                if getattr(a, "sharding", None) is not None
                                else ocp.RestoreArgs(restore_type=np.ndarray), abstract_subtree)
    try:
      return self._manager.restore(step, args=ocp.args.PyTreeRestore(
          item=dict(abstract_subtree), restore_args=dict(restore_args), partial_restore=True))
    except (ValueError, KeyError) as e:
      raise UserError(f"Checkpoint at step {step} in {self.directory} does not fit this config's "
                      f"model ({e}). Use another --workdir or the config it was trained with.") from e

  def wait(self) -> None:
    self._manager.wait_until_finished()
