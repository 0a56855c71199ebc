"""ViT-Slim search on DeiT-S (Chavan et al., "Vision Transformer Slimming", CVPR 2022).

Learns soft masks (per head x head dim on q/k/v, MLP hidden units, patch tokens) on pretrained
DeiT-S weights for 50 epochs with L1 penalties w1=2e-4, w2=5e-5, w3=1e-4 (the authors' README
example), then keeps 70% of the attention dims and MLP units (a global threshold per dimension;
patches all kept, see compact_vit/models/vit_slim.py), extracts the smaller `vit_slim_deit_s` into
DIR/slim and writes DIR/search.json. Third-party tables for budget 0.7: ~15.7M params, ~3.1 GMACs,
79.9% top-1 after retraining (configs/vit_slim_deit_s_retrain.py).

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
  c.optim.warmup_epochs = 0.0
  c.optim.no_decay = ("cls_token", "pos_embed", "zeta")
  c.objective = ml_collections.ConfigDict({"name": "vit_slim", "w1": 2e-4, "w2": 5e-5, "w3": 1e-4})
  c.search = ml_collections.ConfigDict()
  c.search.method = "vit_slim"
  c.search.base_model = "deit_small_patch16_224"  # the dense model the weights come from
  c.search.init_from = ml_collections.FieldReference(None, field_type=str)
  c.search.pretrain_epochs = 0  # > 0 and no init_from: train the base model here first
  c.search.budget_attn = args.budget
  c.search.budget_mlp = args.budget
  c.search.budget_patch = 1.0
  c.search.trajectory_every = 2500  # steps between mask snapshots (search.json candidates)
  if args.quick:
    common.make_quick_deit(c)
    c.total_epochs = 10
    c.optim.warmup_epochs = 0.0
    c.search.pretrain_epochs = 15
    c.search.trajectory_every = 50
    # Few masks on the small model: stronger penalties so they separate within 10 epochs.
    c.objective.update(w1=2e-3, w2=5e-4, w3=1e-3)
  return c
