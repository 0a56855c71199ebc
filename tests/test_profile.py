"""Parameter and MAC counting, throughput, and the profile CLI."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from compact_vit.models import create_model
from compact_vit.profile import (count_macs, count_params, function_macs, images_per_sec,
                                 random_variables)


class HandCounted(nn.Module):
  """Every kind of op and nesting `count_macs` handles, with MACs counted by hand below."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), padding="SAME")(x)  # (2,8,8,3)->(2,8,8,8): 1024 outputs x 9 x 3
    x = nn.Conv(8, (3, 3), strides=2, feature_group_count=4)(x)  # 256 outputs x 9 x 8/4
    x = nn.Dense(5)(x.reshape(2, -1))  # batch 2 x 128 in x 5 out
    outer = jnp.einsum("bi,bj->bij", x, x)  # 2 x 5 x 5, contracting nothing
    w = self.param("w", nn.initializers.lecun_normal(), (5, 5))
    x, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=3)  # 3 x 2x5x5
    x = jax.lax.cond(x.sum() > 0, lambda x: x @ w @ w, lambda x: x, x)  # max branch 2 x 2x5x5
    x = jax.jit(lambda a, b: a @ b)(x, w)  # nested pjit: 2x5x5
    return x + outer.sum(-1)


HAND_MACS = 1024 * 9 * 3 + 256 * 9 * 2 + 2 * 128 * 5 + 2 * 5 * 5 + 3 * 50 + 2 * 50 + 50


def test_count_macs_exact_on_hand_counted_model():
  model = HandCounted()
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, 8, 8, 3)))
  assert count_macs(model, variables, (2, 8, 8, 3)) == HAND_MACS
  assert count_params(variables["params"]) == (9 * 3 * 8 + 8) + (9 * 2 * 8 + 8) + (128 * 5 + 5) + 25


def test_function_macs_counts_a_plain_function_of_several_arguments():
  model = HandCounted()
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, 8, 8, 3)))
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  a, b = jnp.ones((4, 6)), jnp.ones((6, 7))
  both = lambda v, x, a, b: (model.apply(v, x), a @ b)  # noqa: E731
  assert function_macs(both, variables, x, a, b) == HAND_MACS + 4 * 6 * 7


@pytest.mark.parametrize("name,gmacs", [("deit_tiny_patch16_224", 1.26),
                                        ("deit_small_patch16_224", 4.61)])
def test_deit_gmacs_match_references(name, gmacs):
  """REFERENCES.md (fvcore convention); ours: DeiT-Ti 1.2537, DeiT-S 4.5989, DeiT-B 17.5638."""
  model = create_model(name)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  total = count_macs(model, variables, (2, 224, 224, 3))  # total for the batch
  assert abs(total / 2 / 1e9 - gmacs) / gmacs < 0.01


def test_images_per_sec_is_positive():
  model = create_model("deit_tiny_patch16_224", img_size=32, depth=1)
  variables = random_variables(model, (1, 32, 32, 3))
  assert images_per_sec(model, variables, 2, 32, steps=2, warmup=1) > 0


def test_profile_cli_prints_one_json_line():
  proc = subprocess.run(
      [sys.executable, "-m", "compact_vit.profile", "--model", "deit_tiny_patch16_224",
       "--batch", "2", "--img-size", "32", "--steps", "2", "--warmup", "1"],
      capture_output=True, text=True, check=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1
  result = json.loads(lines[0])
  assert set(result) == {"model", "params", "gmacs", "images_per_sec", "batch", "img_size"}
  assert result["params"] == 5_717_416 - (197 - 5) * 192  # 4 patches + cls at 32x32
  assert result["batch"] == 2 and result["img_size"] == 32
  assert result["gmacs"] > 0 and result["images_per_sec"] > 0


def test_set_cpu_defaults_keeps_the_users_flags(monkeypatch):
  from compact_vit import xla
  name = xla.CPU_XLA_FLAGS[0].split("=")[0]
  monkeypatch.setenv("XLA_FLAGS", f"{name}=false --xla_dump_to=/tmp/x")
  xla.set_cpu_defaults()
  assert os.environ["XLA_FLAGS"].split()[:2] == [f"{name}=false", "--xla_dump_to=/tmp/x"]
  assert os.environ["XLA_FLAGS"].count(name) == 1
  monkeypatch.delenv("XLA_FLAGS")
  xla.set_cpu_defaults()
  assert os.environ["XLA_FLAGS"].split() == list(xla.CPU_XLA_FLAGS)


def test_train_compiler_options_yield_to_the_users_flags(monkeypatch):
  from compact_vit import xla
  (option, _), = xla.CPU_TRAIN_COMPILER_OPTIONS.items()
  monkeypatch.setenv("XLA_FLAGS", " ".join(xla.CPU_XLA_FLAGS))  # the shipped defaults
  assert xla.train_compiler_options() == xla.CPU_TRAIN_COMPILER_OPTIONS
  monkeypatch.setenv("XLA_FLAGS", f"--{option}=individual_dot")  # the user's own choice
  assert xla.train_compiler_options() == {}


def test_train_compiler_options_give_the_same_gradients_through_ynnpack_reductions():
  """The train-step options route the channel-wise reductions of a conv/BatchNorm/bias gradient to
  YNNPACK; gradients must agree with XLA's own reductions (float32 summation order only)."""
  from compact_vit import xla
  from compact_vit.nn.layers import ConvNormAct, gelu
  model = ConvNormAct(64, kernel_size=3, groups=64, use_bias=False, act=gelu)  # (a conv bias before
  # BatchNorm has an exactly-zero gradient, which both sides compute only as rounding noise)
  x = jax.random.normal(jax.random.key(0), (4, 14, 14, 64))
  variables = model.init(jax.random.key(1), x, train=True)

  def loss(params, x):
    y, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y) * y)

  grad = jax.grad(loss, argnums=(0, 1))
  options = xla.train_compiler_options()
  fast = jax.jit(grad, compiler_options=options)
  assert "ynn" in fast.lower(variables["params"], x).compile(options).as_text()
  for a, b in zip(jax.tree.leaves(fast(variables["params"], x)),
                  jax.tree.leaves(jax.jit(grad)(variables["params"], x))):
    assert jnp.allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, ((1, 1), (1, 1))), (3, 2, "SAME"),
                                                   (5, 2, ((2, 2), (2, 2)))])
def test_fast_depthwise_conv_matches_lax_and_counts_the_same_macs(kernel, stride, padding):
  """layers.conv_general_dilated (shifted multiply-adds) vs lax's grouped conv: same output
  (float32 rounding) and the same MACs for count_macs."""
  from compact_vit.nn import layers

  class DwConv(nn.Module):
    fast: bool

    @nn.compact
    def __call__(self, x, train=False):
      extra = {"conv_general_dilated": layers.conv_general_dilated} if self.fast else {}
      return nn.Conv(12, (kernel, kernel), strides=stride, padding=padding,
                     feature_group_count=12, **extra)(x)

  x = jax.random.normal(jax.random.key(1), (2, 9, 11, 12))
  variables = DwConv(False).init(jax.random.key(0), x)
  ref, out = DwConv(False).apply(variables, x), DwConv(True).apply(variables, x)
  assert out.shape == ref.shape
  assert float(jnp.abs(out - ref).max()) < 1e-5
  assert count_macs(DwConv(True), variables, x.shape) == count_macs(DwConv(False), variables,
                                                                    x.shape)


@pytest.mark.parametrize("stride", [1, 2])
def test_pool2d_matches_flax_pooling(stride):
  from compact_vit.nn import layers
  x = jax.random.normal(jax.random.key(2), (2, 7, 9, 4))
  pad = ((1, 1), (1, 1))
  ref_max = nn.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)
  ref_avg = nn.avg_pool(x, (3, 3), strides=(stride, stride), padding=pad, count_include_pad=False)
  assert float(jnp.abs(layers.pool2d(x, 3, stride, 1, "max") - ref_max).max()) == 0
  assert float(jnp.abs(layers.pool2d(x, 3, stride, 1, "avg") - ref_avg).max()) < 1e-6


def test_dot_product_attention_matches_naive_softmax():
  """Normalising after the weighted sum equals softmax(logits + bias, masked) @ v (NumPy)."""
  import numpy as np
  from compact_vit.nn.layers import dot_product_attention
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 3, 5, 8)).astype(np.float32) for _ in range(3))
  bias = rng.standard_normal((3, 5, 5)).astype(np.float32)
  valid = rng.random((2, 1, 5, 5)) > 0.4
  valid[..., 0] = True
  out = np.asarray(dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                         bias=jnp.asarray(bias), valid=jnp.asarray(valid)))
  logits = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(8) + bias
  logits = np.where(valid, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  ref = np.einsum("bhqk,bhkd->bhqd", weights / weights.sum(-1, keepdims=True), v)
  assert np.abs(out - ref).max() < 1e-5


def test_gelu_matches_exact_erf_gelu_in_float64():
  """layers.gelu (x/2 (1 + erf(x/sqrt 2)), torch's formula) against float64 math.erf."""
  import math
  import numpy as np
  from compact_vit.nn.layers import gelu
  x = np.linspace(-12, 12, 2001).astype(np.float32)
  ref = np.array([v / 2 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
  out = np.asarray(gelu(jnp.asarray(x)), np.float64)
  assert np.abs(out - ref).max() < 2e-6
  assert gelu(jnp.ones((2,), jnp.bfloat16)).dtype == jnp.bfloat16
