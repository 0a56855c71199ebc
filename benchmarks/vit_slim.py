"""ViT-Slim at budget 0.7 beside DeiT-S on this CPU: params, GMACs and inference images/s.

  python benchmarks/vit_slim.py [--batch 16] [--threads N]

Three Flax models in one process, pinned to the same cores: `deit_small_patch16_224`, the
registered `vit_slim_deit_s` (0.7 of every head and MLP, so each layer's heads share one width and
run as one batched einsum) and the same totals with uneven head widths (64/56/48/40/34/28 = 270
per layer, as a global-threshold search produces: heads of different widths run as separate
einsums). Float32 `jax.jit` inference on one random batch after warm-up; best of `--repeats`.
Writes benchmarks/results/vit_slim_cpu.md.
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
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--steps", type=int, default=3, help="timed calls per repeat")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "vit_slim_cpu.md"))
  args = parser.parse_args(argv)
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  sys.path.insert(0, ROOT)
  from compact_vit import profile  # pylint: disable=import-outside-toplevel
  from compact_vit.models import create_model  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_platforms", "cpu")
  x = np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3), dtype=np.float32)
  uneven = dict(head_dims=((64, 56, 48, 40, 34, 28),) * 12, mlp_hidden=(1075,) * 12)
  cases = [("DeiT-S (deit_small_patch16_224)", "deit_small_patch16_224", {}),
           ("ViT-Slim 0.7 (vit_slim_deit_s, uniform heads)", "vit_slim_deit_s", {}),
           ("ViT-Slim 0.7 (uneven head widths)", "vit_slim_deit_s", uneven)]
  rows = []
  for label, name, overrides in cases:
    model = create_model(name, **overrides)
    variables = profile.random_variables(model, (1, 224, 224, 3))
    fn = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
    fn(variables, x).block_until_ready()
    rates = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      for _ in range(args.steps):
        fn(variables, x).block_until_ready()
      rates.append(args.steps * args.batch / (time.perf_counter() - start))
    macs = profile.count_macs(model, variables, (1, 224, 224, 3))
    rows.append((label, profile.count_params(variables["params"]) / 1e6, macs / 1e9, max(rates)))
    print(rows[-1], flush=True)
  base = rows[0][3]
  lines = [f"# ViT-Slim vs DeiT-S, CPU inference ({platform.processor() or platform.machine()}, "
           f"{args.threads} threads, batch {args.batch}, float32, jax {jax.__version__})", "",
           "| model | params (M) | GMACs | images/s | speed vs DeiT-S |", "|---|---|---|---|---|"]
  lines += [f"| {l} | {p:.2f} | {g:.2f} | {r:.1f} | {r / base:.2f}x |" for l, p, g, r in rows]
  lines += ["", "Third-party tables for ViT-Slim DeiT-S at budget 0.7: ~15.7M params, ~3.1 GFLOPs "
            "(MACs). Command: `python benchmarks/vit_slim.py`."]
  _report.write_markdown("\n".join(lines) + "\n", args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
