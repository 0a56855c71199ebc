"""DynamicViT-DeiT-S/0.7 (Rao et al., "DynamicViT", NeurIPS 2021; compact_vit/models/dynamic_vit.py).

30-epoch fine-tune of DeiT-S with three prediction modules (before blocks 3, 6, 9; keeping 137, 96,
67 of 196 patches at inference), the dense DeiT-S as teacher (configs/token_reduction_common.py).
Expected top-1: 79.3% (paper / authors' checkpoint: 79.32) at 2.98 GMACs (0.65x DeiT-S); not
measured here. First convert the DeiT-S weights twice (as the student's start, predictors fresh,
and as the teacher):

  python -m compact_vit.convert --model dynamicvit_deit_s \
      --checkpoint deit_small_patch16_224-cd65a155.pth --out weights/dynamicvit_deit_s_init
  python -m compact_vit.convert --model deit_small_patch16_224 \
      --checkpoint deit_small_patch16_224-cd65a155.pth --out weights/deit_s
  python train.py --config configs/dynamicvit_deit_s.py --workdir runs/dynamicvit_deit_s \
      --config.init_from=weights/dynamicvit_deit_s_init \
      --config.distill.teacher_init_from=weights/deit_s
  python eval.py --config configs/dynamicvit_deit_s.py --workdir runs/dynamicvit_deit_s

The authors' released DeiT-S/0.7 checkpoint (their README's download links) evaluates directly:

  python -m compact_vit.convert --model dynamicvit_deit_s --checkpoint AUTHORS_CHECKPOINT.pth \
      --out weights/dynamicvit_deit_s_authors
  python eval.py --config configs/dynamicvit_deit_s.py --workdir runs/dynamicvit_authors \
      --config.init_from=weights/dynamicvit_deit_s_authors

`:keep_ratio=R` changes ρ. `:quick` trains a shrunken DynamicViT (16x16 digits in 4x4 patches,
4 blocks of width 192, pruning before blocks 1, 2, 3: 11, 7, 5 of 16 patches kept) from scratch on
the embedded `digits` dataset with CE + keep-ratio loss (no teacher, no downloads); measured
87.5% val top-1 after its 30 epochs (660 steps, about 2 minutes on a 2-core CPU):

  python train.py --config configs/dynamicvit_deit_s.py:quick --workdir runs/dynamicvit_quick
"""
from configs import token_reduction_common as trc


def get_config(arg=None, model_name="dynamicvit_deit_s", teacher="deit_small_patch16_224",
               drop_path_rate=0.0, ratio_weight=2.0):
  args = trc.common.parse_arg(arg, quick=False, keep_ratio=0.7)
  c = trc.dynamicvit_recipe(model_name, teacher=teacher, drop_path_rate=drop_path_rate,
                            ratio_weight=ratio_weight)
  c.model.keep_ratio = args.keep_ratio
  if args.quick:
    trc.make_quick(c, pruning_loc=(1, 2, 3))
  return c
