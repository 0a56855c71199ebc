"""Shared pieces of the `train.py` / `eval.py` entry points."""
from __future__ import annotations

import os
import re
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


def define_distributed_flags() -> None:
  """--coordinator_address / --num_processes / --process_id for multi-host runs."""
  from absl import flags
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, reachable from every host (multi-host runs; found "
                      "automatically on Cloud TPU and under SLURM).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the run.")
  flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1.")
  flags.DEFINE_integer("heartbeat_timeout", HEARTBEAT_TIMEOUT_S,
                       "Seconds without a heartbeat after which the distributed runtime declares a "
                       "process lost (multi-host runs).")


# A process that dies is noticed at once by the others when its collectives' TCP connections close
# (a killed process, a crashed host OS), and otherwise (a host that loses power or network) by the
# distributed runtime after this many seconds without a heartbeat. Either way the survivors exit.
HEARTBEAT_TIMEOUT_S = 60


def _cluster_detected() -> bool:
  """A multi-process launch JAX can configure itself: SLURM with several tasks, a Cloud TPU VM
  (libtpu installed; single-host VMs initialise as one process), or JAX_COORDINATOR_ADDRESS."""
  import importlib.util
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(v in os.environ for v in slurm) and int(os.environ["SLURM_NTASKS"]) > 1:
    return True
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  return (importlib.util.find_spec("libtpu") is not None
          and os.environ.get("TPU_SKIP_MDS_QUERY") is None)


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Starts the JAX distributed runtime (before any other JAX call) when the flags are given or a
  cluster is detected; otherwise the run is single-process. CPU processes use Gloo collectives."""
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise UserError("Multi-host runs need all of --coordinator_address=HOST:PORT, "
                    "--num_processes=N and --process_id=I (0 .. N-1) on every process.")
  if not any(given) and not _cluster_detected():
    return
  import jax
  from absl import flags
  if all(given) and not 0 <= process_id < num_processes:
    raise UserError(f"--process_id={process_id} must be in 0 .. {num_processes - 1}.")
  timeout = flags.FLAGS["heartbeat_timeout"].value if "heartbeat_timeout" in flags.FLAGS else (
      HEARTBEAT_TIMEOUT_S)
  if timeout < 1:
    raise UserError(f"--heartbeat_timeout={timeout} must be at least 1 second.")
  # The shutdown barrier keeps JAX's default (300 s): processes may finish their last writes some
  # time apart; a lost process never reaches it, as `run_guarded` exits without it.
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=timeout)


# What a collective or the distributed runtime raises when another process has gone away.
_LOST_PEER = re.compile(r"Gloo|closed by peer|reset by peer|heartbeat timeout|stopped sending heartbeats|"
                        r"leader task", re.IGNORECASE)


def lost_process_message(error: BaseException) -> str | None:
  """One line for an error that says another process of a multi-process run is gone, naming it
  where the run has two processes (else the peer address the error gives); None for other errors."""
  if not _LOST_PEER.search(str(error)):
    return None
  import jax
  if jax.process_count() < 2:
    return None
  if jax.process_count() == 2:
    who = f"process {1 - jax.process_index()} of 2"
  else:
    peer = re.search(r"\[([^\]]+)\]:(\d+)", str(error))
    who = f"the process at {peer[1]}:{peer[2]}" if peer else "another process"
  cause = re.search(r"[^:;]*(Gloo|closed by peer|reset by peer|heartbeat)[^;]*", str(error))
  first = (cause[0] if cause else str(error).strip().splitlines()[0]).strip()[:300]
  return (f"lost {who} (process {jax.process_index()} could not reach it: {first}). Nothing was "
          "saved after the last checkpoint; restart every process with the same command to resume "
          "from it.")


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
  """Runs `fn`; a UserError becomes one line on stderr and exit status 2, with no traceback. In a
  multi-process run, losing another process becomes one line naming it and exit status 3 at once,
  without the shutdown barrier (which would wait for the lost process)."""
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except
    message = lost_process_message(e)  # also when a failed save reports it as a UserError
    if message is not None:
      print(f"error: {message}", file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(3)  # pylint: disable=protected-access
    if not isinstance(e, UserError):
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
