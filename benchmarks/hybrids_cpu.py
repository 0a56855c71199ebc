"""Inference throughput on this CPU: our Flax SepViT-T and UniNet-B1, optionally beside the
authors' PyTorch modules, in the same process, with the same thread count.

  python benchmarks/hybrids_cpu.py [--batch 32] [--threads N] \
      [--sepvit-repo PATH/TO/SepViT] [--uninet-repo PATH/TO/UniNet]

Each model runs at its native resolution (224 for both) in float32: ours as `jax.jit` of
`apply(train=False)` on random variables, the authors' as `eval()` under `torch.inference_mode()`
with random init. The authors' code is not part of this repository: it is timed only when a
checkout is given (liwei109/SepViT: the directory holding `classification/sepvit.py`;
Sense-X/UniNet: the directory holding `uninet.py`). Their SepViT was written for timm 0.3; to import
it under timm 1.x this script stubs `fvcore` (used only in their `__main__`) and gives it timm
0.3's `Block` signature, which their `SepViTBlock` subclasses. Warm-up calls (compilation
included) are untimed; each model is timed `--repeats` times and the best rate kept, which damps
the noise of a shared machine. Prints a Markdown table and writes it to
benchmarks/results/hybrids_cpu.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import types

import _report  # benchmarks/_report.py (this script's folder is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"sepvit_t": ("SepViT_Tiny", 224), "uninet_b1": ("UniNetB1", 224)}


def authors_model(name: str, repo: str):
  """The authors' PyTorch module for `name` from their checkout at `repo` (random init)."""
  import torch.nn as nn  # pylint: disable=import-outside-toplevel
  if name.startswith("sepvit"):
    sys.modules.setdefault("fvcore", types.ModuleType("fvcore"))
    stub = sys.modules.setdefault("fvcore.nn", types.ModuleType("fvcore.nn"))
    stub.FlopCountAnalysis = stub.parameter_count = None
    import timm.models.vision_transformer as vit  # pylint: disable=import-outside-toplevel
    from timm.layers import DropPath, Mlp  # pylint: disable=import-outside-toplevel

    class Block03(nn.Module):
      """timm 0.3's Block constructor (positional qk_scale); SepViTBlock replaces its attn."""

      def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0.,
                   attn_drop=0., drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        del num_heads, qkv_bias, qk_scale, attn_drop
        self.norm1, self.norm2 = norm_layer(dim), norm_layer(dim)
        self.attn = nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    vit.Block = Block03
    sys.path.insert(0, os.path.join(repo, "classification"))
  else:
    sys.path.insert(0, repo)
  module = __import__("sepvit" if name.startswith("sepvit") else "uninet")
  return getattr(module, MODELS[name][0])().eval()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="CPU cores: the process is pinned to that many (XLA sizes its thread "
                           "pool from the affinity) and torch uses as many threads")
  parser.add_argument("--steps", type=int, default=3, help="timed calls per repeat")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--sepvit-repo", help="checkout of liwei109/SepViT (times their module)")
  parser.add_argument("--uninet-repo", help="checkout of Sense-X/UniNet (times their module)")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "hybrids_cpu.md"))
  args = parser.parse_args(argv)

  # Pin before JAX's CPU backend starts: XLA sizes its thread pool from the affinity mask.
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  sys.path.insert(0, ROOT)
  from compact_vit.models import create_model  # pylint: disable=import-outside-toplevel
  from compact_vit.profile import random_variables  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_platforms", "cpu")
  repos = {"sepvit_t": args.sepvit_repo, "uninet_b1": args.uninet_repo}
  torch = None
  if any(repos.values()):
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(args.threads)

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
  for name, (_, size) in MODELS.items():
    x = np.random.default_rng(0).standard_normal((args.batch, size, size, 3), dtype=np.float32)
    model = create_model(name)
    variables = jax.device_put(random_variables(model, (1, size, size, 3)))
    apply = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
    x_jax = jax.device_put(x)
    ours = best_rate(lambda: jax.block_until_ready(apply(variables, x_jax)))
    theirs = None
    if repos[name]:
      reference = authors_model(name, repos[name])
      x_torch = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

      def run_torch(reference=reference, x_torch=x_torch):
        with torch.inference_mode():
          reference(x_torch)
      theirs = best_rate(run_torch)
    rows.append((name, size, ours, theirs))
    print(f"{name}: ours {ours:.1f} img/s" + (f", authors' {theirs:.1f} img/s" if theirs else ""),
          file=sys.stderr, flush=True)

  versions = f"jax {jax.__version__}" + (f", torch {torch.__version__}" if torch else "")
  lines = [
      f"Inference images/s, batch {args.batch}, float32, {args.threads} threads "
      f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs); {versions}. "
      f"Best of {args.repeats} x {args.steps} calls.",
      "",
      "| model | input | ours (Flax/XLA) | authors' (PyTorch) | ours / authors' |",
      "|---|---|---|---|---|",
  ] + [f"| {name} | {size} | {ours:.1f} | "
       + (f"{theirs:.1f} | {ours / theirs:.2f} |" if theirs else "not run | |")
       for name, size, ours, theirs in rows]
  table = "\n".join(lines) + "\n"
  _report.write_markdown(table, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
