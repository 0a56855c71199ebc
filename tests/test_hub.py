"""Published weights by name, with no network: a Hugging Face cache built here in the documented
layout (`models--OWNER--NAME/{blobs,snapshots/<commit>,refs/main}`) is read by
`huggingface_hub.hf_hub_download` with HF_HUB_OFFLINE=1, exactly as after a real download; every
socket connection or name lookup fails the test. Logits are checked against the timm model the
checkpoint was saved from; the table of published checkpoints against timm's pretrained configs."""
import hashlib
import io
import json
import os
import socket
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compact_vit
from compact_vit import models
from compact_vit.checkpointing import load_variables
from compact_vit.convert import hub
from compact_vit.convert.__main__ import main as convert_main
from compact_vit.convert.core import _CONVERTERS
from compact_vit.convert.published import (BY_REPO, DEFAULTS, TIMM_RESULTS, default_spec,
                                           published_top1)
from compact_vit.errors import UserError

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from safetensors.torch import save as safetensors_bytes  # noqa: E402
from conftest import random_images, rel_err, torch_logits  # noqa: E402
from test_convert import RTOL, random_timm  # noqa: E402

REPO = "timm/deit_tiny_patch16_224.fb_in1k"
SPEC = "hf-hub:" + REPO
COMMIT = hashlib.sha1(b"a commit of " + REPO.encode()).hexdigest()
TINY = dict(depth=2, img_size=32)  # a 2-block DeiT-Ti on 32x32 inputs (2x2 patches)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
  """HF_HUB_CACHE (empty) and converted copies in tmp_path, HF_HUB_OFFLINE=1, no network, and the
  list of models converted (every call of the converter)."""
  from huggingface_hub import constants
  cache = tmp_path / "hf_hub"
  cache.mkdir()
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # huggingface_hub read both at import
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("COMPACT_VIT_CACHE", str(tmp_path / "compact_vit"))
  attempts = []

  def no_network(*args, **kwargs):
    attempts.append(args)
    raise OSError("a test tried to reach the network")
  monkeypatch.setattr(socket, "getaddrinfo", no_network)
  monkeypatch.setattr(socket.socket, "connect", no_network)
  conversions = []
  convert = hub.load_pytorch_state_dict

  def counting(name, *args, **kwargs):
    conversions.append(name)
    return convert(name, *args, **kwargs)
  monkeypatch.setattr(hub, "load_pytorch_state_dict", counting)
  yield SimpleNamespace(cache=cache, root=tmp_path / "compact_vit", conversions=conversions)
  assert not attempts, f"network access attempted: {attempts}"


def put_in_cache(cache, repo_id, files, commit=COMMIT):
  """Writes `files` ({name: bytes}) as huggingface_hub does: content-addressed blobs, a snapshot
  folder per commit linking to them, and refs/main naming the commit."""
  repo = cache / ("models--" + repo_id.replace("/", "--"))
  for name, data in files.items():
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
  (repo / "refs").mkdir(exist_ok=True)
  (repo / "refs" / "main").write_text(commit)


def torch_bytes(state_dict):
  buffer = io.BytesIO()
  torch.save(state_dict, buffer)
  return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_timm():
  """A randomised 2-block timm DeiT-Ti at 32x32 and its state dict (torch tensors)."""
  return random_timm("deit_tiny_patch16_224", seed=3, **TINY)


def logits(model, variables, x):
  return np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x)))


def test_hub_cache_loads_offline_and_converts_once(offline_hub, tiny_timm, monkeypatch):
  tm, state_dict = tiny_timm
  put_in_cache(offline_hub.cache, REPO,
               {"model.safetensors": safetensors_bytes(dict(state_dict))})
  downloads = []
  import huggingface_hub
  real_download = huggingface_hub.hf_hub_download

  def spy(repo_id, filename, **kwargs):
    downloads.append((repo_id, filename))
    return real_download(repo_id, filename, **kwargs)
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)

  model, variables = compact_vit.create_model("deit_tiny_patch16_224", pretrained=True, **TINY)
  assert downloads == [(REPO, "model.safetensors")]  # the default name, through huggingface_hub
  assert offline_hub.conversions == ["deit_tiny_patch16_224"]
  x = random_images(2, 32)
  err = rel_err(logits(model, variables, x), torch_logits(tm, x))
  print(f"hub DeiT-Ti (2 blocks, 32 px): max relative logits error {err:.2e}")
  assert err < RTOL

  directory = hub.resolve_init_from(SPEC, model_name="deit_tiny_patch16_224", **TINY)
  assert directory.startswith(str(offline_hub.root))
  with open(os.path.join(directory, "source.json")) as f:
    assert json.load(f)["source"] == {"repo": REPO, "file": "model.safetensors", "commit": COMMIT}
  # The same weights by an explicit name, the pinned commit, and with img_size at its default:
  # the converted copy is reused.
  _, again = compact_vit.create_model("deit_tiny_patch16_224", pretrained=f"{SPEC}@{COMMIT}",
                                      **TINY)
  assert hub.resolve_init_from(SPEC, model_name="deit_tiny_patch16_224", depth=2, img_size=32,
                               num_classes=1000) == directory
  assert offline_hub.conversions == ["deit_tiny_patch16_224"]
  jax.tree.map(np.testing.assert_array_equal, again, variables)
  # Another input size is another copy (pos_embed resampled), converted once more.
  other = hub.resolve_init_from(SPEC, model_name="deit_tiny_patch16_224", depth=2, img_size=48)
  assert other != directory and len(offline_hub.conversions) == 2
  assert load_variables(other)[0]["params"]["pos_embed"].shape == (1, 10, 192)


def test_pytorch_bin_and_a_new_head(offline_hub, tiny_timm):
  _, state_dict = tiny_timm
  put_in_cache(offline_hub.cache, REPO, {"pytorch_model.bin": torch_bytes(state_dict)})
  model, variables = compact_vit.create_model("deit_tiny_patch16_224", pretrained=SPEC,
                                              num_classes=10, **TINY)
  params = variables["params"]
  assert params["head"]["kernel"].shape == (192, 10) and model.num_classes == 10
  np.testing.assert_array_equal(params["head"]["bias"], 0.0)  # fresh, not the checkpoint's
  np.testing.assert_array_equal(params["blocks_1"]["attn"]["qkv"]["kernel"],
                                state_dict["blocks.1.attn.qkv.weight"].numpy().T)
  # The checkpoint's own head (1000 classes) is kept when it fits.
  _, kept = compact_vit.create_model("deit_tiny_patch16_224", pretrained=SPEC, **TINY)
  np.testing.assert_array_equal(kept["params"]["head"]["bias"], state_dict["head.bias"].numpy())


def test_empty_cache_offline_says_what_to_download(offline_hub):
  with pytest.raises(UserError) as info:
    compact_vit.create_model("deit_small_patch16_224", pretrained=True)
  message = str(info.value)
  assert "\n" not in message
  assert (f"`hf download timm/deit_small_patch16_224.fb_in1k model.safetensors --cache-dir "
          f"{offline_hub.cache}`") in message
  assert "HF_HUB_OFFLINE" in message
  assert offline_hub.conversions == []
  assert not offline_hub.root.exists()


def test_cli_converts_from_the_hub(offline_hub, tmp_path, capsys):
  _, state_dict = random_timm("deit_tiny_patch16_224", seed=4)
  put_in_cache(offline_hub.cache, REPO, {"model.safetensors": safetensors_bytes(state_dict)})
  for extra in (["--checkpoint", SPEC], []):  # named, or the model's published weights
    out = str(tmp_path / f"out{len(extra)}")
    assert convert_main(["--model", "deit_tiny_patch16_224", "--out", out, *extra]) == 0
    assert f"from {SPEC} to {out}" in capsys.readouterr().out
    variables, meta = load_variables(out)
    assert meta == {"model": "deit_tiny_patch16_224", "overrides": {}}
    np.testing.assert_array_equal(variables["params"]["blocks_11"]["mlp"]["fc1"]["kernel"],
                                  state_dict["blocks.11.mlp.fc1.weight"].numpy().T)
  assert convert_main(["--model", "deit_tiny_patch16_224", "--out", str(tmp_path / "o"),
                       "--checkpoint", "hf-hub:timm/deit_small_patch16_224.fb_in1k"]) == 1
  assert "hf download timm/deit_small_patch16_224.fb_in1k" in capsys.readouterr().err


def test_local_checkpoint_file_is_converted_once(offline_hub, tiny_timm, tmp_path):
  _, state_dict = tiny_timm
  path = tmp_path / "ckpt.pth"
  path.write_bytes(torch_bytes({"model": state_dict}))
  first = hub.resolve_init_from(str(path), model_name="deit_tiny_patch16_224", **TINY)
  assert hub.resolve_init_from(str(path), model_name="deit_tiny_patch16_224", **TINY) == first
  assert offline_hub.conversions == ["deit_tiny_patch16_224"]
  assert hub.resolve_init_from(first, model_name="deit_tiny_patch16_224") == first  # a directory
  _, variables = compact_vit.create_model("deit_tiny_patch16_224", pretrained=first, **TINY)
  with pytest.raises(UserError, match="does not match the model"):  # a directory of another shape
    compact_vit.create_model("deit_tiny_patch16_224", pretrained=first, depth=3, img_size=32)


@pytest.mark.parametrize("spec,match", [
    ("hf-hub:timm", "not a Hub checkpoint name"),
    ("hf-hub:timm/deit_small_patch16_224.fb_in1k@", "not a Hub checkpoint name"),
    ("no/such/dir", "does not exist"),
])
def test_bad_names(offline_hub, spec, match):
  with pytest.raises(UserError, match=match):
    hub.resolve_init_from(spec, model_name="deit_tiny_patch16_224")


def test_multi_process_runs_take_a_converted_directory(offline_hub, monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  with pytest.raises(UserError, match="single-process runs only; this run has 4 processes"):
    hub.resolve_init_from(SPEC, model_name="deit_tiny_patch16_224")
  assert offline_hub.conversions == []


def test_create_model_without_weights_is_the_registry():
  assert (compact_vit.create_model("deit_tiny_patch16_224", depth=2, num_classes=10)
          == models.create_model("deit_tiny_patch16_224", depth=2, num_classes=10))
  assert (compact_vit.create_model("sepvit_t", pretrained=False)
          == models.create_model("sepvit_t"))
  with pytest.raises(UserError, match="Unknown model 'nope'"):
    compact_vit.create_model("nope", pretrained=True)
  with pytest.raises(UserError) as info:
    compact_vit.create_model("sepvit_t", pretrained=True)
  message = str(info.value)
  assert "'sepvit_t' has no published weights" in message
  assert "deit_small_patch16_224, " in message and "efficientformerv2_s0" in message


# Where our default differs from timm's default tag: DeiT's RegNetY-160 teacher, and NASViT's
# ResNeXt-101 teachers (the semi-weakly supervised IG-1B checkpoints).
NOT_TIMM_DEFAULT = {"regnety_160", "resnext101_32x4d", "resnext101_32x8d"}


@pytest.mark.parametrize("repo_id", sorted(BY_REPO))
def test_table_matches_timm_pretrained_cfg(repo_id):
  """Repository, input size, crop, interpolation, normalisation and classes as timm states them;
  every registered model in the table has a converter."""
  entry = BY_REPO[repo_id]
  cfg = timm.models.get_pretrained_cfg(repo_id.split("/", 1)[1])
  assert cfg is not None and cfg.hf_hub_id == repo_id
  assert (cfg.input_size, cfg.crop_pct, cfg.interpolation, cfg.num_classes) == (
      (3, entry.img_size, entry.img_size), entry.crop_pct, entry.interpolation, entry.num_classes)
  np.testing.assert_allclose(cfg.mean, entry.mean)
  np.testing.assert_allclose(cfg.std, entry.std)
  assert 0.5 < entry.top1 < 0.9 and entry.source == TIMM_RESULTS
  assert entry.model in models.list_models() and entry.model in _CONVERTERS
  if DEFAULTS.get(entry.model) is entry and entry.model not in NOT_TIMM_DEFAULT:
    assert timm.models.get_pretrained_cfg(entry.model).hf_hub_id == repo_id


def test_published_top1_only_for_the_checkpoint_as_published():
  spec = default_spec("deit_small_patch16_224")
  assert spec == "hf-hub:timm/deit_small_patch16_224.fb_in1k"
  assert published_top1(spec) == (0.79856, TIMM_RESULTS)
  assert published_top1(spec + "@main", model_name="deit_small_patch16_224", img_size=224,
                        num_classes=1000).top1 == 0.79856
  assert published_top1(spec, model_name="dynamicvit_deit_s") is None  # other model
  assert published_top1(spec, img_size=384) is None
  assert published_top1(spec, num_classes=10) is None
  assert published_top1("weights/deit_s") is None
  assert published_top1("hf-hub:someone/deit_small_finetuned") is None
  assert published_top1(default_spec("regnety_160")).top1 == 0.83


def test_config_init_from_a_hub_name_reaches_the_evaluator(offline_hub, tiny_timm, tmp_path):
  """`--config.init_from=hf-hub:...` as eval.py and train.py read it: the evaluator resolves the
  name through the same cache, converts for the config's model and gives the torch logits."""
  from compact_vit import evaluator, trainer  # pylint: disable=import-outside-toplevel
  from configs import deit_ti  # pylint: disable=import-outside-toplevel
  tm, state_dict = tiny_timm
  put_in_cache(offline_hub.cache, REPO, {"model.safetensors": safetensors_bytes(dict(state_dict))})
  config = deit_ti.get_config(None)
  config.img_size = TINY["img_size"]
  config.model.depth = TINY["depth"]
  config.init_from = SPEC
  model = trainer.create_model(config, 1000)
  variables, step, ema = evaluator.load_eval_variables(config, str(tmp_path / "run"), model)
  assert step == 0 and ema is None and offline_hub.conversions == ["deit_tiny_patch16_224"]
  x = random_images(2, TINY["img_size"])
  assert rel_err(logits(model, variables, x), torch_logits(tm, x)) < RTOL


def test_eval_prints_the_published_top1_and_warns_about_other_settings(capsys):
  from compact_vit import evaluator  # pylint: disable=import-outside-toplevel
  from configs import deit_ti  # pylint: disable=import-outside-toplevel
  config = deit_ti.get_config(None)
  config.init_from = "hf-hub:timm/deit_tiny_patch16_224.fb_in1k"
  out = evaluator.published_comparison(config, 1000, 0.70)
  assert out == {"published_top1": 0.7219, "published_source": TIMM_RESULTS}
  printed = capsys.readouterr().out
  assert "Published top-1 72.19%" in printed and "vs measured 70.00%" in printed
  assert "--config.crop_pct=0.9" in printed  # DeiT's checkpoints were evaluated at crop 0.9
  assert evaluator.published_comparison(config, 10, 0.70) == {}  # another head: no comparison
