"""Reformer: LSH attention against dense attention and a naive NumPy reference, reversible gradients
against ordinary backprop (dropout and drop path included), memory independent of depth, one
compilation across batches, model shapes and parameter counts, and a train step through the trainer.

Tolerances (float32): LSH vs NumPy (float64) and vs dense attention 2e-5 absolute; reversible vs
ordinary gradients 1e-4 of each leaf's largest magnitude (the inversion X = Y - F(...) rounds in
float32; measured errors are about 3e-6).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compact_vit import trainer
from compact_vit.errors import UserError
from compact_vit.models import create_model, reformer
from compact_vit.nn import lsh_attention as lsh
from compact_vit.nn.reversible import chunked_feed_forward, reversible_stack
from compact_vit.profile import count_params

ATOL = 2e-5
GRAD_RTOL = 1e-4


def _normal(rng, shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _max_rel_error(a, b):
  errs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-12)),
                      a, b)
  return max(jax.tree.leaves(errs))


# ----------------------------------------------------------------------------- LSH attention

def numpy_lsh(qk, v, rotations, factors, chunk_len, mask):
  """Reformer LSH attention with explicit loops, float64: hash every round, list the (round,
  position) pairs sorted by (round, bucket, position), cut the list into chunks, let each query see
  its chunk and the previous one (cyclically), unit-length keys, −1e5 on its own position, masked
  keys excluded, then weight the rounds by softmax over their log-normalisers."""
  qk, v = np.asarray(qk, np.float64), np.asarray(v, np.float64)
  rotations = np.asarray(rotations, np.float64)
  batch, heads, length, _ = qk.shape
  padded = -(-length // chunk_len) * chunk_len
  n_hashes, n_buckets = rotations.shape[2], math.prod(factors)
  out = np.zeros(v.shape)
  for b in range(batch):
    valid = np.zeros(padded, bool)
    valid[:length] = mask[b]
    for h in range(heads):
      q = np.zeros((padded, qk.shape[-1]))
      q[:length] = qk[b, h]
      vals = np.zeros((padded, v.shape[-1]))
      vals[:length] = v[b, h]
      order = []
      for r in range(n_hashes):
        rotated = q @ rotations[h, :, r, :]
        bucket, radix, offset = np.zeros(padded, int), 1, 0
        for factor in factors:
          part = rotated[:, offset:offset + factor // 2]
          bucket += radix * np.argmax(np.concatenate([part, -part], 1), 1)
          radix, offset = radix * factor, offset + factor // 2
        bucket[~valid] = n_buckets
        order += [(r, p) for p in sorted(range(padded), key=lambda p: (bucket[p], p))]
      chunks = [order[i:i + chunk_len] for i in range(0, len(order), chunk_len)]
      round_out = np.zeros((n_hashes, padded, v.shape[-1]))
      round_lse = np.zeros((n_hashes, padded))
      for c, chunk in enumerate(chunks):
        window = [p for _, p in chunks[c - 1] + chunk]
        for r, i in chunk:
          logits = []
          for j in window:
            logit = q[i] @ q[j] / max(np.linalg.norm(q[j]), 1e-12)
            if j == i:
              logit -= 1e5
            elif not valid[j]:
              logit = -np.inf
            logits.append(logit)
          logits = np.array(logits)
          lse = logits.max() + np.log(np.sum(np.exp(logits - logits.max())))
          round_out[r, i] = np.exp(logits - lse) @ vals[window]
          round_lse[r, i] = lse
      weights = np.exp(round_lse - round_lse.max(0))
      weights /= weights.sum(0)
      out[b, h] = np.sum(weights[..., None] * round_out, 0)[:length]
  return out


@pytest.mark.parametrize("n_hashes,factors", [(1, (6,)), (3, (4, 2))])
def test_lsh_matches_numpy_reference_with_fixed_rotations(n_hashes, factors):
  rng = np.random.default_rng(n_hashes)
  qk, v = _normal(rng, (2, 2, 37, 8)), _normal(rng, (2, 2, 37, 6))  # 37 tokens: padded to 40
  mask = rng.random((2, 37)) > 0.2
  rotations = lsh.random_rotations(jax.random.key(n_hashes), 2, 8, n_hashes, factors)
  attend = jax.jit(functools.partial(lsh.lsh_self_attention, chunk_len=8, factors=factors))
  out, buckets = attend(qk, v, rotations=rotations, mask=jnp.asarray(mask))
  assert buckets.shape == (2, 2, n_hashes, 40)
  np.testing.assert_allclose(out, numpy_lsh(qk, v, rotations, factors, 8, mask), atol=ATOL)
  # Given the buckets instead of rotations (the reversible backward pass), the output is the same.
  again, _ = attend(qk, v, buckets=buckets, mask=jnp.asarray(mask))
  np.testing.assert_array_equal(again, out)


def test_lsh_with_one_bucket_equals_dense_shared_qk_attention(n_hashes=2):
  """One bucket and one chunk per round: every query sees every key (the look-back chunk repeats
  keys, which leaves the softmax unchanged), so LSH attention is dense attention, gradients too."""
  rng = np.random.default_rng(0)
  qk, v = _normal(rng, (2, 3, 29, 8)), _normal(rng, (2, 3, 29, 8))
  mask = jnp.asarray(rng.random((2, 29)) > 0.3)
  rotations = jnp.zeros((3, 8, n_hashes, 0))
  lsh_fn = lambda qk, v: lsh.lsh_self_attention(qk, v, chunk_len=32, factors=(1,),
                                                rotations=rotations, mask=mask)[0]
  dense_fn = lambda qk, v: lsh.dense_shared_qk_attention(qk, v, mask=mask)
  np.testing.assert_allclose(lsh_fn(qk, v), dense_fn(qk, v), atol=ATOL)
  cotangent = _normal(rng, v.shape)
  grads = [jax.jit(jax.grad(lambda a, b: jnp.sum(fn(a, b) * cotangent), (0, 1)))(qk, v)
           for fn in (lsh_fn, dense_fn)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_lsh_attends_to_self_only_when_nothing_else_is_available():
  qk = _normal(np.random.default_rng(0), (1, 1, 4, 8))
  v = jnp.eye(4)[None, None]
  mask = jnp.array([[True, False, False, False]])  # only token 0 may be attended to
  out = lsh.dense_shared_qk_attention(qk, v, mask=mask)
  np.testing.assert_allclose(out[0, 0, :, 0], 1.0, atol=1e-6)  # all attend to token 0 ...
  out, _ = lsh.lsh_self_attention(qk, v, chunk_len=4, factors=(1,),
                                  rotations=jnp.zeros((1, 8, 1, 0)), mask=mask)
  np.testing.assert_allclose(out[0, 0, :, 0], 1.0, atol=1e-6)  # ... token 0 too: nothing else
  assert bool(jnp.all(jnp.isfinite(out)))


def test_bucket_factors_follow_trax():
  assert lsh.bucket_factors(197, 64) == (8,)
  assert lsh.bucket_factors(4097, 64) == (16, 8)  # 130 buckets -> factorised to 16 x 8
  assert lsh.bucket_factors(100, 64, n_buckets=1) == (1,)
  with pytest.raises(ValueError):
    lsh.bucket_factors(100, 64, n_buckets=3)


# ----------------------------------------------------------------------------- reversible stack

def _toy_branch(scale):
  """A branch with dropout from its context key and an integer `saved` value (like LSH buckets)."""
  def branch(params, x, ctx, saved):
    h = jnp.tanh(x @ params["w"] + params["b"]) * scale
    keep = jax.random.bernoulli(jax.random.fold_in(ctx["key"], int(scale * 10)), 0.8, h.shape)
    h = jnp.where(keep, h / 0.8, 0.0) * ctx["rate"]
    if saved is None:
      saved = jnp.argsort(x[..., 0], axis=-1)
    return h + jnp.take_along_axis(h, saved[..., None], axis=1), saved
  return branch


def test_reversible_stack_gradients_equal_ordinary_backprop():
  rng = np.random.default_rng(0)
  depth, dim = 5, 6
  params = [{"w": _normal(rng, (depth, dim, dim)) * 0.5, "b": _normal(rng, (depth, dim))}
            for _ in range(2)]
  context = {"key": jax.random.split(jax.random.key(0), depth),
             "rate": jnp.linspace(1.0, 0.5, depth)}
  x1, x2 = _normal(rng, (3, 4, dim)), _normal(rng, (3, 4, dim))
  f, g = _toy_branch(1.0), _toy_branch(0.7)

  def loss(params, x1, x2, memory_efficient):
    y1, y2 = reversible_stack(f, g, params[0], params[1], x1, x2, context,
                              memory_efficient=memory_efficient)
    return jnp.sum(jnp.sin(y1) * y2)

  grad = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)
  assert _max_rel_error(grad(params, x1, x2, True), grad(params, x1, x2, False)) < GRAD_RTOL


def test_chunked_feed_forward_equals_one_call():
  rng = np.random.default_rng(0)
  x, w = _normal(rng, (2, 11, 4)), _normal(rng, (4, 5))
  fn = lambda chunk, key: jnp.tanh(chunk @ w)
  np.testing.assert_allclose(chunked_feed_forward(fn, x, 3), fn(x, None), atol=1e-6)
  grads = [jax.grad(lambda x: jnp.sum(chunked_feed_forward(fn, x, n) ** 2))(x) for n in (3, 0)]
  np.testing.assert_allclose(grads[0], grads[1], atol=1e-6)


def _temp_bytes(depth, reversible, attention="lsh"):
  model = _tiny_model(depth=depth, reversible=reversible, attention=attention, drop_path_rate=0.0)
  x = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  grad = jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x, train=True)))
  return jax.jit(grad).lower(params, x).compile().memory_analysis().temp_size_in_bytes


def test_reversible_activation_memory_does_not_grow_with_depth():
  """XLA's temp buffers of a full gradient: reversible (LSH) depth 8 within 1.2x of depth 2 and
  under half of an ordinary residual stack's at depth 8 (dense there: it compiles faster), which
  shows the analysis does count stored activations. benchmarks/reformer.py has full-size numbers."""
  reversible_8 = _temp_bytes(8, True)
  assert reversible_8 < 1.2 * _temp_bytes(2, True)
  assert reversible_8 < 0.5 * _temp_bytes(8, False, "dense")


# ----------------------------------------------------------------------------- model

def _tiny_model(**overrides):
  """16x16 inputs in 4x4 patches: 17 tokens, padded to 20 = 5 LSH chunks of 4 per round."""
  fields = dict(num_classes=5, img_size=16, patch_size=4, depth=3, embed_dim=32, num_heads=2,
                chunk_len=4, drop_path_rate=0.3)
  fields.update(overrides)
  return create_model("reformer_vit_ti16", **fields)


@pytest.fixture(scope="module")
def tiny():
  """(model, variables, images (4, 16, 16, 3)): LSH attention, reversible, drop path."""
  model = _tiny_model()
  x = _normal(np.random.default_rng(0), (4, 16, 16, 3))
  return model, jax.jit(model.init)(jax.random.key(0), x), x


def test_model_reversible_gradients_equal_ordinary_backprop(tiny, monkeypatch):
  """The full model with LSH, dropout (attention projection and MLP), drop path and a chunked MLP:
  the custom VJP (inputs rebuilt from outputs, dropout replayed) against autodiff of the same
  forward. (Attention-weight dropout uses the same replayed key; left out to save compile time.)"""
  _, variables, x = tiny
  model = _tiny_model(proj_drop_rate=0.1, ff_chunk_len=8)

  def value_and_grad(memory_efficient):
    monkeypatch.setattr(reformer, "reversible_stack",
                        functools.partial(reversible_stack, memory_efficient=memory_efficient))

    def loss(params):
      logits = model.apply({"params": params}, x, train=True,
                           rngs={"dropout": jax.random.key(1), "sample": jax.random.key(2)})
      return jnp.sum(jax.nn.log_softmax(logits) * jnp.arange(logits.shape[-1]))
    return jax.jit(jax.value_and_grad(loss))(variables["params"])

  loss, grads = value_and_grad(True)
  ref_loss, ref_grads = value_and_grad(False)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert _max_rel_error(grads, ref_grads) < GRAD_RTOL
  assert float(optax.global_norm(grads["blocks"])) > 0


def test_one_compilation_across_batches_and_fresh_rotations_per_sample_key(tiny):
  model, variables, x = tiny
  apply = jax.jit(lambda v, x, sample: model.apply(
      v, x, train=True, rngs={"dropout": jax.random.key(0), "sample": jax.random.key(sample)}))
  outputs = [apply(variables, x, seed) for seed in (1, 1, 2)]
  apply(variables, x + 1.0, 3)
  assert apply._cache_size() == 1
  np.testing.assert_array_equal(outputs[0], outputs[1])
  assert not np.allclose(outputs[0], outputs[2])  # new LSH rotations from the 'sample' stream


@pytest.mark.parametrize("overrides", [{}, {"attention": "dense"},
                                       {"reversible": False, "global_pool": "avg"}])
def test_model_shapes_and_deterministic_eval(tiny, overrides):
  model, variables, x = tiny
  if overrides:
    model = _tiny_model(**overrides)
    variables = jax.jit(model.init)(jax.random.key(0), x)
  assert variables["params"]["blocks"]["attn_branch"]["qk"]["kernel"].shape == (3, 32, 32)
  apply = jax.jit(model.apply)
  logits = apply(variables, x)
  assert logits.shape == (4, 5) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, apply(variables, x))
  with pytest.raises(UserError, match="img_size=32"):
    model.apply(variables, jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("name,deit,embed_dim", [
    ("reformer_vit_ti16", "deit_tiny_patch16_224", 192),
    ("reformer_vit_s16", "deit_small_patch16_224", 384),
    ("reformer_vit_b16", "deit_base_patch16_224", 768)])
def test_variants_have_deit_sizes_less_the_key_projection(name, deit, embed_dim):
  """DeiT parameters minus one C x C projection (+ bias) per block: Q and K are shared."""
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  count = lambda model: count_params(
      jax.eval_shape(model.init, jax.random.key(0), x)["params"])
  assert count(create_model(name)) == count(create_model(deit)) - 12 * (embed_dim**2 + embed_dim)


def test_invalid_settings_fail_with_a_user_error():
  with pytest.raises(UserError, match="attention='sparse'"):
    create_model("reformer_vit_s16", attention="sparse")
  with pytest.raises(UserError, match="n_buckets=3"):
    create_model("reformer_vit_s16", n_buckets=3)
  with pytest.raises(UserError, match="Unknown override"):
    create_model("reformer_vit_s16", n_hash=4)


def test_train_step_through_the_trainer():
  model = _tiny_model(num_classes=3)
  tx = optax.adamw(1e-3)
  state = trainer.create_train_state(model, tx, jax.random.key(0), 16, use_ema=False)
  aug = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, mixup_switch_prob=0.5,
             label_smoothing=0.1)
  step = jax.jit(functools.partial(
      trainer.train_step, model=model, tx=tx, schedule=lambda s: 1e-3,
      base_rng=jax.random.key(1), num_classes=3, aug=aug, distill={"type": "none"}),
      donate_argnums=(0,))
  before = jax.tree.map(np.array, state["params"])
  rng = np.random.default_rng(0)
  for _ in range(2):
    batch = {"image": _normal(rng, (4, 16, 16, 3)),
             "label": jnp.asarray(rng.integers(0, 3, (4,)), jnp.int32)}
    state, metrics = step(state, batch, None)
  assert int(state["step"]) == 2 and np.isfinite(float(metrics["loss"]))
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, state["params"])
  assert all(jax.tree.leaves(changed))
  assert step._cache_size() == 1
