"""PatchMerger ViT-S/16 (Renggli et al. 2022; compact_vit/models/patch_merger.py): 8 learned tokens
merge the 196 patches after block 6 of 12 (2.43 GMACs, 0.53x ViT-S/16). Same recipes as
configs/patchmerger_vit_b16.py (from scratch; `:finetune` from converted weights; `:quick`):

  python train.py --config configs/patchmerger_vit_s16.py --workdir runs/patchmerger_vit_s16
  python train.py --config configs/patchmerger_vit_s16.py:quick --workdir runs/patchmerger_s_quick
"""
from configs import patchmerger_vit_b16


def get_config(arg=None):
  return patchmerger_vit_b16.get_config(arg, model_name="patchmerger_vit_s16")
