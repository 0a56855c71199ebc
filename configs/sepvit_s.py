"""SepViT-S (Li et al., "SepViT: Separable Vision Transformer", arXiv 2203.15380).

ImageNet-1K from scratch with the authors' recipe (configs/common.py `sepvit_recipe`): 300 epochs,
global batch 1024, AdamW lr 1e-3, wd 0.05, DeiT augmentation without repeated augmentation or EMA,
gradient clipping 5, drop path 0.3 (the authors' ImageNet command exists only for SepViT-T, with
0.2; 0.3 is the rate of their SepViT-S backbone for detection and segmentation).
Expected top-1: 83.6% (paper); 46.6M parameters, 7.5 GMACs at 224.

  python train.py --config configs/sepvit_s.py --workdir runs/sepvit_s
  python eval.py --config configs/sepvit_s.py --workdir runs/sepvit_s

`:quick` trains a shrunken SepViT (32x32 inputs, three stages, windowed and global blocks) on the
embedded `digits` dataset in about 3 minutes on a 2-core CPU, compilation included; expect >= 95%
val top-1 (measured: 97.5%, 2 min 47 s on a shared 2-core machine):

  python train.py --config configs/sepvit_s.py:quick
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, quick=False)
  c = common.sepvit_recipe("sepvit_s", drop_path_rate=0.3)
  common.cite(c, drop_path="no ImageNet command for SepViT-S (the readme has SepViT-T's "
                            "only): the rate of the authors' SepViT_Small backbone in "
                            "detection/ and segmentation/sepvit.py (their SepViT_Tiny has the "
                            "readme's 0.2)")
  if args.quick:
    common.make_quick_sepvit(c)
  return c
