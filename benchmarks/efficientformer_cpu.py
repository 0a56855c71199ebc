"""Inference throughput on this CPU: our Flax EfficientFormer-L1 and EfficientFormerV2-S0 beside
timm's PyTorch models, in the same process, with the same thread count.

  python benchmarks/efficientformer_cpu.py [--batch 32] [--img-size 224] [--threads N]

Both sides are pinned to the same `--threads` cores and run float32 inference (ours: `jax.jit` of
`apply(train=False)`; timm: `eval()` under `torch.inference_mode()`) on one random NHWC / NCHW
batch, after untimed warm-up calls (JAX compilation included there). Each model is timed
`--repeats` times and the best rate is kept, which damps the noise of a shared machine. Prints a
Markdown table and writes it to benchmarks/results/efficientformer_cpu.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import _report  # benchmarks/_report.py (this script's folder is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("efficientformer_l1", "efficientformerv2_s0")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--img-size", type=int, default=224)
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="CPU cores for both: the process is pinned to that many cores (XLA "
                           "sizes its thread pool from the affinity) and torch uses as many "
                           "threads")
  parser.add_argument("--steps", type=int, default=5, help="timed calls per repeat")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "efficientformer_cpu.md"))
  args = parser.parse_args(argv)

  # Pin before JAX's CPU backend starts: XLA sizes its thread pool from the affinity mask.
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  sys.path.insert(0, ROOT)
  from compact_vit.models import create_model  # pylint: disable=import-outside-toplevel
  from compact_vit.profile import random_variables  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(args.threads)
  jax.config.update("jax_platforms", "cpu")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.batch, args.img_size, args.img_size, 3), dtype=np.float32)

  def best_rate(run) -> float:
    run()  # warm-up (and compilation)
    run()
    rates = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      for _ in range(args.steps):
        run()
      rates.append(args.batch * args.steps / (time.perf_counter() - start))
    return max(rates)

  rows = []
  for name in MODELS:
    model = create_model(name, img_size=args.img_size)
    variables = jax.device_put(random_variables(model, (1, args.img_size, args.img_size, 3)))
    apply = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
    x_jax = jax.device_put(x)
    ours = best_rate(lambda: jax.block_until_ready(apply(variables, x_jax)))

    kwargs = {"img_size": args.img_size} if name.startswith("efficientformerv2") else {}
    reference = timm.create_model(name, pretrained=False, **kwargs).eval()
    x_torch = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    def run_timm(reference=reference, x_torch=x_torch):
      with torch.inference_mode():
        reference(x_torch)
    theirs = best_rate(run_timm)
    rows.append((name, ours, theirs))
    print(f"{name}: ours {ours:.1f} img/s, timm {theirs:.1f} img/s", file=sys.stderr, flush=True)

  lines = [
      f"Inference images/s, batch {args.batch}, {args.img_size}x{args.img_size}, float32, "
      f"{args.threads} threads ({platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} CPUs); jax {jax.__version__}, torch {torch.__version__}, "
      f"timm {timm.__version__}. Best of {args.repeats} x {args.steps} calls.",
      "",
      "| model | ours (Flax/XLA) | timm (PyTorch) | ours / timm |",
      "|---|---|---|---|",
  ] + [f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |"
       for name, ours, theirs in rows]
  table = "\n".join(lines) + "\n"
  _report.write_markdown(table, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
