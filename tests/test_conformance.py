"""Step-for-step conformance with timm: a small DeiT (soft distillation) and a small EfficientFormer
(hard distillation, AGC), converted from timm, trained 20 steps on the same fixed batches by our
`trainer.train_step` and by PyTorch as the authors' scripts train (timm's `create_optimizer_v2`
parameter groups, timm's cosine scheduler stepped after each epoch, timm's label-smoothing losses,
DeiT's distillation losses written out from its losses.py, timm's `adaptive_clip_grad`).
Augmentation, mixup, dropout and drop path are off. The parameters must agree within `RTOL`.
BatchNorm running statistics are not compared: ours update the variance with the biased batch
variance (compact_vit/nn/layers.batch_norm), torch with the unbiased one.
"""
import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compact_vit import models, optim, trainer
from compact_vit.convert import load_pytorch_state_dict

from configs import common

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
F = torch.nn.functional
from timm.data.mixup import mixup_target  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.efficientformer import Attention as EfficientFormerAttention  # noqa: E402
from timm.models.efficientformer import EfficientFormer  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from timm.utils import adaptive_clip_grad  # noqa: E402

# Per parameter tensor, max|ours - timm| <= RTOL * max|timm| after 20 steps (float32 both sides;
# measured at most 6e-6 for the DeiT, 2.5e-5 for the EfficientFormer). Every compared tensor moved
# by more than 20 x RTOL (checked), so an lr off by one epoch or a wrong decay mask fails.
RTOL = 1e-4
NUM_CLASSES, BATCH = 10, 8
STEPS_PER_EPOCH, EPOCHS, WARMUP, COOLDOWN = 2, 10, 3, 2  # 20 steps: warmup, cosine, cooldown
LABEL_SMOOTHING = 0.1
PEAK_LR, WARMUP_LR, MIN_LR, WEIGHT_DECAY = 2e-3, 1e-4, 1e-4, 0.05


def vit_case():
  student = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                       num_heads=2, num_classes=NUM_CLASSES)
  ours = ("deit_tiny_distilled_patch16_224",
          dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2))
  return dict(student=student, ours=ours, img_size=32, no_decay=("cls_token", "dist_token",
                                                                 "pos_embed"),
              distill={"type": "soft", "alpha": 0.5, "tau": 2.0}, clip=("none", 0.0),
              soft_targets=False)


def efficientformer_case():
  student = EfficientFormer(depths=(1, 1, 1, 2), embed_dims=(16, 32, 48, 64), num_vit=1,
                            num_classes=NUM_CLASSES)
  student.stages[-1].blocks[-1].token_mixer = EfficientFormerAttention(64, resolution=2)  # 64x64
  ours = ("efficientformer_l1",
          dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 2), num_vit=1, img_size=64))
  # timm's EfficientFormer lists its attention biases in no_weight_decay() (the authors' model
  # has no such list; efficientformer_recipe's no_decay=() is theirs).
  return dict(student=student, ours=ours, img_size=64, no_decay=("attention_biases",),
              distill={"type": "hard", "alpha": 0.5, "tau": 1.0}, clip=("agc", 0.01),
              soft_targets=True)


def randomise_(model, seed):
  """Random biases, layer scales and bias tables (timm initialises them to 0, 1e-5 and 0), so
  every path carries signal and no parameter starts at a value that hides an error."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(".bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      elif name.endswith("gamma"):
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
      elif name.endswith("attention_biases") or name in ("cls_token", "dist_token", "pos_embed"):
        p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def teacher_for(img_size):
  """A tiny frozen ViT teacher in eval mode, and ours converted from it."""
  torch.manual_seed(1)
  kw = dict(img_size=img_size, patch_size=img_size // 4, embed_dim=32, depth=1, num_heads=2)
  teacher = VisionTransformer(num_classes=NUM_CLASSES, **kw).eval()
  randomise_(teacher, seed=2)
  variables = load_pytorch_state_dict("deit_tiny_patch16_224", teacher.state_dict(),
                                      num_classes=NUM_CLASSES, **kw)
  return teacher, models.create_model("deit_tiny_patch16_224", num_classes=NUM_CLASSES,
                                      **kw), variables


def fixed_batches(img_size, count):
  rng = np.random.default_rng(0)
  return [(rng.standard_normal((BATCH, img_size, img_size, 3), dtype=np.float32),
           rng.integers(0, NUM_CLASSES, size=BATCH).astype(np.int32)) for _ in range(count)]


def optim_config(case):
  c = common.deit_recipe("unused").optim
  c.update(lr=PEAK_LR, lr_base_batch=BATCH, weight_decay=WEIGHT_DECAY, warmup_epochs=WARMUP,
           warmup_lr=WARMUP_LR, min_lr=MIN_LR, cooldown_epochs=COOLDOWN,
           lr_schedule_unit="epoch", lr_epoch_lag=1, grad_clip_mode=case["clip"][0],
           grad_clip_value=case["clip"][1], no_decay=case["no_decay"])
  return c


def train_timm(case, teacher, batches):
  """The authors' loop (DeiT main.py / engine.py, EfficientFormer's the same): per epoch, the
  steps at the optimizer's lr, then `lr_scheduler.step(epoch)`. Returns the final state dict."""
  model = case["student"].train()
  model.set_distilled_training(True)
  opt = create_optimizer_v2(model, "adamw", lr=PEAK_LR, weight_decay=WEIGHT_DECAY, eps=1e-8,
                            betas=(0.9, 0.999))
  scheduler, num_epochs = create_scheduler_v2(
      opt, sched="cosine", num_epochs=EPOCHS - COOLDOWN, warmup_epochs=WARMUP,
      warmup_lr=WARMUP_LR, min_lr=MIN_LR, cooldown_epochs=COOLDOWN)
  assert num_epochs == EPOCHS
  base = (SoftTargetCrossEntropy() if case["soft_targets"]
          else LabelSmoothingCrossEntropy(LABEL_SMOOTHING))
  distill = case["distill"]
  lrs = []
  for epoch in range(num_epochs):
    for step in range(STEPS_PER_EPOCH):
      images, labels = batches[epoch * STEPS_PER_EPOCH + step]
      x = torch.from_numpy(images).permute(0, 3, 1, 2)
      y = torch.from_numpy(labels).long()
      if case["soft_targets"]:  # timm's Mixup with mixing off: smoothed one-hot targets
        y = mixup_target(y, NUM_CLASSES, lam=1.0, smoothing=LABEL_SMOOTHING)
      out, out_kd = model(x)
      with torch.no_grad():
        teacher_out = teacher(x)
      if distill["type"] == "soft":  # DeiT losses.py: KL summed, x tau^2, / out_kd.numel()
        tau = distill["tau"]
        log_s = F.log_softmax(out_kd / tau, dim=1)
        log_t = F.log_softmax(teacher_out / tau, dim=1)
        kd = (log_t.exp() * (log_t - log_s)).sum() * tau * tau / out_kd.numel()
      else:  # DeiT losses.py 'hard': cross entropy with the teacher's argmax
        kd = F.cross_entropy(out_kd, teacher_out.argmax(dim=1))
      loss = (1 - distill["alpha"]) * base(out, y) + distill["alpha"] * kd
      opt.zero_grad()
      loss.backward()
      if case["clip"][0] == "agc":
        adaptive_clip_grad(model.parameters(), clip_factor=case["clip"][1])
      lrs.append(opt.param_groups[0]["lr"])
      opt.step()
    scheduler.step(epoch)
  decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
  return model, lrs, {n for n, p in model.named_parameters() if id(p) in decayed}


def batchnorm_invariant(model, img_size):
  """Parameters whose exact gradient is zero: biases added right before a training-mode
  BatchNorm, which subtracts their shift again. In float32 their gradient is rounding noise, and
  Adam scales noise to steps of up to lr, differently in each framework; they are left out of the
  comparison. Found in float64, where the noise is 1e-16 of the other gradients."""
  m64 = copy.deepcopy(model).double().train()
  m64.set_distilled_training(True)
  x = torch.randn(BATCH, 3, img_size, img_size, generator=torch.Generator().manual_seed(0),
                  dtype=torch.float64)
  out, out_kd = m64(x)
  (out * out.detach().cos() + out_kd.sin()).sum().backward()
  largest = max(float(p.grad.abs().max()) for p in m64.parameters())
  return {n for n, p in m64.named_parameters() if float(p.grad.abs().max()) <= 1e-10 * largest}


def torch_names_of_leaves(name, overrides, model):
  """Our parameter path -> timm parameter name, by converting parameters filled with their index."""
  params = dict(model.named_parameters())
  state = {k: v.detach() for k, v in model.state_dict().items()}
  index = {k: i for i, k in enumerate(params)}
  state.update({k: torch.full(p.shape, float(index[k])) for k, p in params.items()})
  marked = load_pytorch_state_dict(name, state, num_classes=NUM_CLASSES, **overrides)["params"]
  names = list(params)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(marked)[0]:
    values = np.unique(leaf)
    assert len(values) == 1
    out[jax.tree_util.keystr(path)] = names[int(values[0])]
  return out


@pytest.fixture
def one_torch_thread():
  """The models are tiny: torch's thread pool costs more than it saves on a busy CPU."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("make_case", [vit_case, efficientformer_case],
                         ids=["deit_soft_distillation", "efficientformer_hard_agc"])
def test_twenty_steps_equal_timm(make_case):
  torch.manual_seed(0)
  case = make_case()
  randomise_(case["student"], seed=0)
  name, overrides = case["ours"]
  img_size = case["img_size"]
  batches = fixed_batches(img_size, EPOCHS * STEPS_PER_EPOCH)
  teacher_torch, teacher, teacher_vars = teacher_for(img_size)
  if case["distill"]["type"] == "hard":  # no near-tie in the teacher's argmax
    with torch.no_grad():
      top2 = torch.stack([teacher_torch(torch.from_numpy(x).permute(0, 3, 1, 2))
                          for x, _ in batches]).topk(2, dim=-1).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 1e-4

  invariant = batchnorm_invariant(case["student"], img_size)
  assert all(n.endswith(".bias") for n in invariant)
  variables = load_pytorch_state_dict(name, case["student"].state_dict(),
                                      num_classes=NUM_CLASSES, **overrides)
  leaf_names = torch_names_of_leaves(name, overrides, case["student"])
  model = models.create_model(name, num_classes=NUM_CLASSES, drop_path_rate=0.0, **overrides)
  c = optim_config(case)
  tx, schedule = optim.create_optimizer(
      c, batch_size=BATCH, steps_per_epoch=STEPS_PER_EPOCH,
      total_steps=EPOCHS * STEPS_PER_EPOCH, total_epochs=EPOCHS)
  state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
           "opt_state": tx.init(variables["params"])}
  if "batch_stats" in variables:
    state["batch_stats"] = variables["batch_stats"]
  aug = dict(mixup_alpha=0.0, cutmix_alpha=0.0, mixup_prob=1.0, mixup_switch_prob=0.5,
             label_smoothing=LABEL_SMOOTHING)
  step = jax.jit(functools.partial(
      trainer.train_step, model=model, tx=tx, schedule=schedule, base_rng=jax.random.key(0),
      num_classes=NUM_CLASSES, aug=aug, distill=case["distill"], teacher=teacher))
  initial = jax.tree.map(np.array, variables["params"])
  our_lrs = []
  for images, labels in batches:
    state, metrics = step(state, {"image": jnp.asarray(images), "label": jnp.asarray(labels)},
                          teacher_vars)
    our_lrs.append(float(metrics["lr"]))

  trained, timm_lrs, timm_decayed = train_timm(case, teacher_torch, batches)
  np.testing.assert_allclose(our_lrs, timm_lrs, rtol=1e-6)
  assert len(set(np.round(timm_lrs, 12))) >= 7  # warmup, cosine and cooldown values all occur

  # Weight decay falls on the same parameters.
  mask = optim.weight_decay_mask(variables["params"], tuple(c.no_decay))
  our_decayed = {leaf_names[jax.tree_util.keystr(p)]
                 for p, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m}
  assert our_decayed == timm_decayed

  expected = load_pytorch_state_dict(name, trained.state_dict(), num_classes=NUM_CLASSES,
                                     **overrides)
  errors, still = {}, []
  for path, want in jax.tree_util.tree_flatten_with_path(expected["params"])[0]:
    if leaf_names[jax.tree_util.keystr(path)] in invariant:
      continue
    key = f"{jax.tree_util.keystr(path)} ({leaf_names[jax.tree_util.keystr(path)]})"
    scale = np.abs(want).max()
    if np.abs(want - _at(initial, path)).max() <= 20 * RTOL * scale:
      still.append(key)
    errors[key] = float(np.abs(np.asarray(_at(state["params"], path)) - want).max() / scale)
  assert not still, f"parameters too still for the tolerance to mean anything: {still}"
  bad = {k: f"{e:.3g}" for k, e in errors.items() if e > RTOL}
  assert not bad, f"relative error > {RTOL} (max {max(errors.values()):.3g}): {bad}"


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree
