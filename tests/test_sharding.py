"""Sharding rules, and on 8 simulated CPU devices: FSDP == data parallel, grad_accum == large batch,
remat == no remat."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compact_vit import models, sharding, trainer
from compact_vit.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rules_split_model_then_largest_free_dim_over_fsdp():
  mesh = jax.sharding.AbstractMesh((2, 4, 2), ("data", "fsdp", "model"))
  spec = lambda path, shape: tuple(sharding.spec_for(path, shape, mesh))
  assert spec("params/blocks_0/attn/qkv/kernel", (192, 576)) == ("fsdp", "model")
  assert spec("params/blocks_0/attn/qkv/bias", (576,)) == ("model",)
  assert spec("params/blocks_0/mlp/fc2/kernel", (768, 192)) == ("model", "fsdp")
  # Optimizer moments carry the parameter's path as a suffix and follow it.
  assert spec("opt_state/1/0/mu/blocks_0/mlp/fc2/kernel", (768, 192)) == ("model", "fsdp")
  assert spec("params/patch_embed/proj/kernel", (4, 4, 3, 192)) == (None, None, None, "fsdp")
  assert spec("params/head/kernel", (192, 10)) == ("fsdp",)  # 10 is not divisible by 4
  assert spec("params/blocks_0/norm1/scale", (192,)) == ()
  assert spec("params/head/kernel", (6, 10)) == ()  # nothing divisible: replicated
  dp = jax.sharding.AbstractMesh((8, 1, 1), ("data", "fsdp", "model"))
  assert tuple(sharding.spec_for("params/blocks_0/attn/qkv/kernel", (192, 576), dp)) == ()


def test_mesh_errors_are_user_errors():
  with pytest.raises(UserError, match="unknown axes"):
    sharding.make_mesh({"data": -1, "tensor": 1})
  with pytest.raises(UserError, match="at most one axis"):
    sharding.make_mesh({"data": -1, "fsdp": -1})


_SCRIPT = textwrap.dedent("""
  import functools, json
  import jax, jax.numpy as jnp, numpy as np, optax
  from compact_vit import models, sharding, trainer

  model = models.create_model("deit_tiny_patch16_224", num_classes=8, img_size=8, patch_size=4,
                              depth=1, embed_dim=64, num_heads=2)
  tx = optax.sgd(0.5, momentum=0.9)
  aug = dict(mixup_alpha=0.8, cutmix_alpha=0.0, mixup_prob=1.0, mixup_switch_prob=0.5,
             label_smoothing=0.1)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
              "label": rng.integers(0, 8, size=(16,)).astype(np.int32)} for _ in range(2)]

  initial = jax.jit(functools.partial(trainer.create_train_state, model, tx, img_size=8,
                                      use_ema=False))(jax.random.key(0))

  def run(mesh_cfg, grad_accum=1):
    mesh = sharding.make_mesh(mesh_cfg)
    state_sh = sharding.state_shardings(initial, mesh)
    state = jax.device_put(initial, state_sh)
    step = jax.jit(functools.partial(
        trainer.train_step, model=model, tx=tx, schedule=lambda s: 0.5,
        base_rng=jax.random.key(1), num_classes=8, aug=aug, distill={"type": "none"},
        grad_accum=grad_accum), out_shardings=(state_sh, sharding.replicated(mesh)))
    losses = []
    for b in batches:
      state, m = step(state, sharding.shard_batch(b, mesh), None)
      losses.append(float(m["loss"]))
    total = sum(l.nbytes for l in jax.tree.leaves(state["params"]))
    return state, losses, sharding.per_device_bytes(state["params"]) / total

  def diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])))

  dp, dp_loss, dp_frac = run({"data": -1, "fsdp": 1, "model": 1})
  fsdp, fsdp_loss, fsdp_frac = run({"data": 1, "fsdp": -1, "model": 1})
  accum, accum_loss, _ = run({"data": 2, "fsdp": 2, "model": 2}, grad_accum=2)
  mu_sharding = fsdp["opt_state"][0].trace["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec
  print(json.dumps(dict(
      dp_loss=dp_loss, fsdp_loss=fsdp_loss, accum_loss=accum_loss,
      fsdp_vs_dp=diff(fsdp, dp), accum_vs_dp=diff(accum, dp),
      dp_frac=dp_frac, fsdp_frac=fsdp_frac, trace_spec=str(mu_sharding))))
""")


@pytest.fixture(scope="module")
def eight_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=1800)  # a hang guard, generous for a busy machine
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_fsdp_trains_like_data_parallel_with_an_eighth_of_the_params(eight_devices):
  r = eight_devices
  assert r["fsdp_vs_dp"] < 1e-5, r
  assert r["fsdp_loss"] == pytest.approx(r["dp_loss"], abs=1e-5)
  assert r["dp_frac"] == 1.0
  assert r["fsdp_frac"] < 0.16  # 1/8 of every matrix; biases and norms replicated
  assert "fsdp" in r["trace_spec"]  # the momentum follows its parameter


def test_grad_accumulation_on_a_data_fsdp_model_mesh_equals_the_large_batch(eight_devices):
  """Two micro-batches of 8 on a 2 x 2 x 2 mesh against one batch of 16, data parallel."""
  r = eight_devices
  assert r["accum_vs_dp"] < 1e-5, r
  assert r["accum_loss"] == pytest.approx(r["dp_loss"], abs=1e-5)


def test_remat_recomputes_blocks_with_the_same_parameters_and_gradients():
  model = models.create_model("deit_tiny_patch16_224", num_classes=4, img_size=8, patch_size=4,
                              depth=2, embed_dim=32, num_heads=2, drop_path_rate=0.1)
  remat = model.clone(remat=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
  params = jax.jit(lambda: trainer.init_variables(model, jax.random.key(0), 8))()["params"]
  assert jax.tree.structure(params) == jax.tree.structure(  # the same parameter names
      jax.eval_shape(lambda: trainer.init_variables(remat, jax.random.key(0), 8))["params"])

  trainer.check_remat(remat, params, 8)  # its forward pass has checkpointed blocks
  with pytest.raises(UserError, match="does not rematerialise"):
    trainer.check_remat(model, params, 8)

  def grads(m):
    loss = lambda p: m.apply({"params": p}, x, train=True,
                             rngs={"dropout": jax.random.key(1)}).sum()
    return jax.jit(jax.grad(loss))(params)

  for a, b in zip(jax.tree.leaves(grads(model)), jax.tree.leaves(grads(remat))):
    np.testing.assert_allclose(a, b, atol=1e-6)
