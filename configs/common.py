"""Shared config pieces: argument parsing, the DeiT ImageNet-1K recipe and the `quick` recipe.

A config file defines `get_config(arg)`; `arg` is the text after `:` in `--config configs/X.py:ARG`,
a comma-separated list of `key=value` pairs or bare flags (`quick`), parsed by `parse_arg`.
"""
from __future__ import annotations

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'quick,img_size=384' into a ConfigDict over `defaults` (types follow the defaults)."""
  out = ml_collections.ConfigDict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; this config accepts {sorted(defaults)}.")
    if not _:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif defaults[key] is None:
      out[key] = value
    else:
      out[key] = type(defaults[key])(value)
  return out


def deit_recipe(model_name: str, *, drop_path_rate: float = 0.1) -> ml_collections.ConfigDict:
  """The DeiT ImageNet-1K recipe (Touvron et al. 2021; facebookresearch/deit main.py defaults).

  300 epochs, AdamW lr 5e-4 x batch/512, wd 0.05, global batch 1024, 5 warmup epochs, cosine to 1e-5,
  label smoothing 0.1, mixup 0.8, cutmix 1.0, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25.
  Repeated augmentation is not implemented (it mostly matters for its 3x sample reuse per epoch).
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_epochs = 300
  c.total_steps = ml_collections.FieldReference(None, field_type=int)
  c.batch_size = 1024
  c.eval_batch_size = 256
  c.img_size = 224
  c.crop_pct = 0.875
  c.dtype = "float32"  # compute dtype; "bfloat16" on accelerators. Parameters stay float32.
  c.log_every = 50
  c.eval_every = 2500
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.init_from = ml_collections.FieldReference(None, field_type=str)  # converted checkpoint dir
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})  # FSDP: data=1, fsdp=-1
  c.grad_accum = 1  # micro-batches per step (same update as the whole batch at once)
  c.remat = False  # recompute each block in the backward pass (models with a `remat` field)
  c.input_shards = 0  # input slices of the global batch; 0 = one per process
  c.sharding_rules = ()  # ((regex, (None | "model", ...)), ...); empty = sharding.DEFAULT_RULES
  c.objective = ml_collections.ConfigDict({"name": "classification"})  # compact_vit/objectives

  c.model = ml_collections.ConfigDict()
  c.model.name = model_name
  c.model.drop_path_rate = drop_path_rate

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "imagenet2012"
  c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.shuffle_buffer = 16384
  c.dataset.cache = False
  c.dataset.mean = IMAGENET_MEAN
  c.dataset.std = IMAGENET_STD

  c.aug = ml_collections.ConfigDict()
  c.aug.random_resized_crop = True
  c.aug.scale = (0.08, 1.0)
  c.aug.ratio = (3 / 4, 4 / 3)
  c.aug.hflip = True
  c.aug.randaugment = "rand-m9-mstd0.5-inc1"
  c.aug.random_erasing = 0.25
  c.aug.color_jitter = 0.0
  c.aug.mixup_alpha = 0.8
  c.aug.cutmix_alpha = 1.0
  c.aug.mixup_prob = 1.0
  c.aug.mixup_switch_prob = 0.5
  c.aug.label_smoothing = 0.1

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-4  # scaled by batch_size / lr_base_batch
  c.optim.lr_base_batch = 512
  c.optim.weight_decay = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.warmup_epochs = 5.0
  c.optim.warmup_lr = 1e-6
  c.optim.min_lr = 1e-5
  c.optim.lr_schedule_unit = "epoch"  # timm's cosine stepped per epoch (DeiT); "step": per step
  c.optim.lr_epoch_lag = 1  # epoch e at the scheduler's e-1: DeiT calls step(epoch) after it
  c.optim.cooldown_epochs = 0  # last epochs held at min_lr; total_epochs includes them
  c.optim.grad_clip_mode = "none"  # none | norm (global norm) | agc (timm's unit-wise AGC)
  c.optim.grad_clip_value = 0.0  # max norm, or AGC's clip factor; 0 = off (DeiT does not clip)
  c.optim.no_decay = ("cls_token", "dist_token", "pos_embed")  # plus every 1-D parameter
  c.ema_decay = 0.0  # 0 = off; e.g. 0.99996 as DeiT's optional model EMA

  c.distill = ml_collections.ConfigDict()
  c.distill.type = "none"  # none | soft | hard
  c.distill.teacher = ""  # registry name, e.g. regnety_160
  c.distill.teacher_init_from = ""  # converted checkpoint dir of the teacher
  c.distill.alpha = 0.5
  c.distill.tau = 1.0
  return c


def make_quick(c: ml_collections.ConfigDict, **model_overrides) -> ml_collections.ConfigDict:
  """Shrinks a recipe to the embedded `digits` dataset so the whole loop runs on a laptop CPU."""
  c.dataset.name = "digits"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "test"
  c.dataset.shuffle_buffer = 2048
  c.dataset.cache = True
  c.dataset.mean = (0.5, 0.5, 0.5)
  c.dataset.std = (0.5, 0.5, 0.5)
  c.aug.random_resized_crop = True
  c.aug.scale = (0.6, 1.0)
  c.aug.hflip = False  # digits are not mirror-symmetric
  c.aug.randaugment = ""
  c.aug.random_erasing = 0.0
  c.aug.mixup_alpha = 0.0
  c.aug.cutmix_alpha = 0.0
  c.aug.label_smoothing = 0.1
  c.crop_pct = 1.0
  c.batch_size = 64
  c.eval_batch_size = 120
  c.optim.lr = 1e-3
  c.optim.lr_base_batch = 64
  c.optim.warmup_epochs = 2.0
  c.optim.min_lr = 1e-5
  c.log_every = 20
  c.eval_every = 200
  c.checkpoint_every = 200
  c.keep_checkpoints = 2
  for key, value in model_overrides.items():
    c.model[key] = value
  return c


def make_quick_deit(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """DeiT on `digits`: 16×16 inputs in 4×4 patches (16 tokens + CLS), 4 blocks of width 192."""
  make_quick(c, patch_size=4, depth=4, embed_dim=192, num_heads=3, drop_path_rate=0.0)
  c.img_size = 16
  c.total_epochs = 30
  return c


def sepvit_recipe(model_name: str, *, drop_path_rate: float) -> ml_collections.ConfigDict:
  """SepViT's ImageNet-1K recipe (Li et al. 2022; liwei109/SepViT classification/main.py).

  The DeiT recipe (300 epochs, AdamW lr 5e-4 x 1024/512 = 1e-3, wd 0.05, batch 1024, DeiT
  augmentation) plus the authors' gradient clipping at norm 5. Weight decay skips only 1-D
  parameters: the authors' optimizer never consults their block-level `no_weight_decay`, so the
  window tokens are decayed there too.
  """
  c = deit_recipe(model_name, drop_path_rate=drop_path_rate)
  c.optim.grad_clip_mode = "norm"
  c.optim.grad_clip_value = 5.0
  c.optim.no_decay = ()
  return c


def make_quick_sepvit(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """SepViT on `digits`: 32x32 inputs, three stages (8x8, 4x4, 2x2 maps) of widths 32/64/128.

  Keeps every kind of SepViT block: windowed DSA + PSA with window tokens (stage 1: 2x2 windows of
  4x4; stage 2: 2x2 windows of 2x2), global MHSA where the window covers the map, and the PEG.
  """
  make_quick(c, embed_dims=(32, 64, 128), num_heads=(1, 2, 4), depths=(1, 2, 2),
             window_sizes=((4,), (2, 4), (2, 2)), drop_path_rate=0.0)
  c.img_size = 32
  c.total_epochs = 20
  return c


def efficientformer_recipe(model_name: str, *, epochs: int = 300,
                           drop_path_rate: float = 0.0) -> ml_collections.ConfigDict:
  """EfficientFormer V1/V2 ImageNet-1K recipe (snap-research/EfficientFormer main.py defaults).

  The DeiT recipe with: AdamW lr 1e-3 x batch/1024, wd 0.025, warmup from 1e-5, min lr 1e-5, model
  EMA 0.99996, hard distillation (alpha 0.5) from `regnety_160`, whose converted weights must be
  given with `--config.distill.teacher_init_from=DIR`. As in the authors' code, attention biases
  get weight decay (only 1-D parameters are exempt). Not reproduced: the authors' adaptive
  gradient clipping (AGC, 0.01) and repeated augmentation; their color jitter 0.4 is inactive
  beside RandAugment in timm, so it is left off.
  """
  c = deit_recipe(model_name, drop_path_rate=drop_path_rate)
  c.total_epochs = epochs
  c.optim.lr = 1e-3
  c.optim.lr_base_batch = 1024
  c.optim.weight_decay = 0.025
  c.optim.warmup_lr = 1e-5
  c.optim.min_lr = 1e-5
  c.optim.no_decay = ()
  c.ema_decay = 0.99996
  c.distill.type = "hard"
  c.distill.teacher = "regnety_160"
  c.distill.alpha = 0.5
  c.distill.tau = 1.0
  return c


def make_quick_efficientformer(c: ml_collections.ConfigDict, *,
                               v2: bool) -> ml_collections.ConfigDict:
  """EfficientFormer (V1, or V2 if `v2`) on `digits` without a teacher: four stages of widths
  16/32/48/64, depths 1/1/2/2, one attention block per attention stage. V1 takes 64x64 inputs
  (a 2x2 map for its attention); V2 32x32 (its strided attention on 2x2 -> 1x1, its downsampling
  attention 2x2 -> 1x1), because XLA's depthwise-conv gradients are slow on CPU."""
  make_quick(c, embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 2), num_vit=1, drop_path_rate=0.0)
  if v2:
    c.model.mlp_ratios = (4, 4, 4, 4)
  c.img_size = 32 if v2 else 64
  c.total_epochs = 20
  c.ema_decay = 0.0
  c.distill.type = "none"
  c.distill.teacher = ""
  return c


def uninet_recipe(model_name: str, *, img_size: int) -> ml_collections.ConfigDict:
  """UniNet's ImageNet-1K recipe (Liu et al. 2022; Sense-X/UniNet exp/b1/run.sh and main.py).

  The DeiT recipe at the variant's resolution with the authors' B1 command: 300 epochs, batch 1024,
  AdamW lr 5e-4 x 1024/512, wd 0.05, no drop path, no random erasing, mixup 0.8 / cutmix 1.0,
  model EMA 0.99996 (their default; they report the EMA's accuracy too). Only B1's command is
  published; the other sizes use it unchanged.
  """
  c = deit_recipe(model_name, drop_path_rate=0.0)
  c.img_size = img_size
  c.aug.random_erasing = 0.0
  c.optim.no_decay = ()
  c.ema_decay = 0.99996
  return c


def make_quick_uninet(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """UniNet on `digits`: 32x32 inputs, one block per stage, widths 16..64 (maps 16, 8, 4, 2, 2, 1):
  every block kind runs (MBConv with and without expansion, Local and Local-Global DSMs, the
  transformer blocks)."""
  make_quick(c, repeats=(1, 1, 1, 1, 1, 1), channels=(16, 24, 32, 48, 64, 64), stem_dim=16,
             final_dim=256, drop_path_rate=0.0)
  c.img_size = 32
  c.total_epochs = 12
  c.ema_decay = 0.0
  return c


def make_quick_reformer(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Reformer-ViT on `digits`: 16x16 inputs in 4x4 patches (16 tokens + CLS, padded to 20 = five
  LSH chunks of 4 per hash round, 10 buckets, 2 rounds), 4 reversible layers of width 128,
  average-pooled head."""
  make_quick(c, patch_size=4, depth=4, embed_dim=128, num_heads=2, chunk_len=4, n_hashes=2,
             global_pool="avg", drop_path_rate=0.0)
  c.img_size = 16
  c.total_epochs = 30
  return c
