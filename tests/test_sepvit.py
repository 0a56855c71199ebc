"""SepViT: each attention variant against a naive NumPy implementation of the formulas, window
padding, shapes, parameter counts and MACs, and the converter's renaming and window-token fitting.

Logits parity with the authors' PyTorch module (liwei109/SepViT) was measured outside the repository
(their code is not vendored): max relative error 4e-7 to 7e-7 for Lite, T, S and B at 224.
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
from compact_vit.models.sepvit import (VARIANTS, SepViTBlock, padding_mask, window_partition,
                                       window_reverse)
from compact_vit.profile import count_macs, count_params

ATOL = 2e-5


def randomize(tree, seed=0):
  """Every leaf random (norm scales near 1), so no parameter is a no-op (win_tokens start at 0)."""
  rng = np.random.default_rng(seed)
  def fill(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if path[-1].key == "scale":
      return 1.0 + 0.1 * noise
    return (0.5 if path[-1].key == "win_tokens" else 0.2) * noise
  return jax.tree_util.tree_map_with_path(fill, tree)


# ----------------------------------------------------------------------------- NumPy reference

def layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def linear(x, p):
  return x @ p["kernel"] + p["bias"]


def gelu(x):
  return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def mhsa(tokens, p, heads):
  """Plain MHSA (no proj) over a list of tokens: (N, C) -> (N, C)."""
  n, dim = tokens.shape
  d = dim // heads
  qkv = linear(tokens, p).reshape(n, 3, heads, d)
  out = np.zeros((n, heads, d))
  for h in range(heads):
    q, k, v = qkv[:, 0, h], qkv[:, 1, h], qkv[:, 2, h]
    for i in range(n):
      out[i, h] = softmax(q[i] @ k.T * d**-0.5) @ v
  return out.reshape(n, dim)


def naive_block(x, p, ws, heads):
  """One SepViT block on one (H, W, C) map, written from the formulas with explicit loops.

  Windows cover the map from the top-left; a window holds only its real positions (no padding
  exists here). DSA: MHSA over [window token] + the window's real tokens, plus the shortcut. PSA:
  Q, K from the window tokens (LN, GELU, linear); at within-window position t, window w attends
  over the windows in which t is real, the values being their DSA outputs at t; plus the
  shortcut. One window covering the map: global MHSA, plus the shortcut. Then proj, residual, MLP.
  """
  height, width, dim = x.shape
  d = dim // heads
  rows, cols = -(-height // ws), -(-width // ws)
  y = np.zeros_like(x)
  if rows * cols == 1:
    t = layer_norm(x.reshape(-1, dim), p["norm1"], 1e-6)
    y = (mhsa(t, p["attn"]["dsa_qkv"], heads) + t).reshape(x.shape)
  else:
    token_out, feats = [], []  # per window: DSA output of its token; {(r, c): DSA output}
    for w in range(rows * cols):
      wr, wc = divmod(w, cols)
      spots = [(r, c) for r in range(ws) for c in range(ws)
               if wr * ws + r < height and wc * ws + c < width]
      tokens = np.stack([p["win_tokens"][0, w, 0]] +
                        [x[wr * ws + r, wc * ws + c] for r, c in spots])
      t = layer_norm(tokens, p["norm1"], 1e-6)
      out = mhsa(t, p["attn"]["dsa_qkv"], heads) + t
      token_out.append(out[0])
      feats.append(dict(zip(spots, out[1:])))
    g = gelu(layer_norm(np.stack(token_out), p["attn"]["win_tokens_norm"], 1e-5))
    qk = linear(g, p["attn"]["psa_qk"]).reshape(-1, 2, heads, d)
    for w in range(rows * cols):
      wr, wc = divmod(w, cols)
      for spot, own in feats[w].items():
        others = [v for v in range(rows * cols) if spot in feats[v]]
        mixed = np.zeros(dim)
        for h in range(heads):
          sl = slice(h * d, (h + 1) * d)
          attn = softmax(np.array([qk[w, 0, h] @ qk[v, 1, h] for v in others]) * d**-0.5)
          mixed[sl] = sum(a * feats[v][spot][sl] for a, v in zip(attn, others))
        y[wr * ws + spot[0], wc * ws + spot[1]] = mixed + own
  x = x + linear(y, p["attn"]["proj"])
  hidden = gelu(linear(layer_norm(x, p["norm2"], 1e-6), p["mlp"]["fc1"]))
  return x + linear(hidden, p["mlp"]["fc2"])


# ----------------------------------------------------------------------------- attention variants

@pytest.mark.parametrize("map_size,ws,kind", [
    ((8, 8), 4, "windowed"),            # DSA + PSA, 2x2 windows, no padding
    ((6, 10), 4, "windowed, padded"),   # 2x3 windows, bottom and right padded
    ((3, 9), 4, "one row, padded"),     # 1x3 windows: a padded row in every window
    ((5, 7), 7, "global"),              # the window covers the map: global MHSA, no tokens
])
def test_block_matches_naive_formulas(map_size, ws, kind):
  dim, heads = 8, 2
  block = SepViTBlock(num_heads=heads, window_size=ws)
  x = np.random.default_rng(1).standard_normal((2, *map_size, dim)).astype(np.float32)
  params = randomize(jax.eval_shape(block.init, jax.random.key(0), x)["params"])
  assert ("win_tokens" in params) == (kind != "global")
  got = np.asarray(jax.jit(block.apply)({"params": params}, x))
  numpy_params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  for b in range(2):
    np.testing.assert_allclose(got[b], naive_block(x[b].astype(np.float64), numpy_params, ws,
                                                   heads), atol=ATOL, err_msg=kind)


def test_window_partition_round_trip_and_mask():
  x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  windows = window_partition(x, 4)
  assert windows.shape == (2, 6, 16, 3)
  np.testing.assert_array_equal(windows[0, 1, 0], x[0, 0, 4])  # window (0, 1), first token
  np.testing.assert_array_equal(window_reverse(windows, 4, 8, 12), x)
  mask = padding_mask((6, 10), 4)
  assert mask.shape == (6, 16)
  assert mask[0].all() and mask.sum() == 60
  assert mask[5].reshape(4, 4)[:2, :2].all() and not mask[5].reshape(4, 4)[2:].any()


# ----------------------------------------------------------------------------- whole model

def test_every_variant_is_registered():
  assert set(VARIANTS) == {n for n in list_models() if n.startswith("sepvit_")}


@pytest.mark.parametrize("name,expected", [
    ("sepvit_lite", 3_661_128), ("sepvit_t", 31_182_856), ("sepvit_s", 46_570_504),
    ("sepvit_b", 82_377_064)])
def test_param_counts_match_the_authors(name, expected):
  """Exactly the authors' module's counts (REFERENCES.md: 3.66M, 31.18M, 46.57M, 82.38M)."""
  model = create_model(name)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert count_params(variables["params"]) == expected
  assert set(variables) == {"params"}


def test_macs_match_the_authors():
  """sepvit_t at 224: 4.52 GMACs by the authors' counter (within 6%; we measure 4.519)."""
  model = create_model("sepvit_t")
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert count_macs(model, variables, (1, 224, 224, 3)) / 1e9 == pytest.approx(4.52, rel=0.01)


def test_block_kinds_follow_the_map_size():
  model = create_model("sepvit_t")
  assert model.stage_sizes == [(56, 56), (28, 28), (14, 14), (7, 7)]
  assert model.window_grids() == [[(8, 8)], [(4, 4), (2, 2)], [(2, 2), (1, 1)] * 3,
                                  [(1, 1), (1, 1)]]
  odd = create_model("sepvit_t", img_size=(200, 260))  # 50x65 -> 8x10 windows of 7, padded
  assert odd.window_grids()[0] == [(8, 10)] and odd.stage_sizes[-1] == (7, 9)


@pytest.mark.parametrize("img_size", [32, (40, 56)])
def test_shapes_train_and_eval_at_any_size(img_size):
  model = create_model("sepvit_lite", num_classes=7, img_size=img_size, drop_path_rate=0.1)
  x = jnp.zeros((2, *((img_size,) * 2 if isinstance(img_size, int) else img_size), 3))
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  logits, variables = jax.eval_shape(lambda x: model.init_with_output(rngs, x), x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs=rngs), variables, x)
  assert out.shape == (2, 7)


def test_small_model_trains_in_bfloat16():
  """bfloat16 compute on float32 parameters, padded windows (9x9 and 3x3 maps), global blocks."""
  model = create_model("sepvit_lite", num_classes=3, img_size=36, depths=(1, 2, 1, 1),
                       window_sizes=((7,), (7, 14), (2,), (7,)), dtype=jnp.bfloat16,
                       drop_path_rate=0.1)
  x = jax.random.normal(jax.random.key(0), (2, 36, 36, 3))
  params = randomize(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
  loss = lambda p: model.apply({"params": p}, x, train=True,
                               rngs={"dropout": jax.random.key(2)}).sum()
  grads = jax.jit(jax.grad(loss))(params)
  assert all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads["blocks_0_0"]["win_tokens"]).max() > 0
  assert "win_tokens" in grads["blocks_2_0"] and "win_tokens" not in grads["blocks_1_1"]


def test_settings_errors():
  with pytest.raises(UserError, match="one entry per stage"):
    create_model("sepvit_t", depths=(1, 2, 6))
  with pytest.raises(UserError, match=r"window_sizes \(7,\) needs 2"):
    create_model("sepvit_t", window_sizes=((7,), (7,), (7, 14) * 3, (7, 7)))
  with pytest.raises(UserError, match="not divisible by num_heads"):
    create_model("sepvit_t", num_heads=(5, 6, 12, 24))
  model = create_model("sepvit_lite", img_size=64)
  with pytest.raises(UserError, match="create it with img_size=32"):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# ----------------------------------------------------------------------------- converter

def authors_state_dict(params):
  """Our variables in the authors' naming and torch layouts (the converter's inverse)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    key = ".".join(k.key for k in path)
    leaf = np.asarray(leaf)
    if key.endswith(".kernel"):
      leaf = leaf.T if leaf.ndim == 2 else leaf.transpose(3, 2, 0, 1)
    key = re.sub(r"\.(kernel|scale)$", ".weight", key)
    key = re.sub(r"^(blocks|patch_embeds|pos_block)_(\d+)(_(\d+))?",
                 lambda m: ".".join(g for g in m.group(1, 2, 4) if g), key)
    key = re.sub(r"^(pos_block\.\d+\.proj)", r"\1.0", key)
    out[key.replace("dsa_qkv", "DSA_qkv").replace("psa_qk", "PSA_qk")] = leaf
  return out


@pytest.fixture(scope="module")
def lite_checkpoint():
  model = create_model("sepvit_lite")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  params = randomize(shapes["params"])
  return params, authors_state_dict(params)


def test_converter_reads_the_authors_naming(lite_checkpoint):
  params, state_dict = lite_checkpoint
  assert "blocks.1.0.attn.DSA_qkv.weight" in state_dict
  assert "pos_block.2.proj.0.weight" in state_dict
  assert state_dict["blocks.0.0.win_tokens"].shape == (1, 64, 1, 32)
  variables = load_pytorch_state_dict("sepvit_lite", state_dict)
  jax.tree.map(np.testing.assert_array_equal, variables["params"], jax.tree.map(np.asarray, params))


def test_converter_fits_window_tokens_to_other_sizes(lite_checkpoint):
  _, state_dict = lite_checkpoint
  # 112: stage maps 28, 14, 7, 4: stage 1 has 4x4 windows, stage 2 2x2 or one; stage 3 global.
  variables = load_pytorch_state_dict("sepvit_lite", state_dict, img_size=112)["params"]
  assert variables["blocks_0_0"]["win_tokens"].shape == (1, 16, 1, 32)
  assert variables["blocks_1_0"]["win_tokens"].shape == (1, 4, 1, 64)
  assert "win_tokens" not in variables["blocks_1_1"]  # 14-window covers the 14x14 map
  assert "win_tokens" not in variables["blocks_2_0"]
  assert "psa_qk" not in variables["blocks_2_0"]["attn"]
  # A constant token grid stays constant when resampled.
  flat = dict(state_dict, **{"blocks.0.0.win_tokens": np.ones((1, 64, 1, 32), np.float32)})
  tokens = load_pytorch_state_dict("sepvit_lite", flat, img_size=112)["params"]["blocks_0_0"]
  np.testing.assert_allclose(tokens["win_tokens"], 1.0, atol=1e-5)
  # Larger than 224: stage 4 becomes windowed, and its PSA weights are not in the checkpoint.
  with pytest.raises(UserError, match=r"missing keys.*3\.0\.win_tokens"):
    load_pytorch_state_dict("sepvit_lite", state_dict, img_size=288)
