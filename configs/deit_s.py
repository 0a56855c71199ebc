"""DeiT-Small (Touvron et al., "Training data-efficient image transformers", ICML 2021).

ImageNet-1K from scratch with the DeiT recipe (configs/common.py): 300 epochs, global batch 1024,
AdamW lr 5e-4 x 1024/512, wd 0.05, drop path 0.1. Expected top-1: 79.9% (paper, Table 7).

  python train.py --config configs/deit_s.py --workdir runs/deit_s
  python eval.py --config configs/deit_s.py --workdir runs/deit_s

`:quick` trains a shrunken DeiT (16x16 inputs, 2x2 patches) on the embedded `digits` dataset in a
few minutes on a 2-core CPU; expect >= 95% val top-1:

  python train.py --config configs/deit_s.py:quick --workdir runs/deit_s_quick
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, quick=False)
  c = common.deit_recipe("deit_small_patch16_224", drop_path_rate=0.1)
  c.model.attention = "xla"  # "cudnn": cuDNN flash attention (NVIDIA GPU, config.dtype=bfloat16)
  if args.quick:
    common.make_quick_deit(c)
  return c
