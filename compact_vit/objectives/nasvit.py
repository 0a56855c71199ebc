"""NASViT's sandwich rule with gradient projection (Gong et al., ICLR 2022; facebookresearch/NASViT
main.py, misc/loss_ops.py): the largest subnet on the labels, the smallest and random subnets
distilled from it in place with AlphaNet's adaptive α-divergence, conflicting gradients projected."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

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


GRADIENT_RULES = ("authors", "projection", "sum")


def combine_authors(g_sub: Any, g_sup: Any, per_tensor: jax.Array) -> Any:
  """The authors' combination of the summed subnet gradient with the largest subnet's
  (misc/constrain_opt.py `second_step`): g_sub + g_sup while `per_tensor` is False (their first
  100 epochs), then, per tensor, (1 + a)·g_sub + g_sup with a = clip(-<g_sub, g_sup> /
  (1e-6 + |g_sub|²), 0, 2): a subnet gradient that conflicts with the supernet's is scaled up."""
  def one(gs, gp):
    a = jnp.clip(-jnp.vdot(gs, gp) / (1e-6 + jnp.vdot(gs, gs)), 0.0, 2.0)
    return jnp.where(per_tensor, 1.0 + a, 1.0) * gs + gp
  return jax.tree.map(one, g_sub, g_sup)


def teacher_targets(ctx: StepContext, tau: float) -> jax.Array | None:
  """The authors' targets for the largest subnet: the mean over the teachers of
  softmax(teacher logits / tau) (main.py: `(temp * teacher(x)).softmax(-1)` with temp 5, i.e.
  tau = config.distill.tau = 0.2, averaged over their two ResNeXt teachers); None without one."""
  logits = ctx.all_teacher_logits()
  if not logits:
    return None
  return sum(jax.nn.softmax(t.astype(jnp.float32) / tau, -1) for t in logits) / len(logits)


def nasvit_sandwich(params, ctx: StepContext):
  """Sandwich rule: the largest subnet learns from the teachers' soft outputs (or the labels
  without a teacher), then the smallest and `num_random` random subnets are distilled in place
  from the largest's logits with the α-divergence. BatchNorm running statistics follow the
  largest subnet's pass (the one evaluation runs; `recalibrate_batch_stats` recomputes them for
  another subnet).

  `gradient_rule` combines the gradients:
  * "authors" (the reproduction configs): the subnets' summed gradient is clipped to global norm
    `subnet_clip_norm` (their `clip_grad_norm_` runs after the supernet's gradient was set aside),
    then added to the largest's: a plain sum up to epoch `per_tensor_after_epoch` (100) included,
    per tensor after it (`combine_authors`; their `if epoch > 100`).
  * "projection" (the paper's text): each subnet's gradient that conflicts with the largest's is
    projected onto its normal plane, over the whole parameter tree; then everything is summed.
  * "sum": the plain sum.
  Teacher targets: each teacher's softmax at temperature config.distill.tau (the authors' 1/5).

  Resolutions (`resolutions`, default the input's size only): as the authors' sampler, the
  largest subnet runs at the largest, the smallest at the smallest, each random subnet at a
  uniformly sampled one; the batch is resized inside the step (`resize_images`); teachers see the
  batch at its input size.

  The passes run as one `lax.scan` over the stacked subnets (pass 0 the largest); each pass
  picks its resolution with `lax.switch` over one branch per resolution (static shapes in each),
  so the step compiles once for every sampled subnet and resolution."""
  opts = dict(ctx.options)
  space = ctx.model.space
  num_random = int(opts.get("num_random", 2))
  rule = opts.get("gradient_rule", "projection" if opts.get("gradient_projection", True)
                  else "sum")
  if rule not in GRADIENT_RULES:
    raise ValueError(f"objective.gradient_rule={rule!r}: use one of {GRADIENT_RULES}.")
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
  largest_targets = teacher_targets(ctx, float(ctx.distill.get("tau", 1.0)))
  if largest_targets is None:
    largest_targets = ctx.targets

  def at_resolution(size):
    model = ctx.model.clone(img_size=size)

    def branch(p, stats, subnet, soft, i):
      images = nasvit.resize_images(ctx.images, size)

      def loss_fn(p):
        logits, new = model.apply({"params": p, "batch_stats": stats}, images, train=True,
                                  subnet=subnet, rngs=dict(ctx.rngs), mutable=["batch_stats"])
        ce = losses.soft_cross_entropy(logits, largest_targets)
        kd = alpha_divergence(logits, soft)
        return jnp.where(i == 0, ce, kd), (logits, new["batch_stats"])

      return jax.value_and_grad(loss_fn, has_aux=True)(p)
    return branch

  branches = [at_resolution(r) for r in resolutions]

  def one_pass(carry, xs):
    i, subnet, r = xs
    stats, soft, g_sub, g_largest = carry
    (loss, (logits, new_stats)), g = jax.lax.switch(r, branches, params, stats, subnet, soft, i)
    flag = (_vdot(g, g_largest) < 0).astype(jnp.float32)  # pass 0 against zeros: 0
    if rule == "projection":  # pass 0 projects onto zeros: unchanged
      g, _ = project_conflicting(g, g_largest)
    first = i == 0
    soft = jnp.where(first, jax.lax.stop_gradient(logits), soft)
    new_stats = jax.tree.map(lambda a, b: jnp.where(first, a, b), new_stats, stats)
    g_largest = jax.tree.map(lambda a, b: jnp.where(first, a, b), g, g_largest)
    g_sub = jax.tree.map(lambda a, b: a + jnp.where(first, 0.0, b), g_sub, g)
    return (new_stats, soft, g_sub, g_largest), (loss, flag)

  soft0 = jnp.zeros(ctx.targets.shape, jnp.float32)
  carry = (ctx.batch_stats, soft0, zeros, zeros)
  (batch_stats, _, g_sub, g_largest), (pass_losses, flags) = jax.lax.scan(
      one_pass, carry, (jnp.arange(len(subnets)), stacked, res_index))
  metrics = {}
  if rule == "authors":
    clip = float(opts.get("subnet_clip_norm", 1.0))
    metrics["subnet_grad_norm"] = optax.global_norm(g_sub)
    if clip > 0:
      g_sub, _ = optax.clip_by_global_norm(clip).update(g_sub, optax.EmptyState())
    per_tensor = jnp.floor(ctx.epoch) > float(opts.get("per_tensor_after_epoch", 100))
    grads = combine_authors(g_sub, g_largest, per_tensor)
  else:
    grads = jax.tree.map(jnp.add, g_sub, g_largest)
  n_sub = len(subnets) - 1
  sizes = jnp.asarray(resolutions, jnp.float32)[res_index]
  metrics.update({
      "ce_largest": pass_losses[0], "kd_subnets": pass_losses[1:].mean(),
      "conflict_fraction": flags[1:].sum() / n_sub, "mean_resolution": sizes.mean()})
  return pass_losses.sum(), grads, batch_stats, metrics
