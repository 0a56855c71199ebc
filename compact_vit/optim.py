"""Optimizer and learning-rate schedule (Optax): AdamW, linear warmup + cosine, clipping, decay mask."""
from __future__ import annotations

import re
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


def create_learning_rate_fn(*, base_lr: float, warmup_steps: int, total_steps: int,
                            warmup_lr: float = 0.0, min_lr: float = 0.0) -> optax.Schedule:
  """Linear warmup from `warmup_lr` to `base_lr` over `warmup_steps`, then cosine down to `min_lr`.

  Per step rather than timm's per epoch; otherwise the same curve.
  """
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  cosine = optax.cosine_decay_schedule(
      init_value=base_lr, decay_steps=max(total_steps - warmup_steps, 1),
      alpha=min_lr / base_lr if base_lr else 0.0)
  if warmup_steps == 0:
    return cosine
  warmup = optax.linear_schedule(warmup_lr, base_lr, warmup_steps)
  return optax.join_schedules([warmup, cosine], [warmup_steps])


def weight_decay_mask(params: Any, no_decay: tuple[str, ...]) -> Any:
  """True where weight decay applies: parameters with ndim >= 2 whose path matches no `no_decay` regex."""
  patterns = [re.compile(p) for p in no_decay]
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  mask = {k: (jnp.ndim(v) >= 2 and not any(p.search(k) for p in patterns)) for k, v in flat.items()}
  return flax.traverse_util.unflatten_dict(mask, sep="/")


def scale_by_path(rules: tuple[tuple[str, float], ...]) -> optax.GradientTransformation:
  """Multiplies each parameter's update by the scale of the first `(regex, scale)` rule whose regex
  matches its path ('blocks_0/attn/qkv/kernel'); 1 where none does. Placed after AdamW this is a
  per-parameter learning-rate multiplier (weight decay included, as torch parameter groups)."""
  patterns = [(re.compile(r), float(scale)) for r, scale in rules]

  def scale_of(path) -> float:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return next((scale for pattern, scale in patterns if pattern.search(name)), 1.0)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * scale_of(p), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def create_optimizer(optim_cfg, *, batch_size: int, steps_per_epoch: int,
                     total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW (+ optional global-norm clipping) with the scaled lr `lr * batch_size / lr_base_batch`.

  `optim_cfg.lr_scales` (optional): ((regex, scale), ...) per-parameter learning-rate multipliers.
  """
  base_lr = optim_cfg.lr * batch_size / optim_cfg.lr_base_batch
  schedule = create_learning_rate_fn(
      base_lr=base_lr, warmup_steps=int(round(optim_cfg.warmup_epochs * steps_per_epoch)),
      total_steps=total_steps, warmup_lr=optim_cfg.warmup_lr, min_lr=optim_cfg.min_lr)
  no_decay = tuple(optim_cfg.no_decay)
  adamw = optax.adamw(
      schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
      weight_decay=optim_cfg.weight_decay, mask=lambda p: weight_decay_mask(p, no_decay))
  parts = []
  if optim_cfg.grad_clip_norm and optim_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  parts.append(adamw)
  lr_scales = tuple(tuple(rule) for rule in optim_cfg.get("lr_scales", ()))
  if lr_scales:
    parts.append(scale_by_path(lr_scales))
  return optax.chain(*parts), schedule
