"""The whole model zoo on this CPU: params, GMACs, inference and train-step images/s, beside timm
(and the authors' PyTorch SepViT / UniNet) in the same process, under the same thread settings.

  python benchmarks/zoo.py [--models a,b,...] [--batch 32] [--train-batch 8] [--skip-train]
      [--skip-reference] [--repeats 5] [--threads N] [--sepvit-repo DIR] [--uninet-repo DIR]
      [--out benchmarks/results/zoo_cpu.md] [--plot benchmarks/results/zoo_top1_vs_gmacs.png]

Ours: `jax.jit` of `apply(train=False)` on random variables (`compact_vit.profile`), with the CPU
defaults `compact_vit.profile` ships (XLA_FLAGS unless set). timm: `eval()` under
`torch.inference_mode()`, where timm has the architecture (same name); `--sepvit-repo` /
`--uninet-repo` add the authors' modules for SepViT / UniNet (see benchmarks/hybrids_cpu.py).
Both sides use `--threads` cores (the process is pinned; torch.set_num_threads). Each model's
two sides are timed alternately, one call each, `--repeats` times after warm-up, and the medians
are reported, so load from other processes hits both alike. Train step: forward in train mode,
softmax cross-entropy (averaged over the heads of distilled models), backward and an SGD update,
ours jitted with the trainer's `xla.train_compiler_options()`, timm's eager. Writes a Markdown
table (`--out`) and, with `--plot`, published top-1 against measured GMACs for the models whose
top-1 is known (../shared/REFERENCES.md).
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Published ImageNet-1K top-1 (%) of the registered names, from REFERENCES.md (papers / READMEs).
PUBLISHED_TOP1 = {
    "deit_tiny_patch16_224": 72.2, "deit_small_patch16_224": 79.9, "deit_base_patch16_224": 81.8,
    "efficientformer_l1": 79.2, "efficientformer_l3": 82.4, "efficientformer_l7": 83.3,
    "efficientformerv2_s0": 75.7, "efficientformerv2_s1": 79.0, "efficientformerv2_s2": 81.6,
    "efficientformerv2_l": 83.3, "sepvit_t": 82.7, "sepvit_s": 83.6, "sepvit_b": 84.2,
    "uninet_b0": 79.1, "uninet_b1": 81.0, "uninet_b4": 84.2, "uninet_b5": 84.9,
    "autoformer_t": 74.7, "autoformer_s": 81.7, "autoformer_b": 82.4,
    "tftas_t": 75.3, "nasvit_a0": 78.2, "nasvit_a1": 79.7, "nasvit_a2": 80.5, "nasvit_a5": 81.8,
    "vit_slim_deit_s": 79.9, "dynamicvit_deit_s": 79.32,
}
AUTHORS = {"sepvit": "sepvit_repo", "uninet": "uninet_repo"}  # family prefix -> flag


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", help="comma-separated registered names (default: all)")
  parser.add_argument("--batch", type=int, default=32, help="inference batch")
  parser.add_argument("--train-batch", type=int, default=8, help="train-step batch")
  parser.add_argument("--skip-train", action="store_true", help="inference only")
  parser.add_argument("--skip-reference", action="store_true", help="ours only (no torch)")
  parser.add_argument("--count-only", action="store_true",
                      help="params and GMACs only (no timing; fast, e.g. for --plot)")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per side")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--sepvit-repo", help="checkout of liwei109/SepViT (authors' SepViT)")
  parser.add_argument("--uninet-repo", help="checkout of Sense-X/UniNet (authors' UniNet)")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "zoo_cpu.md"))
  parser.add_argument("--plot", help="PNG path for published top-1 vs GMACs")
  parser.add_argument("--note", default="", help="a line added under the table header")
  return parser.parse_args(argv)


def median_rates(runs, batches, repeats):
  """Calls every run twice (warm-up), then `repeats` rounds of one call each, alternating;
  returns the median images/s of each (None for a run that is None)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  live = [(i, r) for i, r in enumerate(runs) if r is not None]
  for _, run in live:
    run()
    run()
  times = {i: [] for i, _ in live}
  for _ in range(repeats):
    for i, run in live:
      start = time.perf_counter()
      run()
      times[i].append(time.perf_counter() - start)
  return [batches[i] / float(np.median(times[i])) if i in times else None
          for i in range(len(runs))]


class Ours:
  """Jitted inference and train step of a registered model on random variables."""

  def __init__(self, name):
    import jax  # pylint: disable=import-outside-toplevel
    from compact_vit import profile  # pylint: disable=import-outside-toplevel
    from compact_vit.models import create_model  # pylint: disable=import-outside-toplevel
    from compact_vit.nn.layers import to_pair  # pylint: disable=import-outside-toplevel
    self.model = create_model(name)
    self.size = to_pair(self.model.img_size)
    shape = (1, *self.size, 3)
    self.variables = jax.device_put(profile.random_variables(self.model, shape))
    self.params = profile.count_params(self.variables["params"])
    self.gmacs = profile.count_macs(self.model, self.variables, shape) / 1e9

  def images(self, batch):
    import numpy as np  # pylint: disable=import-outside-toplevel
    return np.random.default_rng(0).standard_normal((batch, *self.size, 3), dtype=np.float32)

  def infer(self, batch):
    import jax  # pylint: disable=import-outside-toplevel
    apply = jax.jit(lambda v, x: self.model.apply(v, x, train=False))
    x = jax.device_put(self.images(batch))
    return lambda: jax.block_until_ready(apply(self.variables, x))

  def train(self, batch):
    import jax  # pylint: disable=import-outside-toplevel
    from compact_vit import xla  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel
    model, variables = self.model, self.variables
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(params, x, labels, key):
      out, updates = model.apply(
          {"params": params, **rest}, x, train=True, mutable=["batch_stats", "intermediates"],
          rngs={"dropout": key, "sample": jax.random.fold_in(key, 1)})
      heads = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
               if getattr(o, "ndim", 0) == 2]
      loss = sum(optax.softmax_cross_entropy_with_integer_labels(h, labels).mean()
                 for h in heads) / len(heads)
      return loss, updates

    @functools.partial(jax.jit, compiler_options=xla.train_compiler_options())
    def step(params, x, labels, key):
      grads, _ = jax.grad(loss_fn, has_aux=True)(params, x, labels, key)
      return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

    x = jax.device_put(self.images(batch))
    labels = jnp.arange(batch) % self.model.num_classes
    key = jax.random.key(0)
    params = variables["params"]
    return lambda: jax.block_until_ready(step(params, x, labels, key))


class Reference:
  """timm's (or the authors') PyTorch model of the same architecture, NCHW."""

  def __init__(self, name, args):
    import timm  # pylint: disable=import-outside-toplevel
    self.kind, self.model = None, None
    family = name.split("_")[0]
    repo = getattr(args, AUTHORS[family]) if family in AUTHORS else None
    if repo:
      import hybrids_cpu  # pylint: disable=import-outside-toplevel
      hybrids_cpu.MODELS.setdefault(name, (_authors_class(name), None))
      self.kind, self.model = "authors'", hybrids_cpu.authors_model(name, repo)
    elif timm.is_model(name):
      self.kind, self.model = "timm", timm.create_model(name, pretrained=False).eval()

  def infer(self, images):
    import torch  # pylint: disable=import-outside-toplevel
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    model = self.model.eval()

    def run():
      with torch.inference_mode():
        model(x)
    return run

  def train(self, images, num_classes=1000):
    import torch  # pylint: disable=import-outside-toplevel
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    labels = torch.arange(x.shape[0]) % num_classes
    model = self.model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def run():
      model.train()
      out = model(x)
      heads = out if isinstance(out, (tuple, list)) else (out,)
      loss = sum(torch.nn.functional.cross_entropy(h, labels) for h in heads) / len(heads)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      model.eval()
    return run


class _Skip(Exception):
  """Ends a model's measurements early (--count-only)."""


def _authors_class(name):
  """Class name in the authors' files: sepvit_t -> SepViT_Tiny, uninet_b1 -> UniNetB1."""
  if name.startswith("sepvit"):
    return {"t": "SepViT_Tiny", "s": "SepViT_Small", "b": "SepViT_Base", "lite": "SepViT_Lite"}[
        name.split("_")[1]]
  return "UniNet" + name.split("_")[1].upper()


def fmt(value, digits=1):
  return "" if value is None else f"{value:.{digits}f}"


def ratio(a, b):
  return "" if a is None or b is None else f"{a / b:.2f}"


def main(argv=None) -> int:
  args = parse_args(argv)
  # Pin before JAX's CPU backend starts (XLA sizes its thread pool from the affinity mask) and
  # ship the profile's CPU defaults (XLA_FLAGS, read when the backend starts).
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  from compact_vit import xla  # pylint: disable=import-outside-toplevel
  xla.set_cpu_defaults()
  import jax  # pylint: disable=import-outside-toplevel
  from compact_vit.models import list_models  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_platforms", "cpu")
  torch = timm = None
  if not (args.skip_reference or args.count_only):
    import timm  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(args.threads)
  names = args.models.split(",") if args.models else list_models()

  rows = []
  for name in names:
    row = {"model": name}
    try:
      ours = Ours(name)
      row.update(params=ours.params, gmacs=ours.gmacs, size=ours.size[0])
      if args.count_only:
        raise _Skip
      ref = None if args.skip_reference else Reference(name, args)
      ref = ref if ref is not None and ref.model is not None else None
      row["ref_kind"] = ref.kind if ref else None
      if ref:
        row["ref_params"] = sum(p.numel() for p in ref.model.parameters())
      images = ours.images(args.batch)
      row["infer"], row["ref_infer"] = median_rates(
          [ours.infer(args.batch), ref.infer(images) if ref else None],
          [args.batch] * 2, args.repeats)
      if not args.skip_train:
        images = ours.images(args.train_batch)
        row["train"], row["ref_train"] = median_rates(
            [ours.train(args.train_batch),
             ref.train(images, ours.model.num_classes) if ref else None],
            [args.train_batch] * 2, max(args.repeats // 2, 1))
    except _Skip:
      pass
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    rows.append(row)
    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()},
          file=sys.stderr, flush=True)
    jax.clear_caches()
    write_table(rows, args, jax, torch, timm)  # after every model
  if args.plot:
    plot(rows, args.plot)
  return 0


def write_table(rows, args, jax, torch, timm):
  """Writes the Markdown table of `rows` to `args.out` (and prints it)."""
  from compact_vit import xla  # pylint: disable=import-outside-toplevel
  versions = f"jax {jax.__version__}" + (
      f", torch {torch.__version__}, timm {timm.__version__}" if torch else "")
  lines = [
      f"Images/s on this CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} "
      f"CPUs, {args.threads} threads for both sides), float32, inference batch {args.batch}, "
      + ("no train step" if args.skip_train else
         f"train-step batch {args.train_batch} (compiler_options "
         f"`{xla.train_compiler_options()}`)")
      + f"; {versions}; XLA_FLAGS="
      f"`{os.environ.get('XLA_FLAGS', '')}`. Median of {args.repeats} alternating calls "
      f"(train: {max(args.repeats // 2, 1)}) after 2 warm-up calls. Reference: timm's model of "
      "the same name, or the authors' PyTorch module (SepViT, UniNet) where marked.",
  ] + ([args.note] if args.note else []) + [
      "",
      "| model | input | params (M) | GMACs | infer ours | infer ref | ours/ref | train ours | "
      "train ref | ours/ref | ref |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "error" in r and "gmacs" not in r:
      lines.append(f"| {r['model']} | | | | error: {r['error']} | | | | | | |")
      continue
    lines.append(
        f"| {r['model']} | {r['size']} | {r['params'] / 1e6:.2f} | {r['gmacs']:.3f} | "
        f"{fmt(r.get('infer'))} | {fmt(r.get('ref_infer'))} | "
        f"{ratio(r.get('infer'), r.get('ref_infer'))} | {fmt(r.get('train'))} | "
        f"{fmt(r.get('ref_train'))} | {ratio(r.get('train'), r.get('ref_train'))} | "
        f"{r.get('ref_kind') or ''}{' (error: ' + r['error'] + ')' if 'error' in r else ''} |")
  table = "\n".join(lines) + "\n"
  print(table)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(table)


def plot(rows, path):
  """Published top-1 against measured GMACs, one colour per family."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  points = [(r["gmacs"], PUBLISHED_TOP1[r["model"]], r["model"]) for r in rows
            if r["model"] in PUBLISHED_TOP1 and "gmacs" in r]
  fig, ax = plt.subplots(figsize=(9, 6))
  families = sorted({name.split("_")[0] for _, _, name in points})
  for family in families:
    pts = sorted(p for p in points if p[2].split("_")[0] == family)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=family)
    for g, t, name in pts:
      ax.annotate(name, (g, t), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("GMACs per image (measured, compact_vit.profile.count_macs)")
  ax.set_ylabel("published ImageNet-1K top-1 (%)")
  ax.set_title("compact_vit zoo: published top-1 vs measured GMACs")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  sys.exit(main())
