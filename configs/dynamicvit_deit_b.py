"""DynamicViT-DeiT-B/0.7 (Rao et al., "DynamicViT", NeurIPS 2021; compact_vit/models/dynamic_vit.py).

30-epoch fine-tune of DeiT-B (authors' command: drop path 0.2, ratio weight 5.0) with the dense
DeiT-B as teacher (configs/token_reduction_common.py). Expected top-1: 81.4% (authors: 81.43) at
11.5 GMACs (0.65x DeiT-B); not measured here.

  python -m compact_vit.convert --model dynamicvit_deit_b \
      --checkpoint deit_base_patch16_224-b5f2ef4d.pth --out weights/dynamicvit_deit_b_init
  python -m compact_vit.convert --model deit_base_patch16_224 \
      --checkpoint deit_base_patch16_224-b5f2ef4d.pth --out weights/deit_b
  python train.py --config configs/dynamicvit_deit_b.py --workdir runs/dynamicvit_deit_b \
      --config.init_from=weights/dynamicvit_deit_b_init \
      --config.distill.teacher_init_from=weights/deit_b

`:quick` is configs/dynamicvit_deit_s.py's `:quick` (the same shrunken model on `digits`):

  python train.py --config configs/dynamicvit_deit_b.py:quick --workdir runs/dynamicvit_b_quick
"""
from configs import dynamicvit_deit_s


def get_config(arg=None):
  return dynamicvit_deit_s.get_config(arg, "dynamicvit_deit_b", teacher="deit_base_patch16_224",
                                      drop_path_rate=0.2, ratio_weight=5.0)
