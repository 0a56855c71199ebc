"""`python -m compact_vit.convert --model NAME [--checkpoint FILE|hf-hub:OWNER/NAME] --out DIR`:
converts a PyTorch checkpoint (.pth/.pt/.bin, .safetensors, .npz in timm naming; or one on the
Hugging Face Hub, downloaded into its cache; by default the model's published weights) into a
directory that `compact_vit.checkpointing.load_variables` reads (and `config.init_from`, `eval.py`)."""
from __future__ import annotations

import argparse
import os
import sys

from compact_vit.checkpointing import save_variables
from compact_vit.convert import load_pytorch_state_dict, read_state_dict
from compact_vit.convert.hub import checkpoint_file
from compact_vit.convert.published import default_spec
from compact_vit.errors import UserError
from compact_vit.paths import check_workdir, is_remote
from compact_vit.profile import count_params


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the exit status (errors: one line on stderr, status 1)."""
  parser = argparse.ArgumentParser(prog="python -m compact_vit.convert", description=__doc__)
  parser.add_argument("--model", required=True, help="registered model name")
  parser.add_argument("--checkpoint", help=".pth/.pt/.bin, .safetensors or .npz file, or "
                      "hf-hub:OWNER/NAME[/FILE][@REVISION] (default: the model's published "
                      "weights)")
  parser.add_argument("--out", required=True, help="output directory (local or gs://BUCKET/DIR)")
  parser.add_argument("--num-classes", type=int, help="override the model's num_classes")
  parser.add_argument("--img-size", type=int, help="override img_size (resamples pos_embed)")
  parser.add_argument("--drop-head", action="store_true",
                      help="skip the checkpoint's classifier head(s); initialise them afresh")
  args = parser.parse_args(argv)
  overrides = {k: v for k, v in (("num_classes", args.num_classes), ("img_size", args.img_size))
               if v is not None}
  created = not is_remote(args.out) and not os.path.exists(args.out)
  try:
    check_workdir(args.out)  # a bad path or bucket fails before the download
    checkpoint = args.checkpoint or default_spec(args.model)
    state_dict = read_state_dict(checkpoint_file(checkpoint))
    variables = load_pytorch_state_dict(args.model, state_dict, drop_head=args.drop_head,
                                        **overrides)
    out = save_variables(args.out, variables, args.model, overrides)
  except UserError as e:
    if created and os.path.isdir(args.out) and not os.listdir(args.out):
      os.rmdir(args.out)  # the preflight made it; a failed conversion leaves nothing behind
    print(f"error: {e}", file=sys.stderr)
    return 1
  num_params = count_params(variables["params"])
  print(f"Converted {args.model} ({num_params:,} parameters) from {checkpoint} to {out}"
        + (f" with {overrides}" if overrides else "") + (", head reinitialised" if args.drop_head
                                                          else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
