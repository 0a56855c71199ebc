"""Train-step pieces on fake data (no TensorFlow): losses, mixing, optimizer, one update."""
import functools
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compact_vit import losses, models, optim, trainer
from compact_vit.nn.layers import DistilledLogits
from compact_vit.errors import UserError


def test_smooth_one_hot_matches_timm_convention():
  t = losses.smooth_one_hot(jnp.array([2]), 4, 0.1)
  np.testing.assert_allclose(t, [[0.025, 0.025, 0.925, 0.025]], rtol=1e-6)


def test_soft_cross_entropy_equals_naive():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5)).astype(np.float32)
  targets = rng.dirichlet(np.ones(5), size=3).astype(np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -(targets * logp).sum(-1).mean()
  np.testing.assert_allclose(losses.soft_cross_entropy(logits, targets), expected, rtol=1e-5)


def test_kl_distillation_is_deits_soft_loss():
  """DeiT's losses.py ('soft'): KL summed, x tau^2, / outputs_kd.numel() = batch x classes."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(2, 4, 6)).astype(np.float32) * 3
  tau = 2.0
  kl_sum = torch.nn.functional.kl_div(
      torch.log_softmax(torch.from_numpy(s) / tau, dim=1),
      torch.log_softmax(torch.from_numpy(t) / tau, dim=1), reduction="sum", log_target=True)
  expected = float(kl_sum) * tau * tau / s.size
  np.testing.assert_allclose(losses.kl_distillation(s, t, tau), expected, rtol=1e-5)


def test_kl_batchmean_is_dynamicvits_kl():
  """DynamicViT's losses.py: F.kl_div(..., reduction='batchmean', log_target=True), no tau."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(2)
  s, t = rng.normal(size=(2, 4, 6)).astype(np.float32) * 3
  log_s = torch.log_softmax(torch.from_numpy(s), dim=-1)
  log_t = torch.log_softmax(torch.from_numpy(t), dim=-1)
  expected = torch.nn.functional.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
  np.testing.assert_allclose(losses.kl_batchmean(s, t), float(expected), rtol=1e-5)


def test_mixup_cutmix_off_returns_smoothed_targets():
  x = jnp.ones((4, 8, 8, 3))
  y = jnp.array([0, 1, 2, 3])
  mixed, targets = losses.mixup_cutmix(jax.random.key(0), x, y, num_classes=4, mixup_alpha=0.0,
                                       cutmix_alpha=0.0, label_smoothing=0.0)
  np.testing.assert_array_equal(mixed, x)
  np.testing.assert_array_equal(targets, np.eye(4))


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_lambda_is_the_pasted_area(seed):
  """CutMix alone: each image gets a box of its reversed partner; λ equals the area kept."""
  b, h, w = 4, 12, 10
  x = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None], (b, h, w, 1))
  y = jnp.arange(b)
  mixed, targets = losses.mixup_cutmix(jax.random.key(seed), x, y, num_classes=b,
                                       mixup_alpha=0.0, cutmix_alpha=1.0)
  mixed = np.asarray(mixed)
  for i in range(b):
    own = np.mean(mixed[i] == i)
    np.testing.assert_allclose(targets[i, i], own, atol=1e-6)
    np.testing.assert_allclose(targets[i, b - 1 - i], 1 - own, atol=1e-6)
  np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, atol=1e-6)


def test_mixup_blends_images_and_targets_with_the_same_lambda():
  x = jnp.stack([jnp.zeros((4, 4, 3)), jnp.ones((4, 4, 3))])
  y = jnp.array([0, 1])
  mixed, targets = losses.mixup_cutmix(jax.random.key(3), x, y, num_classes=2, mixup_alpha=0.8,
                                       cutmix_alpha=0.0)
  lam = float(targets[0, 0])
  np.testing.assert_allclose(mixed[0], 1 - lam, atol=1e-6)  # 0·λ + 1·(1-λ)
  np.testing.assert_allclose(mixed[1], lam, atol=1e-6)


def test_weight_decay_mask_skips_biases_norms_and_tokens():
  params = {"cls_token": jnp.zeros((1, 1, 4)), "pos_embed": jnp.zeros((1, 5, 4)),
            "blocks_0": {"mlp": {"fc1": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros((8,))}},
                         "norm1": {"scale": jnp.zeros((4,))}}}
  mask = optim.weight_decay_mask(params, ("cls_token", "dist_token", "pos_embed"))
  assert mask["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert not mask["blocks_0"]["mlp"]["fc1"]["bias"]
  assert not mask["blocks_0"]["norm1"]["scale"]
  assert not mask["cls_token"] and not mask["pos_embed"]


def test_weight_decay_mask_skips_every_bias_as_timm():
  """timm's groups exempt names ending in '.bias' whatever their rank (a 2-D bias here)."""
  params = {"attn": {"qkv": {"kernel": jnp.zeros((4, 3, 8)), "bias": jnp.zeros((3, 8))}}}
  mask = optim.weight_decay_mask(params, ())
  assert mask["attn"]["qkv"]["kernel"] and not mask["attn"]["qkv"]["bias"]


def test_learning_rate_schedule_warmup_then_cosine():
  fn = optim.create_learning_rate_fn(base_lr=1e-3, warmup_steps=10, total_steps=110,
                                     warmup_lr=1e-6, min_lr=1e-5)
  np.testing.assert_allclose(fn(0), 1e-6, rtol=1e-5)
  np.testing.assert_allclose(fn(10), 1e-3, rtol=1e-5)
  np.testing.assert_allclose(fn(60), (1e-3 + 1e-5) / 2, rtol=1e-4)
  np.testing.assert_allclose(fn(110), 1e-5, rtol=1e-4)


def test_compute_loss_hard_distillation_uses_the_distillation_head():
  cls = jnp.array([[2.0, 0.0, 0.0]])
  dist = jnp.array([[0.0, 3.0, 0.0]])
  teacher = jnp.array([[0.0, 0.0, 5.0]])
  targets = jnp.array([[1.0, 0.0, 0.0]])
  got = trainer.compute_loss(DistilledLogits(cls, dist), targets, teacher, {"type": "hard", "alpha": 0.5})
  expected = 0.5 * losses.soft_cross_entropy(cls, targets) + 0.5 * losses.soft_cross_entropy(
      dist, jnp.array([[0.0, 0.0, 1.0]]))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def _tiny_setup(name="deit_tiny_patch16_224", **overrides):
  model = models.create_model(name, num_classes=3, img_size=16, patch_size=4, depth=1,
                              drop_path_rate=0.1, **overrides)
  tx = optax.adamw(1e-3)
  state = trainer.create_train_state(model, tx, jax.random.key(0), 16, use_ema=True)
  aug = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, mixup_switch_prob=0.5,
             label_smoothing=0.1)
  step = jax.jit(functools.partial(
      trainer.train_step, model=model, tx=tx, schedule=lambda s: 1e-3,
      base_rng=jax.random.key(1), num_classes=3, aug=aug, distill={"type": "none"},
      ema_decay=0.9), donate_argnums=(0,))
  return model, state, step


def _fake_batch(seed):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 3, size=(4,)), jnp.int32)}


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_one_train_step_updates_params_and_compiles_once(name):
  _, state, step = _tiny_setup(name)
  before = jax.tree.map(np.array, state["params"])
  state, metrics = step(state, _fake_batch(0), None)
  state, metrics = step(state, _fake_batch(1), None)
  assert int(state["step"]) == 2
  assert np.isfinite(float(metrics["loss"]))
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, state["params"])
  assert all(jax.tree.leaves(changed))
  ema_moved = jax.tree.map(lambda a, e, p: not np.allclose(a, e) and not np.allclose(e, p),
                           before, state["ema_params"], state["params"])
  assert any(jax.tree.leaves(ema_moved))
  assert step._cache_size() == 1


def test_train_step_is_deterministic_given_seed_and_step():
  _, s1, step = _tiny_setup()
  _, s2, _ = _tiny_setup()
  s1, _ = step(s1, _fake_batch(0), None)
  s2, _ = step(s2, _fake_batch(0), None)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_array_equal(a, b)


def test_eval_step_counts_only_masked_in_examples():
  model = models.create_model("deit_tiny_patch16_224", num_classes=7, img_size=16, patch_size=4,
                              depth=1)
  variables = trainer.init_variables(model, jax.random.key(0), 16)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 16, 16, 3)), jnp.float32)
  logits = model.apply(variables, x)
  labels = jnp.argsort(logits, axis=-1)[:, ::-1][:, jnp.array([0, 1, 4, 6, 0])].diagonal()
  mask = jnp.array([True, True, True, True, False])
  out = trainer.eval_step(variables, {"image": x, "label": labels, "mask": mask}, model=model)
  assert float(out["count"]) == 4
  assert float(out["top1"]) == 1  # only example 0 is top-1 (example 4 is masked out)
  assert float(out["top5"]) == 3  # ranks 0, 1 and 4 are in the top 5; rank 6 is not


def test_bfloat16_compute_keeps_float32_parameters():
  model, state, step = _tiny_setup(dtype=jnp.bfloat16)
  x = _fake_batch(0)["image"]
  logits = model.apply({"params": state["params"]}, x)  # computed in bfloat16, returned as float32
  reference = model.clone(dtype=jnp.float32).apply({"params": state["params"]}, x)
  assert not np.array_equal(logits, reference)
  np.testing.assert_allclose(logits, reference, atol=0.1)
  state, metrics = step(state, _fake_batch(0), None)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state["params"]))
  assert np.isfinite(float(metrics["loss"]))


def test_registered_objective_drives_the_step_and_reports_its_metrics():
  """A custom objective's loss, gradients and metrics reach the update; options pass through."""
  from compact_vit import objectives

  @objectives.register("_test_scaled")
  def scaled(params, ctx):
    loss, grads, batch_stats, _ = objectives.OBJECTIVES["classification"](params, ctx)
    scale = ctx.options["scale"]
    return scale * loss, jax.tree.map(lambda g: scale * g, grads), batch_stats, {"scale": scale}

  model, state, _ = _tiny_setup()
  tx = optax.sgd(1.0)
  state = trainer.create_train_state(model, tx, jax.random.key(0), 16, use_ema=False)
  aug = dict(mixup_alpha=0.0, cutmix_alpha=0.0, mixup_prob=1.0, mixup_switch_prob=0.5,
             label_smoothing=0.0)
  kw = dict(model=model, tx=tx, schedule=lambda s: 1.0, base_rng=jax.random.key(1), num_classes=3,
            aug=aug, distill={"type": "none"})
  _, plain = trainer.train_step(state, _fake_batch(0), None, **kw)
  _, scaled_metrics = trainer.train_step(state, _fake_batch(0), None, **kw,
                                         objective={"name": "_test_scaled", "scale": 3.0})
  np.testing.assert_allclose(scaled_metrics["loss"], 3.0 * plain["loss"], rtol=1e-5)
  np.testing.assert_allclose(scaled_metrics["grad_norm"], 3.0 * plain["grad_norm"], rtol=1e-5)
  assert float(scaled_metrics["scale"]) == 3.0


def test_lr_scales_multiply_the_updates_of_matching_parameters():
  params = {"score_predictor_0": {"kernel": jnp.ones((2, 2))}, "blocks_0": {"kernel": jnp.ones((2, 2))}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optim.scale_by_path((("^(?!score_predictor)", 0.01),))
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["score_predictor_0"]["kernel"], 1.0)
  np.testing.assert_allclose(updates["blocks_0"]["kernel"], 0.01)


def test_progress_reports_the_share_of_time_spent_waiting_for_input(monkeypatch, capsys):
  """Progress: waited seconds over the wall time between two updates; over half is flagged, with
  the hint under the first flag only."""
  from compact_vit import writers  # pylint: disable=import-outside-toplevel
  clock = iter([10.0, 14.0, 15.0])
  monkeypatch.setattr(writers.time, "perf_counter", lambda: next(clock))
  progress = writers.Progress(total_steps=100, batch_size=8, input_bound_hint="try on_accelerator")
  progress.update(1)
  progress.input_wait(1.0)
  progress.input_wait(2.0)
  assert progress.update(5) == 4 * 8 / 4.0 and progress.input_fraction == 0.75
  progress.show(5, 1.0, 1e-3)
  progress.show(5, 1.0, 1e-3)  # Still input-bound: the hint is not repeated.
  progress.input_wait(0.25)
  assert progress.update(6) == 8.0 and progress.input_fraction == 0.25
  progress.show(6, 1.0, 1e-3)
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 4 and out[1] == "try on_accelerator"
  assert "input wait 75%  INPUT-BOUND" in out[0] and "INPUT-BOUND" in out[2]
  assert "input wait 25%" in out[3] and "INPUT-BOUND" not in out[3]


def test_input_fn_runs_inside_the_step_on_the_raw_batch():
  """dataset.on_accelerator: the step turns the host batch into images itself (`input_fn`); the
  update equals the one on the images given directly."""
  model, state, _ = _tiny_setup()
  tx = optax.adamw(1e-3)
  aug = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, mixup_switch_prob=0.5,
             label_smoothing=0.1)
  kw = dict(model=model, tx=tx, schedule=lambda s: 1e-3, base_rng=jax.random.key(1),
            num_classes=3, aug=aug, distill={"type": "none"}, ema_decay=0.9)
  batch = _fake_batch(3)
  raw = {"canvas": batch["image"] / 2.0, "label": batch["label"]}
  direct, _ = jax.jit(functools.partial(trainer.train_step, **kw))(state, batch, None)
  inside, _ = jax.jit(functools.partial(trainer.train_step, input_fn=lambda b: 2.0 * b["canvas"],
                                        **kw))(state, raw, None)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               direct["params"], inside["params"])


def test_accelerator_inputs_follow_the_config(monkeypatch):
  from configs import deit_s  # pylint: disable=import-outside-toplevel
  from compact_vit.data import settings  # pylint: disable=import-outside-toplevel
  config = deit_s.get_config("quick")
  assert config.dataset.on_accelerator is None  # auto
  assert trainer.accelerator_inputs(config) == (None, None)  # auto on the CPU: the host path
  with monkeypatch.context() as m:
    m.setattr(jax, "default_backend", lambda: "gpu")
    assert trainer.accelerator_inputs(config)[0] is not None  # auto on a GPU: the step augments
    assert settings.resolve_on_accelerator("auto") and not settings.resolve_on_accelerator(False)
  with pytest.raises(UserError, match="True, False or None"):
    settings.resolve_on_accelerator("yes")
  config.dataset.on_accelerator = True
  train_fn, eval_fn = trainer.accelerator_inputs(config)
  assert train_fn.keywords["img_size"] == eval_fn.keywords["img_size"] == config.img_size
  assert train_fn.keywords["mean"] == tuple(config.dataset.mean)


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
  """tensorboardX imports torch when it is installed (as here, for the parity tests); a run's
  writer does not (a fresh interpreter, since this one may have imported torch already)."""
  assert importlib.util.find_spec("torch") is not None  # requirements-test.txt installs it
  code = ("import sys, glob; from compact_vit import writers;"
          f"w = writers.MetricWriter({str(tmp_path)!r}); w.write(1, {{'train/loss': 2.5}}); w.close();"
          f"print('torch' in sys.modules, len(glob.glob({str(tmp_path / 'tensorboard' / '*')!r})));"
          "import torch; print(torch.ones(2).sum().item())")  # torch itself still imports after
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__)))))
  assert out.stdout.split() == ["False", "1", "2.0"], out.stderr[-2000:]
