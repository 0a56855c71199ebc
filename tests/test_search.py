"""Search: space operators under limits, unsatisfiable limits, evolution resume, the Newton-Schulz
nuclear norm against NumPy SVD, DSS against a naive reference (extracted subnet, NumPy SVD), a tiny
end-to-end TF-TAS search.json."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compact_vit import search
from compact_vit.errors import UserError
from compact_vit.models import autoformer
from compact_vit.search import evolution, space as space_lib, tf_tas
from configs import autoformer_common

TINY = dict(patch_size=4, head_dim=4, max_relative_position=1, embed_dims=(8, 12, 16),
            depths=(1, 2), num_heads=(1, 2, 3), mlp_ratios=(2.0, 3.0))


def _tiny_supernet():
  return autoformer.AutoFormerSupernet(num_classes=10, img_size=8, **TINY)


def _valid(arch, space):
  return (arch["embed_dim"] in space.embed_dims and arch["depth"] in space.depths
          and len(arch["num_heads"]) == arch["depth"] == len(arch["mlp_ratios"])
          and set(arch["num_heads"]) <= set(space.num_heads)
          and set(arch["mlp_ratios"]) <= set(space.mlp_ratios))


def test_operators_stay_in_space_and_limits():
  model = _tiny_supernet()
  space, costs = model.space, space_lib.Costs(model)
  limits = space_lib.Limits(min_params_m=0.004, max_params_m=0.006)
  rng = np.random.default_rng(0)
  parents = [space_lib.sample_valid(space, rng, limits, costs) for _ in range(20)]
  assert all(_valid(a, space) and limits.allows(*costs(a)) for a in parents)
  changed = 0
  for a in parents:
    child = space_lib.mutate(a, space, rng, layer_prob=0.2, structure_prob=0.4)
    assert _valid(child, space)
    changed += space_lib.arch_key(child) != space_lib.arch_key(a)
    same_depth = [b for b in parents if b["depth"] == a["depth"]]
    mix = space_lib.crossover(a, same_depth[-1], rng)
    assert _valid(mix, space)
    for i in range(a["depth"]):
      assert mix["num_heads"][i] in (a["num_heads"][i], same_depth[-1]["num_heads"][i])
  assert changed > 5
  assert not limits.allows(*costs(model.largest_arch()))


def test_unsatisfiable_limits_are_a_user_error(tmp_path):
  config = autoformer_common.search_config("t", "tf_tas", "quick")
  config.search.max_params_m = 0.001
  with pytest.raises(UserError, match="cannot be met.*smallest subnet"):
    search.run(config, str(tmp_path))
  assert not os.listdir(tmp_path)  # failed before any work
  model = _tiny_supernet()
  with pytest.raises(UserError, match="largest subnet"):
    space_lib.check_satisfiable(model.space, space_lib.Limits(50.0, 60.0), space_lib.Costs(model))


def test_evolution_resumes_exactly(tmp_path):
  model = _tiny_supernet()
  space, costs = model.space, space_lib.Costs(model)
  cfg = autoformer_common.search_config("t", "autoformer_evolution", "quick").search
  cfg.min_params_m, cfg.max_params_m = 0.0, 0.006
  cfg.population, cfg.select, cfg.mutations, cfg.crossovers, cfg.generations = 8, 3, 3, 3, 3
  limits = space_lib.Limits(cfg.min_params_m, cfg.max_params_m, cfg.max_gmacs)
  fake_score = lambda arch: costs(arch)[0] / 1e5 + arch["num_heads"][0] / 7  # noqa: E731

  whole = evolution.Evolution(cfg, space, costs, limits, fake_score, str(tmp_path / "a.json"))
  whole.run()
  cfg_short = cfg.copy_and_resolve_references()
  cfg_short.generations = 1
  part = evolution.Evolution(cfg_short, space, costs, limits, fake_score, str(tmp_path / "b.json"))
  part.run()
  resumed = evolution.Evolution(cfg, space, costs, limits, fake_score, str(tmp_path / "b.json"))
  assert resumed.generation == 1
  resumed.run()
  assert resumed.scored == whole.scored
  assert all(limits.allows(r["params"], r["gmacs"] * 1e9) for r in whole.scored.values())
  best = max(whole.scored.values(), key=lambda r: r["score"])
  assert best["score"] == max(fake_score(r["arch"]) for r in whole.scored.values())


def _naive_dss(model, params, arch):
  """DSS of the extracted subnet: its own gradients (no masks) and float64 NumPy SVDs."""
  abs_params = jax.tree.map(jnp.abs, params)
  sub, sub_params = autoformer.extract_subnet(model, abs_params, arch)
  x = jnp.ones((1, 8, 8, 3))
  grads = jax.jit(jax.grad(lambda p: sub.apply({"params": p}, x).sum()))(sub_params)
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  nuc = lambda a: np.linalg.svd(f64(a), compute_uv=False).sum()  # noqa: E731
  total = np.sum(np.abs(f64(grads["head"]["kernel"]) * f64(sub_params["head"]["kernel"])))
  for i in range(arch["depth"]):
    g, w = grads[f"blocks_{i}"], sub_params[f"blocks_{i}"]
    total += sum(nuc(g["attn"][n]["kernel"]) * nuc(w["attn"][n]["kernel"]) for n in ("qkv", "proj"))
    total += sum(np.sum(np.abs(f64(g[n]["kernel"]) * f64(w[n]["kernel"]))) for n in ("fc1", "fc2"))
  return total


def test_nuclear_norm_of_low_rank_matrices_against_numpy_svd():
  """Like DSS gradients: numerically low rank (a few large singular values over a tiny tail)."""
  rng = np.random.default_rng(0)
  mats = [rng.normal(size=(m, 4)) @ (rng.normal(size=(4, n)) * [[1.0], [0.3], [0.05], [0.01]])
          + 1e-6 * rng.normal(size=(m, n)) for m, n in ((48, 20), (20, 60), (33, 33))]
  mats.append(np.abs(rng.normal(size=(24, 40))))  # full rank, like |W|
  got = jax.jit(lambda ms: [tf_tas.nuclear_norm(jnp.asarray(m, jnp.float32)) for m in ms])(mats)
  for m, g in zip(mats, got):
    np.testing.assert_allclose(float(g), np.linalg.svd(m, compute_uv=False).sum(), rtol=1e-4)


def test_tiny_tf_tas_search_json_and_dss_against_naive_reference(tmp_path):
  config = autoformer_common.search_config("t", "tf_tas", "quick")
  config.model.update(TINY)
  config.img_size = 8
  config.search.num_candidates = 6
  config.search.chunk = 3
  config.search.min_params_m, config.search.max_params_m = 0.0, 0.006
  result = search.run(config, str(tmp_path))
  with open(tmp_path / "search.json") as f:
    out = json.load(f)
  assert out["method"] == "tf_tas" and len(out["candidates"]) == 6
  scores = [c["score"] for c in out["candidates"]]
  assert out["best"]["score"] == max(scores) == result.best["score"]
  assert len(set(np.round(scores, 4))) == len(scores)
  assert all(c["params"] <= 6_000 for c in out["candidates"])
  assert f"--config.model.depth={out['best']['arch']['depth']}" in out["train_command"]
  # The masked-supernet score equals the naive one of the extracted subnet (same init seed).
  model = autoformer.AutoFormerSupernet(num_classes=10, img_size=8, **TINY)
  params = jax.jit(model.init)(jax.random.key(config.search.init_seed),
                               jnp.zeros((1, 8, 8, 3)))["params"]
  for cand in out["candidates"][:1]:
    np.testing.assert_allclose(cand["score"], _naive_dss(model, params, cand["arch"]), rtol=1e-4)
  # vmap (the default on accelerators) and lax.map (CPU) give the same scores.
  archs = [c["arch"] for c in out["candidates"][:3]]
  by_map = tf_tas.make_scorer(model, params, chunk=2, vectorize=False)(archs)
  by_vmap = tf_tas.make_scorer(model, params, chunk=2, vectorize=True)(archs)
  np.testing.assert_allclose(by_vmap, by_map, rtol=1e-4)


def test_search_scoring_gets_images_where_on_accelerator_is_auto(tmp_path, monkeypatch):
  """On a GPU or TPU, auto turns dataset.on_accelerator on for train.py / eval.py; the searches give
  batch['image'] to the model themselves, so they read the host path's images whatever the backend."""
  from compact_vit import trainer  # pylint: disable=import-outside-toplevel
  config = autoformer_common.search_config("t", "evolution", "quick")
  config.img_size = 8
  config.dataset.data_dir = str(tmp_path)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert trainer.accelerator_inputs(config)[1] is not None  # the steps would resample themselves
  assert config.dataset.on_accelerator is None and trainer.host_dataset(config).on_accelerator is False
  batch = evolution._eval_batches(config, limit=16)[0]  # pylint: disable=protected-access
  assert batch["image"].shape == (config.eval_batch_size, 8, 8, 3)
  assert batch["image"].dtype == np.float32
