"""Optimizer and learning-rate schedule (Optax): AdamW, warmup + cosine, clipping, decay mask.

The update is PyTorch's `torch.optim.AdamW` as timm's `create_optimizer_v2(model, 'adamw', ...)`
builds it: decoupled weight decay `p -= lr·wd·p`, bias-corrected moments, `eps` added to the
bias-corrected root of the second moment; weight decay skips every parameter with ndim <= 1, every
`bias` and the paths matching `optim.no_decay` (timm: `model.no_weight_decay()`).

Learning rate (`optim.lr_schedule_unit`):
* "epoch": timm's `CosineLRScheduler` stepped once per epoch, as the authors' scripts run it
  (DeiT's main.py and the scripts derived from it): linear warmup from `warmup_lr` over
  `warmup_epochs` (not a prefix: the cosine is measured from epoch 0), cosine from the peak to
  `min_lr` over `total_epochs - cooldown_epochs` epochs, then `cooldown_epochs` at `min_lr`.
  Those scripts call `scheduler.step(epoch)` after training epoch `epoch`, so epoch e trains at the
  scheduler's value for epoch max(e - 1, 0): `optim.lr_epoch_lag` = 1 (0 = timm's train.py, which
  calls `step(epoch + 1)`).
* "step": the same warmup and cosine recomputed at every step (no cooldown unless
  `cooldown_epochs` > 0, then the last `cooldown_epochs` × steps_per_epoch steps hold `min_lr`).

A run shortened (or lengthened) with `total_steps` keeps the epoch schedule's proportions: the
`total_epochs` epochs are compressed to `total_steps` steps, so warmup, decay and cooldown keep
their share of the run (`schedule_summary` says so in one line). The "step" unit is not rescaled.

Gradient clipping (`optim.grad_clip_mode`, `optim.grad_clip_value`; value 0 = off): "norm" clips
the global norm (torch's `clip_grad_norm_`), "agc" is timm's unit-wise adaptive gradient clipping
(Brock et al. 2021) over every parameter, head included, as `adaptive_clip_grad` in timm.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from compact_vit.errors import UserError

SCHEDULE_UNITS = ("epoch", "step")
SCHEDULES = ("cosine", "constant")
CLIP_MODES = ("none", "norm", "agc")
AGC_EPS = 1e-3  # timm's adaptive_clip_grad default: the floor of a unit's parameter norm
# Values of the newer optim fields for a config that lacks them: the per-step curve, no clipping.
DEFAULTS = {"lr_schedule_unit": "step", "lr_epoch_lag": 1, "cooldown_epochs": 0,
            "grad_clip_mode": "none", "grad_clip_value": 0.0, "lr_schedule": "cosine",
            "warmup_prefix": True, "lr_scales": (), "decay": ()}


def _get(optim_cfg, field: str):
  return optim_cfg.get(field, DEFAULTS[field])


# ----------------------------------------------------------------------------- config

def check_config(optim_cfg: Mapping[str, Any]) -> None:
  """Raises UserError for optimizer settings that cannot run (before anything compiles)."""
  if "grad_clip_norm" in optim_cfg:
    raise UserError("config.optim.grad_clip_norm is gone: set config.optim.grad_clip_mode='norm' "
                    "and config.optim.grad_clip_value=V (or grad_clip_mode='none').")
  unit = _get(optim_cfg, "lr_schedule_unit")
  if unit not in SCHEDULE_UNITS:
    raise UserError(f"config.optim.lr_schedule_unit={unit!r}: use 'epoch' (the authors' timm "
                    "scheduler, stepped per epoch) or 'step'.")
  if _get(optim_cfg, "lr_schedule") not in SCHEDULES:
    raise UserError(f"config.optim.lr_schedule={_get(optim_cfg, 'lr_schedule')!r}: use 'cosine' or "
                    "'constant' (timm's --sched none: the peak lr throughout).")
  for rule in _get(optim_cfg, "lr_scales"):
    if len(rule) not in (2, 3):
      raise UserError(f"config.optim.lr_scales rule {tuple(rule)} must be (regex, scale) or "
                      "(regex, scale, from_epoch).")
  mode = _get(optim_cfg, "grad_clip_mode")
  if mode not in CLIP_MODES:
    raise UserError(f"config.optim.grad_clip_mode={mode!r}: use none, norm or agc.")
  value = _get(optim_cfg, "grad_clip_value")
  if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
    raise UserError(f"config.optim.grad_clip_value={value!r} must be a number >= 0 (0 = off).")
  for field in ("lr", "warmup_lr", "min_lr", "weight_decay", "warmup_epochs", "cooldown_epochs",
                "lr_epoch_lag"):
    value = _get(optim_cfg, field) if field in DEFAULTS else optim_cfg[field]
    if value < 0:
      raise UserError(f"config.optim.{field}={value} must be >= 0.")
  if int(_get(optim_cfg, "lr_epoch_lag")) != _get(optim_cfg, "lr_epoch_lag"):
    raise UserError(f"config.optim.lr_epoch_lag={optim_cfg.lr_epoch_lag} must be a whole number.")
  if optim_cfg.lr_base_batch <= 0:
    raise UserError(f"config.optim.lr_base_batch={optim_cfg.lr_base_batch} must be positive.")


def peak_lr(optim_cfg, batch_size: int) -> float:
  """`lr` scaled linearly by `batch_size / lr_base_batch`."""
  return optim_cfg.lr * batch_size / optim_cfg.lr_base_batch


def _whole_epochs(optim_cfg, total_epochs) -> int:
  epochs = int(total_epochs)
  if epochs != total_epochs or epochs <= 0:
    raise UserError(f"config.total_epochs={total_epochs}: the per-epoch schedule "
                    "(optim.lr_schedule_unit='epoch') needs a positive whole number of epochs.")
  if epochs - _get(optim_cfg, "cooldown_epochs") <= 0:
    raise UserError(f"config.optim.cooldown_epochs={optim_cfg.cooldown_epochs} leaves no epoch of "
                    f"cosine decay in config.total_epochs={epochs}; total_epochs counts the "
                    "cooldown epochs too.")
  return epochs


# ----------------------------------------------------------------------------- schedules

def create_learning_rate_fn(*, base_lr: float, warmup_steps: int, total_steps: int,
                            warmup_lr: float = 0.0, min_lr: float = 0.0) -> optax.Schedule:
  """Linear warmup from `warmup_lr` to `base_lr` over `warmup_steps`, then cosine down to `min_lr`
  at `total_steps`, held there after. Per step: the "step" unit."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  cosine = optax.cosine_decay_schedule(
      init_value=base_lr, decay_steps=max(total_steps - warmup_steps, 1),
      alpha=min_lr / base_lr if base_lr else 0.0)
  if warmup_steps == 0:
    return cosine
  warmup = optax.linear_schedule(warmup_lr, base_lr, warmup_steps)
  return optax.join_schedules([warmup, cosine], [warmup_steps])


def timm_step_schedule(*, base_lr: float, warmup_steps: int, total_steps: int, warmup_lr: float,
                       min_lr: float) -> optax.Schedule:
  """timm's `CosineLRScheduler` with `t_in_epochs=False` and warmup not a prefix (Swin-derived
  scripts such as NASViT's lr_scheduler.py): `timm_cosine_lr` evaluated at every step, the cosine
  measured from step 0 over `total_steps`."""
  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm = warmup_lr + t * (base_lr - warmup_lr) / max(warmup_steps, 1)
    cosine = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t / total_steps))
    return jnp.where(t < warmup_steps, warm, jnp.where(t < total_steps, cosine, min_lr))
  return schedule


def timm_cosine_lr(t: int, *, base_lr: float, t_initial: int, warmup_t: float, warmup_lr: float,
                   min_lr: float) -> float:
  """The value of timm's `CosineLRScheduler` at epoch `t` (one cycle, warmup not a prefix):
  `warmup_lr + t·(base_lr - warmup_lr)/warmup_t` while t < warmup_t, then
  `min_lr + (base_lr - min_lr)·(1 + cos(π·t/t_initial))/2` while t < t_initial, then `min_lr`."""
  if t < warmup_t:
    return warmup_lr + t * (base_lr - warmup_lr) / warmup_t
  if t < t_initial:
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t / t_initial))
  return min_lr


def epoch_learning_rates(optim_cfg, *, batch_size: int, total_epochs: int) -> list[float]:
  """The learning rate each epoch 0..total_epochs-1 trains at, "epoch" unit (lag included)."""
  epochs = _whole_epochs(optim_cfg, total_epochs)
  lag = int(_get(optim_cfg, "lr_epoch_lag"))
  kw = dict(base_lr=peak_lr(optim_cfg, batch_size),
            t_initial=epochs - _get(optim_cfg, "cooldown_epochs"),
            warmup_t=optim_cfg.warmup_epochs, warmup_lr=optim_cfg.warmup_lr,
            min_lr=optim_cfg.min_lr)
  return [timm_cosine_lr(max(e - lag, 0), **kw) for e in range(epochs)]


def epoch_starts(*, steps_per_epoch: int, total_steps: int, total_epochs: int) -> np.ndarray:
  """The first step of each epoch: e·steps_per_epoch, or, when `total_steps` is not the recipe's
  total_epochs × steps_per_epoch, ceil(e·total_steps / total_epochs) (the epochs compressed or
  stretched to `total_steps`)."""
  e = np.arange(total_epochs, dtype=np.int64)
  if total_steps == total_epochs * steps_per_epoch:
    return e * steps_per_epoch
  return -(-e * total_steps // total_epochs)


def _epoch_schedule(lrs: Sequence[float], starts: np.ndarray) -> optax.Schedule:
  table = jnp.asarray(np.asarray(lrs, np.float32))
  starts = jnp.asarray(starts, jnp.int32)

  def schedule(step):
    epoch = jnp.searchsorted(starts, jnp.asarray(step, jnp.int32), side="right") - 1
    return table[jnp.clip(epoch, 0, table.shape[0] - 1)]

  return schedule


def _epochs_of(total_epochs, steps_per_epoch: int, total_steps: int):
  """`total_epochs`, or for callers that do not know it, the epochs `total_steps` spans."""
  if total_epochs is None:
    return max(-(-total_steps // steps_per_epoch), 1)
  return total_epochs


def create_schedule(optim_cfg, *, batch_size: int, steps_per_epoch: int, total_steps: int,
                    total_epochs: int | None = None) -> optax.Schedule:
  """schedule(step) -> the learning rate of the update at `step` (0-based), jit-friendly."""
  check_config(optim_cfg)
  base_lr = peak_lr(optim_cfg, batch_size)
  if _get(optim_cfg, "lr_schedule") == "constant":
    return optax.constant_schedule(base_lr)
  if _get(optim_cfg, "lr_schedule_unit") == "step":
    cooldown = int(round(_get(optim_cfg, "cooldown_epochs") * steps_per_epoch))
    if not _get(optim_cfg, "warmup_prefix"):
      return timm_step_schedule(
          base_lr=base_lr, warmup_steps=int(optim_cfg.warmup_epochs * steps_per_epoch),
          total_steps=max(total_steps - cooldown, 1), warmup_lr=optim_cfg.warmup_lr,
          min_lr=optim_cfg.min_lr)
    return create_learning_rate_fn(
        base_lr=base_lr, warmup_steps=int(round(optim_cfg.warmup_epochs * steps_per_epoch)),
        total_steps=max(total_steps - cooldown, 1), warmup_lr=optim_cfg.warmup_lr,
        min_lr=optim_cfg.min_lr)
  epochs = _whole_epochs(optim_cfg, _epochs_of(total_epochs, steps_per_epoch, total_steps))
  lrs = epoch_learning_rates(optim_cfg, batch_size=batch_size, total_epochs=epochs)
  return _epoch_schedule(lrs, epoch_starts(steps_per_epoch=steps_per_epoch,
                                           total_steps=total_steps, total_epochs=epochs))


def lr_at_epochs(optim_cfg, *, batch_size: int, total_epochs: int,
                 steps_per_epoch: int | None = None) -> dict[str, float]:
  """{"0": lr, "1": lr, ...}: the learning rate at the start of every epoch of the recipe.

  The "step" unit needs `steps_per_epoch` (its curve moves within an epoch).
  """
  check_config(optim_cfg)
  if _get(optim_cfg, "lr_schedule") == "constant":
    return {str(e): float(peak_lr(optim_cfg, batch_size)) for e in range(int(math.ceil(
        total_epochs)))}
  if _get(optim_cfg, "lr_schedule_unit") == "epoch":
    lrs = epoch_learning_rates(optim_cfg, batch_size=batch_size, total_epochs=total_epochs)
    return {str(e): float(lr) for e, lr in enumerate(lrs)}
  if steps_per_epoch is None:
    raise ValueError("lr_at_epochs of a per-step schedule needs steps_per_epoch.")
  epochs = int(math.ceil(total_epochs))
  schedule = create_schedule(optim_cfg, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                             total_steps=int(math.ceil(total_epochs * steps_per_epoch)))
  return {str(e): float(schedule(e * steps_per_epoch)) for e in range(epochs)}


def schedule_summary(optim_cfg, *, batch_size: int, steps_per_epoch: int, total_steps: int,
                     total_epochs: int | None = None) -> str:
  """One line for the start of a run: the schedule as it will run, and how a `total_steps` that
  differs from the recipe's length changed it."""
  check_config(optim_cfg)
  cooldown = _get(optim_cfg, "cooldown_epochs")
  peak = f"{optim_cfg.warmup_lr:g} -> {peak_lr(optim_cfg, batch_size):g}"
  if _get(optim_cfg, "lr_schedule") == "constant":
    return f"lr constant at {peak_lr(optim_cfg, batch_size):g} for {total_steps} steps."
  if _get(optim_cfg, "lr_schedule_unit") == "step":
    warmup = min(int(round(optim_cfg.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    line = (f"lr per step: warmup {warmup} steps {peak}, cosine to {optim_cfg.min_lr:g} over "
            f"{total_steps} steps")
    if cooldown:
      line += f" less a cooldown of {int(round(cooldown * steps_per_epoch))} steps at the minimum"
    if total_epochs is not None and total_steps != math.ceil(total_epochs * steps_per_epoch):
      line += (f"; total_steps={total_steps} instead of the recipe's "
               f"{math.ceil(total_epochs * steps_per_epoch)}, warmup kept in epochs")
    return line + "."
  epochs = _whole_epochs(optim_cfg, _epochs_of(total_epochs, steps_per_epoch, total_steps))
  lag = int(_get(optim_cfg, "lr_epoch_lag"))
  timing = f"epoch e at its value for e-{lag}" if lag else "epoch e at its value for e"
  line = (f"lr per epoch (timm cosine, {timing}): warmup "
          f"{optim_cfg.warmup_epochs:g} epochs {peak}, cosine to {optim_cfg.min_lr:g} by epoch "
          f"{epochs - cooldown}, {cooldown:g} cooldown epochs; {epochs} epochs")
  natural = epochs * steps_per_epoch
  if total_steps == natural:
    return line + f" of {steps_per_epoch} steps."
  verb = "compressed" if total_steps < natural else "stretched"
  return (line + f" {verb} to total_steps={total_steps} (the recipe's {natural} steps; "
          f"{total_steps / epochs:.4g} steps per epoch), so warmup, decay and cooldown keep "
          "their proportions.")


# ----------------------------------------------------------------------------- transformations

def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def weight_decay_mask(params: Any, no_decay: tuple[str, ...], decay: tuple[str, ...] = ()) -> Any:
  """True where weight decay applies, as timm's parameter groups (filter_bias_and_bn): not for
  parameters with ndim <= 1, nor for `bias` leaves, nor for paths ('blocks_0/attn/qkv/kernel')
  matching a `no_decay` regex (timm: the names in `model.no_weight_decay()`). Paths matching a
  `decay` regex are decayed whatever their rank (a parameter the authors store with more
  dimensions than here, such as ViT-Slim's (1, 1, hidden) masks)."""
  patterns = [re.compile(p) for p in no_decay]
  forced = [re.compile(p) for p in decay]
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  mask = {k: any(p.search(k) for p in forced) or (
      jnp.ndim(v) >= 2 and not k.endswith("/bias") and k != "bias"
      and not any(p.search(k) for p in patterns)) for k, v in flat.items()}
  return flax.traverse_util.unflatten_dict(mask, sep="/")


def scale_by_path(rules, steps_per_epoch: float = 1.0) -> optax.GradientTransformation:
  """Multiplies each parameter's update by the scale of the first rule whose regex matches its
  path ('blocks_0/attn/qkv/kernel'); 1 where none does. A rule is `(regex, scale)` or
  `(regex, scale, from_epoch)`: with `from_epoch` the scale is 0 before that epoch (epoch =
  update count / `steps_per_epoch`), as DynamicViT's `fix_step` holds its backbone at lr 0 for 5
  epochs. Placed after AdamW this is a per-parameter learning-rate multiplier (weight decay
  included, as torch parameter groups; AdamW's moments still accumulate while the scale is 0, as
  torch's at lr 0)."""
  patterns = [(re.compile(rule[0]), float(rule[1]), float(rule[2]) if len(rule) > 2 else 0.0)
              for rule in rules]
  timed = any(start > 0 for _, _, start in patterns)

  def rule_of(path) -> tuple[float, float]:
    name = "/".join(_path_names(path))
    return next(((scale, start) for pattern, scale, start in patterns if pattern.search(name)),
                (1.0, 0.0))

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)) if timed else (
        optax.EmptyState())

  def update_fn(updates, state, params=None):
    del params
    epoch = state.count / steps_per_epoch if timed else 0.0

    def scale(path, update):
      factor, start = rule_of(path)
      if start > 0:
        factor = jnp.where(epoch >= start, factor, 0.0)
      return update * factor

    new_state = optax.ScaleByScheduleState(count=state.count + 1) if timed else state
    return jax.tree_util.tree_map_with_path(scale, updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def unit_axes(path, ndim: int) -> tuple[int, ...]:
  """The axes a unit-wise norm reduces for the leaf at `path`, as torch's layout would have them.

  timm's `unitwise_norm` takes the whole tensor when ndim <= 1 and otherwise one norm per index
  of the FIRST axis (a torch Linear/Conv weight's output unit). Our `kernel` leaves are those
  weights transposed ((in, out), (kh, kw, in, out)), so their unit is the LAST axis; every other
  leaf (pos_embed, cls_token, attention-bias tables, embeddings) has torch's layout, unit first.
  """
  if ndim <= 1:
    return tuple(range(ndim))
  if _path_names(path)[-1] == "kernel":
    return tuple(range(ndim - 1))
  return tuple(range(1, ndim))


def adaptive_grad_clip(clip_factor: float, eps: float = AGC_EPS) -> optax.GradientTransformation:
  """timm's `adaptive_clip_grad`: each unit's gradient g is scaled to at most
  `clip_factor · max(‖w‖, eps)` (‖·‖ over the unit, see `unit_axes`); where ‖g‖ is below that
  bound it is left as is. Needs `params` in `update`.

  Not `optax.adaptive_grad_clip`: that one infers the unit from the rank alone (rank 2: axis 0 is
  reduced, rank 3-4: the first three axes), which is timm's choice for our kernels but not for
  leaves kept in torch's layout: a (heads, offsets) attention-bias table would be normed per offset
  instead of per head. Here the leaf's path decides.
  """
  def clip(path, g, p):
    axes = unit_axes(path, g.ndim)
    g_norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=axes, keepdims=True))
    p_norm = jnp.sqrt(jnp.sum(jnp.square(p), axis=axes, keepdims=True))
    max_norm = jnp.maximum(p_norm, eps) * clip_factor
    clipped = g * (max_norm / jnp.maximum(g_norm, 1e-6))
    return jnp.where(g_norm < max_norm, g, clipped).astype(g.dtype)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("adaptive_grad_clip needs the parameters: tx.update(grads, state, params).")
    return jax.tree_util.tree_map_with_path(clip, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def create_optimizer(optim_cfg, *, batch_size: int, steps_per_epoch: int, total_steps: int,
                     total_epochs: int | None = None
                     ) -> tuple[optax.GradientTransformation, Callable]:
  """(tx, schedule): [clipping →] AdamW at the scaled lr `lr · batch_size / lr_base_batch`
  [→ per-parameter lr scales]. `schedule(step)` is the lr of the update at `step`.

  `total_epochs`: the recipe's epochs (config.total_epochs); when `total_steps` differs from
  total_epochs × steps_per_epoch, the per-epoch schedule is compressed to `total_steps`. Without
  it the run is taken to last the epochs `total_steps` spans (no rescaling).
  `optim_cfg.lr_scales` (optional): ((regex, scale[, from_epoch]), ...) per-parameter learning-rate
  multipliers (`scale_by_path`); their epochs follow the schedule's (compressed with it).
  """
  schedule = create_schedule(optim_cfg, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                             total_steps=total_steps, total_epochs=total_epochs)
  no_decay = tuple(optim_cfg.no_decay)
  adamw = optax.adamw(
      schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
      weight_decay=optim_cfg.weight_decay,
      mask=lambda p: weight_decay_mask(p, no_decay, tuple(_get(optim_cfg, "decay"))))
  parts = []
  mode, value = _get(optim_cfg, "grad_clip_mode"), _get(optim_cfg, "grad_clip_value")
  if mode == "norm" and value > 0:
    parts.append(optax.clip_by_global_norm(value))
  elif mode == "agc" and value > 0:
    parts.append(adaptive_grad_clip(value))
  parts.append(adamw)
  lr_scales = tuple(tuple(rule) for rule in _get(optim_cfg, "lr_scales"))
  if lr_scales:
    epochs = total_epochs if total_epochs else total_steps / steps_per_epoch
    parts.append(scale_by_path(lr_scales, steps_per_epoch=total_steps / epochs))
  return optax.chain(*parts), schedule
