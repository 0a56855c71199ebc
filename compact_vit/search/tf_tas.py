"""TF-TAS: training-free search with the DSS indicator (method `tf_tas`).

Zhou et al., "Training-free Transformer Architecture Search", CVPR 2022; decemberzhou/TF_TAS
lib/training_free/indicators/dss.py and search_autoformer.py. The supernet is randomly initialised
(no training, no data); every weight is replaced by its absolute value, an all-ones image goes
through the candidate subnet and L = sum of the logits. Then, over the active slices,

  DSS = sum_l ||dL/dW_qkv||_* ||W_qkv||_* + ||dL/dW_proj||_* ||W_proj||_*     (synaptic diversity)
      + sum_l sum |dL/dW_fc1 * W_fc1| + sum |dL/dW_fc2 * W_fc2|               (synaptic saliency)
      + sum |dL/dW_head * W_head|

as the layers the authors' code visits (`get_layer_metric_array_dss`: the patch embedding is not
one of them; their loop visits the head twice, counted once here). Scoring runs on the masked
supernet, one jitted function for every candidate; inactive weights get zero gradient, and the zero
rows/columns of a masked weight do not change its nuclear norm, so the score equals that of the
extracted subnet. The weights' nuclear norms depend only on (layer, embed dim, heads) and are
tabulated once; the gradients' are computed by Newton-Schulz iterations (matmuls only).
"""
from __future__ import annotations

import functools
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from compact_vit import trainer
from compact_vit.search import registry
from compact_vit.errors import UserError
from compact_vit.models import autoformer
from compact_vit.nn.layers import to_pair
from compact_vit.search import space as space_lib


def nuclear_norm(matrix: jax.Array, fast: int = 8, slow: int = 5) -> jax.Array:
  """Sum of singular values by matmuls only: trace(U^T A) with U, the polar factor of A, from
  Newton-Schulz iterations started at A / ||A||_F (singular values in (0, 1]). `fast` quintic
  steps X <- X (a I + b S + c S^2), S = X^T X, with (a, b, c) = (3.4445, -4.7750, 2.0315) (the
  Muon coefficients: small values grow 3.44x per step, all land in about [0.7, 1.2]) then `slow`
  cubic steps X <- X (3 I - S) / 2, which converge quadratically to 1 from there. Values below ~1e-5
  ||A||_F are under-counted (at most by themselves), as with 30 cubic steps at twice the cost.
  XLA's batched SVD costs ~0.4 s per 240x768 matrix on CPU and float32 Gram eigenvalues are off by
  ~1% on these numerically low-rank gradients; this is exact to ~1e-5.
  """
  a = matrix.astype(jnp.float32)
  if a.shape[0] < a.shape[1]:
    a = a.T
  norm = jnp.sqrt(jnp.sum(a * a))
  x = a / jnp.where(norm > 0, norm, 1.0)
  eye = jnp.eye(a.shape[1], dtype=a.dtype)

  def quintic(_, x):
    s = x.T @ x
    return x @ (3.4445 * eye - 4.7750 * s + 2.0315 * (s @ s))

  x = jax.lax.fori_loop(0, fast, quintic, x)
  x = jax.lax.fori_loop(0, slow, lambda _, x: x @ (1.5 * eye - 0.5 * (x.T @ x)), x)
  return jnp.sum(x * a)


def weight_nuclear_norms(model: autoformer.AutoFormerSupernet, abs_params: Any) -> np.ndarray:
  """||W||_* of every layer's qkv and proj slice, for every (embed dim, heads) choice:
  (max_depth, 2, len(embed_dims), len(num_heads)), from float64 eigenvalues of W^T W on the host.
  The weights are fixed during a search, so only the gradients' norms are computed per candidate."""
  table = np.zeros((model.max_depth, 2, len(model.embed_dims), len(model.num_heads)))
  for i in range(model.max_depth):
    attn = abs_params[f"blocks_{i}"]["attn"]
    qkv, proj = (np.asarray(attn[n]["kernel"], np.float64) for n in ("qkv", "proj"))
    for a, embed in enumerate(model.embed_dims):
      for b, heads in enumerate(model.num_heads):
        qk = heads * model.head_dim
        for j, w in enumerate((qkv[:embed, :3 * qk], proj[:qk, :embed])):
          gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
          table[i, j, a, b] = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None)).sum()
  return table.astype(np.float32)


def dss_score(model: autoformer.AutoFormerSupernet, abs_params: Any,
              arch: Mapping[str, jax.Array], weight_norms: jax.Array) -> jax.Array:
  """The DSS indicator of `arch` (arch_arrays) given the supernet's |parameters| and
  `weight_nuclear_norms`. Traceable."""
  x = jnp.ones((1, *to_pair(model.img_size), 3), jnp.float32)
  grads = jax.grad(lambda p: model.apply({"params": p}, x, arch=arch).sum())(abs_params)
  embed_idx = jnp.argmax(jnp.asarray(model.embed_dims) == arch["embed_dim"])
  total = jnp.sum(jnp.abs(grads["head"]["kernel"] * abs_params["head"]["kernel"]))
  for i in range(model.max_depth):
    w, g = abs_params[f"blocks_{i}"], grads[f"blocks_{i}"]
    heads_idx = jnp.argmax(jnp.asarray(model.num_heads) == arch["num_heads"][i])
    layer = 0.0
    for j, name in enumerate(("qkv", "proj")):
      layer = layer + (nuclear_norm(g["attn"][name]["kernel"])
                       * weight_norms[i, j, embed_idx, heads_idx])
    for name in ("fc1", "fc2"):
      layer = layer + jnp.sum(jnp.abs(g[name]["kernel"] * w[name]["kernel"]))
    total = total + jnp.where(i < arch["depth"], layer, 0.0)
  return total


def make_scorer(model: autoformer.AutoFormerSupernet, params: Any, chunk: int = 8,
                vectorize: bool | None = None):
  """list of arch dicts -> DSS scores (numpy). Candidates are scored `chunk` at a time by one
  jitted call (the last chunk padded), so every call reuses one compilation. `vectorize`: `vmap`
  over the chunk (all candidates' activations at once, which fills an accelerator) or `lax.map`
  (one candidate at a time: less memory, and no slower on CPU, 1.03 vs 1.11 s per candidate at
  full AutoFormer-T size). None picks `vmap` on accelerators and `lax.map` on CPU."""
  if vectorize is None:
    vectorize = jax.default_backend() != "cpu"
  abs_params = jax.tree.map(jnp.abs, params)
  norms = jnp.asarray(weight_nuclear_norms(model, abs_params))
  over = jax.vmap if vectorize else lambda f: functools.partial(jax.lax.map, f)
  scored = jax.jit(lambda p, archs, n: over(lambda a: dss_score(model, p, a, n))(archs))

  def score(archs) -> np.ndarray:
    out = []
    for i in range(0, len(archs), chunk):
      part = list(archs[i:i + chunk])
      arrays = [autoformer.arch_arrays(a, model.max_depth) for a in part]
      arrays += arrays[-1:] * (chunk - len(part))
      stacked = {k: np.stack([a[k] for a in arrays]) for k in arrays[0]}
      out.append(np.asarray(scored(abs_params, stacked, norms))[:len(part)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
  score.jit = scored
  return score


@registry.register("tf_tas")
def tf_tas(config: ml_collections.ConfigDict, workdir: str) -> registry.SearchResult:
  s = config.search
  model = trainer.create_model(config, s.num_classes)
  if not isinstance(model, autoformer.AutoFormerSupernet):
    raise UserError(f"config.model.name={config.model.name!r} is not an AutoFormer supernet.")
  costs = space_lib.Costs(model)
  limits = space_lib.Limits(s.min_params_m, s.max_params_m, s.max_gmacs)
  space_lib.check_satisfiable(model.space, limits, costs)
  init = jax.jit(lambda key: trainer.init_variables(model, key, config.img_size)["params"])
  params = init(jax.random.key(s.init_seed))
  score = make_scorer(model, params, chunk=s.chunk)
  rng = np.random.default_rng(s.seed)

  archs, keys = [], set()
  for _ in range(50 * s.num_candidates):
    if len(archs) >= s.num_candidates:
      break
    arch = space_lib.sample_valid(model.space, rng, limits, costs)
    key = space_lib.arch_key(arch)
    if key not in keys:
      keys.add(key)
      archs.append(arch)
  print(f"Scoring {len(archs)} distinct candidates within the limits by DSS.", flush=True)
  score(archs[:1])  # compile
  candidates, start = [], time.perf_counter()
  step = max(len(archs) // 10, 1)
  for i in range(0, len(archs), step):
    part = archs[i:i + step]
    candidates += [space_lib.record(a, costs, v) for a, v in zip(part, score(part))]
    rate = len(candidates) / (time.perf_counter() - start)
    best = max(candidates, key=lambda r: r["score"])
    print(f"[{len(candidates)}/{len(archs)}] {rate:.1f} candidates/s  best DSS "
          f"{best['score']:.4g} ({best['params'] / 1e6:.3f}M params)", flush=True)
  print(f"DSS: {len(candidates) / (time.perf_counter() - start):.1f} candidates/s.", flush=True)
  candidates.sort(key=lambda r: -r["score"])
  return registry.SearchResult(
      best=candidates[0], candidates=candidates,
      train_command=space_lib.train_command(s.retrain_config, candidates[0]["arch"]))
