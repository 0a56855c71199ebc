"""Where DynamicViT's inference time goes, beside its dense DeiT, on this CPU.

  python benchmarks/dynamicvit_breakdown.py [--model dynamicvit_deit_s] [--keep-ratio 0.7]
      [--batch 32] [--repeats 8] [--threads N] [--out FILE]

Times, jitted in float32 on random variables at one batch size, in the interleaved rounds of
benchmarks/token_reduction.py:
* whole models: the dense DeiT; DynamicViT; DynamicViT given fixed keep decisions (the first
  int(N·ρ^s) patches), so that XLA drops the unused predictors: its blocks and pruning alone;
* parts, each jitted alone: one transformer block at every token count DynamicViT runs (1 + N
  patches, then 1 + int(N·ρ^s) after stage s), each stage's score predictor, each prune step
  (top-k, gather, class-token concatenation), and the attention's two batched products alone.
For each: how many times one DynamicViT forward pass runs it, MACs per image
(`compact_vit.profile.function_macs`), median ms per call, GMAC/s and cores busy (process CPU
time over wall time, afterwards). Then DeiT's time over
DynamicViT's (the speed ratio, median of same-round ratios) with and without the predictors,
each beside its MACs bound 1 / (MACs ratio): the ratio if both models ran at the same speed per
MAC. Parts jitted alone run slower per MAC than inside a whole model: on Linux each call gets its
buffers over 32 MB from glibc's mmap as fresh pages, so one 197-token block at batch 32 pays about
as many page faults (~20k) as a whole model does. Compare their GMAC/s with each other.
Writes benchmarks/results/dynamicvit_breakdown_cpu.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import _report  # benchmarks/_report.py (this script's folder is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENSE = {"dynamicvit_deit_s": "deit_small_patch16_224",
         "dynamicvit_deit_b": "deit_base_patch16_224"}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="dynamicvit_deit_s", choices=sorted(DENSE))
  parser.add_argument("--keep-ratio", type=float, default=0.7)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="CPU cores: the process is pinned to that many")
  parser.add_argument("--steps", type=int, default=2, help="timed calls per round")
  parser.add_argument("--repeats", type=int, default=8, help="rounds")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "dynamicvit_breakdown_cpu.md"))
  args = parser.parse_args(argv)

  profile = _report.cpu_setup(args.threads)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from compact_vit.models import create_model  # pylint: disable=import-outside-toplevel
  from compact_vit.models.dynamic_vit import (  # pylint: disable=import-outside-toplevel
      ScorePredictor, keep_top_patches)
  from compact_vit.nn.layers import Block  # pylint: disable=import-outside-toplevel

  batch, shape = args.batch, (1, 224, 224, 3)
  model = create_model(args.model, keep_ratio=args.keep_ratio)
  dense_name = DENSE[args.model]
  dense = create_model(dense_name)
  variables = {args.model: profile.random_variables(model, shape),
               dense_name: profile.random_variables(dense, shape)}
  rng = np.random.default_rng(0)

  def normal(*dims):
    return jnp.asarray(rng.standard_normal(dims, dtype=np.float32))

  images = normal(batch, 224, 224, 3)
  num_patches = model.grid_size[0] * model.grid_size[1]
  decisions = [jnp.broadcast_to(jnp.arange(num_patches) < model.num_kept(s), (batch, num_patches))
               for s in range(len(model.pruning_loc))]
  fixed = jax.jit(lambda v, x, d: model.apply(v, x, train=False, decisions=d))
  # parts: name -> (runs per DynamicViT pass, MACs per image, jitted fn, its arguments); without
  # its predictors, DynamicViT's MACs are its own less theirs (make_jaxpr keeps unused equations)
  parts = {}
  for name, m in ((dense_name, dense), (args.model, model)):
    fn = jax.jit(lambda v, x, m=m: m.apply(v, x, train=False))
    parts[name] = (1, profile.count_macs(m, variables[name], shape), fn, (variables[name], images))
  no_predictors = f"{args.model}, fixed decisions (no predictors)"
  parts[no_predictors] = (1, None, fixed, (variables[args.model], images, decisions))

  tokens = [1 + num_patches] + [1 + model.num_kept(s) for s in range(len(model.pruning_loc))]
  per_block = [tokens[sum(i >= loc for loc in model.pruning_loc)] for i in range(model.depth)]
  block = Block(num_heads=model.num_heads, mlp_ratio=model.mlp_ratio, qkv_bias=model.qkv_bias)
  block_vars = {"params": variables[args.model]["params"]["blocks_0"]}
  block_fn = jax.jit(lambda v, x: block.apply(v, x))
  for n in tokens:
    x = normal(batch, n, model.embed_dim)
    parts[f"block, {n} tokens"] = (per_block.count(n),
                                   profile.function_macs(block.apply, block_vars, x[:1]),
                                   block_fn, (block_vars, x))
  heads, head_dim = model.num_heads, model.embed_dim // model.num_heads
  attention_fn = jax.jit(lambda q, k, v: jnp.einsum("bhqk,bhkd->bhqd",
                                                    jnp.einsum("bhqd,bhkd->bhqk", q, k), v))
  for n in tokens:
    q = normal(batch, heads, n, head_dim)
    parts[f"attention dots q·kᵀ, ·v, {n} tokens"] = (
        per_block.count(n), profile.function_macs(attention_fn, q[:1], q[:1], q[:1]),
        attention_fn, (q, q, q))
  predictor = ScorePredictor()
  predictor_fn = jax.jit(lambda v, x: predictor.apply(v, x, jnp.ones(x.shape[:2])))

  for s, n in enumerate(tokens[:-1]):
    pred_vars = {"params": variables[args.model]["params"][f"score_predictor_{s}"]}
    x = normal(batch, n, model.embed_dim)
    parts[f"predictor {s}, {n - 1} patches"] = (
        1, profile.function_macs(predictor_fn, pred_vars, x[:1, 1:]), predictor_fn,
        (pred_vars, x[:, 1:]))
    k = tokens[s + 1] - 1
    parts[f"prune {s}, {n - 1} -> {k} patches"] = (
        1, 0.0, jax.jit(lambda x, log_probs, k=k: keep_top_patches(x, log_probs[..., 0], k)[0]),
        (x, normal(batch, n - 1, 2)))

  predictor_macs = sum(macs for name, (_, macs, _, _) in parts.items() if "predictor " in name)
  parts[no_predictors] = (1, parts[args.model][1] - predictor_macs) + parts[no_predictors][2:]
  runs = {name: (lambda fn=fn, a=a: jax.block_until_ready(fn(*a)))
          for name, (_, _, fn, a) in parts.items()}
  secs = _report.timed_rounds(runs, args.steps, args.repeats)
  ms = {name: float(np.median(s)) * 1e3 for name, s in secs.items()}
  busy = {name: cores_busy(run, args.steps) for name, run in runs.items()}

  cpu = platform.processor() or platform.machine()
  lines = [f"# DynamicViT's inference time by part, this CPU ({cpu}, {args.threads} threads, "
           f"float32, jax {jax.__version__})", "",
           f"`python benchmarks/dynamicvit_breakdown.py --model {args.model} --keep-ratio "
           f"{args.keep_ratio} --batch {batch} --repeats {args.repeats}`; XLA_FLAGS="
           f"`{os.environ.get('XLA_FLAGS', '')}`; median over {args.repeats} interleaved rounds "
           f"of {args.steps} calls.", "",
           "| part | runs per pass | GMACs per image | ms per call | GMAC/s | cores busy |",
           "|---|---|---|---|---|---|"]
  for name, (count, macs, _, _) in parts.items():
    rate = f"{macs * batch / ms[name] / 1e6:.1f}" if macs else "-"
    lines.append(f"| {name} | {count} | {macs / 1e9:.4f} | {ms[name]:.1f} | {rate} | "
                 f"{busy[name]:.2f} |")
  lines += ["", f"Speed ratio {dense_name} / {args.model} at batch {batch}, median (range) over "
            "rounds, beside the MACs bound:", ""]
  for name in (args.model, no_predictors):
    ratios = _report.same_round_ratios(secs, dense_name, name)
    macs_ratio = parts[name][1] / parts[dense_name][1]
    lines.append(f"- {name}: {np.median(ratios):.3f}x ({ratios.min():.3f}-{ratios.max():.3f}); "
                 f"MACs ratio {macs_ratio:.4f}, bound {1 / macs_ratio:.3f}x")
  predictors = ms[args.model] - ms[no_predictors]
  lines.append(f"- the predictors take {predictors:.1f} ms of {args.model}'s {ms[args.model]:.1f} "
               f"({predictors / ms[args.model]:.1%}) for "
               f"{1 - parts[no_predictors][1] / parts[args.model][1]:.1%} of its MACs")
  _report.write_markdown("\n".join(lines) + "\n", args.out)
  return 0


def cores_busy(run, calls: int) -> float:
  """Process CPU time over wall time of `calls` calls of `run`: how many cores it kept busy."""
  start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(calls):
    run()
  after = resource.getrusage(resource.RUSAGE_SELF)
  cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
  return cpu / (time.perf_counter() - start)


if __name__ == "__main__":
  sys.exit(main())
