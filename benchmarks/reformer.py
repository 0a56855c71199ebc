"""Reformer's memory savings, measured: XLA's compiled memory analysis of a full training gradient,
and time per gradient as ratios measured in the same run.

  python benchmarks/reformer.py [--batch 8] [--depths 6,12,24] [--grids 32,45,64,90,128]
                                [--time-depth 2] [--max-dense-time-tokens 8192] [--threads N]

The gradient is `jax.grad` of the cross-entropy of `model.apply(params, x, train=True)` with respect
to all parameters, deterministic (drop path and dropout 0, fixed 'dropout'/'sample' keys), jitted
on the CPU. Memory is `jit(grad).lower(...).compile().memory_analysis().temp_size_in_bytes`: XLA's
scratch buffers (activations kept for the backward pass and workspace), excluding parameters,
inputs and the gradient outputs. Nothing is executed for the memory columns.

1. Depth (224x224, 197 tokens, batch `--batch`): reversible LSH `reformer_vit_s16`, the same with
   ordinary residual blocks (`reversible=False`), and DeiT-S (`deit_small_patch16_224`, the
   ordinary ViT) at each of `--depths`; temp memory and its ratio to the shallowest depth. Time per
   gradient at depth 12 relative to DeiT-S.
2. Tokens (batch 1, patch 16, images of `16 * grid` pixels: grid^2 + 1 tokens): reversible
   `reformer_vit_s16` with LSH (2 hash rounds, chunks of 64) against the same model with dense
   attention. Memory at the full depth 12; time at depth `--time-depth` (a 12-layer dense gradient
   at 8k tokens takes minutes on a CPU; reversible memory does not depend on depth, table 1), dense
   timed only up to `--max-dense-time-tokens`.

Prints Markdown and writes it to benchmarks/results/reformer_cpu.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import _report  # benchmarks/_report.py (this script's folder is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8, help="batch of the depth table")
  parser.add_argument("--depths", default="6,12,24")
  parser.add_argument("--grids", default="32,45,64,90,128",
                      help="patch grids of the token table (grid^2 + 1 tokens)")
  parser.add_argument("--time-depth", type=int, default=2, help="depth of the token-table timing")
  parser.add_argument("--max-dense-time-tokens", type=int, default=8192)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls (best kept)")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "reformer_cpu.md"))
  args = parser.parse_args(argv)

  # Pin before JAX's CPU backend starts: XLA sizes its thread pool from the affinity mask.
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  sys.path.insert(0, ROOT)
  from compact_vit.models import create_model  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_platforms", "cpu")
  mib = 2.0**20

  def gradient(name: str, batch: int, img_size: int, **overrides):
    """(jitted gradient function, abstract params, abstract images) of the training loss."""
    model = create_model(name, num_classes=1000, img_size=img_size, **overrides)
    x = jax.ShapeDtypeStruct((batch, img_size, img_size, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    labels = jnp.arange(batch) % 1000
    rngs = {"dropout": jax.random.key(1), "sample": jax.random.key(2)}

    def loss(params, x):
      logits = model.apply({"params": params}, x, train=True, rngs=rngs)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    return jax.jit(jax.grad(loss)), params, x

  def temp_mib(name: str, batch: int, img_size: int, **overrides) -> float:
    grad, params, x = gradient(name, batch, img_size, **overrides)
    return grad.lower(params, x).compile().memory_analysis().temp_size_in_bytes / mib

  def prepare(name: str, batch: int, img_size: int, **overrides):
    """A compiled, warmed-up gradient call on random parameters and images."""
    grad, params, x = gradient(name, batch, img_size, **overrides)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.02, p.shape), p.dtype), params)
    x = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    compiled = grad.lower(params, x).compile()
    run = lambda: jax.block_until_ready(compiled(params, x))
    run()
    return run

  def best_seconds(runs: dict) -> dict:
    """Best time of each call over `--repeats` rounds, the calls interleaved within each round so
    that load from other jobs on the machine affects all of them alike."""
    best = {key: float("inf") for key in runs}
    for _ in range(args.repeats):
      for key, run in runs.items():
        start = time.perf_counter()
        run()
        best[key] = min(best[key], time.perf_counter() - start)
    return best

  lines = [
      "# Reformer on CPU: training-gradient memory and time",
      "",
      "`" + " ".join(["python benchmarks/reformer.py"] +
                     list(argv if argv is not None else sys.argv[1:])) + "`",
      "",
      f"Machine: {platform.processor() or platform.machine()}, {args.threads} threads "
      f"(shared with other jobs, so times are noisy; ratios come from the same run); "
      f"jax {jax.__version__}. Memory: XLA `memory_analysis().temp_size_in_bytes` of the jitted "
      "gradient (activations kept for the backward pass plus workspace; parameters, inputs and "
      f"gradients excluded). Time: best of {args.repeats} gradient calls after a warm-up, the "
      "models compared in a table timed in interleaved rounds.",
      ""]

  # 1. Depth.
  depths = [int(d) for d in args.depths.split(",")]
  configs = [("reformer_vit_s16, reversible, LSH", "reformer_vit_s16", {}),
             ("reformer_vit_s16, ordinary blocks, LSH", "reformer_vit_s16", {"reversible": False}),
             ("deit_small_patch16_224 (ordinary ViT)", "deit_small_patch16_224", {})]
  lines += [f"## 1. Depth: 224x224 (197 tokens), batch {args.batch}", "",
            "| model | " + " | ".join(f"depth {d} MiB" for d in depths) +
            f" | depth {depths[-1]} / depth {depths[0]} | time at depth 12 vs DeiT-S |",
            "|---|" + "---|" * (len(depths) + 2)]
  depth_ratio, mems = {}, {}
  for label, name, overrides in configs:
    mems[label] = [temp_mib(name, args.batch, 224, depth=d, **overrides) for d in depths]
    depth_ratio[label] = mems[label][-1] / mems[label][0]
    print(label, mems[label], flush=True)
  times = best_seconds({label: prepare(name, args.batch, 224, depth=12, **overrides)
                        for label, name, overrides in configs})
  deit_time = times[configs[-1][0]]
  for label, _, _ in configs:
    mem = mems[label]
    lines.append(f"| {label} | " + " | ".join(f"{m:,.0f}" for m in mem) +
                 f" | {depth_ratio[label]:.2f}x | {times[label] / deit_time:.2f}x "
                 f"({times[label]:.2f} s) |")
  lines.append("")

  # 2. Tokens.
  grids = [int(g) for g in args.grids.split(",")]
  lines += ["## 2. Tokens: reversible reformer_vit_s16, LSH (2 rounds, chunks of 64) vs dense, "
            "batch 1", "",
            f"Memory at depth 12; time per gradient at depth {args.time_depth}.", "",
            "| tokens | LSH MiB | dense MiB | LSH / dense memory | LSH s | dense s | "
            "LSH / dense time |", "|---|---|---|---|---|---|---|"]
  token_rows = {}
  for grid in grids:
    img, tokens = 16 * grid, grid * grid + 1
    lsh_mem = temp_mib("reformer_vit_s16", 1, img, attention="lsh")
    dense_mem = temp_mib("reformer_vit_s16", 1, img, attention="dense")
    runs = {"lsh": prepare("reformer_vit_s16", 1, img, attention="lsh", depth=args.time_depth)}
    if tokens <= args.max_dense_time_tokens:
      runs["dense"] = prepare("reformer_vit_s16", 1, img, attention="dense",
                              depth=args.time_depth)
    timed = best_seconds(runs)
    lsh_s, dense_s = timed["lsh"], timed.get("dense")
    token_rows[tokens] = (lsh_mem / dense_mem, None if dense_s is None else lsh_s / dense_s)
    dense_cols = ("—", "—")
    if dense_s is not None:
      dense_cols = (f"{dense_s:.2f}", f"{lsh_s / dense_s:.2f}x")
    lines.append(f"| {tokens:,} | {lsh_mem:,.0f} | {dense_mem:,.0f} | {lsh_mem / dense_mem:.2f}x "
                 f"| {lsh_s:.2f} | {dense_cols[0]} | {dense_cols[1]} |")
    print(lines[-1], flush=True)
  lines.append("")

  # Targets (issue 6).
  rev = depth_ratio[configs[0][0]]
  lines += ["## Targets", ""]
  lines.append(f"- reversible reformer_vit_s16, temp memory depth {depths[-1]} / depth "
               f"{depths[0]}: {rev:.2f}x (target <= 1.5x): {'met' if rev <= 1.5 else 'NOT met'}; "
               f"DeiT-S: {depth_ratio[configs[-1][0]]:.2f}x.")
  near = min(token_rows, key=lambda t: abs(t - 4096))
  mem_ratio, time_ratio = token_rows[near]
  lines.append(f"- {near:,} tokens, LSH / dense temp memory: {mem_ratio:.2f}x (target <= 0.35x): "
               f"{'met' if mem_ratio <= 0.35 else 'NOT met'}.")
  if time_ratio is not None:
    lines.append(f"- {near:,} tokens, LSH / dense time: {time_ratio:.2f}x (target < 1, faster): "
                 f"{'met' if time_ratio < 1 else 'NOT met'}.")
  text = "\n".join(lines) + "\n"
  _report.write_markdown(text, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
