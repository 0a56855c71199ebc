"""Training objectives: what one train step differentiates.

An objective is `fn(params, ctx) -> (loss, grads, new_batch_stats, metrics)`, registered under a name
and chosen by `config.objective.name` (default `classification`); the other fields of
`config.objective` reach it as `ctx.options`. The default covers plain classification and DeiT-style
distillation. Model families with their own training rule register theirs next to the model:
token-reduction losses, supernet subnet sampling, sandwich rules with several forward/backward passes.
`metrics` is a dict of scalars, logged as `train/<key>`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from compact_vit import losses
from compact_vit.errors import UserError

Objective = Callable[..., tuple]
_OBJECTIVES: dict[str, Objective] = {}


def register(name: str):
  def wrap(fn: Objective) -> Objective:
    _OBJECTIVES[name] = fn
    return fn
  return wrap


def get(name: str) -> Objective:
  from compact_vit import models, search  # noqa: F401  (families register objectives on import)
  if name not in _OBJECTIVES:
    raise UserError(f"Unknown config.objective.name {name!r}. Available: "
                    f"{', '.join(sorted(_OBJECTIVES))}.")
  return _OBJECTIVES[name]


@dataclasses.dataclass(frozen=True)
class StepContext:
  """Everything an objective sees in one step (all traced arrays, inside jit).

  images: (B, H, W, 3) after mixup/cutmix; targets: (B, num_classes) soft labels; rngs: the model's
  'dropout' and 'sample' streams; key: a further key for the objective's own sampling (subnets).
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

  def teacher_logits(self, images=None, **kwargs):
    """The frozen teacher's eval-mode output (stop-gradient), or None without a teacher."""
    if self.teacher is None:
      return None
    images = self.images if images is None else images
    return jax.lax.stop_gradient(self.teacher.apply(self.teacher_vars, images, train=False,
                                                    **kwargs))


def compute_loss(outputs, targets: jax.Array, teacher_logits: jax.Array | None,
                 distill_cfg: Mapping[str, Any]) -> jax.Array:
  """Classification loss plus DeiT-style distillation.

  `outputs` is logits (B, C) or, for models with a distillation token, (cls_logits, dist_logits).
  soft: (1-α)·CE + α·τ²·KL(teacher ‖ student); hard: (1-α)·CE + α·CE(student, argmax teacher).
  The distillation term uses the distillation head where there is one, otherwise the class head.
  """
  cls_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
  base = losses.soft_cross_entropy(cls_logits, targets)
  kind = distill_cfg["type"]
  if kind == "none":
    if isinstance(outputs, tuple):
      return 0.5 * (base + losses.soft_cross_entropy(dist_logits, targets))
    return base
  alpha = distill_cfg["alpha"]
  if kind == "soft":
    distill = losses.kl_distillation(dist_logits, teacher_logits, distill_cfg["tau"])
  else:
    hard = jax.nn.one_hot(jnp.argmax(teacher_logits, axis=-1), cls_logits.shape[-1])
    distill = losses.soft_cross_entropy(dist_logits, hard)
  return (1.0 - alpha) * base + alpha * distill


@register("classification")
def classification(params, ctx: StepContext):
  """Cross-entropy on soft targets (+ distillation when config.distill.type is set)."""
  teacher_logits = ctx.teacher_logits()

  def loss_fn(p):
    outputs, batch_stats = ctx.apply(p)
    return compute_loss(outputs, ctx.targets, teacher_logits, ctx.distill), batch_stats

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, grads, batch_stats, {}
