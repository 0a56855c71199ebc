"""DynamicViT's training rule (Rao et al., NeurIPS 2021; raoyongming/DynamicViT losses.py
DistillDiffPruningLoss_dynamic): cross-entropy, keep-ratio MSE, KL to a dense teacher and token
distillation on the kept tokens. The model sows its keep decisions (`intermediates/keep_decisions`)
and final tokens (`intermediates/features`); the teacher's tokens are its `features` too."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from compact_vit import losses
from compact_vit.objectives.context import StepContext


def teacher_outputs(ctx: StepContext) -> tuple[jax.Array, jax.Array] | tuple[None, None]:
  """The dense teacher's logits (B, classes) and final normed patch tokens (B, N, C), frozen."""
  if ctx.teacher is None:
    return None, None
  logits, state = ctx.teacher.apply(ctx.teacher_vars, ctx.images, train=False,
                                    mutable=["intermediates"])
  tokens = state["intermediates"]["features"][0][:, ctx.teacher.num_prefix_tokens:]
  return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(tokens)


def dynamicvit(params, ctx: StepContext):
  """DynamicViT's loss (authors' DistillDiffPruningLoss_dynamic with mse_token=True):
  CE + ratio_weight · mean over stages of the keep-ratio MSE + distill_weight · KL(teacher logits)
  + distill_weight · MSE(kept final tokens, teacher's). The teacher terms need a teacher
  (config.distill.type != 'none'); without one they are left out. ctx.options: `ratio_weight`
  (default 2.0), `distill_weight` (0.5).
  """
  ratio_weight = float(ctx.options.get("ratio_weight", 2.0))
  distill_weight = float(ctx.options.get("distill_weight", 0.5))
  model = ctx.model
  targets = [model.keep_ratio ** (s + 1) for s in range(len(model.pruning_loc))]
  teacher_logits, teacher_tokens = teacher_outputs(ctx)

  def loss_fn(p):
    (logits, state), batch_stats = ctx.apply(p, mutable=["intermediates"])
    inter = state["intermediates"]
    keeps = inter["keep_decisions"]
    terms = {"cls_loss": losses.soft_cross_entropy(logits, ctx.targets),
             "ratio_loss": losses.keep_ratio_mse(keeps, targets)}
    loss = terms["cls_loss"] + ratio_weight * terms["ratio_loss"]
    if teacher_logits is not None:
      terms["kl_loss"] = losses.kl_batchmean(logits, teacher_logits)
      terms["token_loss"] = losses.kept_token_mse(inter["features"][0][:, 1:], teacher_tokens,
                                                  jax.lax.stop_gradient(keeps[-1]))
      loss = loss + distill_weight * (terms["kl_loss"] + terms["token_loss"])
    terms.update({f"keep_ratio_{s}": jnp.mean(k) for s, k in enumerate(keeps)})
    return loss, (batch_stats, terms)

  (loss, (batch_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, grads, batch_stats, terms
