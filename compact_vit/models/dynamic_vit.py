"""DynamicViT: a DeiT that learns to drop uninformative patch tokens.

Paper: Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification",
NeurIPS 2021 (arXiv 2106.02034); code: raoyongming/DynamicViT (models/dyvit.py, losses.py), whose
parameter names this module keeps (`score_predictor_{i}/in_conv_{0,1}`, `out_conv_{0,2,4}`), so
the authors' released checkpoints load with `compact_vit.convert.load_pytorch_state_dict`.

A prediction module before blocks `pruning_loc` (3, 6, 9 of 12) scores every patch token:
LN -> Linear -> GELU, then the first half of the channels concatenated with the policy-weighted
mean of the second half, then Linear C->C/2 -> GELU -> C/2->C/4 -> GELU -> C/4->2 -> log-softmax.

* Training (`train=True`): all tokens stay; hard Gumbel-softmax keep decisions (straight-through,
  noise from the 'sample' stream) are multiplied by the previous stage's, and attention is
  re-normalised over the kept keys with the self-connection kept (`ops.tokens.attention_weights`).
  The per-stage decisions and the final normed tokens are sown into 'intermediates'
  (`keep_decisions`, `features`) for the `dynamicvit` objective (compact_vit/objectives/
  dynamic_vit.py: cross-entropy, keep-ratio MSE, KL to the teacher, token distillation).
* Inference (`train=False`): stage s keeps the top `int(N·keep_ratio^s)` patches by predicted
  keep score (a compile-time count: 137, 96, 67 of 196 at keep_ratio 0.7) by a `take_along_axis`
  gather; the class token always stays. The kept patch positions are sown as `kept_positions`.

Departure from the authors' code: the predictor's global mean is guarded against an all-zero
policy (their division by Σ policy gives NaN, DynamicViT#6). Their `--lr_scale 0.01` for the
backbone is the configs' `optim.lr_scales` (configs/token_reduction_common.py).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from compact_vit.errors import UserError
from compact_vit.models.registry import register
from compact_vit.nn.layers import Block, dense, drop_path_rates, gelu, linear_init
from compact_vit.models.vit import VisionTransformer
from compact_vit.nn import tokens as tok

_SMALL = dict(embed_dim=384, depth=12, num_heads=6, patch_size=16)
_BASE = dict(embed_dim=768, depth=12, num_heads=12, patch_size=16)
VARIANTS: dict[str, dict] = {
    "dynamicvit_deit_s": _SMALL,
    "dynamicvit_deit_b": _BASE,
}
PREDICTOR_LN_EPS = 1e-5  # the authors' predictor uses torch's default LayerNorm


class ScorePredictor(nn.Module):
  """DynamicViT's PredictorLG: x (B, N, C), policy (B, N) -> keep/drop log-probabilities (B, N, 2)
  (float32; index 0 = keep)."""
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, policy: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    linear = functools.partial(dense, dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.LayerNorm(epsilon=PREDICTOR_LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="in_conv_0")(x)
    x = gelu(linear(dim, "in_conv_1")(x))
    local, rest = x[..., :dim // 2], x[..., dim // 2:]
    global_mean = tok.masked_mean(rest, policy)
    x = gelu(ConcatDense(dim // 2, self.dtype, self.param_dtype, name="out_conv_0")(
        local, global_mean))
    x = gelu(linear(dim // 4, "out_conv_2")(x))
    return jax.nn.log_softmax(linear(2, "out_conv_4")(x).astype(jnp.float32), axis=-1)


class ConcatDense(nn.Module):
  """Dense(concat([local, broadcast(shared)], -1)) computed as local @ W[:n] + shared @ W[n:] + b,
  so the half of the input that is the same for every token costs one product per image.
  local (B, N, n), shared (B, 1, m) -> (B, N, features); parameters as `dense`'s (kernel (n+m,
  features), bias)."""
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, local: jax.Array, shared: jax.Array) -> jax.Array:
    n = local.shape[-1]
    kernel = self.param("kernel", linear_init, (n + shared.shape[-1], self.features),
                        self.param_dtype).astype(self.dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    # jnp.matmul rather than `@`: the same product, which jax2onnx exports as MatMul (`@` becomes
    # an Einsum, about twice as slow in onnxruntime at these sizes)
    shared = jnp.matmul(shared.astype(self.dtype), kernel[n:]) + bias.astype(self.dtype)
    return jnp.matmul(local.astype(self.dtype), kernel[:n]) + shared


def gumbel_keep(rng: jax.Array, log_probs: jax.Array) -> jax.Array:
  """Hard Gumbel-softmax (τ = 1) keep decisions (B, N) in {0, 1} with straight-through gradients
  (torch's F.gumbel_softmax(hard=True)[..., 0])."""
  soft = jax.nn.softmax(log_probs + jax.random.gumbel(rng, log_probs.shape), axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), 2, dtype=soft.dtype)
  return (hard - jax.lax.stop_gradient(soft) + soft)[..., 0]


class DynamicViT(VisionTransformer):
  """DeiT with DynamicViT token pruning (see the module docstring).

  `__call__(x, train=False, decisions=None)`: x (B, H, W, 3) -> logits (B, num_classes) float32.
  `decisions`, optional, one (B, N_patches) {0, 1} array per stage, replaces the predictors'
  choices (training: the Gumbel sample before the product with the previous stage; inference: the
  ranking, so stage s must keep exactly `num_kept(s)` patches nested in the previous stage's) —
  for analysis and tests.
  """
  keep_ratio: float = 0.7
  pruning_loc: tuple[int, ...] = (3, 6, 9)

  def __post_init__(self):
    tok.check_plain_vit(self, "DynamicViT")
    if not 0.0 < self.keep_ratio <= 1.0:
      raise UserError(f"keep_ratio={self.keep_ratio} must be in (0, 1], e.g. 0.7.")
    locs = tuple(self.pruning_loc)
    if not locs or list(locs) != sorted(set(locs)) or locs[0] < 0 or locs[-1] >= self.depth:
      raise UserError(f"pruning_loc={locs} must be increasing block indices in [0, {self.depth}).")
    super().__post_init__()

  def num_kept(self, stage: int) -> int:
    """Patches kept after stage `stage` (0-based): int(N · keep_ratio^(stage + 1)), at least 1."""
    num_patches = self.grid_size[0] * self.grid_size[1]
    return max(1, int(num_patches * self.keep_ratio ** (stage + 1)))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               decisions: Sequence[jax.Array] | None = None) -> jax.Array:
    dtype = jnp.dtype(self.dtype)
    x = tok.embed(self, x, train)
    batch, num_patches = x.shape[0], x.shape[1] - 1
    block = functools.partial(
        Block, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
        attn_drop_rate=self.attn_drop_rate, proj_drop_rate=self.proj_drop_rate, dtype=dtype,
        param_dtype=self.param_dtype)
    policy_block = functools.partial(
        tok.PolicyBlock, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
        qkv_bias=self.qkv_bias, proj_drop_rate=self.proj_drop_rate, dtype=dtype,
        param_dtype=self.param_dtype)
    keep = jnp.ones((batch, num_patches), jnp.float32)  # training: the running decision
    positions = jnp.broadcast_to(jnp.arange(num_patches), (batch, num_patches))  # inference
    policy = None
    stage = 0
    for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
      if i in self.pruning_loc:
        predictor = ScorePredictor(dtype, self.param_dtype, name=f"score_predictor_{stage}")
        log_probs = predictor(x[:, 1:], keep if train else jnp.ones((batch, x.shape[1] - 1)))
        if train:
          sample = (gumbel_keep(self.make_rng("sample"), log_probs) if decisions is None
                    else decisions[stage].astype(jnp.float32))
          keep = sample * keep
          self.sow("intermediates", "keep_decisions", keep)
          policy = jnp.concatenate([jnp.ones((batch, 1), keep.dtype), keep], axis=1)
        else:
          scores = log_probs[..., 0] if decisions is None else gather_decision(
              decisions[stage], positions)
          x, index = keep_top_patches(x, scores, self.num_kept(stage))
          positions = tok.gather_tokens(positions, index)
          self.sow("intermediates", "kept_positions", positions)
        stage += 1
      if policy is None:
        x = block(drop_path_rate=rate, name=f"blocks_{i}")(x, train=train)
      else:
        x = policy_block(drop_path_rate=rate, name=f"blocks_{i}")(x, policy, train=train)
    x = tok.final_norm(self, x)
    return tok.classify(self, x, train)


def keep_top_patches(x: jax.Array, scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """DynamicViT's inference pruning: x (B, 1 + N, C) and patch scores (B, N) -> the class token and
  the k best-scored patches (B, 1 + k, C), best first, and their indices (B, k)."""
  index = tok.top_k_indices(scores, k)
  return jnp.concatenate([x[:, :1], tok.gather_tokens(x[:, 1:], index)], axis=1), index


def gather_decision(decision: jax.Array, positions: jax.Array) -> jax.Array:
  """A (B, N_patches) decision over the original patches, read at the current `positions`."""
  return jnp.take_along_axis(decision.astype(jnp.float32), positions, axis=1)


for _name, _fields in VARIANTS.items():
  register(_name)(functools.partial(DynamicViT, **_fields))
