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
import logging
import os
import sys
import traceback
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from compact_vit import paths
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
  """Writes `directory/variables` (Orbax), then `directory/model.json`, which marks the copy
  complete (local or gs://). Returns the directory."""
  directory = paths.absolute(paths.check_path(directory, "Output directory"))
  paths.makedirs(directory)
  tree = jax.tree.map(np.asarray, dict(variables))
  ckptr = process_local_checkpointer()
  ckptr.save(paths.join(directory, "variables"), tree, force=True)
  ckptr.wait_until_finished()
  paths.write_text(paths.join(directory, "model.json"),
                   json.dumps({"model": model_name, "overrides": dict(overrides or {})}, indent=2))
  return directory


def load_variables(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads what `save_variables` wrote. Returns (variables as numpy arrays, model.json contents)."""
  directory = paths.absolute(paths.check_path(directory, "Converted checkpoint"))
  meta_path = paths.join(directory, "model.json")
  if not paths.exists(meta_path):
    raise UserError(
        f"{directory} is not a converted checkpoint (no model.json). Create one with "
        "`python -m compact_vit.convert --model NAME --checkpoint FILE --out DIR`.")
  meta = json.loads(paths.read_text(meta_path))
  with process_local_checkpointer() as checkpointer:
    tree = checkpointer.restore(paths.join(directory, "variables"))
  return jax.tree.map(np.asarray, tree), meta


def _late_tensorstore_callback(unraisable: Any) -> bool:
  """True for the one report `quiet_late_tensorstore_callbacks` drops: `RuntimeError: Event loop is
  closed` raised by `loop.call_soon_threadsafe` called straight from tensorstore's C++ (no object,
  that one frame in the traceback)."""
  error = unraisable.exc_value
  if (unraisable.object is not None or not isinstance(error, RuntimeError) or
      str(error) != "Event loop is closed"):
    return False
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return (bool(frames) and frames[0].name == "call_soon_threadsafe" and
          all(f.filename.endswith(os.path.join("asyncio", "base_events.py")) for f in frames))


def _unretrieved_orbax_failure(record: logging.LogRecord) -> bool:
  """True for asyncio's report of a future whose exception nobody retrieved, where that exception
  came from a checkpoint write: raised inside Orbax, or set by tensorstore's native code (which
  leaves no Python traceback at all)."""
  first_line = record.getMessage().split("\n", 1)[0]
  if not first_line.endswith("exception was never retrieved") or not record.exc_info:
    return False
  error = record.exc_info[1]
  if error is None or error.__traceback__ is None:
    return error is not None
  orbax_dir = os.path.dirname(ocp.__file__)
  while error is not None:
    if any(f.filename.startswith(orbax_dir) for f in traceback.extract_tb(error.__traceback__)):
      return True
    error = error.__cause__ or error.__context__
  return False


def _keep_asyncio_record(record: logging.LogRecord) -> bool:
  """The `asyncio` logger's filter: every record but an unretrieved checkpoint-write failure."""
  return not _unretrieved_orbax_failure(record)


def quiet_late_tensorstore_callbacks() -> None:
  """Drops the late reports of writes that fail or finish after the save that awaited them failed.

  Orbax awaits a save's tensorstore writes with asyncio in a thread of its own; when one write
  fails for good, the gather fails at once and that thread's event loop closes. The writes still in
  flight then end in one of two ways, each reported dozens of times around the run's one `error:`
  line, by asyncio or tensorstore, with no frame of ours: a write that completes calls into the
  closed loop (`RuntimeError: Event loop is closed`, through `sys.unraisablehook`); one that fails
  too leaves a future whose exception nobody retrieves (`Future` / `_GatheringFuture exception was
  never retrieved`, logged by the `asyncio` logger when the future is collected; the exception was
  raised in Orbax, or set by tensorstore without a Python traceback). Nothing waits for those
  results (the save is already reported as failed, with its first cause), so exactly these reports
  are dropped; every other one is reported as before. Idempotent."""
  asyncio_logger = logging.getLogger("asyncio")
  if _keep_asyncio_record not in asyncio_logger.filters:
    asyncio_logger.addFilter(_keep_asyncio_record)
  previous = sys.unraisablehook
  if getattr(previous, "_drops_late_tensorstore_callbacks", False):
    return

  def hook(unraisable):
    if not _late_tensorstore_callback(unraisable):
      previous(unraisable)

  hook._drops_late_tensorstore_callbacks = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def process_local_checkpointer() -> ocp.StandardCheckpointer:
  """An Orbax checkpointer that involves this process only. A default one runs collectives across
  every process of a multi-process run at each save and restore (barriers; a restore all-gathers
  across processes), so a process reading or writing variables that the others do not (a
  converted-weights cache filled by process 0, a cache hit on one host and a miss on another)
  waited for ever (tests/test_faults_multihost.py)."""
  quiet_late_tensorstore_callbacks()
  pid = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=pid, active_processes={pid}, barrier_sync_key_prefix=f"process_{pid}"))


def params_sha256(params: Mapping[str, Any]) -> str:
  """Fingerprint of the parameter bytes (leaf names, dtypes, shapes and values, in name order)."""
  import hashlib
  digest = hashlib.sha256()
  for name, value in sorted(_flatten(params).items()):
    value = np.asarray(jax.device_get(value))
    digest.update(f"{name}:{value.dtype}:{value.shape};".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


class SaveFailed(UserError):
  """A checkpoint could not be written; the message names the path, the reason and the last
  complete checkpoint, which is kept."""


class _OrbaxErrors(logging.Filter):
  """Keeps the errors Orbax's background save threads log (they do not reach the caller) and
  drops their tracebacks from the console: `TrainCheckpointer` reports them in one line."""

  def __init__(self):
    super().__init__()
    self.errors: list[BaseException] = []
    self.active = False  # while a save is in flight

  def filter(self, record: logging.LogRecord) -> bool:
    if self.active and record.levelno >= logging.ERROR and "orbax" in record.pathname:
      if record.exc_info and record.exc_info[1] is not None:
        self.errors.append(record.exc_info[1])
      return False
    return True


class TrainCheckpointer:
  """Orbax CheckpointManager for the whole train state; keeps the latest `keep` steps.

  Saves are asynchronous: `save` returns once the state is copied to host memory and the upload
  goes on while training continues. Whether a save committed is checked at the next `save` and at
  `wait`; one that failed raises `SaveFailed`, and the previous checkpoint stays the latest."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = paths.absolute(paths.check_path(directory, "Checkpoint directory"))
    quiet_late_tensorstore_callbacks()
    self._errors = _OrbaxErrors()
    logging.getLogger("absl").addFilter(self._errors)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self._pending: int | None = None  # the step whose save may still be in flight
    self.last_complete = self._manager.latest_step()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Starts saving `state` as `step` (after checking that the previous save committed)."""
    self.check()
    self._pending, self._errors.active = step, True
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    except Exception as e:  # pylint: disable=broad-except  (any storage client's error)
      self._raise_failed(step, e)

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
    """Blocks until the save in flight, if any, has committed; raises SaveFailed if it did not."""
    self.check()

  def check(self) -> None:
    """Waits for the save in flight and raises SaveFailed if it did not commit."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._errors.errors.append(e)
    # Several of the save's threads may fail; the first that names a cause is the one to report.
    errors = self._errors.errors
    failed = [e for e in errors if not paths.describe_error(e).startswith(type(e).__name__)]
    failed = failed[:1] or errors[:1] or [None]
    self._errors.active = False
    if failed[0] is not None or step not in self._manager.all_steps():
      self._raise_failed(step, failed[0])
    self.last_complete = step

  def _raise_failed(self, step: int, error: BaseException | None) -> None:
    self._errors.errors.clear()
    self._errors.active = False
    reason = paths.describe_error(error) if error is not None else "it did not commit"
    kept = (f"the last complete checkpoint (step {self.last_complete}) is kept and restores"
            if self.last_complete is not None else "no earlier checkpoint exists")
    what = ("free space (or move --workdir) and rerun the same command to resume"
            if "disk is full" in reason else "fix the storage and rerun the same command to resume")
    raise SaveFailed(f"Saving the checkpoint of step {step} to {paths.join(self.directory, str(step))}"
                     f" failed: {reason}; {kept}; {what}.") from error

  def close(self) -> None:
    """Stops keeping Orbax's save errors (the manager's threads are finished by `wait`)."""
    logging.getLogger("absl").removeFilter(self._errors)
