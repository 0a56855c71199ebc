"""SepViT-T (Li et al., "SepViT: Separable Vision Transformer", arXiv 2203.15380).

ImageNet-1K from scratch with the authors' recipe (configs/common.py `sepvit_recipe`): 300 epochs,
global batch 1024, AdamW lr 1e-3, wd 0.05, DeiT augmentation without repeated augmentation or EMA,
gradient clipping 5, drop path 0.2 (the authors' README command). Expected top-1: 82.7% (paper);
31.2M parameters, 4.5 GMACs at 224.

  python train.py --config configs/sepvit_t.py --workdir runs/sepvit_t
  python eval.py --config configs/sepvit_t.py --workdir runs/sepvit_t

`:quick` is the same shrunken SepViT as `configs/sepvit_s.py:quick` (32x32 inputs, three stages,
windowed and global blocks) on the embedded `digits` dataset; expect >= 95% val top-1:

  python train.py --config configs/sepvit_t.py:quick
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, quick=False)
  c = common.sepvit_recipe("sepvit_t", drop_path_rate=0.2)
  common.cite(c, drop_path="liwei109/SepViT readme.md training command: --drop-path 0.2")
  if args.quick:
    common.make_quick_sepvit(c)
  return c
