"""Shared timing and output steps of the benchmark scripts."""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

import numpy as np


def cpu_setup(threads: int, host_devices: int = 1):
  """Pins this process to `threads` cores (XLA sizes its thread pool from the affinity), puts the
  repository on sys.path and applies the XLA CPU flags train.py / eval.py ship; `host_devices` > 1
  splits the CPU into that many XLA devices (`--xla_force_host_platform_device_count`). Call it
  before JAX's backend starts. Returns `compact_vit.profile`."""
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
  if host_devices > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={host_devices}").strip()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from compact_vit import profile, xla  # pylint: disable=import-outside-toplevel
  xla.set_cpu_defaults()
  return profile


def timed_rounds(runs: dict[str, Callable[[], None]], calls: int,
                 repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each run in each of `repeats` interleaved rounds of `calls` calls, after
  two untimed calls each. The order is reversed every other round, so a slow drift of the machine
  hits every run alike."""
  for run in runs.values():
    run()
    run()
  secs = {name: [] for name in runs}
  for r in range(repeats):
    for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
      start = time.perf_counter()
      for _ in range(calls):
        runs[name]()
      secs[name].append((time.perf_counter() - start) / calls)
  return secs


def same_round_ratios(secs: dict[str, list[float]], base: str, name: str) -> np.ndarray:
  """base's time / name's time in each round of `timed_rounds` (name's speed ratio against base)."""
  return np.array(secs[base]) / np.array(secs[name])


def write_markdown(table: str, path: str) -> None:
  """Prints `table` and writes it to `path`, creating the folder."""
  print(table)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(table)
