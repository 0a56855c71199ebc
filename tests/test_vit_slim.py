"""ViT-Slim: masked model vs DeiT, extraction vs binarised masks, budgets (tiny models, random
weights drawn in NumPy so that no `init` is compiled)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compact_vit.models import create_model
from compact_vit.models import vit_slim

TINY = dict(num_classes=5, img_size=8, patch_size=4, embed_dim=24, depth=3, num_heads=3)
X = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)


def _random_params(model, seed, scale=0.3):
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def masked_params():
  params = _random_params(create_model("vit_slim_masked_deit_s", **TINY), 0)
  params["blocks_1"]["attn"]["zeta"] = np.full((3, 8), -5.0, np.float32)  # every head pruned
  params["blocks_2"]["mlp"]["zeta"] = np.full((96,), -5.0, np.float32)  # every unit pruned
  return params


def test_masked_model_with_unit_masks_equals_deit(masked_params):
  deit = create_model("deit_small_patch16_224", **TINY)
  deit_params = _random_params(deit, 3)
  masked = create_model("vit_slim_masked_deit_s", searched=True, **TINY)
  unit = jax.tree_util.tree_map_with_path(  # every mask 1 (searched=True uses ζ as given)
      lambda path, a: np.ones_like(a) if "zeta" in str(path[-1]) else a, masked_params)
  params = vit_slim.merge_pretrained(unit, deit_params)
  assert not np.allclose(params["blocks_0"]["attn"]["qkv"]["kernel"],
                         masked_params["blocks_0"]["attn"]["qkv"]["kernel"])  # DeiT's merged in
  np.testing.assert_allclose(jax.jit(masked.apply)({"params": params}, X),
                             jax.jit(deit.apply)({"params": deit_params}, X), atol=1e-5)


def test_binarize_keeps_budget_and_nested_tokens(masked_params):
  binary = vit_slim.binarize_masks(masked_params, 0.5, 0.6, 0.7)
  z = vit_slim.mask_values(masked_params)
  kept_attn = sum(binary[f"blocks_{i}"]["attn"]["zeta"].sum() for i in range(3))
  assert abs(kept_attn / sum(v.size for v in z["attn"]) - 0.5) < 0.05
  tokens = np.stack([binary[f"blocks_{i}"]["patch_zeta"] for i in range(3)])
  assert np.all(tokens[:-1] >= tokens[1:])  # a token kept in layer l+1 is kept in layer l
  assert np.all(tokens[:, 0] == 1)  # the class token
  assert tokens.sum() < tokens.size  # something was pruned


def test_extracted_equals_binarised_masked_model(masked_params):
  binary = vit_slim.binarize_masks(masked_params, 0.6, 0.5, 0.8)
  reference = jax.jit(create_model("vit_slim_masked_deit_s", searched=True, **TINY).apply)(
      {"params": binary}, X)
  slim_params, dims = vit_slim.extract(binary)
  assert sum(dims["head_dims"][1]) == 0 and dims["mlp_hidden"][2] == 0
  assert len(set(dims["head_dims"][0])) > 1  # uneven head widths
  slim = create_model("vit_slim_deit_s", **TINY, **dims)
  np.testing.assert_allclose(jax.jit(slim.apply)({"params": slim_params}, X), reference,
                             atol=1e-5)
  masked_size = sum(np.size(a) for a in jax.tree.leaves(binary))
  assert sum(np.size(a) for a in jax.tree.leaves(slim_params)) < 0.7 * masked_size
