"""ViT / DeiT models, the registry and the shared layers (logits parity with timm: test_convert)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compact_vit.errors import UserError
from compact_vit.models import create_model, list_models
from compact_vit.nn.layers import Attention, DropPath, drop_path_rates
from compact_vit.models.vit import VARIANTS
from compact_vit.profile import count_params

# Small configuration for behaviour tests: 4 patch tokens, 2 blocks.
SMALL = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def init(model, batch=2):
  """Random variables (numpy, 0.1 N(0, 1); cheaper than compiling the init) and an input batch."""
  x = jax.random.normal(jax.random.key(1), (batch, *(model.img_size,) * 2, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes), x


def test_registry_lists_every_variant():
  assert set(VARIANTS) <= set(list_models())
  assert list_models() == sorted(list_models())


def test_registry_errors_name_the_choices():
  with pytest.raises(ValueError, match="deit_small_patch16_224"):  # UserError is a ValueError
    create_model("deit_smol_patch16_224")
  with pytest.raises(UserError, match=r"dpeth.*Accepted: .*depth.*drop_path_rate"):
    create_model("deit_small_patch16_224", dpeth=6)
  with pytest.raises(UserError, match="not divisible by num_heads"):
    create_model("deit_small_patch16_224", embed_dim=100)
  with pytest.raises(UserError, match="img_size=100 is not a multiple"):
    create_model("deit_small_patch16_224", img_size=100)
  with pytest.raises(UserError, match="is not a dtype"):
    create_model("deit_small_patch16_224", dtype="bfloat17")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_output_shapes(name):
  model = create_model(name, num_classes=10)
  x = jnp.zeros((2, 224, 224, 3))
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  logits, variables = jax.eval_shape(lambda x: model.init_with_output(rngs, x), x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  train_out = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs=rngs), variables, x)
  if model.distilled:
    assert [o.shape for o in train_out] == [(2, 10), (2, 10)]
  else:
    assert train_out.shape == (2, 10)


@pytest.mark.parametrize("name,expected", [
    ("deit_tiny_patch16_224", 5_717_416), ("deit_small_patch16_224", 22_050_664),
    ("deit_base_patch16_224", 86_567_656), ("deit_tiny_distilled_patch16_224", 5_910_800),
    ("deit_small_distilled_patch16_224", 22_436_432),
    ("deit_base_distilled_patch16_224", 87_338_192)])
def test_param_counts_match_timm(name, expected):
  model = create_model(name)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert count_params(variables["params"]) == expected
  assert set(variables) == {"params"}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))


def test_module_names_follow_timm():
  model = create_model("deit_tiny_distilled_patch16_224", depth=1, img_size=32)
  params = init(model)[0]["params"]
  assert set(params) == {"patch_embed", "cls_token", "dist_token", "pos_embed", "blocks_0",
                         "norm", "head", "head_dist"}
  assert set(params["blocks_0"]) == {"norm1", "attn", "norm2", "mlp"}
  assert params["blocks_0"]["attn"]["qkv"]["kernel"].shape == (192, 576)
  assert params["patch_embed"]["proj"]["kernel"].shape == (16, 16, 3, 192)
  assert params["pos_embed"].shape == (1, 2 + 4, 192)


def test_distilled_train_returns_tuple_and_eval_the_average():
  model = create_model("deit_tiny_distilled_patch16_224", **SMALL)
  variables, x = init(model)
  apply = jax.jit(model.apply, static_argnames="train")
  cls_logits, dist_logits = apply(variables, x, train=True)  # no dropout: no rng needed
  assert cls_logits.shape == dist_logits.shape == (2, 5)
  assert not np.allclose(cls_logits, dist_logits)
  np.testing.assert_allclose(apply(variables, x), (cls_logits + dist_logits) / 2, rtol=1e-6)


def test_dropout_and_drop_path_use_the_dropout_stream():
  model = create_model("deit_tiny_patch16_224", drop_path_rate=0.5, drop_rate=0.5, **SMALL)
  variables, x = init(model, batch=8)
  apply = jax.jit(model.apply, static_argnames="train")
  def train(seed):
    return apply(variables, x, train=True, rngs={"dropout": jax.random.key(seed)})
  np.testing.assert_array_equal(train(0), train(0))
  assert not np.allclose(train(0), train(1))
  eval_logits = apply(variables, x)  # deterministic, needs no rng
  np.testing.assert_array_equal(eval_logits, apply(variables, x, train=False))
  assert not np.allclose(eval_logits, train(0))
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, train=True)


def test_drop_path_is_per_sample_and_rises_linearly():
  x = jnp.ones((512, 3, 4))
  y = DropPath(0.25).apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
  per_sample = np.asarray(y).reshape(512, -1)
  np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / 0.75], rtol=1e-6)
  assert (per_sample == per_sample[:, :1]).all()
  assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.06
  np.testing.assert_array_equal(DropPath(0.25).apply({}, x, train=False), x)
  np.testing.assert_allclose(drop_path_rates(0.1, 12), np.linspace(0, 0.1, 12))


def _naive_attention(params, x, num_heads):
  """Plain numpy multi-head self-attention over all tokens of x (N, C)."""
  qkv = x @ params["qkv"]["kernel"] + params["qkv"]["bias"]
  n, c = x.shape
  q, k, v = qkv.reshape(n, 3, num_heads, c // num_heads).transpose(1, 2, 0, 3)
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(c // num_heads)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = (weights @ v).transpose(1, 0, 2).reshape(n, c)
  return out @ params["proj"]["kernel"] + params["proj"]["bias"]


def test_masked_attention_equals_attention_over_kept_tokens():
  attn = Attention(num_heads=4)
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 9, 32)))
  shapes = jax.eval_shape(attn.init, jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda s: np.random.default_rng(0).standard_normal(s.shape, np.float32),
                        shapes)
  mask = np.array([[1, 1, 0, 1, 0, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0, 1]], bool)
  out = np.asarray(attn.apply({"params": params}, x, mask))
  for b in range(2):
    kept = np.flatnonzero(mask[b])
    np.testing.assert_allclose(out[b, kept], _naive_attention(params, x[b, kept], 4),
                               rtol=1e-5, atol=1e-5)
  # A fully masked row cannot happen: with no kept token each query attends to itself only.
  alone = np.asarray(attn.apply({"params": params}, x, np.zeros((2, 9), bool)))
  for i in range(9):
    np.testing.assert_allclose(alone[0, i], _naive_attention(params, x[0, i:i + 1], 4)[0],
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(attn.apply({"params": params}, x, np.ones((2, 9), bool)),
                             attn.apply({"params": params}, x), rtol=1e-6, atol=1e-6)


def _fake_cudnn(monkeypatch):
  """Pretend to be on a GPU and run jax.nn.dot_product_attention's XLA kernel where our
  `Attention` asks for cuDNN's (which needs an NVIDIA GPU); returns the list of calls."""
  calls = []
  original = jax.nn.dot_product_attention

  def fake(q, k, v, *args, implementation=None, **kwargs):
    calls.append((q.shape, q.dtype, implementation))
    return original(q, k, v, *args, implementation="xla", **kwargs)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  return calls


def test_cudnn_attention_matches_the_naive_reference(monkeypatch):
  # Everything jitted: op by op, bfloat16 on the CPU compiles every operation alone (minutes).
  calls = _fake_cudnn(monkeypatch)
  attn = Attention(num_heads=4, dtype=jnp.bfloat16, implementation="cudnn")
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 9, 32)))
  shapes = jax.eval_shape(attn.init, jax.random.key(1), x)["params"]
  params = jax.tree.map(
      lambda s: 0.3 * np.random.default_rng(0).standard_normal(s.shape, np.float32), shapes)
  calls.clear()
  out = np.asarray(jax.jit(attn.apply)({"params": params}, x), np.float32)
  assert calls == [((2, 9, 4, 8), jnp.bfloat16, "cudnn")]  # (B, N, heads, head_dim) layout
  for b in range(2):  # bfloat16 compute against a float32 reference: 2% of the output scale
    ref = _naive_attention(params, x[b], 4)
    np.testing.assert_allclose(out[b], ref, atol=0.02 * np.abs(ref).max())
  # A whole DeiT with attention='cudnn' takes the same parameters and gives the same logits
  # (up to bfloat16 rounding) as the default, and trains (finite gradients).
  model = create_model("deit_tiny_patch16_224", **dict(SMALL, embed_dim=64), dtype=jnp.bfloat16)
  fused = model.clone(attention="cudnn")
  variables, images = init(model)
  np.testing.assert_allclose(jax.jit(fused.apply)(variables, images),
                             jax.jit(model.apply)(variables, images), atol=0.05)
  grads = jax.jit(jax.grad(lambda p: fused.apply({"params": p}, images, train=True).sum()))(
      variables["params"])
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_cudnn_attention_errors_say_what_to_do(monkeypatch):
  x = np.zeros((1, 4, 32), np.float32)
  attn = Attention(num_heads=4, dtype=jnp.bfloat16, implementation="cudnn")
  with pytest.raises(UserError, match=r"only on NVIDIA GPUs and this backend is cpu.*'xla'"):
    attn.init(jax.random.key(0), x)
  _fake_cudnn(monkeypatch)
  with pytest.raises(UserError, match=r"bfloat16 or float16 compute, not float32"):
    Attention(num_heads=4, implementation="cudnn").init(jax.random.key(0), x)
  with pytest.raises(UserError, match="no key mask"):
    attn.init(jax.random.key(0), x, np.ones((1, 4), bool))
  dropping = Attention(num_heads=4, dtype=jnp.bfloat16, implementation="cudnn",
                       attn_drop_rate=0.1)
  dropping.init(jax.random.key(0), x)  # attention dropout is off at inference
  with pytest.raises(UserError, match="no attention dropout"):
    dropping.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=True)
  with pytest.raises(UserError, match="attention='flash' is not one of"):
    create_model("deit_small_patch16_224", attention="flash")
  with pytest.raises(UserError, match="DynamicViT supports only.*attention='cudnn'"):
    create_model("dynamicvit_deit_s", attention="cudnn")
  create_model("patchmerger_vit_s16", attention="cudnn")  # plain blocks: allowed

  def refuse(*args, **kwargs):
    raise NotImplementedError("Unsupported sequence length Q 4, KV 4.")
  monkeypatch.setattr(jax.nn, "dot_product_attention", refuse)
  with pytest.raises(UserError, match=r"refused these inputs \(Unsupported sequence.*'xla'"):
    attn.init(jax.random.key(0), x)


def test_bfloat16_compute_keeps_float32_params():
  model32 = create_model("deit_tiny_patch16_224", **SMALL)
  model16 = create_model("deit_tiny_patch16_224", dtype=jnp.bfloat16, **SMALL)
  variables, x = init(model16)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  out16, out32 = jax.jit(model16.apply)(variables, x), jax.jit(model32.apply)(variables, x)
  assert out16.dtype == jnp.float32
  assert np.abs(out16 - out32).max() < 0.05 * np.abs(out32).max()


def test_wrong_input_size_is_a_user_error():
  model = create_model("deit_tiny_patch16_224", **SMALL)
  variables, _ = init(model)
  with pytest.raises(UserError, match="img_size=48"):
    model.apply(variables, jnp.zeros((1, 48, 48, 3)))


# One model of each family: the settings checks and the input-size check they all share
# (compact_vit.nn.layers.settings_problems / check_input_size).
FAMILY_MODELS = ("deit_tiny_patch16_224", "dynamicvit_deit_s", "ats_deit_s", "patchmerger_vit_s16",
                 "efficientformer_l1", "efficientformerv2_s0", "sepvit_t", "uninet_b0",
                 "regnety_160", "reformer_vit_ti16", "autoformer_t", "autoformer_supernet_t",
                 "tftas_t", "nasvit_a0", "vit_slim_deit_s", "resnext50_32x4d")


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_every_family_rejects_bad_settings_and_image_sizes_clearly(name):
  with pytest.raises(UserError, match=r"settings: .*num_classes=0 is not positive"):
    create_model(name, num_classes=0)
  with pytest.raises(UserError, match=r"drop_path_rate=1.0 is not in \[0, 1\)"):
    create_model(name, drop_path_rate=1.0)
  with pytest.raises(UserError, match=r"dtype='float33' is not a dtype"):
    create_model(name, dtype="float33")
  model = create_model(name, num_classes=3)
  x = jnp.zeros((1, 64, 96, 3))
  with pytest.raises(UserError, match=r"Input images are \(64, 96\) but the model was built for "
                                      r"img_size=.*create it with img_size=\(64, 96\)"):
    jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                      x))
