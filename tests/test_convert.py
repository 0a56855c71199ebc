"""PyTorch -> Flax conversion: logits parity with timm for every ViT/DeiT variant, pos-embed
resampling, error messages, and the `python -m compact_vit.convert` round trip."""
import os
import subprocess
import sys

import numpy as np
import pytest

from compact_vit.checkpointing import load_variables
from compact_vit.convert import load_pytorch_state_dict
from compact_vit.convert.__main__ import main as convert_main
from compact_vit.errors import UserError
from compact_vit.models.vit import VARIANTS
from compact_vit.profile import count_params
from conftest import our_logits, random_images, rel_err, torch_logits

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from timm.models.vision_transformer import checkpoint_filter_fn  # noqa: E402

# Max relative error max|ours - timm| / max|timm| of float32 logits. Measured: 3e-7 to 1.4e-6.
RTOL = 1e-4


def random_timm(name, seed=0, **kwargs):
  """timm model `name` in eval mode with EVERY tensor random (not timm's init), and its state dict.

  Built on the meta device (skipping timm's init), then filled: norm weights 1 + 0.1 N(0,1), other
  vectors (biases, layer scales) 0.1 N(0,1), tokens and position embeddings 0.5 N(0,1), weight
  matrices and convs 0.02 N(0,1).
  """
  with torch.device("meta"):
    model = timm.create_model(name, pretrained=False, **kwargs)
  generator = torch.Generator().manual_seed(seed)
  state_dict = {}
  for key, value in model.state_dict().items():
    noise = torch.randn(value.shape, generator=generator)
    if value.ndim == 1:
      state_dict[key] = noise * 0.1 + (1.0 if "norm" in key and key.endswith("weight") else 0.0)
    else:
      state_dict[key] = noise * (0.5 if value.ndim == 3 else 0.02)
  model.load_state_dict(state_dict, assign=True)
  return model.eval(), state_dict


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_timm(name):
  tm, state_dict = random_timm(name)
  variables = load_pytorch_state_dict(name, state_dict)  # torch tensors accepted as values
  assert count_params(variables["params"]) == sum(p.numel() for p in tm.parameters())
  x = random_images(1, 224)
  err = rel_err(our_logits(name, variables, x), torch_logits(tm, x))
  print(f"{name}: max relative logits error {err:.2e}")
  assert err < RTOL


@pytest.mark.parametrize("name,size", [("deit_tiny_patch16_224", 160),
                                       ("deit_tiny_distilled_patch16_224", 288)])
def test_pos_embed_resampling_matches_timm(name, size):
  """224 checkpoint into a `size` model vs timm's model at `size` loading the same checkpoint
  through its checkpoint_filter_fn (resample_abs_pos_embed, antialiased bicubic)."""
  _, state_dict = random_timm(name)
  tm = timm.create_model(name, pretrained=False, img_size=size).eval()
  tm.load_state_dict(checkpoint_filter_fn(state_dict, tm))
  variables = load_pytorch_state_dict(name, state_dict, img_size=size)
  np.testing.assert_allclose(variables["params"]["pos_embed"], tm.pos_embed.detach().numpy(),
                             atol=1e-6)
  x = random_images(1, size)
  err = rel_err(our_logits(name, variables, x, img_size=size), torch_logits(tm, x))
  print(f"{name} @ {size}: max relative logits error {err:.2e}")
  assert err < RTOL


def test_layer_scale_and_avg_pool_match_timm():
  overrides = dict(depth=2, init_values=0.1, global_pool="avg", img_size=64)
  tm, state_dict = random_timm("vit_tiny_patch16_224", **overrides)
  variables = load_pytorch_state_dict("vit_tiny_patch16_224", state_dict, **overrides)
  x = random_images(2, 64)
  assert rel_err(our_logits("vit_tiny_patch16_224", variables, x, **overrides),
                 torch_logits(tm, x)) < RTOL


@pytest.fixture(scope="module")
def small_checkpoint():
  """A randomised 2-block timm DeiT-Ti state dict as numpy arrays."""
  _, state_dict = random_timm("deit_tiny_patch16_224", depth=2)
  return {k: v.numpy() for k, v in state_dict.items()}


def test_converter_names_missing_unexpected_and_misshaped_keys(small_checkpoint):
  sd = dict(small_checkpoint)
  del sd["blocks.1.mlp.fc2.bias"]
  sd["blocks.1.attn.extra.weight"] = np.zeros((3, 3), np.float32)
  sd["blocks.0.attn.qkv.weight"] = np.zeros((576, 100), np.float32)
  with pytest.raises(UserError) as info:
    load_pytorch_state_dict("deit_tiny_patch16_224", sd, depth=2)
  message = str(info.value)
  assert "missing keys (1): blocks.1.mlp.fc2.bias" in message
  assert "unexpected keys (1): blocks.1.attn.extra.weight" in message
  assert "blocks.0.attn.qkv.weight: checkpoint (576, 100), model expects (576, 192)" in message


def test_converter_depth_mismatch_and_unknown_names(small_checkpoint):
  with pytest.raises(UserError, match=r"missing keys \(\d+\): blocks\.2\."):
    load_pytorch_state_dict("deit_tiny_patch16_224", small_checkpoint, depth=3)
  with pytest.raises(UserError, match="unexpected keys"):  # no dist_token / head_dist in the model
    load_pytorch_state_dict("deit_tiny_patch16_224", dict(
        small_checkpoint, dist_token=np.zeros((1, 1, 192), np.float32)), depth=2)
  with pytest.raises(UserError, match="Unknown override"):
    load_pytorch_state_dict("deit_tiny_patch16_224", small_checkpoint, dpeth=2)
  with pytest.raises(UserError, match="No PyTorch converter"):
    load_pytorch_state_dict("no_such_model", small_checkpoint)


def test_other_num_classes_needs_drop_head(small_checkpoint):
  with pytest.raises(UserError, match="head.weight.*drop_head=True"):
    load_pytorch_state_dict("deit_tiny_patch16_224", small_checkpoint, depth=2, num_classes=10)
  variables = load_pytorch_state_dict("deit_tiny_patch16_224", small_checkpoint, drop_head=True,
                                      depth=2, num_classes=10)
  params = variables["params"]
  assert params["head"]["kernel"].shape == (192, 10)
  np.testing.assert_array_equal(params["head"]["bias"], 0.0)  # fresh init, not the checkpoint
  np.testing.assert_array_equal(params["blocks_1"]["mlp"]["fc1"]["kernel"],
                                small_checkpoint["blocks.1.mlp.fc1.weight"].T)


def test_cli_round_trip_safetensors(tmp_path):
  from safetensors.torch import save_file
  tm, state_dict = random_timm("deit_tiny_patch16_224", seed=1)
  path = str(tmp_path / "deit_tiny.safetensors")
  save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
  out = str(tmp_path / "converted")
  assert convert_main(["--model", "deit_tiny_patch16_224", "--checkpoint", path, "--out", out]) == 0
  variables, meta = load_variables(out)
  assert meta == {"model": "deit_tiny_patch16_224", "overrides": {}}
  x = random_images(2, 224)
  assert rel_err(our_logits(meta["model"], variables, x, **meta["overrides"]),
                 torch_logits(tm, x)) < RTOL


def test_cli_wrapped_pth_with_img_size(tmp_path):
  _, state_dict = random_timm("deit_tiny_distilled_patch16_224", seed=2)
  path = str(tmp_path / "ckpt.pth")
  torch.save({"model": state_dict, "epoch": 299}, path)
  out = str(tmp_path / "converted")
  assert convert_main(["--model", "deit_tiny_distilled_patch16_224", "--checkpoint", path,
                       "--out", out, "--img-size", "160"]) == 0
  variables, meta = load_variables(out)
  assert meta["overrides"] == {"img_size": 160}
  tm = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=160).eval()
  tm.load_state_dict(checkpoint_filter_fn(state_dict, tm))
  x = random_images(1, 160)
  assert rel_err(our_logits(meta["model"], variables, x, **meta["overrides"]),
                 torch_logits(tm, x)) < RTOL


def test_cli_errors_are_one_line(tmp_path, capsys):
  assert convert_main(["--model", "deit_tiny_patch16_224", "--checkpoint",
                       str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o")]) == 1
  assert capsys.readouterr().err.strip().count("\n") == 0
  bad = tmp_path / "bad.npz"
  np.savez(bad, **{"head.weight": np.zeros((1000, 192), np.float32)})
  proc = subprocess.run(
      [sys.executable, "-m", "compact_vit.convert", "--model", "deit_tiny_patch16_224",
       "--checkpoint", str(bad), "--out", str(tmp_path / "o")],
      capture_output=True, text=True, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  error_lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(error_lines) == 1 and "missing keys" in error_lines[0]
  assert not os.path.exists(tmp_path / "o")
