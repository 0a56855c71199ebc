"""AutoFormer-B supernet (Chen et al., ICCV 2021; microsoft/Cream AutoFormer supernet_train.py).

Trains the weight-entangled supernet over the B search space, one uniformly sampled subnet per
step (objective `autoformer_supernet`): the authors' command (--epochs 500 --warmup-epochs 20,
8 GPUs x batch 128 = 1024, AdamW lr 5e-4 x 1024/512, wd 0.05, drop path 0.1, DeiT augmentation):

  python train.py --config configs/autoformer_b_supernet.py --workdir runs/autoformer_b_supernet

then search it with configs/autoformer_b_search.py. val/top1 is that of the largest subnet.
`:retrain` trains the published AutoFormer-B (registry `autoformer_b`; 53.7M params, 11.2 GMACs;
top-1 82.4%) from scratch with the DeiT recipe; `--config.model.*` overrides give any searched
subnet.
`:quick` trains a small supernet on `digits` (25 epochs, a few minutes on a 2-core CPU; measured:
the largest subnet 74.7% val top-1, the best subnet found by the quick search 78.1%).
"""
from configs import autoformer_common


def get_config(arg=None):
  return autoformer_common.supernet_config("b", arg)
