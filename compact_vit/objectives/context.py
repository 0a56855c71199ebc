"""What a training rule sees in one step: `StepContext`, and the `Objective` signature.

An objective is `fn(params, ctx: StepContext) -> (loss, grads, new_batch_stats, metrics)`:
`metrics` is a dict of scalars, logged as `train/<key>`; `new_batch_stats` is None for a model
without BatchNorm.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

Objective = Callable[..., tuple]


@dataclasses.dataclass(frozen=True)
class StepContext:
  """Everything an objective sees in one step (all traced arrays, inside jit).

  images: (B, H, W, 3) after mixup/cutmix; targets: (B, num_classes) soft labels; rngs: the model's
  'dropout' and 'sample' streams; key: a further key for the objective's own sampling (subnets);
  epoch: the (fractional) epoch of this step, for rules that change with training progress.
  teacher / teacher_vars: one frozen teacher model and its variables, or tuples of several
  (config.distill.teacher lists them, comma-separated).
  """
  model: Any
  images: jax.Array
  targets: jax.Array
  rngs: Mapping[str, jax.Array]
  key: jax.Array
  step: jax.Array
  batch_stats: Any
  distill: Mapping[str, Any]
  options: Mapping[str, Any]
  teacher: Any = None
  teacher_vars: Any = None
  epoch: Any = 0.0

  def apply(self, params, images=None, **kwargs):
    """Training-mode forward pass -> (outputs, new_batch_stats); kwargs go to the model."""
    variables = {"params": params}
    images = self.images if images is None else images
    if self.batch_stats is None:
      return self.model.apply(variables, images, train=True, rngs=dict(self.rngs), **kwargs), None
    variables["batch_stats"] = self.batch_stats
    out, new_vars = self.model.apply(variables, images, train=True, rngs=dict(self.rngs),
                                     mutable=["batch_stats"], **kwargs)
    return out, new_vars["batch_stats"]

  def all_teacher_logits(self, images=None, **kwargs) -> list[jax.Array]:
    """Every frozen teacher's eval-mode logits (stop-gradient), in config order; [] without."""
    if self.teacher is None:
      return []
    images = self.images if images is None else images
    teachers, variables = self.teacher, self.teacher_vars
    if not isinstance(teachers, (tuple, list)):
      teachers, variables = (teachers,), (variables,)
    return [jax.lax.stop_gradient(t.apply(v, images, train=False, **kwargs))
            for t, v in zip(teachers, variables)]

  def teacher_logits(self, images=None, **kwargs):
    """The frozen teacher's eval-mode logits (stop-gradient), None without a teacher; with
    several teachers, the mean of their logits."""
    logits = self.all_teacher_logits(images, **kwargs)
    if not logits:
      return None
    return logits[0] if len(logits) == 1 else sum(logits) / len(logits)
