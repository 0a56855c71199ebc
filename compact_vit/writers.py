"""Metric outputs: `metrics.jsonl`, TensorBoard events (tensorboardX) and a live progress line."""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, Mapping

from compact_vit import paths
from compact_vit.errors import UserError


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch whenever
  it is installed (2 s of every run's start on a 2-core machine, and PyTorch beside TensorFlow in
  one process is fragile), only to accept torch tensors, which a JAX run never passes."""
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is here
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """`{"step": s, **metrics}` lines in WORKDIR/metrics.jsonl, and TensorBoard scalars.

  A resumed run replays the steps after its checkpoint, so at start the lines of steps after
  `start_step` (written by the interrupted attempt) are dropped: no line is lost or repeated.
  Locally each line is appended and flushed at once. A bucket object cannot be appended to, so
  there the whole file is rewritten (one atomic upload) at most every `flush_secs` and at every
  `flush()` (the trainer's checkpoint saves) and `close()`: a run killed between flushes loses only
  lines of steps after its last checkpoint, which the rerun writes again.

  Only the writing process (process 0) passes enabled=True. A failed write raises a one-line
  UserError, after `on_error()` (the trainer's checkpoint check, so that a full disk is reported
  by the checkpoint save that filled it).
  """

  def __init__(self, workdir: str, enabled: bool = True, start_step: int = 0,
               flush_secs: float = 30.0, on_error: Callable[[], None] = lambda: None,
               tensorboard: bool = True):
    self.enabled = enabled
    self._on_error = on_error
    self.path = paths.join(workdir, "metrics.jsonl")
    self._remote = paths.is_remote(workdir)
    self._flush_secs = flush_secs
    self._tb = None
    self._file = None
    if not enabled:
      return
    self._lines = self._kept_lines(start_step)
    self._flushed = time.monotonic()
    self._guard(lambda: paths.write_text(self.path, "".join(self._lines)))
    if not self._remote:
      self._file = self._guard(lambda: open(self.path, "a"))
      self._lines = []
    try:
      if tensorboard:
        self._tb = _summary_writer()(paths.join(workdir, "tensorboard"))
    except ImportError:  # TensorBoard events are optional
      self._tb = None

  def _kept_lines(self, start_step: int) -> list[str]:
    if not self._guard(lambda: paths.exists(self.path)):
      return []
    kept = []
    for line in self._guard(lambda: paths.read_text(self.path)).splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a torn last line of a killed local run
        continue
      if int(record.get("step", 0)) <= start_step:
        kept.append(line + "\n")
    return kept

  def _guard(self, fn):
    try:
      return fn()
    except OSError as e:
      self._on_error()
      raise UserError(f"Writing {self.path} failed: {paths.describe_error(e)}. Free space or fix "
                      "the permissions, then rerun the same command to resume.") from e

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    line = json.dumps(record) + "\n"
    if self._file is not None:
      def append():
        self._file.write(line)
        self._file.flush()
      self._guard(append)
    else:
      self._lines.append(line)
      if time.monotonic() - self._flushed >= self._flush_secs:
        self.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), int(step))
      if not self._remote:
        self._tb.flush()

  def flush(self) -> None:
    """Makes every line written so far durable (a bucket: rewrites the object)."""
    if not self.enabled:
      return
    if self._remote:
      self._guard(lambda: paths.write_text(self.path, "".join(self._lines)))
      self._flushed = time.monotonic()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self.flush()
      if self._file is not None:
        self._file.close()
      if self._tb is not None:
        self._tb.close()
        self._tb = None


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """Images/s between calls, the share of that time spent waiting for input, and a one-line
  status: step, loss, lr, images/s, input wait, ETA.

  The loop reports each wait for the next batch with `input_wait(seconds)`. `input_fraction` is
  the waited time over the wall time between two `update` calls: near 0 the accelerators set the
  pace; near 1 the run is input-bound (more host cores, or a lighter augmentation, would speed it
  up). `input_bound_hint`, when given, is printed once, under the first INPUT-BOUND line."""

  def __init__(self, total_steps: int, batch_size: int, input_bound_hint: str = ""):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._hint = input_bound_hint
    self._last_time = None
    self._last_step = None
    self._waited = 0.0
    self.rate = 0.0
    self.input_fraction = 0.0

  def input_wait(self, seconds: float) -> None:
    self._waited += seconds

  def update(self, step: int) -> float:
    now = time.perf_counter()
    if self._last_time is not None and step > self._last_step:
      self.rate = (step - self._last_step) * self.batch_size / (now - self._last_time)
      self.input_fraction = min(self._waited / (now - self._last_time), 1.0)
    self._last_time, self._last_step, self._waited = now, step, 0.0
    return self.rate

  def show(self, step: int, loss: float, lr: float, skipped: int = 0) -> None:
    """`skipped`: unreadable examples skipped so far, shown when any."""
    eta = ((self.total_steps - step) * self.batch_size / self.rate) if self.rate else 0.0
    bound = "  INPUT-BOUND" if self.input_fraction > 0.5 else ""
    line = (f"[step {step}/{self.total_steps}] loss {loss:.4f}  lr {lr:.3g}  "
            f"{self.rate:.1f} img/s  input wait {100 * self.input_fraction:.0f}%{bound}  "
            f"ETA {_format_seconds(eta)}" + (f"  skipped {skipped}" if skipped else ""))
    print(line, file=sys.stdout, flush=True)
    if bound and self._hint:
      print(self._hint, file=sys.stdout, flush=True)
      self._hint = ""
