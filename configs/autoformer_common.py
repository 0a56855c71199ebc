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


def supernet_config(size: str, arg: str | None) -> ml_collections.ConfigDict:
  """Supernet training (default) or, with `retrain`, the standalone published subnet."""
  args = common.parse_arg(arg, quick=False, retrain=False)
  if args.retrain:
    c = common.deit_recipe(f"autoformer_{size}", drop_path_rate=0.1)
  else:
    c = common.deit_recipe(f"autoformer_supernet_{size}", drop_path_rate=0.1)
    c.total_epochs = 500
    c.optim.warmup_epochs = 20.0
    c.objective = ml_collections.ConfigDict({"name": "autoformer_supernet"})
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


def search_config(size: str, method: str, arg: str | None) -> ml_collections.ConfigDict:
  """The supernet config plus `config.search` for `autoformer_evolution` or `tf_tas`."""
  args = common.parse_arg(arg, quick=False)
  c = supernet_config(size, "quick" if args.quick else None)
  s = ml_collections.ConfigDict()
  s.method = method
  s.seed = 0
  s.min_params_m, s.max_params_m = QUICK_PARAM_LIMITS if args.quick else PARAM_LIMITS[size]
  s.max_gmacs = 0.0  # 0 = no limit
  s.retrain_config = f"configs/autoformer_{size}_supernet.py:" + ("quick,retrain" if args.quick
                                                                    else "retrain")
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
