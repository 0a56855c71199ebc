"""AutoFormer supernet: one compilation for every subnet, extraction == masked supernet, a naive
NumPy reference of the relative-position attention, analytic params/MACs, the objective."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compact_vit import objectives, profile
from compact_vit.models import autoformer, create_model
from compact_vit.search import space as space_lib

SUPERNET = dict(num_classes=10, img_size=8, patch_size=4, head_dim=4, max_relative_position=1,
                embed_dims=(8, 12, 16), depths=(1, 2), num_heads=(1, 2, 3), mlp_ratios=(2.0, 3.0))


@pytest.fixture(scope="module")
def supernet():
  model = autoformer.AutoFormerSupernet(**SUPERNET)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  # Larger, distinct values than the init (whose head gives ~1e-2 logits).
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda a: a + 0.2 * rng.standard_normal(a.shape, np.float32), params)
  return model, params, x


def test_one_compilation_serves_sampled_subnets_and_extraction_matches(supernet):
  model, params, x = supernet
  apply = jax.jit(lambda p, x, arch: model.apply({"params": p}, x, arch=arch))
  rng = np.random.default_rng(0)
  archs = [space_lib.random_arch(model.space, rng) for _ in range(4)]
  for arch in archs[2:]:
    apply(params, x, autoformer.arch_arrays(arch, model.max_depth))
  for arch in (archs[0], model.largest_arch()):
    masked = apply(params, x, autoformer.arch_arrays(arch, model.max_depth))
    sub, sub_params = autoformer.extract_subnet(model, params, arch)
    standalone = jax.jit(sub.apply)({"params": sub_params}, x)
    scale = float(jnp.abs(standalone).max())
    assert scale > 0.1
    np.testing.assert_allclose(masked, standalone, rtol=0, atol=2e-5 * scale)
    assert profile.count_params(sub_params) == autoformer.count_subnet_params(
        arch, **space_lib.Costs(model).kwargs)
  assert apply._cache_size() == 1  # pylint: disable=protected-access
  # Without `arch` the supernet runs its largest subnet.
  np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, x), masked, atol=1e-5)


def _naive_rel_attention(x, p, heads, head_dim, rel_index):
  """NumPy float64: the authors' formulation with full (T, T, d) relative embeddings."""
  x = np.asarray(x, np.float64)
  f = lambda a: np.asarray(a, np.float64)  # noqa: E731
  b, t, _ = x.shape
  qkv = x @ f(p["qkv"]["kernel"]) + f(p["qkv"]["bias"])
  qkv = qkv.reshape(b, t, heads, head_dim, 3)
  q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
  def emb(tables):  # (T, T, d) embeddings, gathered as the authors
    return f(tables["embeddings_table_v"])[rel_index[0]] + f(tables["embeddings_table_h"])[rel_index[1]]
  rk, rv = emb(p["rel_pos_embed_k"]), emb(p["rel_pos_embed_v"])
  logits = (np.einsum("bihd,bjhd->bhij", q, k) + np.einsum("bihd,ijd->bhij", q, rk)) / np.sqrt(
      head_dim)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  out = np.einsum("bhij,bjhd->bihd", attn, v) + np.einsum("bhij,ijd->bihd", attn, rv)
  return out.reshape(b, t, heads * head_dim) @ f(p["proj"]["kernel"]) + f(p["proj"]["bias"])


def test_relative_position_attention_matches_naive_reference():
  heads, head_dim, grid = 2, 8, (3, 4)
  rel_index = autoformer.relative_position_index(grid, 2)
  attn = autoformer.Attention(heads, head_dim, max_relative_position=2)
  x = jax.random.normal(jax.random.key(0), (2, 13, 24))
  p = jax.jit(attn.init)(jax.random.key(1), x, rel_index)["params"]
  rng = np.random.default_rng(3)
  p = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape, np.float32), p)
  got = jax.jit(attn.apply)({"params": p}, x, rel_index)
  want = _naive_rel_attention(x, p, heads, head_dim, rel_index)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_published_subnets_params_and_macs():
  # Papers / READMEs: AutoFormer T 5.7M (5.8M README) 1.3G, S 22.9M 5.1G, B 53.7M 11G.
  published = {"autoformer_t": (5.8e6, 1.3e9), "autoformer_s": (22.9e6, 5.1e9),
               "autoformer_b": (53.7e6, 11.0e9)}
  for name, (params, macs) in published.items():
    arch = create_model(name).arch
    assert abs(autoformer.count_subnet_params(arch) / params - 1) < 0.03, name
    assert abs(autoformer.count_subnet_macs(arch) / macs - 1) < 0.10, name
  # The analytic counts are the jaxpr counts of the model (checked at a small size).
  model = create_model("tftas_t", img_size=64, num_classes=10)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  kwargs = dict(img_size=64, num_classes=10)
  assert profile.count_params(shapes["params"]) == autoformer.count_subnet_params(
      model.arch, **kwargs)
  assert profile.count_macs(model, shapes, (1, 64, 64, 3)) == autoformer.count_subnet_macs(
      model.arch, **kwargs)


def test_supernet_objective_samples_subnets_from_key(supernet):
  model, params, x = supernet
  seen = set()
  for seed in range(6):
    arch = model.sample_arch(jax.random.key(seed))
    seen.add((int(arch["embed_dim"]), int(arch["depth"])))
    assert int(arch["embed_dim"]) in model.embed_dims and int(arch["depth"]) in model.depths
  assert len(seen) > 1
  ctx = objectives.StepContext(
      model=model, images=x, targets=jax.nn.one_hot(jnp.array([1, 2]), 10),
      rngs={"dropout": jax.random.key(0), "sample": jax.random.key(1)}, key=jax.random.key(5),
      step=jnp.zeros((), jnp.int32), batch_stats=None, distill={"type": "none"}, options={})
  loss, grads, _, metrics = jax.jit(lambda p: objectives.get("autoformer_supernet")(p, ctx))(params)
  assert np.isfinite(float(loss))
  assert int(metrics["subnet_embed_dim"]) in model.embed_dims
  # Channels beyond the sampled embed dim get no gradient (weight entanglement).
  embed = int(metrics["subnet_embed_dim"])
  assert float(jnp.abs(grads["head"]["kernel"][embed:]).max()) == 0.0
  assert float(jnp.abs(grads["head"]["kernel"][:embed]).max()) > 0.0


def test_authors_supernet_checkpoint_converts_to_sliced_subnet(supernet):
  from compact_vit import convert
  from compact_vit.convert.core import _flatten, _torch_key
  model, params, _ = supernet
  state_dict = {}
  for path, value in _flatten({"params": params}).items():
    value = np.asarray(value)
    if path[-1] == "kernel":  # Flax (*k, I, O) -> torch (O, I, *k)
      value = np.transpose(value, (value.ndim - 1, value.ndim - 2, *range(value.ndim - 2)))
    state_dict[_torch_key(path).replace("patch_embed.", "patch_embed_super.")] = value
  arch = {"embed_dim": 12, "depth": 1, "num_heads": [2], "mlp_ratios": [3.0]}
  fields = model.subnet_fields(arch)
  converted = convert.load_pytorch_state_dict("autoformer_t", state_dict, **fields)["params"]
  _, want = autoformer.extract_subnet(model, params, arch)
  jax.tree.map(np.testing.assert_array_equal, converted, jax.tree.map(np.asarray, want))
