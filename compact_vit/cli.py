"""Shared pieces of the `train.py` / `eval.py` entry points."""
from __future__ import annotations

import os
import sys
from typing import Callable

from compact_vit.errors import UserError


def default_workdir(config_path: str, config_arg: str | None) -> str:
  """runs/<config file stem>[_<arg>] when --workdir is not given."""
  stem = os.path.splitext(os.path.basename(config_path))[0]
  suffix = "_" + config_arg.replace(",", "_").replace("=", "-") if config_arg else ""
  return os.path.join("runs", stem + suffix)


def split_config_flag(value: str) -> tuple[str, str | None]:
  path, _, arg = value.partition(":")
  return path, (arg or None)


def quiet_logs() -> None:
  """Keeps library INFO logs (Orbax, TensorFlow) off the console; our progress goes to stdout."""
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_guarded(fn: Callable[[], object]) -> None:
  """Runs `fn`; a UserError becomes one line on stderr and exit status 2, with no traceback."""
  try:
    fn()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
