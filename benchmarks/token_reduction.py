"""Token reduction on this CPU: DynamicViT-S/0.7 and ATS beside DeiT-S, PatchMerger ViT-B/16 (and
S/16) beside ViT-B/16 (S/16), in one process, with the same thread settings for every model.

  python benchmarks/token_reduction.py [--batches 16,32,64] [--merger-batches 16,32] [--threads N]
      [--platform cpu|gpu] [--dtype float32|bfloat16] [--dynamicvit-repo DIR] [--host-devices N]

For each model: parameters, GMACs per image (`compact_vit.profile.count_macs`, jaxpr
multiply-accumulates of the static-shape inference graph), images/s of `jax.jit(apply(train=False))`
in float32 on random variables at each batch size, and batch-1 latency. Warm-up calls (compilation
included) are untimed; the models of a group are timed in turns, `--repeats` rounds of `--steps`
calls each, the order reversed every other round. images/s is a model's best round; a speed ratio
is the median, over rounds, of the dense baseline's time over the model's time in the same round,
with its range: on a shared machine whose speed drifts by several percent within minutes, this
pairing is much steadier than a ratio of the two best rounds. Prints a Markdown table
and writes it to benchmarks/results/token_reduction_cpu.md. `--platform gpu` runs the same on the
first GPU (`--threads` then only pins the host process); `--dtype` is the compute dtype.
`--dynamicvit-repo` (a checkout of raoyongming/DynamicViT, not part of this repository) adds the
authors' PyTorch DynamicViT-S and timm's DeiT-S to the DeiT-S group's rounds (CPU, eval mode,
`torch.inference_mode`, `--threads` torch threads), so both ratios come from the same run.
`--host-devices N` splits the CPU into N XLA devices (`--xla_force_host_platform_device_count`, as
`XLA_FLAGS=--xla_force_host_platform_device_count=N python eval.py ...` does for evaluation) and
shards every batch over them, data parallel: XLA:CPU runs a batched matmul whose matrices are
small (DynamicViT's attention below ~150 tokens) on one core, and N devices run N of them at once.
The dense baseline is then also timed on one device in the same rounds (its own row).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import _report  # benchmarks/_report.py (this script's folder is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = {  # baseline -> token-reduction models
    "deit_small_patch16_224": ("dynamicvit_deit_s", "ats_deit_s"),
    "vit_base_patch16_224": ("patchmerger_vit_b16",),
    "vit_small_patch16_224": ("patchmerger_vit_s16",),
}


def authors_models(repo: str, threads: int) -> dict:
  """timm's DeiT-S and the authors' DynamicViT-S/0.7 (their models/dyvit.py), random init, eval.

  Their package imports `torch._six` (gone from torch 2) and `tensorboardX` in utils.py, which
  dyvit.py only needs for `batch_index_select`: both are stubbed."""
  import math  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  six = sys.modules.setdefault("torch._six", types.ModuleType("torch._six"))
  six.inf = math.inf
  sys.modules.setdefault("tensorboardX", types.ModuleType("tensorboardX")).SummaryWriter = None
  sys.path[:0] = [repo, os.path.join(repo, "models")]
  from dyvit import VisionTransformerDiffPruning  # pylint: disable=import-outside-toplevel
  ratio = 0.7
  return {"timm deit_small_patch16_224 (PyTorch)":
              timm.create_model("deit_small_patch16_224").eval(),
          "authors' DynamicViT-S/0.7 (PyTorch)": VisionTransformerDiffPruning(
              patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True,
              pruning_loc=[3, 6, 9], token_ratio=[ratio, ratio ** 2, ratio ** 3]).eval()}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="16,32,64", help="batch sizes for the DeiT-S group")
  parser.add_argument("--merger-batches", default="16,32", help="batch sizes for the ViT groups")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="CPU cores: the process is pinned to that many (XLA sizes its thread "
                           "pool from the affinity)")
  parser.add_argument("--steps", type=int, default=2, help="timed calls per round")
  parser.add_argument("--repeats", type=int, default=5, help="rounds per model and batch")
  parser.add_argument("--latency-steps", type=int, default=10, help="timed batch-1 calls per round")
  parser.add_argument("--groups", default=",".join(GROUPS), help="baselines to run")
  parser.add_argument("--platform", default="cpu", choices=("cpu", "gpu"))
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--dynamicvit-repo", help="checkout of raoyongming/DynamicViT")
  parser.add_argument("--host-devices", type=int, default=1,
                      help="CPU only: split the CPU into this many XLA devices and shard each "
                           "batch over them (data parallel; batch-1 latency stays on one)")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "token_reduction_cpu.md"))
  args = parser.parse_args(argv)

  batch_sizes = {int(b) for b in f"{args.batches},{args.merger_batches}".split(",")}
  if args.host_devices > 1 and (args.platform != "cpu" or any(b % args.host_devices
                                                              for b in batch_sizes)):
    parser.error(f"--host-devices {args.host_devices} needs --platform cpu and batch sizes that "
                 f"are multiples of it (got {sorted(batch_sizes)}).")
  profile = _report.cpu_setup(args.threads, args.host_devices)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from compact_vit.models import create_model  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_platforms", {"gpu": "cuda"}.get(args.platform, args.platform))
  dtype = jax.numpy.dtype(args.dtype)
  mesh = Mesh(np.array(jax.devices()[:args.host_devices]), ("data",))
  batched, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

  def ratio_cell(secs: dict[str, list[float]], base: str, name: str) -> str:
    """'median (min-max)' of the same-round speed ratios, e.g. '1.55x (1.52-1.57)'."""
    if name == base:
      return "1.00x"
    ratios = _report.same_round_ratios(secs, base, name)
    return f"{np.median(ratios):.2f}x ({ratios.min():.2f}-{ratios.max():.2f})"

  where = (f"this CPU ({platform.processor() or platform.machine()}, {args.threads} threads"
           if args.platform == "cpu" else f"{jax.devices()[0].device_kind} (")
  lines = [f"# Token reduction, inference on {where}, {args.dtype}, jax {jax.__version__})", "",
           f"XLA_FLAGS=`{os.environ.get('XLA_FLAGS', '')}`; batches sharded over "
           f"{args.host_devices} XLA device(s); {args.repeats} interleaved rounds of "
           f"{args.steps} calls (order reversed every other round); images/s of the best round; "
           "speed ratio: median (min-max) over rounds of the baseline's time / the model's time "
           "in the same round.", "",
           "| model | params (M) | GMACs | MACs ratio | batch | images/s | speed ratio |"
           " batch-1 latency (ms) |", "|---|---|---|---|---|---|---|---|"]
  for baseline in args.groups.split(","):
    names = (baseline,) + GROUPS[baseline]
    batches = [int(b) for b in (args.batches if baseline.startswith("deit")
                                else args.merger_batches).split(",")]
    models, variables, stats = {}, {}, {}
    for name in names:
      models[name] = create_model(name, **({} if args.dtype == "float32" else {"dtype": dtype}))
      variables[name] = profile.random_variables(models[name], (1, 224, 224, 3))
      stats[name] = (profile.count_params(variables[name]["params"]) / 1e6,
                     profile.count_macs(models[name], variables[name], (1, 224, 224, 3)) / 1e9)
    applies = {n: jax.jit(lambda v, x, m=models[n]: m.apply(v, x, train=False)) for n in names}

    on_mesh = {n: jax.device_put(v, replicated) for n, v in variables.items()}
    on_one = on_mesh if args.host_devices == 1 else {
        n: jax.device_put(v, jax.devices()[0]) for n, v in variables.items()}

    def runner(name, x):
      v = on_one[name] if x.shape[0] == 1 else on_mesh[name]
      return lambda: jax.block_until_ready(applies[name](v, x))

    torch_models = (authors_models(args.dynamicvit_repo, args.threads)
                    if args.dynamicvit_repo and baseline.startswith("deit") else {})

    def torch_runner(name, x):
      import torch  # pylint: disable=import-outside-toplevel
      images = torch.from_numpy(np.array(x, np.float32)).permute(0, 3, 1, 2).contiguous()

      def run():
        with torch.inference_mode():
          torch_models[name](images)
      return run

    rates, timings, single = {}, {}, f"{baseline}, 1 device"
    for batch in batches:
      x = jax.device_put(np.random.default_rng(0).standard_normal((batch, 224, 224, 3),
                                                                  dtype=np.float32),
                         batched).astype(dtype)
      runs = {**{n: runner(n, x) for n in names}, **{n: torch_runner(n, x) for n in torch_models}}
      if args.host_devices > 1:  # the dense baseline undivided too, to show the split's own gain
        x_one = jax.device_put(x, jax.devices()[0])
        runs[single] = lambda x_one=x_one: jax.block_until_ready(
            applies[baseline](on_one[baseline], x_one))
      timings[batch] = _report.timed_rounds(runs, args.steps, args.repeats)
      rates[batch] = {n: batch / min(s) for n, s in timings[batch].items()}
      print(f"batch {batch}: " + ", ".join(f"{n} {r:.1f} img/s" for n, r in rates[batch].items()),
            flush=True)
    x1 = jax.device_put(np.zeros((1, 224, 224, 3), np.float32), jax.devices()[0]).astype(dtype)
    latency_secs = _report.timed_rounds({n: runner(n, x1) for n in names}, args.latency_steps,
                                        args.repeats)
    latency = {n: min(s) for n, s in latency_secs.items()}
    print("batch 1 latency: " + ", ".join(f"{n} {s * 1e3:.1f} ms" for n, s in latency.items()),
          flush=True)
    for name in names:
      params, gmacs = stats[name]
      for i, batch in enumerate(batches):
        lead = (f"| {name} | {params:.2f} | {gmacs:.2f} | {gmacs / stats[baseline][1]:.3f}"
                if i == 0 else "| | | |")
        lines.append(f"{lead} | {batch} | {rates[batch][name]:.1f} | "
                     f"{ratio_cell(timings[batch], baseline, name)} | "
                     + (f"{latency[name] * 1e3:.1f} "
                        f"({np.median(_report.same_round_ratios(latency_secs, baseline, name)):.2f}"
                        "x) |"
                        if i == 0 else "|"))
    torch_base = next(iter(torch_models), None)
    for name in torch_models:
      for i, batch in enumerate(batches):
        lines.append(f"| {name if i == 0 else ''} | | | | {batch} | {rates[batch][name]:.1f} | "
                     f"{ratio_cell(timings[batch], torch_base, name)} vs timm |  |")
    for i, batch in enumerate(batches if args.host_devices > 1 else []):
      lines.append(f"| {single if i == 0 else ''} | | | | {batch} | {rates[batch][single]:.1f} | "
                   f"{ratio_cell(timings[batch], baseline, single)} |  |")
  table = "\n".join(lines) + "\n"
  _report.write_markdown(table, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
