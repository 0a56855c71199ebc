"""Deployment latency in onnxruntime (CPU): our ONNX exports beside timm's PyTorch models exported
with `torch.onnx.export`, and the token reducers beside their dense backbones.

  python benchmarks/export_latency.py [--models NAME,...|all] [--batches 1,32] [--threads 2]
      [--rounds 15] [--layout nchw|nhwc] [--control | --no-control] [--reducers | --no-reducers]
      [--out benchmarks/results/export_cpu.md]

For each model with a timm version: timm's model (random init, eval mode) is converted to our
variables (`compact_vit.convert.load_pytorch_state_dict`), so both sides hold the same weights;
ours is exported by `compact_vit.export.to_onnx` (checked on photos against `model.apply`), timm's
by `torch.onnx.export` (the TorchScript exporter, opset 17, which folds BatchNorm into the
convolutions), and both logits are compared on the same photos. By default ours is exported with
`layout='nchw'`, so both files take the same (B, 3, H, W) tensor, as a deployment that swaps one
for the other would feed them; `--layout nhwc` times ours on the NHWC input `model.apply` takes
(one more Transpose at the input). Both run in onnxruntime with the
same session options (`--threads` intra-op threads, all graph optimisations), at each batch size,
in alternating rounds in one process (the order rotates through every permutation of the sessions,
so none always runs right after the same other); a round times `--calls` runs of each. The ratio
is the median over rounds of ours / timm in the same round (below 1: ours is faster), with its
range. With `--control` (the default) a second session of timm's own file is timed in the same
rounds: timm / timm is what this machine's noise alone makes of identical graphs, the yardstick
for ours / timm beside it. The table also lists what differs between the two graphs onnxruntime
runs after its optimisations (operator counts, ours minus timm's): a deterministic account of
where a real difference could come from. The token reducers (DynamicViT-S/0.7, ATS-DeiT-S,
PatchMerger-ViT-S/16) are timed the same way against their dense backbone's export. The load
average of the machine before and after is written beside the table: on a shared machine the
ratios stay fair (same rounds), the absolute milliseconds do not.
"""
from __future__ import annotations

import argparse
import io
import itertools
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEFAULT = ("deit_tiny_patch16_224", "deit_small_patch16_224", "efficientformer_l1",
           "efficientformerv2_s0", "resnet50")
TIMM = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
        "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224",
        "deit_base_distilled_patch16_224", "vit_tiny_patch16_224", "vit_small_patch16_224",
        "vit_base_patch16_224", "efficientformer_l1", "efficientformer_l3", "efficientformer_l7",
        "efficientformerv2_s0", "efficientformerv2_s1", "efficientformerv2_s2",
        "efficientformerv2_l", "resnet50", "resnext50_32x4d", "resnext101_32x4d",
        "resnext101_32x8d", "regnety_160")
REDUCERS = {  # token reducer -> its dense backbone
    "dynamicvit_deit_s": "deit_small_patch16_224",
    "ats_deit_s": "deit_small_patch16_224",
    "patchmerger_vit_s16": "vit_small_patch16_224",
}


def timm_pair(name: str, batch: int):
  """(our model, our variables, timm's ONNX bytes) of timm's `name` with the same weights."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from compact_vit.convert import load_pytorch_state_dict  # pylint: disable=import-outside-toplevel
  from compact_vit.models import create_model  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  reference = timm.create_model(name, pretrained=False).eval()
  state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  model = create_model(name)
  variables = load_pytorch_state_dict(name, state)
  size = model.img_size
  buffer = io.BytesIO()
  with torch.no_grad():
    torch.onnx.export(reference, (torch.zeros(batch, 3, size, size),), buffer, dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["logits"])
  return model, variables, buffer.getvalue()


# With random weights a token reducer's keep scores nearly tie, and float rounding may keep a
# different token in onnxruntime than in XLA (DynamicViT-S: 2e-4 relative): the reducers' exports
# are checked at this tolerance here; timing does not depend on the values.
REDUCER_RTOL = 1e-2


def our_export(name: str, batch: int, variables=None, layout: str = "nhwc"):
  """(model, variables, Export) of our `name` at `batch` (random variables unless given)."""
  from compact_vit import export, profile  # pylint: disable=import-outside-toplevel
  from compact_vit.models import create_model  # pylint: disable=import-outside-toplevel
  model = create_model(name)
  if variables is None:
    variables = profile.random_variables(model, (1, model.img_size, model.img_size, 3))
  rtol = REDUCER_RTOL if name in REDUCERS else export.PARITY_RTOL
  return model, variables, export.to_onnx(model, variables, batch=batch, model_name=name,
                                          rtol=rtol, layout=layout)


def alternate(sessions: dict, feeds: dict, rounds: int, calls: int) -> dict[str, list[float]]:
  """Seconds per run of each session in each round; round r runs the sessions in the r-th order
  of their permutations (cyclically: for two sessions, the order flips every other round)."""
  for name, sess in sessions.items():
    for _ in range(2):
      sess.run(None, feeds[name])
  secs = {name: [] for name in sessions}
  orders = list(itertools.permutations(sessions))
  for r in range(rounds):
    for name in orders[r % len(orders)]:
      start = time.perf_counter()
      for _ in range(calls):
        sessions[name].run(None, feeds[name])
      secs[name].append((time.perf_counter() - start) / calls)
  return secs


def ratio(secs: dict, name: str, base: str) -> tuple[float, float, float]:
  """Median, min and max over rounds of name's time / base's time in the same round."""
  r = np.asarray(secs[name]) / np.asarray(secs[base])
  return float(np.median(r)), float(r.min()), float(r.max())


def graph_difference(ours: bytes, timm: bytes) -> str:
  """Operator counts in which onnxruntime's optimised graphs of the two files differ (ours minus
  timm's), e.g. 'Transpose -9, Slice +1', onnxruntime's own operators named with their domain;
  'none' when they hold the same operators."""
  from compact_vit import export  # pylint: disable=import-outside-toplevel
  a, b = export.optimized_ops(ours, domains=True), export.optimized_ops(timm, domains=True)
  diff = {op: a[op] - b[op] for op in sorted(set(a) | set(b)) if a[op] != b[op]}
  return ", ".join(f"{op} {n:+d}" for op, n in diff.items()) or "none"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(DEFAULT), help="comma-separated, or 'all'")
  parser.add_argument("--batches", default="1,32")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--calls", type=int, default=0, help="runs per round (0: 8 at batch 1, 1 "
                      "at larger batches)")
  parser.add_argument("--layout", default="nchw", choices=["nchw", "nhwc"],
                      help="our exports' input layout (timm's is NCHW)")
  parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                      help="also time a second session of timm's file (the noise of this machine)")
  parser.add_argument("--reducers", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/export_cpu.md"))
  args = parser.parse_args()
  import torch  # pylint: disable=import-outside-toplevel  # before anything imports TensorFlow
  torch.set_num_threads(args.threads)
  from compact_vit import export  # pylint: disable=import-outside-toplevel
  names = list(TIMM) if args.models == "all" else [n for n in args.models.split(",") if n]
  unknown = sorted(set(names) - set(TIMM))
  if unknown:
    raise SystemExit(f"No timm version in this benchmark for {unknown}; choose from {TIMM}.")
  batches = [int(b) for b in args.batches.split(",")]
  load_before = os.getloadavg()
  rows, reducer_rows = [], []
  for batch in batches:
    calls = args.calls or (8 if batch == 1 else 1)
    images = export.photo_batch(batch, 224)
    for name in names:
      model, variables, timm_onnx = timm_pair(name, batch)
      _, _, ours = our_export(name, batch, variables, args.layout)
      ours_onnx = ours.proto.SerializeToString()
      sessions = {"ours": export.session(ours_onnx, args.threads),
                  "timm": export.session(timm_onnx, args.threads)}
      feeds = {"ours": export.feed(sessions["ours"], images),
               "timm": {"x": np.ascontiguousarray(images.transpose(0, 3, 1, 2))}}
      if args.control:
        sessions["timm again"] = export.session(timm_onnx, args.threads)
        feeds["timm again"] = feeds["timm"]
      logits = {k: s.run(None, feeds[k])[0] for k, s in sessions.items()}
      agree = float(np.abs(logits["ours"] - logits["timm"]).max()
                    / np.abs(logits["timm"]).max())
      secs = alternate(sessions, feeds, args.rounds, calls)
      control = ratio(secs, "timm again", "timm") if args.control else None
      rows.append((name, batch, 1e3 * np.median(secs["ours"]), 1e3 * np.median(secs["timm"]),
                   ratio(secs, "ours", "timm"), control, graph_difference(ours_onnx, timm_onnx),
                   ours.max_rel_err, agree))
      print(rows[-1], flush=True)
    if args.reducers:
      bases = {}
      for reducer, base in REDUCERS.items():
        if base not in bases:
          bases[base] = export.session(our_export(base, batch, layout=args.layout)[2].proto,
                                       args.threads)
        reduced = our_export(reducer, batch, layout=args.layout)[2]
        sessions = {reducer: export.session(reduced.proto, args.threads), base: bases[base]}
        feeds = {k: export.feed(s, images) for k, s in sessions.items()}
        secs = alternate(sessions, feeds, args.rounds, calls)
        med, low, high = ratio(secs, reducer, base)
        reducer_rows.append((reducer, base, batch, 1e3 * np.median(secs[reducer]),
                             1e3 * np.median(secs[base]), med, low, high))
        print(reducer_rows[-1], flush=True)
  load_after = os.getloadavg()
  write(args, rows, reducer_rows, load_before, load_after)


def write(args, rows, reducer_rows, load_before, load_after) -> None:
  import onnxruntime  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  lines = [
      "# ONNX export latency in onnxruntime (CPU)", "",
      f"`python benchmarks/export_latency.py --models {args.models} --batches {args.batches} "
      f"--threads {args.threads} --rounds {args.rounds} --layout {args.layout}"
      f"{'' if args.control else ' --no-control'}`", "",
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; onnxruntime "
      f"{onnxruntime.__version__}, {args.threads} intra-op threads, all graph optimisations; "
      f"torch {torch.__version__} (`torch.onnx.export`, TorchScript exporter, opset 17); ours "
      f"exported with layout={args.layout}. "
      f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.1f}' for x in load_before)}; "
      f"after: {', '.join(f'{x:.1f}' for x in load_after)} (the machine is shared; ratios "
      "come from alternating rounds in one process, milliseconds are medians over rounds).", "",
      "## Ours vs timm (same weights)", "",
      "timm / timm: a second session of timm's file in the same rounds (this machine's noise on "
      "identical graphs). Optimised graphs: operator counts in which the graphs onnxruntime runs "
      "differ, ours minus timm's.", "",
      "| model | batch | ours ms | timm ms | ours / timm (median, range) | timm / timm (noise) | "
      "optimised graphs, ours - timm | ours vs apply | ours vs timm logits |",
      "|---|---|---|---|---|---|---|---|---|"]
  for name, batch, ours_ms, timm_ms, (med, low, high), control, diff, err, agree in rows:
    noise = f"{control[0]:.2f} ({control[1]:.2f}-{control[2]:.2f})" if control else "-"
    lines.append(f"| {name} | {batch} | {ours_ms:.1f} | {timm_ms:.1f} | **{med:.2f}** "
                 f"({low:.2f}-{high:.2f}) | {noise} | {diff} | {err:.1e} | {agree:.1e} |")
  if reducer_rows:
    lines += ["", "## Token reducers vs their dense backbones (both our exports)", "",
              "| model | backbone | batch | model ms | backbone ms | model / backbone (median, "
              "range) |", "|---|---|---|---|---|---|"]
    for reducer, base, batch, r_ms, b_ms, med, low, high in reducer_rows:
      lines.append(f"| {reducer} | {base} | {batch} | {r_ms:.1f} | {b_ms:.1f} | **{med:.2f}** "
                   f"({low:.2f}-{high:.2f}) |")
  table = "\n".join(lines) + "\n"
  print(table)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(table)


if __name__ == "__main__":
  main()
