"""Shared pieces of the token-reduction configs (DynamicViT, ATS, PatchMerger)."""
from __future__ import annotations

import ml_collections

from configs import common


def dynamicvit_recipe(model_name: str, *, teacher: str, drop_path_rate: float,
                      ratio_weight: float) -> ml_collections.ConfigDict:
  """DynamicViT's 30-epoch fine-tune of a DeiT (raoyongming/DynamicViT README and main.py).

  Batch 1024, AdamW wd 0.05, 5 warmup epochs, cosine to 1e-6, DeiT augmentation (mixup 0.8,
  cutmix 1.0, RandAugment, random erasing 0.25, label smoothing 0.1); loss = CE + ratio_weight x
  keep-ratio MSE + 0.5 KL to the dense DeiT teacher + 0.5 token distillation (objective
  `dynamicvit`). As the authors: the predictors train at lr 1e-3 x batch/512 and the backbone at
  0.01x that (`--lr_scale 0.01`, here `optim.lr_scales`).
  Needs `--config.init_from` (the DeiT weights converted for this model) and
  `--config.distill.teacher_init_from` (the same DeiT converted as itself).
  """
  c = common.deit_recipe(model_name, drop_path_rate=drop_path_rate)
  c.total_epochs = 30
  c.optim.lr = 1e-3
  c.optim.lr_base_batch = 512
  c.optim.lr_scales = (("^(?!score_predictor)", 0.01),)  # backbone at 0.01x the predictors' lr
  c.optim.min_lr = 1e-6
  c.optim.warmup_epochs = 5.0
  c.distill.type = "soft"  # loads the teacher; the objective below uses it
  c.distill.teacher = teacher
  c.objective = ml_collections.ConfigDict(
      {"name": "dynamicvit", "ratio_weight": ratio_weight, "distill_weight": 0.5})
  return c


def finetune_recipe(model_name: str, *, epochs: int = 30,
                    drop_path_rate: float = 0.1) -> ml_collections.ConfigDict:
  """The DeiT recipe shortened to a fine-tune from converted weights (`--config.init_from`):
  `epochs` epochs, lr 1e-4 x batch/1024 after 5 warmup epochs, cosine to 1e-6."""
  c = common.deit_recipe(model_name, drop_path_rate=drop_path_rate)
  c.total_epochs = epochs
  c.optim.lr = 1e-4
  c.optim.lr_base_batch = 1024
  c.optim.min_lr = 1e-6
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
