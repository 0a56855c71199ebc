"""Shared pieces of the AutoFormer / TF-TAS configs: supernet recipe, retraining, search settings.

Sizes 't', 's', 'b' use the authors' search spaces (compact_vit/models/autoformer.py SPACES);
`quick` shrinks everything to the embedded `digits` dataset (16x16 inputs, 4x4 patches, 16-dim
heads, embed {32, 48, 64}, depth {2, 3, 4}, heads {1, 2, 3}, MLP ratio {2, 3, 4}).
"""
from __future__ import annotations

import ml_collections

from configs import common

# Authors' evolution limits (evolution.py --min-param-limits/--param-limits, in millions) chosen
# so that the published subnet of each size lies inside them.
PARAM_LIMITS = {"t": (5.0, 6.0), "s": (18.0, 23.0), "b": (48.0, 54.0)}
QUICK_SPACE = dict(embed_dims=(32, 48, 64), depths=(2, 3, 4), num_heads=(1, 2, 3),
                   mlp_ratios=(2.0, 3.0, 4.0))
QUICK_MODEL = dict(patch_size=4, head_dim=16, max_relative_position=3, drop_path_rate=0.0)
QUICK_PARAM_LIMITS = (0.05, 0.12)


# timm 0.3.2's create_optimizer skips decay for the exact names in no_weight_decay() = {pos_embed,
# cls_token, rel_pos_embed}: the top-level tensors only, the relative-position tables (named
# rel_pos_embed_k.embeddings_table_h, ...) are decayed. Anchored, so they stay decayed here too.
NO_DECAY = ("^cls_token$", "^pos_embed$")
CREAM = "microsoft/Cream AutoFormer"
SUPERNET_TRAIN = f"{CREAM}/supernet_train.py"
TF_TAS = "decemberzhou/TF_TAS"


def supernet_config(size: str, arg: str | None) -> ml_collections.ConfigDict:
  """Supernet training (default) or, with `retrain`, the standalone published subnet."""
  args = common.parse_arg(arg, quick=False, retrain=False)
  if args.retrain:
    c = common.deit_recipe(f"autoformer_{size}", drop_path_rate=0.1)
    ours = ("not in the authors' pipeline (AutoFormer subnets inherit the supernet's weights; "
            "supernet_train.py --mode retrain only evaluates them): DeiT's recipe")
    common.cite(c, total_epochs=ours, lr_at_epoch=ours)
  else:
    c = common.deit_recipe(f"autoformer_supernet_{size}", drop_path_rate=0.1)
    c.total_epochs = 500
    c.optim.warmup_epochs = 20.0
    c.ema_decay = 0.0  # supernet_train.py leaves --model-ema off
    c.objective = ml_collections.ConfigDict({"name": "autoformer_supernet"})
    command = f"{CREAM}/README.md supernet command"
    common.cite_defaults(c, SUPERNET_TRAIN)
    common.cite(
        c, total_epochs=f"{command}: --epochs 500",
        global_batch=f"{command}: 8 GPUs x --batch-size 128",
        peak_lr=f"{SUPERNET_TRAIN}: --lr 5e-4 x global batch / 512",
        lr_at_epoch=f"{SUPERNET_TRAIN}: timm create_scheduler (cosine, {command} "
                    "--warmup-epochs 20 from 1e-6, min 1e-5), step(epoch) after each epoch",
        ema_decay=f"{SUPERNET_TRAIN}: --model-ema off (its set_defaults is commented out)")
  c.optim.no_decay = NO_DECAY
  common.cite(c, no_decay=f"timm 0.3.2 create_optimizer: 1-D and .bias parameters and the exact "
                         f"names in no_weight_decay() ({CREAM}/model/supernet_transformer.py): "
                         "pos_embed, cls_token; the relative-position tables are decayed")
  if args.quick:
    common.make_quick(c, **QUICK_MODEL)
    if args.retrain:  # the largest subnet of the quick space, to be overridden by search results
      c.model.update(embed_dim=64, depth=4, num_heads=(3, 3, 3, 3), mlp_ratios=(4.0,) * 4)
    else:
      c.model.update(QUICK_SPACE)
    c.img_size = 16
    c.total_epochs = 25
    c.optim.warmup_epochs = 2.0
  return c


def tftas_retrain_config(size: str, quick: bool) -> ml_collections.ConfigDict:
  """TF-TAS's retraining of the searched subnet (decemberzhou/TF_TAS config.yaml, the arguments of
  the authors' retraining run): the DeiT recipe with 10 warmup epochs, no model EMA and a global
  batch of 256 (batch_size 256 on world_size 1, so lr 5e-4 x 256/512). The model defaults to the
  paper's TF-TAS subnet (`tftas_<size>`); search.py's printed command overrides its shape."""
  c = supernet_config(size, "quick,retrain" if quick else "retrain")
  if quick:
    return c
  c.model.name = f"tftas_{size}"
  c.batch_size = 256
  c.optim.warmup_epochs = 10.0
  c.ema_decay = 0.0
  yaml = f"{TF_TAS} config.yaml"
  common.cite_defaults(c, yaml)
  common.cite(c, total_epochs=f"{yaml} epochs 300",
              global_batch=f"{yaml} batch_size 256, world_size 1",
              peak_lr=f"{yaml} lr 0.0005, x global batch / 512 by AutoFormer's supernet_train.py",
              lr_at_epoch=f"{yaml} sched cosine, warmup_epochs 10, warmup_lr 1e-6, min_lr 1e-5",
              no_decay=f"timm 0.3.2 (TF-TAS requirements.txt) with the exact names in {TF_TAS} "
                       "model/autoformer_space.py no_weight_decay(): pos_embed, cls_token",
              repeated_augmentation=f"{yaml} repeated_aug true",
              ema_decay=f"{yaml} model_ema false", drop_path=f"{yaml} drop_path 0.1",
              eval=f"{TF_TAS} lib/datasets.py: Resize(int(256 / 224 * 224)) + CenterCrop(224)")
  return c


def search_config(size: str, method: str, arg: str | None) -> ml_collections.ConfigDict:
  """The supernet config plus `config.search` for `autoformer_evolution` or `tf_tas`; with
  `retrain`, the config that retrains a found subnet (search.py prints the command)."""
  args = common.parse_arg(arg, quick=False, retrain=False)
  if args.retrain:
    if method == "tf_tas":
      return tftas_retrain_config(size, args.quick)
    return supernet_config(size, "quick,retrain" if args.quick else "retrain")
  c = supernet_config(size, "quick" if args.quick else None)
  s = ml_collections.ConfigDict()
  s.method = method
  s.seed = 0
  s.min_params_m, s.max_params_m = QUICK_PARAM_LIMITS if args.quick else PARAM_LIMITS[size]
  s.max_gmacs = 0.0  # 0 = no limit
  owner = (f"autoformer_{size}_supernet" if method == "autoformer_evolution"
           else f"tftas_{size}_search")
  s.retrain_config = f"configs/{owner}.py:" + ("quick,retrain" if args.quick else "retrain")
  if method == "autoformer_evolution":
    s.supernet_workdir = ""  # a train.py workdir of configs/autoformer_<size>_supernet.py
    s.train_supernet = bool(args.quick)  # train into WORKDIR/supernet when none is given
    s.population = 12 if args.quick else 50
    s.generations = 4 if args.quick else 20
    s.select = 4 if args.quick else 10
    s.mutations = 4 if args.quick else 25
    s.crossovers = 4 if args.quick else 25
    s.layer_prob = 0.2
    s.structure_prob = 0.4
    s.eval_examples = 0  # 0 = the whole config.dataset.eval_split
  else:
    s.num_candidates = 300 if args.quick else 8000
    s.num_classes = 10 if args.quick else 1000
    s.init_seed = 0
    s.chunk = 8  # candidates per jitted call (vmap on accelerators, lax.map on CPU)
  c.search = s
  return c
