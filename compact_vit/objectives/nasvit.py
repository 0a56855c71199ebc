"""NASViT's sandwich rule with gradient projection (Gong et al., ICLR 2022; facebookresearch/NASViT
main.py, misc/loss_ops.py): the largest subnet on the labels, the smallest and random subnets
distilled from it in place with AlphaNet's adaptive α-divergence, conflicting gradients projected."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compact_vit import losses
from compact_vit.models import nasvit
from compact_vit.objectives.context import StepContext


def alpha_divergence(logits: jax.Array, teacher_logits: jax.Array, alpha_min: float = -1.0,
                     alpha_max: float = 1.0, iw_clip: float = 5.0) -> jax.Array:
  """AlphaNet's adaptive α-divergence (NASViT misc/loss_ops.py AdaptiveLossSoft): per example the
  larger of D_{α_min} and D_{α_max}(p_teacher || q_student). Returns its batch mean, with the
  gradient of the authors' surrogate (`grad_loss`, importance weights held constant)."""
  q_prob = jax.lax.stop_gradient(jax.nn.softmax(logits, -1))
  p_prob = jax.lax.stop_gradient(jax.nn.softmax(teacher_logits, -1))
  q_log = jax.nn.log_softmax(logits, -1)
  ratio = p_prob / q_prob

  def divergence(alpha):
    if abs(alpha - 1.0) < 1e-3:
      f, base, rho = ratio * jnp.log(ratio), 0.0, ratio
    elif abs(alpha) < 1e-3:
      r = jnp.clip(ratio, 0.0, iw_clip)
      f, base, rho = -jnp.log(r), 0.0, jnp.log(r) - 1.0
    else:
      iw = jnp.clip(ratio**alpha, 0.0, iw_clip)
      f, base = iw / alpha / (alpha - 1.0), 1.0 / alpha / (alpha - 1.0)
      rho = iw / alpha + base
    return (q_prob * (f - base)).sum(-1), -(q_prob * rho * q_log).sum(-1)

  left, left_grad = divergence(alpha_max)
  right, right_grad = divergence(alpha_min)
  surrogate = jnp.where(left >= right, left_grad, right_grad).mean()
  return surrogate + jax.lax.stop_gradient(jnp.maximum(left, right).mean() - surrogate)


def _vdot(a: Any, b: Any) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def project_conflicting(grad: Any, reference: Any) -> tuple[Any, jax.Array]:
  """g - min(0, g·r) / |r|² r over the whole pytree (the paper's projection onto the normal plane
  of the supernet's gradient when g·r < 0). Returns (grad, conflict flag)."""
  dot = _vdot(grad, reference)
  coef = jnp.minimum(dot, 0.0) / jnp.maximum(_vdot(reference, reference), 1e-12)
  return jax.tree.map(lambda a, b: a - coef * b, grad, reference), (dot < 0).astype(jnp.float32)


def nasvit_sandwich(params, ctx: StepContext):
  """Sandwich rule: the largest subnet on the labels, then the smallest and `num_random` random
  subnets distilled in place from the largest's logits with the α-divergence. With
  `gradient_projection` (default True) each subnet's gradient that conflicts with the largest's
  is projected onto its normal plane. BatchNorm running statistics follow the largest subnet's
  pass (the one evaluation runs; `recalibrate_batch_stats` recomputes them for another subnet).

  Resolutions (`resolutions`, default the input's size only): as the authors' sampler, the
  largest subnet runs at the largest, the smallest at the smallest, each random subnet at a
  uniformly sampled one; the batch is resized inside the step (`resize_images`).

  The passes run as one `lax.scan` over the stacked subnets (pass 0 the largest); each pass
  picks its resolution with `lax.switch` over one branch per resolution (static shapes in each),
  so the step compiles once for every sampled subnet and resolution."""
  opts = dict(ctx.options)
  space = ctx.model.space
  num_random = int(opts.get("num_random", 2))
  project = bool(opts.get("gradient_projection", True))
  resolutions = tuple(sorted({int(r) for r in opts.get("resolutions", ())}))
  resolutions = resolutions or (ctx.images.shape[1],)
  sub_key, res_key = jax.random.split(ctx.key)
  subnets = [nasvit.as_arrays(nasvit.largest(space)), nasvit.as_arrays(nasvit.smallest(space))] + [
      nasvit.sample_subnet(k, space) for k in jax.random.split(sub_key, num_random)]
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *subnets)
  res_index = jnp.concatenate([
      jnp.asarray([len(resolutions) - 1, 0], jnp.int32),
      jax.random.randint(res_key, (num_random,), 0, len(resolutions), jnp.int32)])
  zeros = jax.tree.map(jnp.zeros_like, params)

  def at_resolution(size):
    model = ctx.model.clone(img_size=size)

    def branch(p, stats, subnet, teacher, i):
      images = nasvit.resize_images(ctx.images, size)

      def loss_fn(p):
        logits, new = model.apply({"params": p, "batch_stats": stats}, images, train=True,
                                  subnet=subnet, rngs=dict(ctx.rngs), mutable=["batch_stats"])
        ce = losses.soft_cross_entropy(logits, ctx.targets)
        kd = alpha_divergence(logits, teacher)
        return jnp.where(i == 0, ce, kd), (logits, new["batch_stats"])

      return jax.value_and_grad(loss_fn, has_aux=True)(p)
    return branch

  branches = [at_resolution(r) for r in resolutions]

  def one_pass(carry, xs):
    i, subnet, r = xs
    stats, teacher, grads, g_largest = carry
    (loss, (logits, new_stats)), g = jax.lax.switch(r, branches, params, stats, subnet, teacher,
                                                    i)
    flag = jnp.zeros(())
    if project:  # pass 0 projects onto zeros: unchanged
      g, flag = project_conflicting(g, g_largest)
    teacher = jnp.where(i == 0, jax.lax.stop_gradient(logits), teacher)
    new_stats = jax.tree.map(lambda a, b: jnp.where(i == 0, a, b), new_stats, stats)
    g_largest = jax.tree.map(lambda a, b: jnp.where(i == 0, a, b), g, g_largest)
    grads = jax.tree.map(jnp.add, grads, g)
    return (new_stats, teacher, grads, g_largest), (loss, flag)

  teacher0 = jnp.zeros(ctx.targets.shape, jnp.float32)
  carry = (ctx.batch_stats, teacher0, zeros, zeros)
  (batch_stats, _, grads, _), (pass_losses, flags) = jax.lax.scan(
      one_pass, carry, (jnp.arange(len(subnets)), stacked, res_index))
  n_sub = len(subnets) - 1
  sizes = jnp.asarray(resolutions, jnp.float32)[res_index]
  return pass_losses.sum(), grads, batch_stats, {
      "ce_largest": pass_losses[0], "kd_subnets": pass_losses[1:].mean(),
      "conflict_fraction": flags[1:].sum() / n_sub, "mean_resolution": sizes.mean()}
