"""Pictures of what a model does with its tokens.

`python -m compact_vit.viz tokens --config configs/X.py[:ARGS] --workdir DIR --image FILE
--out tokens.png` draws, for a trained DynamicViT or ATS model (the latest checkpoint in
`DIR/checkpoints`, else converted weights given with `--init-from DIR`), the input image and then
one panel per pruning stage in which the patches that no longer take part are greyed out. The
image is resized to the model's input size and normalised with the config's mean/std. Uses
Pillow only.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys

import numpy as np

from compact_vit import paths
from compact_vit.errors import UserError

PANEL = 224  # pixels per panel side
GAP = 8


def load_config(spec: str):
  """`configs/X.py[:ARG]` -> the ConfigDict of its `get_config(ARG)`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"Config file {path} does not exist.")
  sys.path.insert(0, os.getcwd())
  module_spec = importlib.util.spec_from_file_location("viz_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def kept_masks(intermediates, grid: tuple[int, int]) -> list[np.ndarray]:
  """Per stage, a (rows, cols) bool map of the patches still present (first image of the batch).

  DynamicViT sows `kept_positions` (patch indices); ATS sows `kept_positions` (token indices, 0 =
  class token) and `kept_valid`.
  """
  positions = intermediates.get("kept_positions")
  if positions is None:
    raise UserError("This model sows no kept token positions; `viz tokens` supports DynamicViT "
                    "(dynamicvit_*) and ATS (ats_*) models.")
  valid = intermediates.get("kept_valid")
  masks = []
  for s, pos in enumerate(positions):
    pos = np.asarray(pos[0])
    ok = np.ones(pos.shape, bool) if valid is None else np.asarray(valid[s][0])
    if valid is not None:  # ATS: token index -> patch index, drop the class token
      ok, pos = ok & (pos > 0), pos - 1
    mask = np.zeros(grid[0] * grid[1], bool)
    mask[pos[ok]] = True
    masks.append(mask.reshape(grid))
  return masks


def draw(image, masks: list[np.ndarray]):
  """Pillow image: the input, then one panel per stage with dropped patches greyed."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  base = np.asarray(image.convert("RGB").resize((PANEL, PANEL), Image.BICUBIC), np.float32)
  grid = np.zeros((PANEL, PANEL, 1), bool)  # patch borders
  rows, cols = masks[0].shape if masks else (1, 1)
  grid[np.linspace(0, PANEL - 1, rows + 1).astype(int)] = True
  grid[:, np.linspace(0, PANEL - 1, cols + 1).astype(int)] = True
  panels = [base]
  for mask in masks:
    keep = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (PANEL, PANEL), Image.NEAREST))[..., None] > 0
    panel = np.where(keep, base, 0.15 * base + 0.85 * np.array([150.0, 150.0, 165.0]))
    panels.append(np.where(grid, np.array([90.0, 90.0, 255.0]), panel))
  canvas = np.full((PANEL, len(panels) * (PANEL + GAP) - GAP, 3), 255.0, np.float32)
  for i, panel in enumerate(panels):
    canvas[:, i * (PANEL + GAP):i * (PANEL + GAP) + PANEL] = panel
  return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def tokens(config_spec: str, workdir: str, image_path: str, out: str,
           init_from: str | None = None) -> list[int]:
  """Writes the picture to `out`; returns the number of patches kept at each stage."""
  import jax  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from compact_vit import evaluator, trainer  # pylint: disable=import-outside-toplevel
  from compact_vit.data import pipeline  # pylint: disable=import-outside-toplevel
  from compact_vit.nn.layers import to_pair  # pylint: disable=import-outside-toplevel

  config = load_config(config_spec)
  if init_from:
    config.init_from = init_from
  if not paths.isfile(paths.check_path(image_path, "Image file")):
    raise UserError(f"Image file {image_path} does not exist.")
  info = pipeline.get_info(config.dataset)
  model = trainer.create_model(config, info.num_classes)
  variables, _, _ = evaluator.load_eval_variables(config, workdir, model)
  image = Image.open(io.BytesIO(paths.read_bytes(image_path))).convert("RGB")
  size = to_pair(config.img_size)
  x = np.asarray(image.resize(size[::-1], Image.BICUBIC), np.float32) / 255.0
  x = (x - np.asarray(config.dataset.mean)) / np.asarray(config.dataset.std)
  _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(
      variables, x[None].astype(np.float32))
  masks = kept_masks(state["intermediates"], model.grid_size)
  picture = io.BytesIO()
  draw(image, masks).save(picture, format="PNG")
  paths.write_bytes(out, picture.getvalue())
  return [int(m.sum()) for m in masks]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m compact_vit.viz", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  tok = sub.add_parser("tokens", help="patches kept at each stage, over the input image")
  tok.add_argument("--config", required=True, help="configs/X.py[:ARGS]")
  tok.add_argument("--workdir", required=True, help="training run (its latest checkpoint)")
  tok.add_argument("--image", required=True, help="an image file Pillow reads")
  tok.add_argument("--out", default="tokens.png", help="output PNG")
  tok.add_argument("--init-from", help="converted weights, used when DIR has no checkpoint")
  args = parser.parse_args(argv)
  try:
    counts = tokens(args.config, args.workdir, args.image, args.out, args.init_from)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"Wrote {args.out}: patches kept per stage {counts}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
