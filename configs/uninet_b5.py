"""UniNet-B5 (Liu et al., "UniNet: Unified Architecture Search with Convolution, Transformer, and
MLP", ECCV 2022; Sense-X/UniNet).

ImageNet-1K from scratch at 384x384 with the authors' recipe (configs/common.py
`uninet_recipe`: the authors publish only B1's command, used here unchanged): 300 epochs + 10
at the minimum lr, global batch 1024, AdamW lr 1e-3, wd 0.05, mixup/cutmix, model EMA.
Evaluation as the authors: the image squashed to size x size, no crop (`eval_resize="squash"`).
Expected top-1: 84.9% (paper); 72.88M parameters, 20.2 GMACs.

  python train.py --config configs/uninet_b5.py --workdir runs/uninet_b5
  python eval.py --config configs/uninet_b5.py --workdir runs/uninet_b5

`:quick` trains a shrunken UniNet (32x32 inputs, one block per stage) on the embedded `digits`
dataset in about 4 minutes on a 2-core CPU; expect >= 95% val top-1 (measured: 98.3%):

  python train.py --config configs/uninet_b5.py:quick
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, quick=False)
  c = common.uninet_recipe("uninet_b5", img_size=384)
  if args.quick:
    common.make_quick_uninet(c)
  return c
