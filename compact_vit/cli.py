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


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing (which loads the config file) with one-line errors instead of tracebacks.

  A misspelt `--config.FIELD` or a bad `--config` argument exits with status 2 and a message.
  """
  from absl import flags
  try:
    argv = flags.FLAGS(argv)
    getattr(flags.FLAGS.config, "model", None)  # a bad config file is reported on first access
    return argv
  except Exception as e:  # pylint: disable=broad-except  (config files may raise anything)
    lines = [line.strip() for line in str(e).replace("\\n", "\n").splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
      lines = lines[-1:]  # the config file's own exception, without the embedded traceback
    message = " ".join(lines).replace("\\'", "'")
    if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
      message = message[1:-1]
    print(f"error: invalid command line: {message}", file=sys.stderr, flush=True)
    print(f"usage: python {os.path.basename(argv[0])} --config configs/X.py[:ARGS] "
          "[--workdir DIR] [--config.FIELD=VALUE ...]", file=sys.stderr)
    sys.exit(2)


def run_guarded(fn: Callable[[], object]) -> None:
  """Runs `fn`; a UserError becomes one line on stderr and exit status 2, with no traceback."""
  try:
    fn()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
