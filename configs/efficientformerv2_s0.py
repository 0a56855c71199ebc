r"""EfficientFormerV2-S0 (Li et al., "Rethinking Vision Transformers for MobileNet Size and
Speed", ICCV 2023).

ImageNet-1K from scratch with the authors' recipe (configs/common.py `efficientformer_recipe`): 300
epochs (`:epochs=450` for the longer schedule), global batch 1024, AdamW lr 1e-3, wd 0.025,
adaptive gradient clipping 0.01, EMA, DeiT augmentation with repeated augmentation, drop path 0.0,
hard distillation from RegNetY-16GF. Expected top-1: 75.7% after 300 epochs, 76.2% after 450
(paper, with the teacher); 3.60M parameters, 0.40 GMACs at 224.

Needs the teacher: convert DeiT's RegNetY-16GF checkpoint once, then pass it to train.py
(eval.py does not need it):

  python -m compact_vit.convert --model regnety_160 --checkpoint regnety_160-a5fe301d.pth \
      --out teachers/regnety_160
  python train.py --config configs/efficientformerv2_s0.py:epochs=450 \
      --workdir runs/efv2_s0 --config.distill.teacher_init_from=teachers/regnety_160
  python eval.py --config configs/efficientformerv2_s0.py:epochs=450 --workdir runs/efv2_s0

`:quick` trains a shrunken EfficientFormerV2 (32x32 inputs, widths 16-64, strided and
downsampling attention kept) on the embedded `digits` dataset without a teacher, in a few
minutes on a 2-core CPU (measured: 99.2% val top-1 in 4 min):

  python train.py --config configs/efficientformerv2_s0.py:quick --workdir runs/efv2_s0_quick
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, quick=False, epochs=300)
  c = common.efficientformer_recipe("efficientformerv2_s0", epochs=args.epochs,
                                    drop_path_rate=0.0)
  if args.quick:
    common.make_quick_efficientformer(c, v2=True)
  return c
