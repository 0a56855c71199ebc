"""Shared pieces of the token-reduction configs (DynamicViT, ATS, PatchMerger)."""
from __future__ import annotations

import ml_collections

from configs import common


def dynamicvit_recipe(model_name: str, *, teacher: str, drop_path_rate: float,
                      ratio_weight: float) -> ml_collections.ConfigDict:
  """DynamicViT's 30-epoch fine-tune of a DeiT (raoyongming/DynamicViT README and main.py).

  Batch 1024 (8 GPUs x 128), AdamW lr 1e-3 NOT scaled by the batch (main.py has no linear
  scaling: `lr_base_batch` equals `batch_size`; keep them equal when changing the batch), wd 0.05,
  the learning rate set per step (utils.cosine_scheduler: 5 warmup epochs from 0, cosine to 1e-6),
  DeiT augmentation without repeated augmentation (mixup 0.8, cutmix 1.0, RandAugment, random
  erasing 0.25, label smoothing 0.1), model EMA 0.9999 (evaluated beside the model); loss = CE +
  ratio_weight x keep-ratio MSE + 0.5 KL to the dense DeiT teacher + 0.5 token distillation
  (objective `dynamicvit`). As the authors' optim_factory.py: the predictors train at the full lr,
  the backbone at 0.01x (`--lr_scale 0.01`, here `optim.lr_scales`) after holding it at lr 0 for
  the first 5 epochs (`fix_step`; AdamW's moments accumulate meanwhile), cls_token and pos_embed
  not at all.
  Needs `--config.init_from` (the DeiT weights converted for this model) and
  `--config.distill.teacher_init_from` (the same DeiT converted as itself).
  """
  c = common.deit_recipe(model_name, drop_path_rate=drop_path_rate)
  c.total_epochs = 30
  c.optim.lr = 1e-3
  c.optim.lr_base_batch = c.batch_size  # the authors do not scale the lr by the batch
  c.optim.lr_scales = (("^(cls_token|pos_embed)$", 0.0),  # frozen (optim_factory.py skips them)
                       # backbone: lr 0 for epochs 0-4 (fix_step=5), then 0.01x the predictors'
                       ("^(?!score_predictor)", 0.01, 5))
  c.optim.lr_schedule_unit = "step"
  c.optim.warmup_epochs = 5.0
  c.optim.warmup_lr = 0.0
  c.optim.min_lr = 1e-6
  c.aug.repeated_aug = 1
  c.ema_decay = 0.9999
  c.distill.type = "soft"  # loads the teacher; the objective below uses it
  c.distill.teacher = teacher
  c.objective = ml_collections.ConfigDict(
      {"name": "dynamicvit", "ratio_weight": ratio_weight, "distill_weight": 0.5})
  repo = "raoyongming/DynamicViT"
  main = f"{repo} main.py"
  command = f"{repo} README.md DeiT command"
  common.cite(
      c, total_epochs=f"{command}: --epochs 30",
      global_batch=f"{command}: 8 GPUs x --batch_size 128",
      peak_lr=f"{command}: --lr 1e-3; {main} does not scale it by the batch",
      lr_at_epoch=f"{main}: utils.cosine_scheduler per iteration, --warmup_epochs 5 from 0, "
                  "--min_lr 1e-6",
      weight_decay=f"{main} --weight_decay 0.05 (constant: --weight_decay_end None)",
      no_decay=f"{repo} optim_factory.py: 1-D and .bias parameters decay-free; cls_token and "
               "pos_embed are not optimised at all",
      lr_scales=f"{repo} optim_factory.py get_parameter_groups: predictor groups lr_scale 1, "
                "backbone groups --lr_scale 0.01 with fix_step 5 (lr 0 before epoch 5, "
                "engine.py), cls_token and pos_embed in no group",
      optimizer=f"{main} --opt adamw --opt_eps 1e-8, torch's default betas",
      repeated_augmentation=f"{main}: DistributedSampler (no repeated augmentation)",
      grad_clip=f"{main} --clip_grad None", label_smoothing=f"{main} --smoothing 0.1",
      mixup=f"{main} --mixup 0.8", cutmix=f"{main} --cutmix 1.0",
      randaugment=f"{main} --aa rand-m9-mstd0.5-inc1", random_erasing=f"{main} --reprob 0.25",
      drop_path=f"{command}: --drop_path 0.2 for DeiT-B; {main} default 0 for DeiT-S",
      ema_decay=f"{main} --model_ema True --model_ema_decay 0.9999 --model_ema_eval True",
      distill=f"{main} + losses.py DistillDiffPruningLoss_dynamic: KL(teacher || student) "
              "(batchmean) x distill_weight 0.5 + token MSE x 0.5, the dense DeiT as teacher",
      eval=f"{repo} datasets.py: Resize(int(224 / 0.875)) shorter side, CenterCrop(224)")
  return c


def finetune_recipe(model_name: str, *, epochs: int = 30,
                    drop_path_rate: float = 0.1) -> ml_collections.ConfigDict:
  """The DeiT recipe shortened to a fine-tune from converted weights (`--config.init_from`):
  `epochs` epochs, lr 1e-4 x batch/1024 after 5 warmup epochs, cosine to 1e-6. No author publishes
  this recipe (ATS releases only evaluation; PatchMerger no code): `recipe_sources` says so."""
  c = common.deit_recipe(model_name, drop_path_rate=drop_path_rate)
  c.total_epochs = epochs
  c.optim.lr = 1e-4
  c.optim.lr_base_batch = 1024
  c.optim.min_lr = 1e-6
  ours = ("not published by the authors: this repository's fine-tune "
          "(configs/token_reduction_common.py)")
  common.cite(c, total_epochs=ours, peak_lr=ours, lr_at_epoch=ours)
  return c


def make_quick(c: ml_collections.ConfigDict, **model_overrides) -> ml_collections.ConfigDict:
  """The `digits` DeiT of `common.make_quick_deit` (16x16 inputs, 4x4 patches: 16 tokens + CLS,
  4 blocks of width 192) trained from scratch without a teacher at lr 3e-4 with gradients
  clipped at norm 1 (DynamicViT at lr 1e-3 reached only 33% top-1), plus `model_overrides`."""
  common.make_quick_deit(c)
  c.optim.lr = 3e-4  # 1e-3 (DeiT's quick rate) diverges: straight-through policy gradients spike
  c.optim.grad_clip_mode = "norm"
  c.optim.grad_clip_value = 1.0
  c.optim.lr_scales = ()  # from scratch: one rate for every parameter
  c.init_from = None
  c.distill.type = "none"
  c.distill.teacher = ""
  for key, value in model_overrides.items():
    c.model[key] = value
  return c
