"""`python -m compact_vit.export --model NAME [--checkpoint SPEC | --config C --workdir W]
--format onnx [--batch N|dynamic] [--layout nhwc|nchw] [--int8 dynamic|static] --out FILE.onnx`

Exports the model, checks its logits against `model.apply` on real photos (relative error at most
1e-4) before writing, and prints one JSON line: params, GMACs per image, the onnxruntime latency
(ms, 2 threads by default) and the check's error. `--checkpoint` takes what
`compact_vit.create_model(pretrained=...)` takes (a converted directory, a PyTorch checkpoint file,
`hf-hub:OWNER/NAME`); `--config`/`--workdir` the latest training checkpoint of a run. With
neither, the weights are random (for latency only). With `--int8`, the int8 model is written only
if it runs faster than the float one; otherwise the command says so and writes nothing (exit 1)
unless `--int8-even-if-slower`. Its logit drift and top-1 change against the float model are
printed too: on the run's eval split (with both top-1 accuracies) for `--config`, else on photos.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from compact_vit.errors import UserError


def _parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m compact_vit.export",
                                   description=__doc__.split("\n\n")[1])
  parser.add_argument("--model", help="registered model name (default: the config's)")
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--checkpoint", help="converted directory, PyTorch checkpoint or hf-hub:...")
  source.add_argument("--config", help="configs/X.py[:ARGS] of a training run (with --workdir)")
  parser.add_argument("--workdir", help="the run's directory (with --config)")
  parser.add_argument("--format", default="onnx", choices=["onnx"])
  parser.add_argument("--batch", default="1", help="batch size, or 'dynamic' (default 1)")
  parser.add_argument("--img-size", type=int, help="input size (default: the model's)")
  parser.add_argument("--layout", default="nhwc", choices=["nhwc", "nchw"],
                      help="the exported model's input: (B, H, W, 3) as model.apply takes it "
                      "(default), or (B, 3, H, W) as a PyTorch model's export takes it")
  parser.add_argument("--int8", choices=["dynamic", "static"], help="onnxruntime int8 quantization")
  parser.add_argument("--int8-even-if-slower", action="store_true",
                      help="write the int8 model even when it runs slower than the float one")
  parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads for the timing")
  parser.add_argument("--rtol", type=float, default=1e-4,
                      help="largest relative logit difference the check accepts (default 1e-4)")
  parser.add_argument("--out", required=True, help="output .onnx file")
  return parser.parse_args(argv)


def _batch(value: str) -> int | str:
  if value == "dynamic":
    return value
  if not value.isdigit() or int(value) < 1:
    raise UserError(f"--batch={value}: give a positive integer or 'dynamic'.")
  return int(value)


def load(args: argparse.Namespace):
  """(model name, model, variables, where the weights came from) for the CLI's arguments."""
  import compact_vit  # pylint: disable=import-outside-toplevel
  from compact_vit import profile  # pylint: disable=import-outside-toplevel
  overrides = {"img_size": args.img_size} if args.img_size else {}
  if args.config:
    if not args.workdir:
      raise UserError("--config needs --workdir (the run whose latest checkpoint to export).")
    return _from_run(args.config, args.workdir, args.model, overrides)
  if args.workdir:
    raise UserError("--workdir needs --config (the run's configs/X.py[:ARGS]).")
  if not args.model:
    raise UserError("Give --model NAME (or --config and --workdir of a training run).")
  if args.checkpoint:
    model, variables = compact_vit.create_model(args.model, pretrained=args.checkpoint,
                                                **overrides)
    return args.model, model, variables, args.checkpoint
  model = compact_vit.create_model(args.model, **overrides)
  from compact_vit.nn.layers import to_pair  # pylint: disable=import-outside-toplevel
  variables = profile.random_variables(model, (1, *to_pair(model.img_size), 3))
  return args.model, model, variables, "random (no --checkpoint or --config)"


def _from_run(config_spec: str, workdir: str, name: str | None, overrides: dict):
  # pylint: disable=import-outside-toplevel
  from compact_vit import evaluator, recipe, trainer
  from compact_vit.data import pipeline
  config = recipe.load_config(config_spec)
  if name and name != config.model.name:
    raise UserError(f"--model {name} but the run trains {config.model.name}; drop --model.")
  if overrides:
    raise UserError("--img-size cannot change a trained run's input size; drop it.")
  num_classes = pipeline.get_info(config.dataset).num_classes
  model = trainer.create_model(config, num_classes)
  variables, step, _ = evaluator.load_eval_variables(config, workdir, model)
  return config.model.name, model, variables, f"{workdir} step {step}"


def eval_set(config_spec: str, limit: int = 1024):
  """(images, labels): up to `limit` examples of the run's eval split, as eval.py reads them."""
  # pylint: disable=import-outside-toplevel
  from compact_vit import recipe
  from compact_vit.data import pipeline
  config = recipe.load_config(config_spec)
  images, labels = [], []
  for batch in pipeline.eval_iterator(config.dataset, img_size=config.img_size,
                                      batch_size=config.eval_batch_size,
                                      crop_pct=config.crop_pct):
    images.append(batch["image"][batch["mask"]])
    labels.append(batch["label"][batch["mask"]])
  return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; prints one JSON line (errors: one line on stderr, status 1)."""
  args = _parse(argv)
  try:
    # pylint: disable=import-outside-toplevel
    from compact_vit import profile
    from compact_vit.export import onnx as ex
    from compact_vit.nn.layers import to_pair
    batch = _batch(args.batch)
    name, model, variables, source = load(args)
    export = ex.to_onnx(model, variables, batch=batch, model_name=name, rtol=args.rtol,
                        layout=args.layout)
    shape = (1, *to_pair(model.img_size), 3)
    timing_batch = export.check_batch
    images = ex.photo_batch(timing_batch, model.img_size)
    record = {
        "model": name, "weights": source, "format": "onnx", "batch": batch, "layout": args.layout,
        "img_size": model.img_size, "params": profile.count_params(variables["params"]),
        "gmacs": round(profile.count_macs(model, variables, shape) / 1e9, 4),
        "max_rel_err": export.max_rel_err,
        "latency_ms": round(ex.latency_ms(ex.session(export.proto, args.threads), images), 3),
        "latency_batch": timing_batch, "threads": args.threads,
    }
    if args.int8:
      report = ex.quantize(export, args.int8, threads=args.threads,
                           eval_set=eval_set(args.config) if args.config else None)
      record.update(int8=args.int8, float_ms=round(report.float_ms, 3),
                    int8_ms=round(report.int8_ms, 3), int8_logit_drift=report.logit_drift,
                    int8_top1_changed=report.top1_changed)
      if report.float_top1 is not None:
        record.update(float_top1=report.float_top1, int8_top1=report.int8_top1)
      if not report.faster and not args.int8_even_if_slower:
        print(json.dumps(record))
        print(f"error: {args.int8} int8 {name} runs slower than float32 in onnxruntime "
              f"({report.int8_ms:.1f} vs {report.float_ms:.1f} ms at batch {timing_batch}, "
              f"{args.threads} threads); nothing written. Export without --int8 for the float "
              "model, or pass --int8-even-if-slower.", file=sys.stderr)
        return 1
      export.proto = report.proto
    record["out"] = export.save(args.out)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(record))
  return 0


if __name__ == "__main__":
  sys.exit(main())
