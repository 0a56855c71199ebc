"""AutoFormer's supernet training: one uniformly sampled subnet per step (Chen et al., ICCV 2021;
microsoft/Cream AutoFormer supernet_train.py), with the classification loss (and distillation)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from compact_vit.errors import UserError
from compact_vit.models.autoformer import AutoFormerSupernet
from compact_vit.objectives.classification import compute_loss
from compact_vit.objectives.context import StepContext

def autoformer_supernet(params, ctx: StepContext):
  """One uniformly sampled subnet per step (from ctx.key); loss as `classification`."""
  if not isinstance(ctx.model, AutoFormerSupernet):
    raise UserError("objective 'autoformer_supernet' needs an autoformer_supernet_* model.")
  arch = ctx.model.sample_arch(ctx.key)
  teacher_logits = ctx.teacher_logits()

  def loss_fn(p):
    outputs, batch_stats = ctx.apply(p, arch=arch)
    return compute_loss(outputs, ctx.targets, teacher_logits, ctx.distill), batch_stats

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, grads, batch_stats, {"subnet_embed_dim": arch["embed_dim"].astype(jnp.float32),
                                    "subnet_depth": arch["depth"].astype(jnp.float32)}
