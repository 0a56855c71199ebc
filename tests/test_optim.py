"""Learning-rate schedules and gradient clipping against timm: `CosineLRScheduler` epoch by epoch,
driven as the authors' scripts drive it, and `timm.utils.adaptive_clip_grad` on converted trees."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from compact_vit import optim
from compact_vit.convert import load_pytorch_state_dict
from compact_vit.errors import UserError

from configs import common

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from timm.scheduler import create_scheduler_v2  # noqa: E402
from timm.utils import adaptive_clip_grad  # noqa: E402

LR_RTOL = 1e-6  # float32 lr table against timm's float64 values


def optim_config(**fields) -> ml_collections.ConfigDict:
  c = common.deit_recipe("deit_tiny_patch16_224").optim
  c.update(fields)
  return c


def timm_epoch_lrs(*, peak, epochs, warmup_epochs, warmup_lr, min_lr, cooldown_epochs, lag):
  """The lr of every epoch of the authors' loop: timm's factory builds the scheduler; each epoch
  trains at the optimizer's current lr, then `step(epoch)` (lag 1, DeiT's main.py) or
  `step(epoch + 1)` (lag 0, timm's train.py) sets the next one. Returns (lrs, epochs run)."""
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.AdamW([param], lr=peak)
  scheduler, num_epochs = create_scheduler_v2(
      opt, sched="cosine", num_epochs=epochs, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr,
      min_lr=min_lr, cooldown_epochs=cooldown_epochs)
  lrs = []
  for epoch in range(num_epochs):
    lrs.append(opt.param_groups[0]["lr"])
    scheduler.step(epoch + 1 - lag)
  return lrs, num_epochs


# (epochs before cooldown, warmup epochs, cooldown epochs, lag)
CASES = [(30, 5, 0, 1), (12, 3, 4, 1), (10, 0, 2, 1), (20, 4, 3, 0), (8, 2.5, 0, 0)]


@pytest.mark.parametrize("epochs,warmup,cooldown,lag", CASES)
def test_epoch_schedule_equals_timm_cosine_scheduler(epochs, warmup, cooldown, lag):
  """Every step of every epoch: warmup, cosine and cooldown as timm's scheduler in the authors'
  loop; the recipe card's lr_at_epochs too."""
  c = optim_config(lr=8e-4, lr_base_batch=256, warmup_epochs=warmup, warmup_lr=1e-6, min_lr=1e-5,
                   cooldown_epochs=cooldown, lr_epoch_lag=lag)
  expected, num_epochs = timm_epoch_lrs(peak=8e-4 * 512 / 256, epochs=epochs,
                                        warmup_epochs=warmup, warmup_lr=1e-6, min_lr=1e-5,
                                        cooldown_epochs=cooldown, lag=lag)
  assert num_epochs == epochs + cooldown  # our total_epochs counts the cooldown
  spe = 3
  _, schedule = optim.create_optimizer(c, batch_size=512, steps_per_epoch=spe,
                                       total_steps=num_epochs * spe, total_epochs=num_epochs)
  ours = np.asarray(jax.vmap(schedule)(jnp.arange(num_epochs * spe))).reshape(num_epochs, spe)
  np.testing.assert_allclose(ours, np.repeat(np.asarray(expected)[:, None], spe, 1),
                             rtol=LR_RTOL)
  card = optim.lr_at_epochs(c, batch_size=512, total_epochs=num_epochs)
  assert list(card) == [str(e) for e in range(num_epochs)]
  np.testing.assert_allclose(list(card.values()), expected, rtol=LR_RTOL)
  if cooldown > lag:
    assert expected[-1] == pytest.approx(1e-5)  # the cooldown is reached


@pytest.mark.parametrize("total_steps", [40, 7, 2100])
def test_shortened_or_lengthened_run_scales_the_epoch_schedule(total_steps):
  """total_steps != epochs x steps_per_epoch: step s trains at timm's lr of epoch
  floor(s·epochs/total_steps), so warmup, decay and cooldown keep their share of the run."""
  epochs, spe = 300, 1251
  c = optim_config(cooldown_epochs=10)
  expected, _ = timm_epoch_lrs(peak=1e-3, epochs=290, warmup_epochs=5, warmup_lr=1e-6,
                               min_lr=1e-5, cooldown_epochs=10, lag=1)
  _, schedule = optim.create_optimizer(c, batch_size=1024, steps_per_epoch=spe,
                                       total_steps=total_steps, total_epochs=epochs)
  steps = np.arange(total_steps)
  ours = np.asarray(jax.vmap(schedule)(jnp.asarray(steps)))
  np.testing.assert_allclose(ours, np.asarray(expected)[steps * epochs // total_steps],
                             rtol=LR_RTOL)
  summary = optim.schedule_summary(c, batch_size=1024, steps_per_epoch=spe,
                                   total_steps=total_steps, total_epochs=epochs)
  assert ("compressed" if total_steps < epochs * spe else "stretched") in summary
  assert f"total_steps={total_steps}" in summary and "proportions" in summary


def test_summary_of_a_full_run_names_the_schedule():
  c = optim_config()
  line = optim.schedule_summary(c, batch_size=1024, steps_per_epoch=1251,
                                total_steps=300 * 1251, total_epochs=300)
  assert line.startswith("lr per epoch") and "300 epochs of 1251 steps" in line
  assert "compressed" not in line and "\n" not in line


def test_step_unit_keeps_the_per_step_curve():
  """lr_schedule_unit='step': linear warmup over warmup_epochs x steps_per_epoch steps, cosine to
  min_lr at total_steps (a closed-form reference)."""
  c = optim_config(lr_schedule_unit="step", lr=1e-3, lr_base_batch=64, warmup_epochs=2.0)
  spe, total = 10, 110
  _, schedule = optim.create_optimizer(c, batch_size=64, steps_per_epoch=spe, total_steps=total,
                                       total_epochs=11)
  for s in (0, 5, 20, 60, 109, 110):
    if s < 20:
      want = 1e-6 + (1e-3 - 1e-6) * s / 20
    else:
      want = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (s - 20) / 90))
    np.testing.assert_allclose(schedule(s), want, rtol=1e-5)
  card = optim.lr_at_epochs(c, batch_size=64, total_epochs=11, steps_per_epoch=spe)
  np.testing.assert_allclose(card["2"], 1e-3, rtol=1e-5)


@pytest.mark.parametrize("fields,match", [
    ({"lr_schedule_unit": "epochs"}, "lr_schedule_unit"),
    ({"grad_clip_mode": "global"}, "grad_clip_mode"),
    ({"grad_clip_value": -1.0}, "grad_clip_value"),
    ({"cooldown_epochs": 300}, "cooldown_epochs"),
    ({"lr_epoch_lag": -1}, "lr_epoch_lag"),
    ({"grad_clip_norm": 1.0}, "grad_clip_mode='norm'"),
])
def test_bad_optimizer_settings_are_user_errors(fields, match):
  c = optim_config()
  with c.unlocked():
    c.update(fields)
  with pytest.raises(UserError, match=match):
    optim.create_optimizer(c, batch_size=1024, steps_per_epoch=10, total_steps=3000,
                           total_epochs=300)


def test_per_epoch_schedule_needs_whole_epochs():
  with pytest.raises(UserError, match="whole number of epochs"):
    optim.lr_at_epochs(optim_config(), batch_size=1024, total_epochs=2.5)


# ----------------------------------------------------------------------------- AGC

AGC_RTOL = 1e-5  # float32: the two sides reduce the unit norms in different orders


def _random_grads(model, seed):
  """Per torch output unit (first axis), gradients 10^U(-4.5, -0.5) times the unit's mean |w|:
  about half the units exceed AGC's bound 0.01·max(‖w_unit‖, 1e-3), half do not."""
  gen = torch.Generator().manual_seed(seed)
  for p in model.parameters():
    unit_shape = (p.shape[0],) + (1,) * (p.ndim - 1) if p.ndim > 1 else ()
    scale = 10.0 ** (torch.rand(unit_shape, generator=gen) * 4 - 4.5)
    p.grad = torch.randn(p.shape, generator=gen) * scale * (p.detach().abs().mean() + 1e-3)


def _tiny_timm(name):
  if name == "vit":
    from timm.models.deit import VisionTransformerDistilled
    return VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                      num_heads=2, num_classes=10), \
        ("deit_tiny_distilled_patch16_224",
         dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10))
  if name == "efficientformer_l1":
    from timm.models.efficientformer import Attention, EfficientFormer
    model = EfficientFormer(depths=(1, 1, 1, 2), embed_dims=(16, 32, 48, 64), num_vit=1,
                            num_classes=10)
    model.stages[-1].blocks[-1].token_mixer = Attention(64, resolution=2)  # 64x64 inputs
    return model, ("efficientformer_l1", dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 2),
                                              num_vit=1, num_classes=10, img_size=64))
  from timm.models.efficientformer_v2 import EfficientFormerV2
  model = EfficientFormerV2(depths=(1, 1, 2, 2), embed_dims=(16, 32, 48, 64), num_vit=1,
                            mlp_ratios=4, img_size=64, num_classes=10)
  return model, ("efficientformerv2_s0", dict(
      embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 2), num_vit=1, mlp_ratios=(4, 4, 4, 4),
      num_classes=10, img_size=64))


def _convert(name, overrides, model, values):
  """Our tree of `values` (torch name -> tensor, parameters only), buffers from `model`."""
  state = {k: v.detach() for k, v in model.state_dict().items()}
  state.update(values)
  return load_pytorch_state_dict(name, state, **overrides)["params"]


@pytest.mark.parametrize("family", ["vit", "efficientformer_l1", "efficientformerv2_s0"])
def test_adaptive_grad_clip_equals_timm(family):
  """Our AGC on the converted parameters and gradients equals timm's adaptive_clip_grad applied
  to every parameter (the EfficientFormer authors pass model.parameters(), heads included), then
  converted. Attention-bias tables (heads, offsets), pos_embed and tokens keep torch's layout;
  kernels are transposed: both unit conventions are exercised."""
  torch.manual_seed(0)
  model, (name, overrides) = _tiny_timm(family)
  _random_grads(model, seed=1)
  named = dict(model.named_parameters())
  grads_before = {k: p.grad.clone() for k, p in named.items()}
  adaptive_clip_grad(model.parameters(), clip_factor=0.01, eps=1e-3)
  clipped_units = sum(int((p.grad != grads_before[k]).any()) for k, p in named.items())
  assert 0 < clipped_units < len(named)  # both branches of the clip are taken

  params = _convert(name, overrides, model, {k: p.detach() for k, p in named.items()})
  grads = _convert(name, overrides, model, grads_before)
  expected = _convert(name, overrides, model, {k: p.grad for k, p in named.items()})
  tx = optim.adaptive_grad_clip(0.01)
  ours, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for path, want in jax.tree_util.tree_flatten_with_path(expected)[0]:
    got = ours
    for key in path:
      got = got[key.key]
    np.testing.assert_allclose(got, want, rtol=AGC_RTOL, atol=1e-12,
                               err_msg=jax.tree_util.keystr(path))


def test_unit_axes_follow_torch_layout():
  key = lambda *names: tuple(jax.tree_util.DictKey(n) for n in names)  # noqa: E731
  assert optim.unit_axes(key("blocks_0", "mlp", "fc1", "kernel"), 2) == (0,)
  assert optim.unit_axes(key("stem", "conv1", "kernel"), 4) == (0, 1, 2)
  assert optim.unit_axes(key("attn", "attention_biases"), 2) == (1,)
  assert optim.unit_axes(key("pos_embed"), 3) == (1, 2)
  assert optim.unit_axes(key("norm", "scale"), 1) == (0,)


def test_per_step_schedule_without_warmup_prefix_equals_timm_stepped_per_update():
  """NASViT's scheduler (Swin's build_scheduler): timm's CosineLRScheduler over steps,
  t_in_epochs=False, warmup not a prefix; our value at step s equals timm's `_get_lr(s)`."""
  from timm.scheduler import CosineLRScheduler  # pylint: disable=import-outside-toplevel
  c = optim_config(lr=3e-4, lr_base_batch=512, lr_schedule_unit="step", warmup_prefix=False,
                   warmup_epochs=2, warmup_lr=5e-7, min_lr=5e-6, cooldown_epochs=0)
  steps_per_epoch, total = 7, 70
  schedule = optim.create_schedule(c, batch_size=1024, steps_per_epoch=steps_per_epoch,
                                   total_steps=total, total_epochs=10)
  opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=6e-4)
  timm_sched = CosineLRScheduler(opt, t_initial=total, lr_min=5e-6, warmup_lr_init=5e-7,
                                 warmup_t=2 * steps_per_epoch, cycle_limit=1, t_in_epochs=False)
  want = [timm_sched._get_lr(s)[0] for s in range(total + 3)]  # pylint: disable=protected-access
  got = [float(schedule(s)) for s in range(total + 3)]  # float32: cos near pi loses ~1e-7 of peak
  np.testing.assert_allclose(got, want, rtol=LR_RTOL, atol=1e-7 * 6e-4)


def test_constant_schedule_is_the_scaled_peak():
  c = optim_config(lr=5e-4, lr_base_batch=512, lr_schedule="constant")
  schedule = optim.create_schedule(c, batch_size=1024, steps_per_epoch=10, total_steps=100,
                                   total_epochs=10)
  assert {float(schedule(s)) for s in (0, 5, 99)} == {1e-3}
  assert set(optim.lr_at_epochs(c, batch_size=1024, total_epochs=10).values()) == {1e-3}


def test_lr_scale_from_epoch_holds_updates_at_zero_while_adam_moments_accumulate():
  """DynamicViT's fix_step: a (regex, scale, from_epoch) rule gives zero updates before the epoch
  and `scale` x the AdamW update after; AdamW's moments still see every gradient, as torch's
  optimizer at lr 0 (compared with AdamW run without the rule on the same gradients)."""
  import optax  # pylint: disable=import-outside-toplevel
  params = {"backbone": {"kernel": jnp.ones((2, 3))}, "score_predictor": {"bias": jnp.ones((3,))}}
  rules = (("^(?!score_predictor)", 0.01, 2),)
  scaled = optax.chain(optax.adamw(1e-2), optim.scale_by_path(rules, steps_per_epoch=3))
  plain = optax.adamw(1e-2)
  state_s, state_p = scaled.init(params), plain.init(params)
  rng = np.random.default_rng(0)
  for step in range(9):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    upd_s, state_s = scaled.update(grads, state_s, params)
    upd_p, state_p = plain.update(grads, state_p, params)
    factor = 0.0 if step < 6 else 0.01  # epochs 0 and 1 frozen (3 steps per epoch)
    np.testing.assert_allclose(upd_s["backbone"]["kernel"], factor * upd_p["backbone"]["kernel"],
                               rtol=1e-6)
    np.testing.assert_allclose(upd_s["score_predictor"]["bias"],
                               upd_p["score_predictor"]["bias"], rtol=1e-6)
