r"""EfficientFormer-L1 (Li et al., "EfficientFormer: Vision Transformers at MobileNet Speed",
NeurIPS 2022).

ImageNet-1K from scratch with the authors' recipe (configs/common.py `efficientformer_recipe`): 300
epochs, global batch 1024, AdamW lr 1e-3, wd 0.025, adaptive gradient clipping 0.01, EMA, DeiT
augmentation with repeated augmentation, hard distillation from RegNetY-16GF. Expected top-1: 79.2%
(paper, with the teacher; without it users report 77-78%, EfficientFormer issues #15, #31); 12.29M
parameters, 1.30 GMACs at 224.

Needs the teacher: convert DeiT's RegNetY-16GF checkpoint once, then pass it to train.py
(eval.py does not need it):

  python -m compact_vit.convert --model regnety_160 --checkpoint regnety_160-a5fe301d.pth \
      --out teachers/regnety_160
  python train.py --config configs/efficientformer_l1.py --workdir runs/ef_l1 \
      --config.distill.teacher_init_from=teachers/regnety_160
  python eval.py --config configs/efficientformer_l1.py --workdir runs/ef_l1

`:quick` trains a shrunken EfficientFormer (64x64 inputs, widths 16-64, one attention block) on the
embedded `digits` dataset without a teacher, in a few minutes on a 2-core CPU (measured: 97.8% val
top-1 in 4.5 min):

  python train.py --config configs/efficientformer_l1.py:quick --workdir runs/ef_l1_quick
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, quick=False)
  c = common.efficientformer_recipe("efficientformer_l1")
  if args.quick:
    common.make_quick_efficientformer(c, v2=False)
  return c
