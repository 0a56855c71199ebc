"""UniNet: the transformer block and the Local-Global DSM against naive NumPy implementations of the
formulas, the MBConv block and Local DSM likewise, shapes, BatchNorm state, parameter counts and
MACs, and the converter's renaming of the authors' Sequential indices.

Logits parity with the authors' PyTorch module (Sense-X/UniNet uninet.py) was measured outside the
repository (their code is not vendored): max relative error 5e-7 to 7e-7 for B0 to B5.
"""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from compact_vit.convert import load_pytorch_state_dict
from compact_vit.errors import UserError
from compact_vit.models import create_model, list_models
from compact_vit.models.uninet import (VARIANTS, AttentionBlock, LocalDSM, LocalGlobalDSM,
                                       MBConvBlock)
from compact_vit.profile import count_macs, count_params

ATOL = 2e-5


def randomize(tree, seed=0):
  """Every leaf random: scales near 1, BN variances in [1, 1.5], the rest 0.2 N(0, 1)."""
  rng = np.random.default_rng(seed)
  def fill(path, leaf):
    name = path[-1].key
    if name == "var":
      return (1.0 + 0.5 * rng.random(leaf.shape)).astype(np.float32)
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    return 1.0 + 0.1 * noise if name in ("scale", "gamma") else 0.2 * noise
  return jax.tree_util.tree_map_with_path(fill, tree)


def random_variables(module, x, seed=0):
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  return {k: randomize(v, seed) for k, v in shapes.items()}


# ----------------------------------------------------------------------------- NumPy reference

def conv(x, p, stride=1, groups=1):
  """Conv2d, 'same'-style padding k // 2, on one (H, W, Cin) map; kernel (kh, kw, Cin/g, Cout)."""
  kernel = p["kernel"]
  k, cout = kernel.shape[0], kernel.shape[-1]
  pad = k // 2
  xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  height, width = (x.shape[0] - 1) // stride + 1, (x.shape[1] - 1) // stride + 1
  cin_g, cout_g = x.shape[-1] // groups, cout // groups
  out = np.zeros((height, width, cout))
  for i in range(height):
    for j in range(width):
      patch = xp[i * stride:i * stride + k, j * stride:j * stride + k]
      for g in range(groups):
        w = kernel[..., g * cout_g:(g + 1) * cout_g]
        out[i, j, g * cout_g:(g + 1) * cout_g] = np.einsum(
            "abc,abco->o", patch[..., g * cin_g:(g + 1) * cin_g], w)
  return out + p.get("bias", 0.0)


def batch_norm(x, p, stats):
  return (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * p["scale"] + p["bias"]


def layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def max_pool(x, stride):
  xp = np.pad(x, ((1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  height, width = (x.shape[0] - 1) // stride + 1, (x.shape[1] - 1) // stride + 1
  return np.array([[xp[i * stride:i * stride + 3, j * stride:j * stride + 3].max((0, 1))
                    for j in range(width)] for i in range(height)])


def gelu(x):
  return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def linear(x, p):
  return x @ p["kernel"] + p["bias"]


def attention(q, k, v, heads):
  """softmax(q k^T / sqrt(d)) v per head; q (Nq, C), k and v (Nk, C)."""
  d = q.shape[-1] // heads
  out = np.zeros_like(q)
  for h in range(heads):
    sl = slice(h * d, (h + 1) * d)
    logits = q[:, sl] @ k[:, sl].T * d**-0.5
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    out[:, sl] = weights / weights.sum(-1, keepdims=True) @ v[:, sl]
  return out


def naive_attention_block(x, p, heads):
  """x + dwconv(x); x + g1 * proj(MHSA(LN(x))); x + g2 * Mlp(LN(x)). x (H, W, C)."""
  height, width, dim = x.shape
  x = x + conv(x, p["pos_embed"], groups=dim)
  t = x.reshape(-1, dim)
  qkv = linear(layer_norm(t, p["norm1"]), p["attn"]["qkv"])
  y = linear(attention(qkv[:, :dim], qkv[:, dim:2 * dim], qkv[:, 2 * dim:], heads),
             p["attn"]["proj"])
  t = t + p["ls1"]["gamma"] * y
  y = linear(gelu(linear(layer_norm(t, p["norm2"]), p["mlp"]["fc1"])), p["mlp"]["fc2"])
  return (t + p["ls2"]["gamma"] * y).reshape(height, width, dim)


def naive_local_global_dsm(x, p, s, stride, heads):
  """q = LN(1x1(BN(dw3x3/s(x)))), k, v = kv(LN(x)); proj(MHSA) + 1x1([maxpool](x))."""
  dim_in = x.shape[-1]
  q = conv(batch_norm(conv(x, p["q_dw"], stride, dim_in), p["q_dw_norm"], s["q_dw_norm"]),
           p["q_project"])
  out_shape, dim = q.shape, q.shape[-1]
  q = layer_norm(q.reshape(-1, dim), p["q_norm"])
  kv = linear(layer_norm(x.reshape(-1, dim_in), p["kv_norm"]), p["attn"]["kv"])
  y = linear(attention(q, kv[:, :dim], kv[:, dim:], heads), p["attn"]["proj"])
  shortcut = conv(x if stride == 1 else max_pool(x, stride), p["shortcut"])
  return y.reshape(out_shape) + shortcut


def naive_mbconv(x, p, s):
  shortcut = conv(max_pool(x, 1), p["shortcut"]) if "shortcut" in p else x
  if "expand" in p:
    x = batch_norm(x, p["pre_norm"], s["pre_norm"])
    x = gelu(batch_norm(conv(x, p["expand"]), p["expand_norm"], s["expand_norm"]))
  hidden = x.shape[-1]
  x = gelu(batch_norm(conv(x, p["dw"], groups=hidden), p["dw_norm"], s["dw_norm"]))
  scale = np.maximum(conv(x.mean((0, 1), keepdims=True), p["se"]["fc1"]), 0.0)
  scale = np.clip(conv(scale, p["se"]["fc2"]) + 3.0, 0.0, 6.0) / 6.0
  x = batch_norm(conv(x * scale, p["project"]), p["project_norm"], s["project_norm"])
  return shortcut + x


def naive_local_dsm(x, p, s, stride):
  y = conv(x, p["dw"], stride, x.shape[-1])
  y = conv(batch_norm(y, p["dw_norm"], s["dw_norm"]), p["project"])
  return y + conv(x if stride == 1 else max_pool(x, stride), p["shortcut"])


def check(module, x, naive):
  variables = random_variables(module, x)
  got = np.asarray(jax.jit(lambda v, x: module.apply(v, x))(variables, x))
  np64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
  for b in range(x.shape[0]):
    want = naive(np.asarray(x[b], np.float64), np64["params"], np64.get("batch_stats", {}))
    np.testing.assert_allclose(got[b], want, atol=ATOL)


# ----------------------------------------------------------------------------- blocks vs formulas

X = np.random.default_rng(1).standard_normal((2, 5, 6, 64)).astype(np.float32)


def test_attention_block_matches_naive_formulas():
  check(AttentionBlock(expansion=2, head_dim=32), X,
        lambda x, p, s: naive_attention_block(x, p, heads=2))


@pytest.mark.parametrize("stride", [1, 2])
def test_local_global_dsm_matches_naive_formulas(stride):
  check(LocalGlobalDSM(features=96, stride=stride, head_dim=32), X,
        lambda x, p, s: naive_local_global_dsm(x, p, s, stride, heads=3))


@pytest.mark.parametrize("features,expansion", [(64, 3), (48, 1)])
def test_mbconv_matches_naive_formulas(features, expansion):
  check(MBConvBlock(features=features, expansion=expansion), X[..., :32], naive_mbconv)


def test_local_dsm_matches_naive_formulas():
  check(LocalDSM(features=48, stride=2), X[..., :32],
        lambda x, p, s: naive_local_dsm(x, p, s, stride=2))


# ----------------------------------------------------------------------------- whole model

def test_every_variant_is_registered():
  assert set(VARIANTS) == {n for n in list_models() if n.startswith("uninet_")}
  assert [VARIANTS[f"uninet_b{i}"]["img_size"] for i in range(6)] == [160, 224, 256, 288, 320, 384]


@pytest.mark.parametrize("name,expected", [
    ("uninet_b0", 11_450_864), ("uninet_b1", 11_450_864), ("uninet_b2", 16_211_472),
    ("uninet_b3", 24_020_184), ("uninet_b4", 43_796_288), ("uninet_b5", 72_883_072)])
def test_param_counts_match_the_authors(name, expected):
  """The authors' counts (their comments: 11.451M, 16.211M, 24.02M, 43.796M, 72.883M)."""
  model = create_model(name)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *(model.img_size,) * 2, 3)))
  assert count_params(shapes["params"]) == expected
  assert set(shapes) == {"params", "batch_stats"}


@pytest.mark.parametrize("name,gmacs", [("uninet_b0", 0.555), ("uninet_b1", 1.118)])
def test_macs_within_6_percent_of_the_authors(name, gmacs):
  """We count 0.544 / 1.095 (-2%): fvcore, behind the authors' figures, also counts norms."""
  model = create_model(name)
  shape = (1, model.img_size, model.img_size, 3)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  assert count_macs(model, variables, shape) / 1e9 == pytest.approx(gmacs, rel=0.06)


def test_layout_follows_the_authors_sequence():
  model = create_model("uninet_b0")
  layout = model.layout()
  assert len(layout) == 23 + 5
  assert layout[:4] == [("mbconv", 0), ("local_dsm", 1), ("mbconv", 1), ("mbconv", 1)]
  assert [kind for kind, _ in layout if kind.endswith("dsm")] == ["local_dsm"] * 3 + [
      "local_global_dsm"] * 2
  assert layout[-1] == ("attention", 5)


def test_train_updates_batch_stats_and_shapes():
  model = create_model("uninet_b0", num_classes=5, img_size=(48, 40), repeats=(1, 1, 1, 1, 1, 1),
                       drop_path_rate=0.1, drop_rate=0.1)
  x = jax.random.normal(jax.random.key(0), (2, 48, 40, 3))
  variables = random_variables(model, x)
  rngs = {"dropout": jax.random.key(1)}
  logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, rngs=rngs,
                                                     mutable=["batch_stats"]))(variables, x)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), updates["batch_stats"],
                       variables["batch_stats"])
  assert all(m > 0 for m in jax.tree.leaves(moved))
  eval_logits = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
  assert eval_logits.shape == (2, 5)


def test_settings_errors():
  with pytest.raises(UserError, match="one entry per stage"):
    create_model("uninet_b0", repeats=(1, 2, 4))
  with pytest.raises(UserError, match="not a multiple of head_dim"):
    create_model("uninet_b0", channels=(24, 48, 80, 128, 100, 256))
  model = create_model("uninet_b0")
  with pytest.raises(UserError, match="create it with img_size=224"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))


# ----------------------------------------------------------------------------- converter

_TO_AUTHORS = [  # our module names -> the authors' Sequential indices (inverse of the converter)
    ("stem_conv", "stem.0"), ("stem_norm", "stem.1"), ("final_conv", "head.0"),
    ("final_norm", "head.1"), ("pre_norm", "b1.0"), ("expand_norm", "b1.2"), ("expand", "b1.1"),
    ("dw_norm", "b2.1"), ("project_norm", "b2.5"), ("project", "b2.4"), ("se", "b2.3"),
    ("dw", "b2.0"), ("ls1.gamma", "gamma_1"), ("ls2.gamma", "gamma_2")]
_DSM_TO_AUTHORS = [("q_dw_norm", "q.1"), ("q_dw", "q.0"), ("q_project", "q.2"),
                   ("attn.kv", "kv"), ("attn.proj", "proj"), ("dw_norm", "downsample.1"),
                   ("dw", "downsample.0"), ("project", "downsample.2")]


def authors_state_dict(model, variables):
  """Our variables in the authors' naming and torch layouts."""
  dsms = {j for j, (kind, _) in enumerate(model.layout()) if kind.endswith("dsm")}
  out = {}
  for tree in variables.values():
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      key, leaf = ".".join(k.key for k in path), np.asarray(leaf)
      if key.endswith(".kernel"):
        leaf = leaf.T if leaf.ndim == 2 else leaf.transpose(3, 2, 0, 1)
      key = re.sub(r"\.(kernel|scale)$", ".weight", key)
      key = re.sub(r"\.mean$", ".running_mean", re.sub(r"\.var$", ".running_var", key))
      block = re.match(r"blocks_(\d+)\.", key)
      table = _DSM_TO_AUTHORS if block and int(block.group(1)) in dsms else _TO_AUTHORS
      for ours, theirs in table:
        key = re.sub(rf"(^|\.){re.escape(ours)}\.", rf"\g<1>{theirs}.", key, count=1)
        key = re.sub(rf"\.{re.escape(ours)}$", f".{theirs}", key)
      if block:
        stride1_dsm = int(block.group(1)) in dsms and ".downsample." not in key and (
            model.strides[model.layout()[int(block.group(1))][1]] == 1)
        key = key.replace(".shortcut.", ".residual.0." if stride1_dsm else ".residual.1.")
        key = re.sub(r"^blocks_(\d+)\.", r"blocks.\1.", key)
      out[key] = leaf
  return out


def test_converter_reads_the_authors_naming():
  model = create_model("uninet_b0", repeats=(1, 1, 1, 1, 1, 1))
  x = jnp.zeros((1, 160, 160, 3))
  variables = random_variables(model, x)
  state_dict = authors_state_dict(model, variables)
  for key in ("stem.0.weight", "blocks.0.residual.1.weight", "blocks.0.b2.3.fc1.weight",
              "blocks.2.b1.1.weight", "blocks.1.downsample.2.bias", "blocks.7.q.2.weight",
              "blocks.7.residual.0.weight", "blocks.9.residual.1.weight", "blocks.7.kv.weight",
              "blocks.8.gamma_1", "blocks.8.attn.qkv.weight", "head.1.running_var",
              "classifier.weight"):
    assert key in state_dict, key
  converted = load_pytorch_state_dict("uninet_b0", state_dict, repeats=(1, 1, 1, 1, 1, 1))
  jax.tree.map(np.testing.assert_array_equal, converted, jax.tree.map(np.asarray, variables))
  del state_dict["blocks.8.gamma_2"]
  with pytest.raises(UserError, match=r"missing keys \(1\): blocks\.8\.ls2\.gamma"):
    load_pytorch_state_dict("uninet_b0", state_dict, repeats=(1, 1, 1, 1, 1, 1))
