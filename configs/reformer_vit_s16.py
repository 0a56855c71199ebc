"""Reformer-ViT-S/16 (Kitaev et al., "Reformer: The Efficient Transformer", ICLR 2020, on a DeiT-S
layout: compact_vit/models/reformer.py): LSH attention (2 hash rounds, chunks of 64) and reversible
layers, ImageNet-1K from scratch with the DeiT recipe (configs/common.py): 300 epochs, global batch
1024, AdamW lr 5e-4 x 1024/512, wd 0.05, drop path 0.1. Weight decay also skips the stacked
per-layer LayerNorm and bias parameters (`blocks/.../bias|scale`, 2-D because of the depth axis).
No published ImageNet accuracy exists for this model; none has been measured here.

  python train.py --config configs/reformer_vit_s16.py --workdir runs/reformer_vit_s16
  python eval.py --config configs/reformer_vit_s16.py --workdir runs/reformer_vit_s16

`:hires` trains at 512x512 in 8x8 patches: 4,096 patches + CLS = 4,097 tokens (65 LSH chunks of 64
per round, 128 buckets factorised 16 x 8), global batch 256 (lr scaled to 2.5e-4). This is where
LSH pays off: benchmarks/reformer.py measures 0.23x the training-gradient temp memory of dense
attention at the same 4,097 tokens (1024x1024 in 16x16 patches, batch 1).

  python train.py --config configs/reformer_vit_s16.py:hires --workdir runs/reformer_vit_s16_hires

`:quick` trains a shrunken Reformer-ViT (16x16 inputs in 4x4 patches: 17 tokens padded to 20, LSH
in chunks of 4 with 10 buckets and 2 rounds, 4 reversible layers of width 128, average pooling) on
the embedded `digits` dataset for 30 epochs in 2-3 minutes on a shared 2-core CPU, compilation
included (measured 2m01s and 2m49s); expect ~95% val top-1 (measured 95.3% and 94.2%):

  python train.py --config configs/reformer_vit_s16.py:quick --workdir runs/reformer_vit_s16_quick
"""
from configs import common

NO_DECAY = ("cls_token", "pos_embed", r"^blocks/.*/(bias|scale)$")


def get_config(arg=None):
  args = common.parse_arg(arg, quick=False, hires=False)
  c = common.deit_recipe("reformer_vit_s16", drop_path_rate=0.1)
  c.optim.no_decay = NO_DECAY
  c.model.attention = "lsh"
  c.model.reversible = True
  c.model.n_hashes = 2
  c.model.chunk_len = 64
  if args.hires:
    c.img_size = 512
    c.model.patch_size = 8
    c.batch_size = 256
  if args.quick:
    common.make_quick_reformer(c)
  return c
