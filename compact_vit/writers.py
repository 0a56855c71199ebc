"""Metric outputs: `metrics.jsonl`, TensorBoard events (tensorboardX) and a live progress line."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping


class MetricWriter:
  """Appends `{"step": s, **metrics}` lines to WORKDIR/metrics.jsonl and TensorBoard scalars.

  Only the writing process (process 0) passes enabled=True.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if enabled:
      self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard events are optional
        self._tb = None

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


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

  def show(self, step: int, loss: float, lr: float) -> None:
    eta = ((self.total_steps - step) * self.batch_size / self.rate) if self.rate else 0.0
    bound = "  INPUT-BOUND" if self.input_fraction > 0.5 else ""
    line = (f"[step {step}/{self.total_steps}] loss {loss:.4f}  lr {lr:.3g}  "
            f"{self.rate:.1f} img/s  input wait {100 * self.input_fraction:.0f}%{bound}  "
            f"ETA {_format_seconds(eta)}")
    print(line, file=sys.stdout, flush=True)
    if bound and self._hint:
      print(self._hint, file=sys.stdout, flush=True)
      self._hint = ""
