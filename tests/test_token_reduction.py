"""Token reduction (DynamicViT, ATS, PatchMerger) on tiny models: all-keep equals the dense ViT,
masked training path equals gathered inference path, one compilation across images, finite
forward/backward at aggressive ratios and degenerate policies (float32 and bfloat16), ATS
unique/sampling and the merger against naive NumPy, the DynamicViT objective with a teacher,
timm DeiT weights into the three families, and DynamicViT's pruned inference from an
authors'-layout checkpoint against a naive PyTorch model.

Tolerances (float32): paths that differ only by DynamicViT's policy eps (1e-6) 2e-5 absolute on
logits of magnitude ~1; exact-math comparisons 1e-5.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compact_vit import objectives
from compact_vit.models import create_model
from compact_vit.models.ats import inverse_transform_sample
from compact_vit.nn import tokens as tok

# 16 patches (+ class token), 3 blocks; DynamicViT prunes before blocks 1 and 2.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
DYN = dict(TINY, pruning_loc=(1, 2))
ATOL = 2e-5


def _variables(model, x, scale=0.3):
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _images(batch=3, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, 32, 32, 3))


def _train_fn(model):
  """jit((variables, x, decisions) -> (logits, intermediates)) of the training path."""
  def run(variables, x, decisions=None):
    logits, state = model.apply(variables, x, train=True, mutable=["intermediates"],
                                rngs={"sample": jax.random.key(2), "dropout": jax.random.key(3)},
                                decisions=decisions)
    return logits, state["intermediates"]
  return jax.jit(run)


def _eval_fn(model, **kwargs):
  return jax.jit(lambda v, x, **kw: model.apply(v, x, **kwargs, **kw))


def _nested_decisions(model, batch, seed=0):
  """Random nested keep decisions keeping exactly num_kept(s) patches at stage s."""
  rng = np.random.default_rng(seed)
  n = model.grid_size[0] * model.grid_size[1]
  out, kept = [], [rng.permutation(n) for _ in range(batch)]
  for s in range(len(model.pruning_loc)):
    kept = [rng.permutation(k)[:model.num_kept(s)] for k in kept]
    d = np.zeros((batch, n), np.float32)
    for b, k in enumerate(kept):
      d[b, k] = 1
    out.append(jnp.asarray(d))
  return out


@pytest.fixture(scope="module")
def dyn():
  """DynamicViT (keep 0.6: 9, then 5 of 16 patches), variables, images, jitted paths."""
  model = create_model("dynamicvit_deit_s", keep_ratio=0.6, **DYN)
  x = _images()
  return dict(model=model, x=x, variables=_variables(model, x), train=_train_fn(model),
              eval=_eval_fn(model), eval_inter=_eval_fn(model, mutable=["intermediates"]))


def test_dynamicvit_all_keep_equals_dense_vit(dyn):
  dense = create_model("deit_small_patch16_224", **TINY)
  x, variables = dyn["x"], dyn["variables"]
  dense_vars = {"params": {k: v for k, v in variables["params"].items()
                           if not k.startswith("score_predictor")}}
  want = _eval_fn(dense)(dense_vars, x)
  logits, inter = dyn["train"](variables, x, [jnp.ones((3, 16))] * 2)
  np.testing.assert_allclose(logits, want, atol=ATOL)  # policy path, all kept
  assert all(float(k.min()) == 1.0 for k in inter["keep_decisions"])
  # (inference with keep_ratio=1 against timm: test_timm_deit_weights_load_into_all_three_families)


def test_dynamicvit_masked_training_path_equals_gathered_inference_path(dyn):
  model, x, variables = dyn["model"], dyn["x"], dyn["variables"]
  decisions = _nested_decisions(model, 3)
  logits_train, inter = dyn["train"](variables, x, decisions)
  logits_eval, state = dyn["eval_inter"](variables, x, decisions=decisions)
  np.testing.assert_allclose(logits_train, logits_eval, atol=ATOL)
  kept = np.asarray(state["intermediates"]["kept_positions"][-1])
  for b in range(3):  # the gathered patches are exactly the decided ones
    assert set(kept[b]) == set(np.flatnonzero(decisions[-1][b]))
  np.testing.assert_array_equal(inter["keep_decisions"][-1], decisions[-1])
  assert [model.num_kept(s) for s in range(2)] == [9, 5]  # int(16·0.6^s)
  assert not np.allclose(logits_eval, dyn["eval"](variables, x), atol=1e-3)  # decisions matter


def test_dynamicvit_one_compilation_serves_different_images(dyn):
  outs = [dyn["eval"](dyn["variables"], _images(seed=s)) for s in range(3)]
  assert dyn["eval"]._cache_size() == 1  # pylint: disable=protected-access
  assert not np.allclose(outs[0], outs[1])


def test_dynamicvit_forward_backward_finite_at_aggressive_and_degenerate_policies(dyn):
  """bfloat16 at ρ = 0.3 (inference keeps int(16·0.3²) = 1 patch), policies that keep nothing
  or one patch (the predictor's global mean over an empty policy, DynamicViT#6); float32 forward
  on the same policies. The float32 Gumbel path at ρ = 0.3 with its gradients runs in
  test_dynamicvit_objective_with_a_teacher."""
  degenerate = ([jnp.zeros((3, 16))] * 2, [jnp.zeros((3, 16)).at[:, 0].set(1.0)] * 2)
  for decisions in degenerate:
    logits, inter = dyn["train"](dyn["variables"], dyn["x"], decisions)
    assert np.all(np.isfinite(logits)) and np.all(np.isfinite(inter["features"][0][:, 1:]))
  model = create_model("dynamicvit_deit_s", keep_ratio=0.3, dtype=jnp.bfloat16, **DYN)
  x = _images()
  variables = _variables(model, x)

  @jax.jit
  def run(params, decisions):
    def loss(params):
      logits, state = model.apply({"params": params}, x, train=True, decisions=decisions,
                                  mutable=["intermediates"], rngs={"dropout": jax.random.key(0)})
      tokens = state["intermediates"]["features"][0][:, 1:].astype(jnp.float32)
      return jnp.sum(logits ** 2) + jnp.sum(tokens ** 2)
    return jax.value_and_grad(loss)(params), model.apply({"params": params}, x)

  for decisions in degenerate:
    (value, grads), logits = run(variables["params"], decisions)
    assert np.isfinite(float(value)) and np.all(np.isfinite(logits))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert run._cache_size() == 1  # pylint: disable=protected-access


def test_policy_softmax_renormalises_over_kept_keys_with_self_connection():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 1, 5, 5)).astype(np.float32) * 3
  policy = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], np.float32)
  weights = jax.jit(lambda a, p: (tok.attention_weights(a, policy=p),
                                  tok.attention_weights(a, key_mask=p > 0)))
  got, masked = map(np.asarray, weights(logits, policy))
  for b in range(2):
    for q in range(5):
      keep = policy[b].astype(bool).copy()
      keep[q] = True  # self-connection
      e = np.exp(logits[b, 0, q] - logits[b, 0, q].max()) * keep
      np.testing.assert_allclose(got[b, 0, q], (e + 1e-6 / 5) / (e.sum() + 1e-6), rtol=1e-5)
      np.testing.assert_allclose(masked[b, 0, q], e / e.sum(), rtol=1e-5, atol=1e-7)


def test_masked_mean_and_gather_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 3)).astype(np.float32)
  w = np.array([[1, 0, 1, 1, 0, 0], [0] * 6], np.float32)
  got = np.asarray(jax.jit(tok.masked_mean)(x, w))
  np.testing.assert_allclose(got[0, 0], x[0, [0, 2, 3]].mean(0), atol=1e-6)
  np.testing.assert_array_equal(got[1, 0], 0.0)  # all-zero policy: 0, not NaN
  index = np.array([[5, 0], [2, 2]])
  np.testing.assert_array_equal(jax.jit(tok.gather_tokens)(x, index),
                                x[np.arange(2)[:, None], index])


def test_unique_fixed_matches_numpy_unique():
  rng = np.random.default_rng(0)
  index = rng.integers(0, 7, size=(20, 9))
  values, valid = map(np.asarray, jax.jit(tok.unique_fixed, static_argnums=1)(index, 7))
  for row, v, ok in zip(index, values, valid):
    want = np.unique(row)
    np.testing.assert_array_equal(v[ok], want)
    assert ok.sum() == len(want) and np.all(v[~ok] == 7) and np.all(ok[:len(want)])


def numpy_ats_sample(significance, num_samples):
  """The authors' inverse transform sampling with loops, float64: sort, min-max normalised CDF,
  points from the first positive CDF value to 1, nearest CDF entry each, distinct picks."""
  out = []
  for s in np.asarray(significance, np.float64):
    s = s / s.sum()
    order = np.argsort(s, kind="stable")
    cdf = np.cumsum(s[order])
    cdf = (cdf - cdf.min()) / (cdf.max() - cdf.min())
    start = cdf[cdf > 0].min()
    ys = [start + t * (1 - start) / (num_samples - 1) for t in range(num_samples)]
    picks = sorted({int(np.argmin(np.abs(y - cdf))) for y in ys})
    out.append(set(order[picks].tolist()))
  return out


def test_ats_inverse_transform_sampling_matches_numpy():
  rng = np.random.default_rng(0)
  significance = rng.gamma(0.3, size=(16, 20)).astype(np.float32)  # peaked: many duplicates
  sample = jax.jit(inverse_transform_sample, static_argnums=1)
  index, valid = map(np.asarray, sample(significance, 10))
  want = numpy_ats_sample(significance, 10)
  counts = []
  for b in range(16):
    assert set(index[b][valid[b]].tolist()) == want[b]
    counts.append(valid[b].sum())
  assert min(counts) < 10  # duplicates were masked on some rows
  degenerate = sample(np.zeros((16, 20), np.float32), 10)[1][0]
  assert int(np.sum(degenerate)) == 1  # all-zero significance keeps one token, no NaN


def test_ats_keeps_class_token_finite_in_bfloat16_with_one_compilation():
  model = create_model("ats_deit_s", ats_blocks=(1, 2), num_tokens=(12, 7),
                       dtype=jnp.bfloat16, **TINY)
  x = _images()
  variables = _variables(model, x)

  run = _eval_fn(model, mutable=["intermediates"])
  logits, state = run(variables, x)
  other, _ = run(variables, _images(seed=5))
  assert run._cache_size() == 1  # pylint: disable=protected-access
  assert not np.allclose(logits, other)
  inter = state["intermediates"]
  positions, valid = inter["kept_positions"], inter["kept_valid"]
  assert positions[-1].shape == (3, 7) and np.all(positions[-1][:, 0] == 0)
  assert np.all(np.asarray(valid[1]).sum(1) <= np.asarray(valid[0]).sum(1))
  for b in range(3):  # valid kept patches are distinct
    p = np.asarray(positions[-1][b])[np.asarray(valid[-1][b])]
    assert len(set(p.tolist())) == len(p)
  assert np.all(np.isfinite(logits))


def test_patch_merger_matches_numpy_and_halves_the_tokens():
  model = create_model("patchmerger_vit_s16", num_merged_tokens=3, merge_after=2, **TINY)
  x = _images()
  variables = _variables(model, x)
  logits, inter = _eval_fn(model, capture_intermediates=True)(variables, x)
  tokens_in = np.asarray(inter["intermediates"]["blocks_1"]["__call__"][0])[:, 1:]
  merged = np.asarray(inter["intermediates"]["patch_merger"]["__call__"][0])
  p = variables["params"]["patch_merger"]
  mu, var = tokens_in.mean(-1, keepdims=True), tokens_in.var(-1, keepdims=True)
  normed = (tokens_in - mu) / np.sqrt(var + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
  a = np.einsum("mc,bnc->bmn", p["queries"], normed)
  a = np.exp(a - a.max(-1, keepdims=True))
  want = np.einsum("bmn,bnc->bmc", a / a.sum(-1, keepdims=True), tokens_in)
  np.testing.assert_allclose(merged, want, atol=1e-5)
  assert logits.shape == (3, 5)
  assert np.asarray(inter["intermediates"]["blocks_2"]["__call__"][0]).shape[1] == 4  # cls + 3


def test_dynamicvit_objective_with_a_teacher():
  """The `dynamicvit` objective (Gumbel decisions, ρ = 0.3, float32) with a dense teacher."""
  model = create_model("dynamicvit_deit_s", keep_ratio=0.3, **DYN)
  teacher = create_model("deit_small_patch16_224", **TINY)
  x = _images(batch=4)
  variables = _variables(model, x)
  teacher_vars = _variables(teacher, x)

  @jax.jit
  def step(params, teacher_vars):
    ctx = objectives.StepContext(
        model=model, images=x, targets=jax.nn.one_hot(jnp.arange(4) % 5, 5),
        rngs={"dropout": jax.random.key(0), "sample": jax.random.key(1)}, key=jax.random.key(2),
        step=jnp.zeros((), jnp.int32), batch_stats=None, distill={"type": "soft"}, options={},
        teacher=teacher, teacher_vars=teacher_vars)
    return objectives.get("dynamicvit")(params, ctx)

  loss, grads, _, metrics = step(variables["params"], teacher_vars)
  parts = {k: float(v) for k, v in metrics.items()}
  want = parts["cls_loss"] + 2.0 * parts["ratio_loss"] + 0.5 * (parts["kl_loss"]
                                                                 + parts["token_loss"])
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert parts["token_loss"] > 0 and parts["kl_loss"] > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  predictor_grad = grads["score_predictor_0"]["out_conv_4"]["kernel"]
  assert np.any(np.asarray(predictor_grad) != 0)  # the ratio loss trains the predictors


def _timm_tiny_deit():
  """timm's DeiT with TINY's shape, eval mode."""
  import timm  # pylint: disable=import-outside-toplevel
  return timm.create_model("deit_small_patch16_224", pretrained=False, **TINY).eval()


def test_timm_deit_weights_load_into_all_three_families():
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  from compact_vit.convert import load_pytorch_state_dict
  ref = _timm_tiny_deit()
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  x = np.array(_images())
  with torch.no_grad():
    want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  for name, extra in [("dynamicvit_deit_s", dict(pruning_loc=(1, 2), keep_ratio=1.0)),
                      ("ats_deit_s", dict(ats_blocks=(2,), num_tokens=(17,))),
                      ("patchmerger_vit_s16", dict(merge_after=2))]:
    overrides = dict(TINY, **extra)
    variables = load_pytorch_state_dict(name, sd, **overrides)
    if name == "dynamicvit_deit_s":  # keeps everything: the dense DeiT's logits
      logits = _eval_fn(create_model(name, **overrides))(variables, x)
      np.testing.assert_allclose(logits, want, atol=1e-5)
    torch_names = {k: re.sub(r"_(\d+)$", r".\1", k) for k in variables["params"]}
    fresh = {k for k, t in torch_names.items()
             if not any(key == t or key.startswith(t + ".") for key in sd)}
    assert fresh == {"ats_deit_s": set(), "patchmerger_vit_s16": {"patch_merger"},
                     "dynamicvit_deit_s": {"score_predictor_0", "score_predictor_1"}}[name]
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(variables))


def _torch_dynamicvit(vit, predictors, images, keep_counts, pruning_loc):
  """Naive PyTorch DynamicViT inference as the paper describes it: timm's DeiT blocks; before
  block pruning_loc[s] a predictor (LayerNorm eps 1e-5, Linear-GELU, local half | mean of the
  global half over the tokens, Linear-GELU, Linear-GELU, Linear, log-softmax) scores the patches,
  and the keep_counts[s] best (argsort of the keep log-probability) stay, behind the class token."""
  import torch  # pylint: disable=import-outside-toplevel
  f = torch.nn.functional

  def predict(w, x):
    dim = x.shape[-1]
    x = f.layer_norm(x, (dim,), w["in_conv.0.weight"], w["in_conv.0.bias"], eps=1e-5)
    x = f.gelu(f.linear(x, w["in_conv.1.weight"], w["in_conv.1.bias"]))
    local, rest = x[..., :dim // 2], x[..., dim // 2:]
    x = torch.cat([local, rest.mean(dim=1, keepdim=True).expand_as(rest)], dim=-1)
    for j in (0, 2):
      x = f.gelu(f.linear(x, w[f"out_conv.{j}.weight"], w[f"out_conv.{j}.bias"]))
    return f.log_softmax(f.linear(x, w["out_conv.4.weight"], w["out_conv.4.bias"]), dim=-1)

  x = vit._pos_embed(vit.patch_embed(images))  # pylint: disable=protected-access
  for i, block in enumerate(vit.blocks):
    if i in pruning_loc:
      s = pruning_loc.index(i)
      score = predict(predictors[s], x[:, 1:])[..., 0]
      keep = torch.argsort(score, dim=1, descending=True)[:, :keep_counts[s]]
      patches = torch.gather(x[:, 1:], 1, keep[..., None].expand(-1, -1, x.shape[-1]))
      x = torch.cat([x[:, :1], patches], dim=1)
    x = block(x)
  return vit.head(vit.norm(x)[:, 0])


def test_dynamicvit_pruned_inference_matches_a_pytorch_reference_in_the_authors_layout():
  """An authors'-layout checkpoint (timm DeiT keys + `score_predictor.{s}.in_conv.{0,1}` /
  `out_conv.{0,2,4}`) loads through load_pytorch_state_dict, and the pruned inference (ranking,
  gather, kept counts 9 and 5 of 16) gives the naive PyTorch model's logits within 1e-5."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  from compact_vit.convert import load_pytorch_state_dict
  torch.manual_seed(0)
  vit = _timm_tiny_deit()
  with torch.no_grad():
    for p in vit.parameters():
      p.add_(0.2 * torch.randn_like(p))
  shapes = {"in_conv.0": (32,), "in_conv.1": (32, 32), "out_conv.0": (16, 32),
            "out_conv.2": (8, 16), "out_conv.4": (2, 8)}
  predictors = [{f"{k}.{leaf}": 0.3 * torch.randn(shape if leaf == "weight" else shape[:1])
                 + (1.0 if k == "in_conv.0" and leaf == "weight" else 0.0)
                 for k, shape in shapes.items() for leaf in ("weight", "bias")} for _ in range(2)]
  state_dict = {k: v.numpy() for k, v in vit.state_dict().items()}
  state_dict.update({f"score_predictor.{s}.{k}": v.numpy()
                     for s, w in enumerate(predictors) for k, v in w.items()})
  x = np.array(_images(batch=4, seed=5))
  with torch.no_grad():
    want = _torch_dynamicvit(vit, predictors, torch.from_numpy(x).permute(0, 3, 1, 2), (9, 5),
                             (1, 2)).numpy()
  overrides = dict(DYN, keep_ratio=0.6)
  variables = load_pytorch_state_dict("dynamicvit_deit_s", state_dict, **overrides)
  got = _eval_fn(create_model("dynamicvit_deit_s", **overrides))(variables, x)
  np.testing.assert_allclose(got, want, atol=1e-5)
  with torch.no_grad():  # the pruning changed the answer, so the comparison above means something
    assert not np.allclose(vit(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy(), want, atol=1e-3)
