"""ResNet / ResNeXt (NASViT's teachers) against timm: logits after conversion, parameter counts."""
import jax
import numpy as np
import pytest

from compact_vit.convert import load_pytorch_state_dict
from compact_vit.errors import UserError
from compact_vit.models import create_model, list_models
from conftest import our_logits, random_images, rel_err, torch_logits

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

# Max relative error (max |ours - timm| / max |timm|) of float32 logits after 53 (ResNeXt-101: 104)
# convolutions; measured 4e-7 (ResNet-50, ResNeXt-50, 64 px) and 1.3e-6 (ResNeXt-101, 32 px).
RTOL = 1e-4


def random_timm(name, seed=0, **kwargs):
  """timm's `name` in eval mode with every float tensor random (BatchNorm statistics included, so
  a mapping error in them shows) and its state dict."""
  model = timm.create_model(name, pretrained=False, **kwargs).eval()
  generator = torch.Generator().manual_seed(seed)
  state_dict = {}
  for key, value in model.state_dict().items():
    if not value.is_floating_point():
      state_dict[key] = value
      continue
    noise = torch.randn(value.shape, generator=generator)
    if key.endswith("running_var"):
      state_dict[key] = torch.rand(value.shape, generator=generator) + 0.5
    elif key.endswith(("running_mean", "bias")):
      state_dict[key] = 0.1 * noise
    elif value.ndim >= 2:  # unit gain through depth
      state_dict[key] = noise / np.sqrt(np.prod(value.shape[1:]))
    else:  # BN scales
      state_dict[key] = 0.5 + 0.1 * noise
  model.load_state_dict(state_dict)
  return model, state_dict


@pytest.mark.parametrize("name,kwargs", [
    ("resnext50_32x4d", dict(num_classes=10)),
    ("resnet50", dict(num_classes=10)),
])
def test_logits_match_timm(name, kwargs):
  tm, state_dict = random_timm(name, **kwargs)
  variables = load_pytorch_state_dict(name, state_dict, img_size=64, **kwargs)
  x = random_images(2, 64)
  err = rel_err(our_logits(name, variables, x, img_size=64, **kwargs), torch_logits(tm, x))
  print(f"{name}: max relative logits error {err:.2e}")
  assert err < RTOL


def test_resnext101_teacher_converts_and_matches_timm_at_a_small_input():
  """The real 32x4d teacher architecture (101 layers), 32 px, batch 1."""
  tm, state_dict = random_timm("resnext101_32x4d")
  variables = load_pytorch_state_dict("resnext101_32x4d", state_dict, img_size=32)
  x = random_images(1, 32, seed=1)
  err = rel_err(our_logits("resnext101_32x4d", variables, x, img_size=32), torch_logits(tm, x))
  print(f"resnext101_32x4d: max relative logits error {err:.2e}")
  assert err < RTOL


# timm 1.0's counts (torch meta device), 44.18M and 88.79M.
TEACHER_PARAMS = {"resnext101_32x4d": 44_177_704, "resnext101_32x8d": 88_791_336}


@pytest.mark.parametrize("name", sorted(TEACHER_PARAMS))
def test_teachers_are_registered_with_timms_parameter_count(name):
  assert {"resnet50", "resnext50_32x4d", name} <= set(list_models())
  model = create_model(name)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  with torch.device("meta"):
    expected = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
  ours = sum(a.size for a in jax.tree.leaves(shapes["params"]))
  assert ours == expected == TEACHER_PARAMS[name]


def test_train_mode_updates_batch_stats():
  """Shapes only: train=True needs the `dropout` stream (drop path) and returns new statistics."""
  model = create_model("resnet50", num_classes=5, img_size=64, drop_path_rate=0.1,
                       dtype="bfloat16")
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), np.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits, updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                               rngs={"dropout": jax.random.key(1)}), variables, x)
  assert logits.shape == (2, 5) and logits.dtype == np.float32
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])


@pytest.mark.parametrize("overrides,message", [
    (dict(num_classes=0), "num_classes=0 is not positive"),
    (dict(drop_path_rate=1.0), r"drop_path_rate=1.0 is not in \[0, 1\)"),
    (dict(img_size=16), "img_size=16 is smaller than the network's stride"),
    (dict(depths=(3, 4, 6)), "must be four stages"),
    (dict(cardinality=0), "cardinality=0"),
])
def test_bad_settings_are_rejected(overrides, message):
  with pytest.raises(UserError, match=message):
    create_model("resnext50_32x4d", **overrides)
