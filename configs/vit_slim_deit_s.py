"""ViT-Slim search on DeiT-S (Chavan et al., "Vision Transformer Slimming", CVPR 2022).

Learns soft masks (per head x head dim on q/k/v, MLP hidden units, patch tokens) on pretrained
DeiT-S weights for 50 epochs as the authors' search.py and README command: batch 1024 (4 GPUs x
256), AdamW at a constant lr 5e-4 (no batch scaling, no schedule), wd 1e-3, repeated augmentation,
model EMA 0.99996, DeiT augmentation, L1 penalties w1=2e-4, w2=5e-5, w3=1e-4 divided by the 4 GPUs
as search.py divides them by the world size (DDP averages the gradients, so each acts at 1/4),
then keeps 70% of the attention dims, MLP units and patch tokens (a global threshold per dimension;
pruned patches are zeroed, not removed, see compact_vit/models/vit_slim.py), extracts the smaller
`vit_slim_deit_s` into DIR/slim and writes DIR/search.json. Third-party tables for budget 0.7:
~15.7M params, ~3.1 GMACs, 79.9% top-1 after retraining (configs/vit_slim_deit_s_retrain.py).

  python -m compact_vit.convert --model deit_small_patch16_224 --checkpoint deit_small.pth \
      --out weights/deit_s
  python search.py --config configs/vit_slim_deit_s.py \
      --config.search.init_from=weights/deit_s --workdir runs/vit_slim_deit_s

`:quick` first trains a small DeiT on `digits` (15 epochs), then searches masks for 10 epochs and
extracts it (a few minutes on a 2-core CPU; the extracted model keeps >= 90% val top-1):

  python search.py --config configs/vit_slim_deit_s.py:quick --workdir runs/vit_slim_quick
"""
import ml_collections

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, quick=False, budget=0.7)
  c = common.deit_recipe("vit_slim_masked_deit_s", drop_path_rate=0.1)
  c.total_epochs = 50
  c.optim.lr = 5e-4  # not scaled by the batch, and constant (search.py --sched none)
  c.optim.lr_base_batch = c.batch_size
  c.optim.lr_schedule = "constant"
  c.optim.warmup_epochs = 0.0
  c.optim.weight_decay = 1e-3
  c.optim.decay = ("zeta$",)  # the masks are decayed: the authors store them as 3-D+ tensors
  gpus = 4  # the README's command; search.py divides w1, w2, w3 by the world size
  c.objective = ml_collections.ConfigDict(
      {"name": "vit_slim", "w1": 2e-4 / gpus, "w2": 5e-5 / gpus, "w3": 1e-4 / gpus})
  c.search = ml_collections.ConfigDict()
  c.search.method = "vit_slim"
  c.search.base_model = "deit_small_patch16_224"  # the dense model the weights come from
  c.search.init_from = ml_collections.FieldReference(None, field_type=str)
  c.search.pretrain_epochs = 0  # > 0 and no init_from: train the base model here first
  c.search.budget_attn = args.budget
  c.search.budget_mlp = args.budget
  c.search.budget_patch = args.budget  # the README's retrain example: 0.7 of every dimension
  c.search.trajectory_every = 2500  # steps between mask snapshots (search.json candidates)
  repo = "Arnav0400/ViT-Slim"
  main, command = f"{repo} ViT-Slim/search.py", f"{repo} ViT-Slim/README.md search command"
  common.cite(
      c, total_epochs=f"{main} --epochs 50", global_batch=f"{command}: 4 GPUs x --batch-size 256",
      peak_lr=f"{main} --lr 5e-4, not scaled by the batch",
      lr_at_epoch=f"{main} --sched none: the lr stays at 5e-4", weight_decay=f"{main} "
      "--weight-decay 1e-3",
      no_decay="timm create_optimizer: 1-D and .bias parameters and no_weight_decay() = "
               f"{{pos_embed, cls_token, dist_token}} ({repo} models/vision_transformer.py); the "
               "masks are decayed: (1, 1, H, 1, D), (1, 1, hidden) and (1, N, 1) tensors there",
      repeated_augmentation=f"{main} --repeated-aug on by default",
      ema_decay=f"{main} --model-ema on, --model-ema-decay 0.99996")
  common.cite_defaults(c, main, "lr_scales", "optimizer", "grad_clip", "label_smoothing", "mixup",
                       "cutmix", "randaugment", "random_erasing", "drop_path", "distill", "eval")
  common.depart(
      c, patch_tokens="pruned patch tokens are zeroed, not removed (see compact_vit/models/"
      "vit_slim.py): the extracted model's MACs do not drop with budget_patch")
  if args.quick:
    common.make_quick_deit(c)
    c.total_epochs = 10
    c.optim.warmup_epochs = 0.0
    c.optim.lr_schedule = "cosine"  # to 1e-5 over its 10 epochs
    c.search.pretrain_epochs = 15
    c.search.trajectory_every = 50
    c.search.budget_patch = 1.0  # 16 tokens: keep them all
    # Few masks on the small model: stronger penalties so they separate within 10 epochs.
    c.objective.update(w1=2e-3, w2=5e-4, w3=1e-3)
  return c
