"""ViT-Slim's search objective (Chavan et al., CVPR 2022; Arnav0400/ViT-Slim): the task loss plus
L1 sparsity on the soft masks of a `vit_slim_masked_*` model."""
from __future__ import annotations

import jax

from compact_vit.models import vit_slim
from compact_vit.objectives.classification import compute_loss
from compact_vit.objectives.context import StepContext


def vit_slim_search(params, ctx: StepContext):
  """Task loss (classification / distillation) + w1 Σ|ζ_attn| + w2 Σ|ζ_mlp| + w3 Σ|tanh ζ_patch|.

  Options: w1, w2, w3 (the authors' DeiT-S example: 2e-4, 5e-5, 1e-4).
  """
  w1, w2, w3 = (float(ctx.options.get(k, 0.0)) for k in ("w1", "w2", "w3"))
  teacher_logits = ctx.teacher_logits()

  def loss_fn(p):
    outputs, batch_stats = ctx.apply(p)
    task = compute_loss(outputs, ctx.targets, teacher_logits, ctx.distill)
    attn, mlp, patch = vit_slim.sparsity_l1(p)
    metrics = {"task_loss": task, "l1_attn": attn, "l1_mlp": mlp, "l1_patch": patch}
    return task + w1 * attn + w2 * mlp + w3 * patch, (batch_stats, metrics)

  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, grads, batch_stats, metrics
