"""Losses and label mixing: soft-target cross entropy, label smoothing, mixup/cutmix, distillation."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """(B,) int → (B, C) targets, timm's convention: off = s/C, on = 1 - s + s/C."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over the batch of -Σ targets · log_softmax(logits). logits (B, C), targets (B, C)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(targets * logp, axis=-1))


def _kl_sum(student_logits: jax.Array, teacher_logits: jax.Array, tau: float) -> jax.Array:
  """Σ over batch and classes of KL(softmax(t/τ) ‖ softmax(s/τ)), in float32."""
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / tau, axis=-1)
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / tau, axis=-1)
  return jnp.sum(jnp.exp(t) * (t - s))


def kl_distillation(student_logits: jax.Array, teacher_logits: jax.Array, tau: float) -> jax.Array:
  """DeiT's soft distillation (facebookresearch/deit losses.py, distillation_type='soft'):
  KL(softmax(t/τ) ‖ softmax(s/τ)) summed, times τ², divided by the number of logits B·C
  (`outputs_kd.numel()`), not by the batch alone."""
  return _kl_sum(student_logits, teacher_logits, tau) * (tau * tau) / student_logits.size


def kl_batchmean(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """DynamicViT's logit distillation (raoyongming/DynamicViT losses.py): KL(softmax(t) ‖
  softmax(s)) summed over classes and averaged over the batch (torch's reduction='batchmean')."""
  return _kl_sum(student_logits, teacher_logits, 1.0) / student_logits.shape[0]


def _cutmix_box(rng: jax.Array, height: int, width: int, lam: jax.Array):
  """A box of area ≈ (1 - lam)·H·W, centred uniformly, clipped (timm rand_bbox). Returns mask, area."""
  cut_ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * cut_ratio).astype(jnp.int32), (width * cut_ratio).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  ys = jnp.arange(height)[:, None]
  xs = jnp.arange(width)[None, :]
  box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  return box, (y1 - y0) * (x1 - x0)


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
                 mixup_alpha: float, cutmix_alpha: float, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0):
  """timm's batch-mode Mixup: one λ per batch, each image mixed with the batch reversed.

  images (B, H, W, C), labels (B,) → mixed images, soft targets (B, num_classes). With probability
  `prob` mixing happens; when both alphas are > 0, cutmix is chosen with `switch_prob`. CutMix's λ is
  corrected to the clipped box area, as timm does.
  """
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  apply = jax.random.uniform(k_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = jax.random.beta(k_mix, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
  lam_cut = jax.random.beta(k_cut, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
  height, width = images.shape[1], images.shape[2]
  box, area = _cutmix_box(k_box, height, width, lam_cut)
  lam_cut = 1.0 - area / (height * width)
  flipped = images[::-1]
  mixed_mixup = lam_mix * images + (1.0 - lam_mix) * flipped
  mixed_cutmix = jnp.where(box[None, :, :, None], flipped, images)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(images.dtype)
  mixed = jnp.where(apply, jnp.where(use_cutmix, mixed_cutmix, mixed_mixup), images)
  targets = lam * targets + (1.0 - lam) * targets[::-1]
  return mixed, targets


def keep_ratio_mse(keep_decisions, target_ratios) -> jax.Array:
  """DynamicViT's ratio loss: the mean over stages of mean_b (mean_n keep[b, n] - ρ_s)².

  keep_decisions: one (B, N) {0, 1} array per stage; target_ratios: one float per stage.
  """
  per_stage = [jnp.mean((jnp.mean(k.astype(jnp.float32), axis=1) - r) ** 2)
               for k, r in zip(keep_decisions, target_ratios)]
  return sum(per_stage) / len(per_stage)


def kept_token_mse(student: jax.Array, teacher: jax.Array, keep: jax.Array) -> jax.Array:
  """DynamicViT's token distillation: mean squared error over the tokens with keep > 0.5 only.

  student, teacher (B, N, C), keep (B, N). 0 when no token is kept (the authors' guard).
  """
  mask = (keep > 0.5).astype(jnp.float32)[..., None]
  sq = (student.astype(jnp.float32) - teacher.astype(jnp.float32)) ** 2
  count = jnp.sum(mask) * student.shape[-1]
  return jnp.sum(sq * mask) / jnp.maximum(count, 1.0)
