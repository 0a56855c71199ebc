"""NASViT supernet training (Gong et al., ICLR 2022; facebookresearch/NASViT configs/cfg.yaml).

Sandwich rule each step: the largest subnet on the mean of its two teachers' sharpened outputs
(timm's swsl ResNeXt-101 32x4d and 32x8d, `resnext101_32x4d` / `resnext101_32x8d` here, loaded
from the Hugging Face Hub by default; the labels are not used), the smallest and two random subnets distilled in place from
the largest with the adaptive alpha-divergence (alpha in [-1, 1]), the gradients combined as the
authors' code does (`gradient_rule` "authors": the subnets' summed gradient clipped to norm 1, added
to the largest's, per tensor after epoch 100; `:rule=projection` for the paper's projection over
the whole tree, `:rule=sum` for none). Each subnet runs at a resolution of `objective.resolutions` (the paper's 192, 224,
256, 288; the batch is resized in the step): the largest subnet at the largest, the smallest at
the smallest, random subnets at a random one. The authors' recipe (configs/cfg.yaml, main.py): 400
epochs (the paper says 360), AdamW lr 3e-4 x batch/512, the learning rate set per step (timm's
cosine, 5 warmup epochs from 5e-7 x batch/512 to a minimum of 5e-6 x batch/512), wd 0, the subnets'
gradient clipped at 1.0, no drop path (cfg.yaml's 0.01 never reaches the blocks), light mixup/cutmix (0.01), random erasing 0.01 and RandAugment rand-n1-m1, no
repeated augmentation, model EMA 0.99985. Global batch 2048: the code gives 64 per process and does
not say how many processes. Expected: smallest subnet 78.3%, largest 82.8% top-1 (authors' README).
Where this differs from the authors (the evaluation): `departures`, or `python -m compact_vit.recipe --config configs/nasvit_supernet.py`.

  python train.py --config configs/nasvit_supernet.py --workdir runs/nasvit_supernet

`:quick` trains the tiny supernet (`nasvit_supernet_tiny`: 3 stages, 16x16 digits, resolutions
12 and 16) for 6 epochs (132 steps of 4 passes; 4.7 min of wall time on a 2-core machine shared
with other jobs); evaluation runs the largest subnet at 16 px: 92.8% val top-1 measured with the
authors' gradient rule (89.2% with `:rule=projection`, when a mid-size subnet after BN
recalibration reached 64.2%: configs/nasvit_search.py:quick with evaluate):

  python train.py --config configs/nasvit_supernet.py:quick --workdir runs/nasvit_quick
"""
import ml_collections

from configs import common

REPO = "facebookresearch/NASViT"


def cite_nasvit(c: ml_collections.ConfigDict) -> None:
  """The authors' files behind the supernet recipe, and where it departs from them."""
  cfg, main = f"{REPO} configs/cfg.yaml", f"{REPO} main.py"
  common.cite(
      c, total_epochs=f"{cfg} TRAIN.EPOCHS 400",
      global_batch=f"not in the authors' files: {REPO} README.md runs --batch-size 64 per "
                   "process on a process count it does not state; 2048 = 32 processes",
      peak_lr=f"{cfg} BASE_LR 3e-4; {main} scales it by global batch / 512",
      lr_at_epoch=f"{REPO} misc/lr_scheduler.py: timm CosineLRScheduler per step (t_in_epochs="
                  "False), WARMUP_EPOCHS 5 from WARMUP_LR 5e-7, MIN_LR 5e-6, both x batch / 512",
      weight_decay=f"{cfg} WEIGHT_DECAY 0.0",
      no_decay=f"{REPO} misc/optimizer.py set_weight_decay (irrelevant at weight decay 0)",
      optimizer=f"{REPO} misc/config.py: adamw, eps 1e-8, betas (0.9, 0.999)",
      lr_scales=f"{REPO} misc/optimizer.py: one lr for both parameter groups",
      repeated_augmentation=f"{REPO} data/build.py: DistributedSampler",
      grad_clip=f"{cfg} CLIP_GRAD 1.0 ({main}: clip_grad_norm_ after the subnets' backward "
                "passes, while the largest subnet's gradient is held aside by first_step)",
      label_smoothing=f"{REPO} misc/config.py MODEL.LABEL_SMOOTHING 0.1",
      mixup=f"{cfg} AUG.MIXUP 0.01", cutmix=f"{cfg} AUG.CUTMIX 0.01",
      randaugment=f"{cfg} AUG.AUTO_AUGMENT rand-n1-m1-mstd0.5-inc1",
      random_erasing=f"{cfg} AUG.REPROB 0.01",
      drop_path=f"{REPO} models/attentive_nas_dynamic_model.py: no drop path in effect. The "
                "transformer blocks are built without drop_path (0), MBConv drop_connect comes "
                "from an unset args.drop_connect (0), and set_dropout_rate assigns a `DropPath` "
                f"attribute the blocks do not have, so {cfg} MODEL.DROP_PATH_RATE 1e-2 is unused",
      ema_decay=f"{main}: ModelEma(decay=.99985)",
      distill=f"{main}: the largest subnet's target is the mean of softmax(5 x logits) (tau 0.2) "
              "of timm's swsl_resnext101_32x4d and swsl_resnext101_32x8d (the labels are not "
              "used: alpha 1)",
      eval=f"{REPO} data/build.py: Resize(int(256 / 224 * 224)) + CenterCrop(224), the model "
           "upsamples to its resolution (288 for the largest subnet); misc/attentive_nas_eval.py "
           "recalibrates BatchNorm on 64 train batches first")
  common.depart(
      c, eval="the trainer evaluates the largest subnet at config.img_size (224) with its running "
      "BatchNorm statistics; the authors upsample the 224 crop to 288 and recalibrate BatchNorm "
      "(configs/nasvit_search.py with search.evaluate does that for any subnet)")


def get_config(arg=None):
  args = common.parse_arg(arg, quick=False, rule="authors")
  c = common.deit_recipe("nasvit_supernet", drop_path_rate=0.0)
  c.total_epochs = 400  # configs/cfg.yaml TRAIN.EPOCHS (the paper says 360)
  c.img_size = 224
  c.batch_size = 2048
  c.optim.lr = 3e-4  # cfg.yaml BASE_LR, x global batch / 512 as main.py scales it
  c.optim.lr_base_batch = 512
  c.optim.lr_schedule_unit = "step"  # misc/lr_scheduler.py: timm cosine, t_in_epochs=False,
  c.optim.warmup_prefix = False  # so its cosine runs from step 0, under the warmup
  c.optim.warmup_lr = 5e-7 * c.batch_size / 512  # main.py scales WARMUP_LR and MIN_LR too
  c.optim.min_lr = 5e-6 * c.batch_size / 512
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_mode = "none"  # the objective clips the subnets' gradient (subnet_clip_norm)
  c.optim.grad_clip_value = 0.0
  c.optim.no_decay = ()
  c.aug.randaugment = "rand-n1-m1-mstd0.5-inc1"
  c.aug.mixup_alpha = 0.01
  c.aug.cutmix_alpha = 0.01
  c.aug.random_erasing = 0.01
  c.aug.repeated_aug = 1  # data/build.py: DistributedSampler
  c.ema_decay = 0.99985  # main.py ModelEma(decay=.99985)
  c.objective = ml_collections.ConfigDict(
      {"name": "nasvit_sandwich", "num_random": 2, "resolutions": (192, 224, 256, 288),
       "gradient_rule": args.rule,  # main.py + misc/constrain_opt.py
       "subnet_clip_norm": 1.0,  # cfg.yaml CLIP_GRAD, applied before the largest's gradient joins
       "per_tensor_after_epoch": 100})  # main.py: proj_student = False once epoch > 100
  c.distill.type = "soft"  # the objective: targets = mean_i softmax(teacher_i logits / tau)
  c.distill.teacher = "resnext101_32x4d,resnext101_32x8d"  # main.py: timm's swsl ResNeXt-101s
  c.distill.teacher_init_from = ("hf-hub:timm/resnext101_32x4d.fb_swsl_ig1b_ft_in1k,"
                                 "hf-hub:timm/resnext101_32x8d.fb_swsl_ig1b_ft_in1k")
  c.distill.alpha = 1.0  # the labels are not used for the largest subnet
  c.distill.tau = 0.2  # main.py: (temp * teacher(x)).softmax(-1), temp = 5
  cite_nasvit(c)
  if args.quick:
    common.make_quick(c, name="nasvit_supernet_tiny", drop_path_rate=0.0)
    c.img_size = 16
    c.objective.resolutions = (12, 16)
    c.distill.type = "none"  # offline: the largest subnet learns from the labels
    c.distill.teacher = ""
    c.distill.teacher_init_from = ""
    c.total_epochs = 6
    c.optim.lr = 2e-3
    c.optim.weight_decay = 0.0
  return c
