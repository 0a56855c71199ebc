"""Shared config pieces: argument parsing, the DeiT ImageNet-1K recipe and the `quick` recipe.

A config file defines `get_config(arg)`; `arg` is the text after `:` in `--config configs/X.py:ARG`,
a comma-separated list of `key=value` pairs or bare flags (`quick`), parsed by `parse_arg`.
"""
from __future__ import annotations

import ml_collections
from compact_vit.data.settings import CANVAS_MIN_SIDE
from compact_vit.imagenet import IMAGENET_MEAN, IMAGENET_STD


# Where each recipe value comes from: `config.recipe_sources` (field of the recipe card -> the
# authors' file and flag), shown by `python -m compact_vit.recipe` and docs/recipes.md. A family
# recipe starts from these and replaces what its authors change.
DEIT = "facebookresearch/deit"
DEIT_SOURCES = {
    "total_epochs": f"{DEIT} main.py --epochs 300",
    "global_batch": f"{DEIT} README_deit.md: 4 GPUs x --batch-size 256 (Ti, S); "
                    "run_with_submitit.py: 2 nodes x 8 GPUs x 64 (B)",
    "peak_lr": f"{DEIT} main.py: --lr 5e-4 x global batch / 512",
    "lr_at_epoch": f"{DEIT} main.py: timm create_scheduler (cosine, --warmup-epochs 5 from "
                   "--warmup-lr 1e-6, --min-lr 1e-5), step(epoch) after each epoch; the loop runs "
                   "--epochs, so the scheduler's 10 --cooldown-epochs never run",
    "lr_scales": f"{DEIT} main.py: one lr for every parameter (timm's parameter groups differ in "
                 "weight decay only)",
    "weight_decay": f"{DEIT} main.py --weight-decay 0.05",
    "no_decay": "timm create_optimizer (filter_bias_and_bn): 1-D and .bias parameters and the "
                "model's no_weight_decay() = {pos_embed, cls_token, dist_token}",
    "optimizer": f"{DEIT} main.py --opt adamw --opt-eps 1e-8, torch's default betas",
    "repeated_augmentation": f"{DEIT} main.py --repeated-aug (on by default): samplers.py "
                             "RASampler, 3 repeats",
    "grad_clip": f"{DEIT} main.py --clip-grad None",
    "label_smoothing": f"{DEIT} main.py --smoothing 0.1",
    "mixup": f"{DEIT} main.py --mixup 0.8",
    "cutmix": f"{DEIT} main.py --cutmix 1.0",
    "randaugment": f"{DEIT} main.py --aa rand-m9-mstd0.5-inc1 (timm ignores --color-jitter 0.3 "
                   "when RandAugment is on)",
    "random_erasing": f"{DEIT} main.py --reprob 0.25",
    "drop_path": f"{DEIT} main.py --drop-path 0.1",
    "ema_decay": f"{DEIT} main.py --model-ema (on) --model-ema-decay 0.99996; the accuracy it "
                 "reports is the raw model's",
    "distill": f"{DEIT} main.py --distillation-type none",
    "eval": f"{DEIT} datasets.py: Resize(int(224 / --eval-crop-ratio 0.875)) shorter side, "
            "CenterCrop(224)",
}


def cite(c: ml_collections.ConfigDict, **sources: str) -> None:
  """Records the authors' file behind recipe fields: cite(c, drop_path='repo file --flag')."""
  c.recipe_sources.update(sources)


def cite_defaults(c: ml_collections.ConfigDict, script: str, *fields: str) -> None:
  """Cites `script`'s argument defaults, the same as DeiT's main.py, for `fields` (default all)."""
  cite(c, **{field: f"{script} default (as DeiT's)" for field in fields or DEIT_SOURCES})


def depart(c: ml_collections.ConfigDict, **reasons: str) -> None:
  """Records where `c` differs from its authors' recipe and why: depart(c, field='...')."""
  c.departures.update(reasons)


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

  300 epochs, AdamW lr 5e-4 x batch/512, wd 0.05, global batch 1024, 5 warmup epochs, timm's cosine
  stepped per epoch to 1e-5, label smoothing 0.1, mixup 0.8, cutmix 1.0, RandAugment
  rand-m9-mstd0.5-inc1, random erasing 0.25, repeated augmentation (3 copies), model EMA 0.99996
  (kept as main.py keeps it; the authors report the raw model, here `val/top1`). Every value's
  source is in `recipe_sources`; `departures` says where a config differs from its authors
  (`python -m compact_vit.recipe --config ...` prints both with the recipe as it will run).
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_epochs = 300
  c.total_steps = ml_collections.FieldReference(None, field_type=int)
  c.batch_size = 1024
  c.eval_batch_size = 256
  c.img_size = 224
  c.crop_pct = 0.875
  c.eval_resize = "shorter"  # or "squash": the whole image to img_size x img_size, no crop
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
  # True: the host decodes and crops, the step resamples and augments (JAX); None: auto, True on
  # a GPU or TPU backend, False on the CPU.
  c.dataset.on_accelerator = ml_collections.config_dict.placeholder(bool)
  c.dataset.canvas_min_side = CANVAS_MIN_SIDE  # on_accelerator: crops travel in max(2 img_size, this)²
  # Unreadable train images are skipped (named and counted) until more than this fraction of an
  # epoch is; then the run stops and lists them (docs/troubleshooting.md).
  c.dataset.max_skipped = 0.001

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
  c.aug.repeated_aug = 3  # DeiT's RASampler: 3 copies of each image per epoch; 1 = off

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
  c.optim.lr_schedule = "cosine"  # cosine | constant (timm's --sched none)
  c.optim.lr_schedule_unit = "epoch"  # timm's cosine stepped per epoch (DeiT); "step": per step
  c.optim.warmup_prefix = True  # "step" unit: cosine after the warmup (False: timm's, from step 0)
  c.optim.lr_epoch_lag = 1  # epoch e at the scheduler's e-1: DeiT calls step(epoch) after it
  c.optim.cooldown_epochs = 0  # last epochs held at min_lr; total_epochs includes them
  c.optim.grad_clip_mode = "none"  # none | norm (global norm) | agc (timm's unit-wise AGC)
  c.optim.grad_clip_value = 0.0  # max norm, or AGC's clip factor; 0 = off (DeiT does not clip)
  c.optim.no_decay = ("cls_token", "dist_token", "pos_embed")  # plus every 1-D parameter
  c.optim.decay = ()  # path regexes decayed whatever their rank
  c.optim.lr_scales = ()  # ((path regex, lr multiplier[, from_epoch]), ...)
  c.ema_decay = 0.99996  # 0 = off; DeiT's main.py keeps this EMA (--model-ema on by default)

  c.distill = ml_collections.ConfigDict()
  c.distill.type = "none"  # none | soft | hard
  c.distill.teacher = ""  # registry name, e.g. regnety_160
  c.distill.teacher_init_from = ""  # converted checkpoint dir of the teacher
  c.distill.alpha = 0.5
  c.distill.tau = 1.0
  c.recipe_sources = dict(DEIT_SOURCES)
  c.departures = {}
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
  c.dataset.canvas_min_side = 0  # 8x8 digits: a canvas of 2 img_size holds them whole
  c.aug.random_resized_crop = True
  c.aug.scale = (0.6, 1.0)
  c.aug.hflip = False  # digits are not mirror-symmetric
  c.aug.randaugment = ""
  c.aug.random_erasing = 0.0
  c.aug.mixup_alpha = 0.0
  c.aug.cutmix_alpha = 0.0
  c.aug.label_smoothing = 0.1
  c.aug.repeated_aug = 1
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
  c.ema_decay = 0.0
  c.optim.cooldown_epochs = 0
  c.recipe_sources = {}
  c.departures = {"quick": "a small-scale check of the training loop on `digits`, not the "
                           "authors' recipe"}
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
  augmentation) plus the authors' gradient clipping at norm 5, without repeated augmentation and
  without model EMA (their main.py turns both off). Weight decay skips only 1-D and bias
  parameters: the authors' optimizer never consults their block-level `no_weight_decay`, so the
  window tokens are decayed there too.
  """
  c = deit_recipe(model_name, drop_path_rate=drop_path_rate)
  c.optim.grad_clip_mode = "norm"
  c.optim.grad_clip_value = 5.0
  c.optim.no_decay = ()
  c.aug.repeated_aug = 1
  c.ema_decay = 0.0
  main = "liwei109/SepViT classification/main.py"
  cite(c, global_batch="liwei109/SepViT readme.md: 8 GPUs x --batch-size 128",
       peak_lr=f"{main} --lr 5e-4 x global batch / 512",
       lr_at_epoch=f"{main}: timm create_scheduler (cosine, warmup 5 epochs from 1e-6, min 1e-5), "
                   "step(epoch) after each epoch over --epochs 300",
       no_decay="timm 0.3.2 create_optimizer: 1-D and .bias parameters (the SepViT model has no "
                "no_weight_decay(); only its blocks do, which timm never asks)",
       repeated_augmentation=f"{main} --repeated-aug off by default",
       grad_clip=f"{main} --clip-grad 5 (global norm)",
       ema_decay=f"{main}: model_ema = None",
       distill=f"{main}: DistillationLoss(criterion, None, 'none', 0, 0)",
       eval="liwei109/SepViT classification/datasets.py: Resize(int(256 / 224 * 224)) shorter "
            "side, CenterCrop(224)")
  cite_defaults(c, main, "total_epochs", "lr_scales", "weight_decay", "optimizer",
                "label_smoothing", "mixup", "cutmix", "randaugment", "random_erasing")
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

  The DeiT recipe with: AdamW lr 1e-3 x batch/1024, wd 0.025, warmup from 1e-5, min lr 1e-5, timm's
  adaptive gradient clipping (AGC) at 0.01, repeated augmentation, model EMA 0.99996, hard
  distillation (alpha 0.5) from `regnety_160`, whose converted weights must be given with
  `--config.distill.teacher_init_from=DIR`. As in the authors' code, attention biases get weight
  decay (only 1-D and bias parameters are exempt: their models define no `no_weight_decay`), and so
  do V2's layer scales, which the authors store as (C, 1, 1) tensors (ours are (C,)); their
  color jitter 0.4 is inactive beside RandAugment in timm, so it is left off. Drop path: V1 keeps
  the model's default 0 (main.py passes none), V2 the rate its model function sets.
  """
  c = deit_recipe(model_name, drop_path_rate=drop_path_rate)
  c.total_epochs = epochs
  c.optim.lr = 1e-3
  c.optim.lr_base_batch = 1024
  c.optim.weight_decay = 0.025
  c.optim.warmup_lr = 1e-5
  c.optim.min_lr = 1e-5
  c.optim.grad_clip_mode = "agc"  # main.py --clip-mode agc --clip-grad 0.01
  c.optim.grad_clip_value = 0.01
  c.optim.no_decay = ()
  if "v2" in model_name:  # the authors' layer scales are (C, 1, 1): 3-D, so timm's rule decays them
    c.optim.decay = (r"/ls[12]/gamma$",)
  c.ema_decay = 0.99996
  c.distill.type = "hard"
  c.distill.teacher = "regnety_160"
  c.distill.alpha = 0.5
  c.distill.tau = 1.0
  main = "snap-research/EfficientFormer main.py"
  cite(c, total_epochs=f"{main} --epochs 300 (V2 also 450: the paper's longer schedule)",
       global_batch="snap-research/EfficientFormer README.md `sh dist_train.sh MODEL 8`: "
                    "8 GPUs x --batch-size 128",
       peak_lr=f"{main}: --lr 1e-3 x global batch / 1024",
       lr_at_epoch=f"{main}: timm create_scheduler (cosine, --warmup-epochs 5 from --warmup-lr "
                   "1e-5, --min-lr 1e-5), step(epoch) after each epoch over --epochs",
       weight_decay=f"{main} --weight-decay 0.025",
       no_decay="timm create_optimizer: 1-D and .bias parameters (models/efficientformer.py and "
                "efficientformer_v2.py define no no_weight_decay); V2's layer_scale_1/2 are "
                "(C, 1, 1) tensors there (efficientformer_v2.py), so they are decayed",
       repeated_augmentation=f"{main} --repeated-aug on by default (util/samplers.py RASampler)",
       grad_clip=f"{main} --clip-grad 0.01 --clip-mode agc (timm NativeScaler -> "
                 "adaptive_clip_grad over every parameter)",
       ema_decay=f"{main} --model-ema on, --model-ema-decay 0.99996",
       drop_path="snap-research/EfficientFormer models/: V1 model default 0 (main.py passes no "
                 "drop path); efficientformerv2_s0/s1 0.0, s2 0.02, l 0.1",
       distill=f"{main} --distillation-type hard --teacher-model regnety_160 "
               "--distillation-alpha 0.5 --distillation-tau 1.0",
       eval="snap-research/EfficientFormer util/datasets.py: Resize(int(256 / 224 * 224)) shorter "
            "side, CenterCrop(224)")
  cite_defaults(c, main, "lr_scales", "optimizer", "label_smoothing", "mixup", "cutmix",
                "randaugment", "random_erasing")
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

  The authors' B1 command at the variant's resolution: 300 epochs of timm's cosine then its 10
  cooldown epochs at the minimum (main.py runs the epoch count `create_scheduler` returns: 310),
  batch 1024, AdamW lr 5e-4 x 1024/512, wd 0.05, no drop path, no random erasing, mixup 0.8 /
  cutmix 1.0, no repeated augmentation, model EMA 0.99996 (they report the EMA's accuracy too).
  Evaluation as their datasets.py: below 320 px resize the shorter side to 256/224 of the size and
  center-crop; from 320 px on resize (squash) to size x size without a crop (eval_resize="squash").
  Only B1's command is published; B0 and B2-B5 take it unchanged at the paper's resolutions.
  """
  c = deit_recipe(model_name, drop_path_rate=0.0)
  c.img_size = img_size
  c.total_epochs = 310
  c.optim.cooldown_epochs = 10
  c.aug.random_erasing = 0.0
  c.aug.repeated_aug = 1
  c.optim.no_decay = ()
  c.ema_decay = 0.99996
  main = "Sense-X/UniNet main.py"
  run = "Sense-X/UniNet exp/b1/run.sh"
  cite(c, total_epochs=f"{run} --epochs 300; {main} trains the epochs create_scheduler returns "
                       "(300 + --cooldown-epochs 10)",
       global_batch=f"{run}: 8 GPUs x --batch-size 128",
       peak_lr=f"{main}: --lr 5e-4 x global batch / 512",
       lr_at_epoch=f"{main}: timm create_scheduler (cosine over 300 epochs, warmup 5 from 1e-6, "
                   "min 1e-5, then 10 cooldown epochs at 1e-5), step(epoch) after each epoch",
       no_decay="timm 0.5.4 create_optimizer: 1-D and .bias parameters and no_weight_decay() = "
                "{pos_embed, dist_token} (uninet.py; neither exists in the model)",
       repeated_augmentation=f"{main} --repeated-aug off by default",
       random_erasing=f"{run} --reprob 0.0",
       drop_path=f"{run} --drop-path 0.0",
       ema_decay=f"{main} --model-ema on, --model-ema-decay 0.99996",
       distill=f"{main}: no distillation",
       eval="Sense-X/UniNet datasets.py: below 320 px Resize(int(256 / 224 * size)) + "
            "CenterCrop(size); from 320 px Resize((size, size))")
  cite_defaults(c, main, "lr_scales", "weight_decay", "optimizer", "grad_clip",
                "label_smoothing", "mixup", "cutmix", "randaugment")
  if img_size >= 320:
    c.crop_pct = 1.0  # unused when squashing
    c.eval_resize = "squash"
  if model_name != "uninet_b1":
    cite(c, total_epochs=f"{run} (B1's command; none published for {model_name})",
         drop_path=f"{run} --drop-path 0.0 (B1's; none published for {model_name})",
         random_erasing=f"{run} --reprob 0.0 (B1's; none published for {model_name})")
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
