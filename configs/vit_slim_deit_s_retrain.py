"""Fine-tunes a ViT-Slim model extracted by `search.py --config configs/vit_slim_deit_s.py`.

The DeiT recipe (configs/common.py) for 300 epochs from the extracted weights, as the authors'
retrain.py and README command (4 GPUs x 256, lr 5e-4 x batch/512, repeated augmentation, EMA;
their DeiT-S at budget 0.7: 79.9% top-1 in third-party tables). `slim_dir` is the search's
DIR/slim (model.json holds the kept dims per layer):

  python train.py --config configs/vit_slim_deit_s_retrain.py:slim_dir=runs/vit_slim_deit_s/slim \
      --workdir runs/vit_slim_deit_s_retrain

Without `slim_dir` it trains the registry's `vit_slim_deit_s` (uniform 0.7 of every dimension)
from scratch. `:quick` on `digits` (>= 90% val top-1 in a few minutes), with or without slim_dir:

  python train.py --config configs/vit_slim_deit_s_retrain.py:quick --workdir runs/vit_slim_rt_q
"""
import json
import os

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, quick=False, slim_dir="")
  c = common.deit_recipe("vit_slim_deit_s", drop_path_rate=0.1)
  common.cite_defaults(c, "Arnav0400/ViT-Slim ViT-Slim/retrain.py")
  common.cite(c, global_batch="Arnav0400/ViT-Slim ViT-Slim/README.md retrain command: 4 GPUs x "
                              "--batch-size 256")
  if args.quick:
    common.make_quick_deit(c)
    c.model.update(head_dims=((45,) * 3,) * 4, mlp_hidden=(538,) * 4)  # 0.7 of the quick DeiT
    c.total_epochs = 10
  if args.slim_dir:
    with open(os.path.join(args.slim_dir, "model.json")) as f:
      overrides = json.load(f)["overrides"]
    c.img_size = overrides.pop("img_size")
    overrides.pop("num_classes")
    for key, value in overrides.items():
      c.model[key] = value
    c.init_from = os.path.abspath(args.slim_dir)
  return c
