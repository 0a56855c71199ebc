"""PatchMerger ViT-B/16 (Renggli et al., "Learning to Merge Tokens in Vision Transformers", 2022;
compact_vit/models/patch_merger.py): 8 learned tokens merge the 196 patches after block 6 of 12
(9.23 GMACs, 0.53x ViT-B/16).

From scratch on ImageNet-1K with the DeiT recipe (300 epochs, drop path 0.1; no published
number for this recipe, the paper trains on JFT and fine-tunes):

  python train.py --config configs/patchmerger_vit_b16.py --workdir runs/patchmerger_vit_b16

Fine-tuned from converted ViT/DeiT weights (the merger starts fresh), 30 epochs at lr 1e-4:

  python -m compact_vit.convert --model patchmerger_vit_b16 \
      --checkpoint deit_base_patch16_224-b5f2ef4d.pth --out weights/patchmerger_vit_b16
  python train.py --config configs/patchmerger_vit_b16.py:finetune --workdir runs/pm_b16_ft \
      --config.init_from=weights/patchmerger_vit_b16

`:quick` trains a shrunken PatchMerger ViT (16x16 digits in 4x4 patches, 4 blocks of width 192,
the 16 patches merged into 4 tokens after block 2) from scratch on `digits`:

  python train.py --config configs/patchmerger_vit_b16.py:quick --workdir runs/patchmerger_quick
"""
from configs import token_reduction_common as trc

MODEL = "patchmerger_vit_b16"


def get_config(arg=None, model_name=MODEL):
  args = trc.common.parse_arg(arg, quick=False, finetune=False)
  if args.finetune:
    c = trc.finetune_recipe(model_name, drop_path_rate=0.1)
  else:
    c = trc.common.deit_recipe(model_name, drop_path_rate=0.1)
  if args.quick:
    trc.make_quick(c, num_merged_tokens=4, merge_after=2)
  return c
