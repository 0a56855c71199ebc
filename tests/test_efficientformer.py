"""EfficientFormer V1 / V2 and the RegNetY-16GF teacher: logits parity with timm from converted,
fully randomised weights (224 and another size), parameter counts, GMACs, the authors' key naming,
bias-table resampling, converter errors and one hard-distillation train step."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compact_vit import models, trainer
from compact_vit.convert import load_pytorch_state_dict
from compact_vit.errors import UserError
from compact_vit.models import create_model, efficientformer, efficientformer_v2
from conftest import our_logits, random_images, rel_err, torch_logits
from compact_vit.profile import count_macs, count_params, random_variables

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table_levit  # noqa: E402
from timm.models.efficientformer import Attention as TimmAttentionV1  # noqa: E402
from timm.models.efficientformer import checkpoint_filter_fn as timm_filter_v1  # noqa: E402

# Max relative error max|ours - timm| / max|timm| of float32 logits. Measured: 4.6e-7 to 1.4e-6.
RTOL = 1e-4
V1 = sorted(efficientformer.VARIANTS)
V2 = sorted(efficientformer_v2.VARIANTS)
# GMACs at 224 (../shared/REFERENCES.md; regnety_160: timm's table).
GMACS = {"efficientformer_l1": 1.30, "efficientformer_l3": 3.93, "efficientformer_l7": 10.17,
         "efficientformerv2_s0": 0.40, "efficientformerv2_s1": 0.65, "efficientformerv2_s2": 1.25,
         "efficientformerv2_l": 2.56, "regnety_160": 15.96}


def randomise(model, seed=0):
  """A state dict of `model`'s keys with EVERY float tensor random, so no default init (zero biases,
  1e-5 layer scales, unit BN statistics) can hide a mapping error. Integer buffers are kept (bias
  index tables; num_batches_tracked zeroed). Scales keep activations O(1) through depth."""
  generator = torch.Generator().manual_seed(seed)
  out = {}
  for key, value in model.state_dict().items():
    if not value.is_floating_point():
      out[key] = torch.zeros_like(value) if key.endswith("num_batches_tracked") else value.clone()
      continue
    noise = torch.randn(value.shape, generator=generator)
    if key.endswith("running_var"):
      out[key] = torch.rand(value.shape, generator=generator) + 0.5
    elif key.endswith("running_mean") or key.endswith("bias"):
      out[key] = 0.1 * noise
    elif key.endswith("attention_biases"):
      out[key] = noise
    elif key.endswith("gamma"):  # layer scales
      out[key] = 0.2 * noise
    elif value.ndim >= 2:  # conv / linear weights: unit gain
      out[key] = noise / np.sqrt(np.prod(value.shape[1:]))
    else:  # norm weights
      out[key] = 1.0 + 0.2 * noise
  return out


def timm_model(name, img_size=224):
  """timm's `name` in eval mode at `img_size` with every float tensor random, and its state dict.

  timm's V1 fixes its attention grid to 7x7; its Attention modules are rebuilt with the grid of
  `img_size` (timm's own class), which is what a V1 at that size computes.
  """
  if name.startswith("efficientformerv2"):
    model = timm.create_model(name, pretrained=False, img_size=img_size)
  else:
    with torch.device("meta"):  # skips timm's init (seconds for L7): every tensor is replaced
      model = timm.create_model(name, pretrained=False)
    model = model.to_empty(device="cpu")
  if name.startswith("efficientformer_"):  # built on the CPU: computes attention_bias_idxs
    for block in model.stages[-1].blocks:
      if isinstance(getattr(block, "token_mixer", None), TimmAttentionV1):
        block.token_mixer = TimmAttentionV1(block.norm1.normalized_shape[0],
                                            resolution=img_size // 32)
  state_dict = randomise(model)
  model.load_state_dict(state_dict, assign=True)
  return model.eval(), state_dict


@functools.lru_cache(maxsize=None)
def shared_timm_224(name):
  """The randomised 224 timm models that several tests reuse (small ones only)."""
  return timm_model(name)


def images(size, batch=1, seed=0):
  return random_images(batch, size, seed)


def num_timm_params(model):
  return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- parity with timm

@pytest.mark.parametrize("name", V1 + V2 + ["regnety_160"])
def test_logits_params_and_gmacs_at_224(name):
  """Logits equal timm's, parameter counts equal timm's, GMACs within 5% of the papers'."""
  tm, state_dict = (shared_timm_224(name) if name in ("efficientformer_l1", "efficientformerv2_s0")
                    else timm_model(name))
  variables = load_pytorch_state_dict(name, state_dict)  # torch tensors accepted as values
  assert set(variables) == {"params", "batch_stats"}
  assert count_params(variables["params"]) == num_timm_params(tm)
  x = images(224)
  err = rel_err(our_logits(name, variables, x), torch_logits(tm, x))
  gmacs = count_macs(create_model(name), variables, x.shape) / 1e9
  print(f"{name} @ 224: max relative logits error {err:.2e}; {gmacs:.3f} GMACs "
        f"(reference {GMACS[name]})")
  assert err < RTOL
  assert abs(gmacs / GMACS[name] - 1) < 0.05


def param_at(variables, torch_key):
  """The Flax parameter for a torch key: `stages.3.blocks.4.x` -> params/stages_3/blocks_4/x."""
  node = variables["params"]
  for part in re.sub(r"\.(\d+)", r"_\1", torch_key).split("."):
    node = node[part]
  return np.asarray(node)


@pytest.mark.parametrize("name,size", [("efficientformer_l1", 256), ("efficientformerv2_s0", 384)])
def test_224_weights_at_another_size_resample_biases_and_match_timm(name, size):
  """A 224 checkpoint loaded at `size`: every attention-bias table is resampled as timm's
  resize_rel_pos_bias_table_levit does, and the logits equal timm's model at `size` loaded with
  those tables."""
  _, state_dict = shared_timm_224(name)
  tm, _ = timm_model(name, img_size=size)  # random weights, replaced below
  target = tm.state_dict()
  resized = dict(state_dict)
  for key, value in state_dict.items():
    if key.endswith("attention_biases"):
      resized[key] = resize_rel_pos_bias_table_levit(value.T, target[key].shape[::-1]).T
    elif key.endswith("attention_bias_idxs"):
      resized[key] = target[key]
  tm.load_state_dict(resized)

  variables = load_pytorch_state_dict(name, state_dict, img_size=size)
  assert count_params(variables["params"]) == num_timm_params(tm)
  for key in (k for k in resized if k.endswith("attention_biases")):
    assert state_dict[key].shape != resized[key].shape
    np.testing.assert_allclose(param_at(variables, key), resized[key].numpy(), atol=1e-5)
  x = images(size)
  err = rel_err(our_logits(name, variables, x, img_size=size), torch_logits(tm, x))
  print(f"{name} @ {size} (from 224 weights): max relative logits error {err:.2e}")
  assert err < RTOL


# ----------------------------------------------------------------------------- the authors' naming

def to_authors_v1(state_dict):
  """timm's V1 keys -> snap-research/EfficientFormer's (the inverse of timm's filter)."""
  out = {}
  for key, value in state_dict.items():
    for ours, theirs in (("stem.conv1.", "patch_embed.0."), ("stem.norm1.", "patch_embed.1."),
                         ("stem.conv2.", "patch_embed.3."), ("stem.norm2.", "patch_embed.4."),
                         ("head_dist.", "dist_head.")):
      key = key.replace(ours, theirs) if key.startswith(ours) else key
    key = re.sub(r"ls(\d)\.gamma$", r"layer_scale_\1", key)
    key = re.sub(r"^stages\.(\d)\.blocks\.", lambda m: f"network.{2 * int(m[1])}.", key)
    key = re.sub(r"^stages\.(\d)\.downsample\.(conv|norm)\.",
                 lambda m: f"network.{2 * int(m[1]) - 1}.{'proj' if m[2] == 'conv' else 'norm'}.",
                 key)
    out[key] = value
  return out


_V2_ATTENTION_INVERSE = [
    (r"q\.local\.", "q.local.0."), (r"q\.proj\.conv\.", "q.proj.0."),
    (r"q\.proj\.bn\.", "q.proj.1."),
    (r"(^|\.)(q|k|v|v_local|stride_conv)\.conv\.", r"\1\2.0."),
    (r"(^|\.)(q|k|v|v_local|stride_conv)\.bn\.", r"\1\2.1."),
    (r"(^|\.)proj\.conv\.", r"\1proj.1."), (r"(^|\.)proj\.bn\.", r"\1proj.2.")]


def to_authors_v2(state_dict):
  """timm's V2 keys -> snap-research/EfficientFormer's, with the authors' (C, 1, 1) layer scales and
  their persistent `attention_bias_idxs` buffers."""
  out = {}
  for key, value in state_dict.items():
    for ours, theirs in (("stem.conv1.conv.", "patch_embed.0."),
                         ("stem.conv1.bn.", "patch_embed.1."),
                         ("stem.conv2.conv.", "patch_embed.3."),
                         ("stem.conv2.bn.", "patch_embed.4."), ("head_dist.", "dist_head.")):
      key = key.replace(ours, theirs) if key.startswith(ours) else key
    match = re.match(r"stages\.(\d)\.(blocks|downsample)\.(.*)$", key)
    if match:
      stage, part, rest = int(match[1]), match[2], match[3]
      if part == "blocks":
        block, rest = rest.split(".", 1)
        if rest.startswith("token_mixer."):
          rest = "token_mixer." + _apply(rest[len("token_mixer."):], _V2_ATTENTION_INVERSE)
        for ours, theirs in (("mlp.fc1.conv.", "mlp.fc1."), ("mlp.fc1.bn.", "mlp.norm1."),
                             ("mlp.mid.conv.", "mlp.mid."), ("mlp.mid.bn.", "mlp.mid_norm."),
                             ("mlp.fc2.conv.", "mlp.fc2."), ("mlp.fc2.bn.", "mlp.norm2.")):
          rest = rest.replace(ours, theirs)
        if re.match(r"ls\d\.gamma$", rest):
          rest, value = f"layer_scale_{rest[2]}", value.reshape(-1, 1, 1)
        key = f"network.{2 * stage}.{block}.{rest}"
      else:
        if rest.startswith("attn."):
          rest = "attn." + _apply(rest[len("attn."):], _V2_ATTENTION_INVERSE)
        elif stage == 3:  # the attention downsample names its conv `conv` / `bn`
          rest = rest.replace("conv.conv.", "conv.").replace("conv.bn.", "bn.")
        else:
          rest = rest.replace("conv.conv.", "proj.").replace("conv.bn.", "norm.")
        key = f"network.{2 * stage - 1}.{rest}"
    out[key] = value
    if key.endswith("attention_biases"):
      out[key.replace("attention_biases", "attention_bias_idxs")] = torch.zeros(1, dtype=torch.long)
  return out


def _apply(key, rules):
  for pattern, replacement in rules:
    key = re.sub(pattern, replacement, key)
  return key


def assert_same_variables(a, b):
  flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(v)[0] for v in (a, b))
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_authors_v1_naming_loads_like_timms():
  _, state_dict = shared_timm_224("efficientformer_l1")
  authors = to_authors_v1(state_dict)
  assert timm_filter_v1(authors, None).keys() == state_dict.keys()  # timm's own authors -> timm map
  assert {"patch_embed.4.running_var", "network.1.proj.weight",
          "network.6.4.token_mixer.qkv.weight", "network.6.4.token_mixer.attention_bias_idxs",
          "network.0.0.layer_scale_1", "network.6.4.mlp.fc2.bias",
          "dist_head.weight"} <= authors.keys()
  assert_same_variables(load_pytorch_state_dict("efficientformer_l1", authors),
                        load_pytorch_state_dict("efficientformer_l1", state_dict))


def test_authors_v2_naming_loads_like_timms():
  _, state_dict = shared_timm_224("efficientformerv2_s0")
  authors = to_authors_v2(state_dict)
  # Key names and count of the authors' efficientformerv2_s0 (models/efficientformer_v2.py).
  assert len(authors) == 573
  assert {"patch_embed.4.running_var", "network.0.0.mlp.mid_norm.running_mean",
          "network.0.1.layer_scale_2", "network.1.proj.weight", "network.3.norm.weight",
          "network.4.4.token_mixer.stride_conv.1.running_var",
          "network.4.5.token_mixer.talking_head1.weight", "network.4.5.token_mixer.proj.2.bias",
          "network.5.conv.weight", "network.5.bn.running_mean", "network.5.attn.q.local.0.weight",
          "network.5.attn.q.proj.1.weight", "network.5.attn.v_local.0.weight",
          "network.6.3.token_mixer.attention_bias_idxs", "dist_head.bias"} <= authors.keys()
  assert authors["network.0.1.layer_scale_2"].shape == (32, 1, 1)
  assert_same_variables(load_pytorch_state_dict("efficientformerv2_s0", authors),
                        load_pytorch_state_dict("efficientformerv2_s0", state_dict))


# ----------------------------------------------------------------------------- converter errors

def test_converter_names_missing_unexpected_and_misshaped_keys():
  _, state_dict = shared_timm_224("efficientformer_l1")
  sd = {k: v.numpy() for k, v in state_dict.items()}
  del sd["head_dist.bias"]
  sd["stages.0.blocks.0.mlp.extra.weight"] = np.zeros((3, 3), np.float32)
  sd["stages.3.blocks.4.token_mixer.qkv.weight"] = np.zeros((1536, 100), np.float32)
  with pytest.raises(UserError) as info:
    load_pytorch_state_dict("efficientformer_l1", sd)
  message = str(info.value)
  assert "missing keys (1): head_dist.bias" in message
  assert "unexpected keys (1): stages.0.blocks.0.mlp.extra.weight" in message
  assert ("stages.3.blocks.4.token_mixer.qkv.weight: checkpoint (1536, 100), "
          "model expects (1536, 448)") in message


def test_converter_rejects_bad_bias_tables_and_unknown_authors_keys():
  _, state_dict = shared_timm_224("efficientformerv2_s0")
  sd = {k: v.numpy() for k, v in state_dict.items()}
  bad = dict(sd)
  bad["stages.3.blocks.3.token_mixer.attention_biases"] = np.zeros((8, 50), np.float32)
  with pytest.raises(UserError, match="do not form a square grid"):
    load_pytorch_state_dict("efficientformerv2_s0", bad)
  authors = to_authors_v2(sd)
  authors["network.8.0.mlp.fc1.weight"] = np.zeros((4, 4, 1, 1), np.float32)  # no 5th stage
  with pytest.raises(UserError, match=r"unexpected keys \(1\): stages\.4\.blocks\.0\.mlp\.fc1"):
    load_pytorch_state_dict("efficientformerv2_s0", authors)


def test_other_num_classes_points_to_drop_head():
  """The hint appears only when the mismatched keys are the family's registered head modules."""
  _, state_dict = shared_timm_224("efficientformerv2_s0")
  with pytest.raises(UserError, match=r"head\.weight.*head_dist\.weight.*drop_head=True"):
    load_pytorch_state_dict("efficientformerv2_s0", state_dict, num_classes=10)


# ----------------------------------------------------------------------------- models and training

def test_registry_and_settings_errors():
  assert set(V1 + V2 + ["regnety_160"]) <= set(models.list_models())
  with pytest.raises(UserError, match="multiple of 32"):
    create_model("efficientformer_l1", img_size=100)
  with pytest.raises(UserError, match="multiple of 32"):
    create_model("efficientformerv2_s0", img_size=(224, 200))
  with pytest.raises(UserError, match=r"mlp_ratios\[2\] has 6 entries for depths\[2\]=2"):
    create_model("efficientformerv2_s0", depths=(2, 2, 2, 4))
  with pytest.raises(UserError, match="num_vit=5"):
    create_model("efficientformer_l1", num_vit=5)
  with pytest.raises(UserError, match="Unknown override"):
    create_model("efficientformerv2_s0", num_vits=2)
  with pytest.raises(UserError, match="create it with img_size=256"):
    model = create_model("efficientformer_l1")
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))


@pytest.mark.parametrize("name", ["efficientformer_l1", "efficientformerv2_s0"])
@pytest.mark.parametrize("distillation", [True, False])
def test_output_conventions(name, distillation):
  model = create_model(name, num_classes=7, distillation=distillation, img_size=64)
  x = jnp.zeros((2, 64, 64, 3))
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  logits, variables = jax.eval_shape(lambda x: model.init_with_output(rngs, x), x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert set(variables) == {"params", "batch_stats"}
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs=rngs,
                                                mutable=["batch_stats"])[0], variables, x)
  if distillation:
    assert [o.shape for o in out] == [(2, 7), (2, 7)]
  else:
    assert out.shape == (2, 7)


def test_train_step_with_hard_distillation_from_regnety():
  """One update of a small EfficientFormer with hard distillation from a small `regnety_160`:
  finite loss, every weight and every BatchNorm statistic moves, the teacher's variables do not.
  (EfficientFormerV2's training path is exercised by its `:quick` config; compiling its step here
  would double this test's time.)"""
  student = create_model("efficientformer_l1", embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 2),
                         num_vit=1, drop_path_rate=0.1, num_classes=5, img_size=64)
  teacher = create_model("regnety_160", num_classes=5, img_size=64, widths=(112, 224, 336, 448),
                         depths=(1, 1, 1, 1))
  # Random variables from shapes: compiling the inits would take longer than the step.
  teacher_vars = random_variables(teacher, (1, 64, 64, 3))
  variables = random_variables(student, (1, 64, 64, 3))
  tx = optax.adamw(1e-3)
  state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
           "batch_stats": variables["batch_stats"], "opt_state": tx.init(variables["params"])}
  aug = dict(mixup_alpha=0.0, cutmix_alpha=0.0, mixup_prob=1.0, mixup_switch_prob=0.5,
             label_smoothing=0.1)
  step = jax.jit(functools.partial(
      trainer.train_step, model=student, tx=tx, schedule=lambda s: 1e-3,
      base_rng=jax.random.key(1), num_classes=5, aug=aug,
      distill={"type": "hard", "alpha": 0.5, "tau": 1.0}, teacher=teacher))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(4, 64, 64, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 5, size=(4,)), jnp.int32)}
  teacher_before = jax.tree.map(np.array, teacher_vars)
  new_state, metrics = step(state, batch, teacher_vars)
  assert np.isfinite(float(metrics["loss"]))
  moved = lambda a, b: not np.allclose(a, b)  # noqa: E731
  for path, did_move in jax.tree_util.tree_flatten_with_path(
      jax.tree.map(moved, state["params"], new_state["params"]))[0]:
    # Conv biases feeding a BatchNorm get no gradient: the normalisation removes their shift.
    invariant = path[-1].key == "bias" and path[-2].key in ("conv1", "conv2", "conv", "fc1", "fc2")
    assert did_move or invariant, jax.tree_util.keystr(path)
  assert all(jax.tree.leaves(jax.tree.map(moved, state["batch_stats"], new_state["batch_stats"])))
  assert_same_variables(teacher_before, teacher_vars)
