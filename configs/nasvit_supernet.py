"""NASViT supernet training (Gong et al., ICLR 2022; facebookresearch/NASViT configs/cfg.yaml).

Sandwich rule each step: the largest subnet on the labels, the smallest and two random subnets
distilled in place from the largest with the adaptive alpha-divergence (alpha in [-1, 1]), and
gradient projection of conflicting subnet gradients (`--config.objective.gradient_projection=False`
turns it off). Each subnet runs at a resolution of `objective.resolutions` (the paper's 192, 224,
256, 288; the batch is resized in the step): the largest subnet at the largest, the smallest at
the smallest, random subnets at a random one. The authors' recipe: 360 epochs (cfg.yaml says
400), AdamW lr 3e-4 at batch 64 per GPU, wd 0, grad clip 1.0, 5 warmup epochs, drop path 0.01,
light mixup/cutmix (0.01) and RandAugment rand-n1-m1. Expected: smallest subnet 78.3%, largest
82.8% top-1 (authors' README).

  python train.py --config configs/nasvit_supernet.py --workdir runs/nasvit_supernet

`:quick` trains the tiny supernet (`nasvit_supernet_tiny`: 3 stages, 16x16 digits, resolutions
12 and 16) for 6 epochs (132 steps of 4 passes; 4.7 min of wall time on a 2-core machine shared
with other jobs); evaluation runs the largest subnet at 16 px: 89.2% val top-1 measured (a
mid-size subnet after BN recalibration: 64.2%, configs/nasvit_search.py:quick with evaluate):

  python train.py --config configs/nasvit_supernet.py:quick --workdir runs/nasvit_quick
"""
import ml_collections

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, quick=False, projection=True)
  c = common.deit_recipe("nasvit_supernet", drop_path_rate=0.01)
  c.total_epochs = 360
  c.img_size = 224
  c.batch_size = 2048
  c.optim.lr = 3e-4
  c.optim.lr_base_batch = 64
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_mode = "norm"
  c.optim.grad_clip_value = 1.0
  c.optim.no_decay = ()
  c.aug.randaugment = "rand-n1-m1-mstd0.5-inc1"
  c.aug.mixup_alpha = 0.01
  c.aug.cutmix_alpha = 0.01
  c.aug.random_erasing = 0.01
  c.objective = ml_collections.ConfigDict(
      {"name": "nasvit_sandwich", "num_random": 2, "gradient_projection": args.projection,
       "resolutions": (192, 224, 256, 288)})
  if args.quick:
    common.make_quick(c, name="nasvit_supernet_tiny", drop_path_rate=0.0)
    c.img_size = 16
    c.objective.resolutions = (12, 16)
    c.total_epochs = 6
    c.optim.lr = 2e-3
    c.optim.weight_decay = 0.0
  return c
