"""SepViT-B (Li et al., "SepViT: Separable Vision Transformer", arXiv 2203.15380).

ImageNet-1K from scratch with the authors' recipe (configs/common.py `sepvit_recipe`): 300 epochs,
global batch 1024, AdamW lr 1e-3, wd 0.05, DeiT augmentation without repeated augmentation or EMA,
gradient clipping 5, drop path 0.5 (the authors' ImageNet command exists only for SepViT-T, with
0.2; 0.5 is the rate of their SepViT-B backbone for detection and segmentation).
Expected top-1: 84.2% (paper); 82.3M parameters, 13.1 GMACs at 224.

  python train.py --config configs/sepvit_b.py --workdir runs/sepvit_b
  python eval.py --config configs/sepvit_b.py --workdir runs/sepvit_b

`:quick` is the same shrunken SepViT as `configs/sepvit_s.py:quick` (32x32 inputs, three stages,
windowed and global blocks) on the embedded `digits` dataset; expect >= 95% val top-1:

  python train.py --config configs/sepvit_b.py:quick
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, quick=False)
  c = common.sepvit_recipe("sepvit_b", drop_path_rate=0.5)
  common.cite(c, drop_path="no ImageNet command for SepViT-B (the readme has SepViT-T's "
                            "only): the rate of the authors' SepViT_Base backbone in "
                            "detection/ and segmentation/sepvit.py (their SepViT_Tiny has the "
                            "readme's 0.2)")
  if args.quick:
    common.make_quick_sepvit(c)
  return c
