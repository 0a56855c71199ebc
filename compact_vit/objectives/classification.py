"""Plain classification and DeiT-style distillation (facebookresearch/deit losses.py).

`compute_loss` is the loss every classification-like objective shares; `classification` is the
default objective.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from compact_vit import losses
from compact_vit.nn.layers import DistilledLogits
from compact_vit.objectives.context import StepContext


def compute_loss(outputs, targets: jax.Array, teacher_logits: jax.Array | None,
                 distill_cfg: Mapping[str, Any]) -> jax.Array:
  """Classification loss plus DeiT-style distillation.

  `outputs` is logits (B, C) or, for models with a distillation head, `DistilledLogits`.
  soft: (1-α)·CE + α·τ²·KL(teacher ‖ student); hard: (1-α)·CE + α·CE(student, argmax teacher).
  The distillation term uses the distillation head where there is one, otherwise the class head.
  """
  cls_logits, dist_logits = outputs if isinstance(outputs, DistilledLogits) else (outputs, outputs)
  base = losses.soft_cross_entropy(cls_logits, targets)
  kind = distill_cfg["type"]
  if kind == "none":
    if isinstance(outputs, DistilledLogits):
      return 0.5 * (base + losses.soft_cross_entropy(dist_logits, targets))
    return base
  alpha = distill_cfg["alpha"]
  if kind == "soft":
    distill = losses.kl_distillation(dist_logits, teacher_logits, distill_cfg["tau"])
  else:
    hard = jax.nn.one_hot(jnp.argmax(teacher_logits, axis=-1), cls_logits.shape[-1])
    distill = losses.soft_cross_entropy(dist_logits, hard)
  return (1.0 - alpha) * base + alpha * distill


def classification(params, ctx: StepContext):
  """Cross-entropy on soft targets (+ distillation when config.distill.type is set)."""
  teacher_logits = ctx.teacher_logits()

  def loss_fn(p):
    outputs, batch_stats = ctx.apply(p)
    return compute_loss(outputs, ctx.targets, teacher_logits, ctx.distill), batch_stats

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, grads, batch_stats, {}
