"""TF-TAS training-free search over the AutoFormer-T space (Zhou et al., CVPR 2022;
decemberzhou/TF_TAS search_autoformer.py).

Ranks 8,000 random subnets within the parameter limits by the DSS indicator (synaptic diversity of
the attention linears + synaptic saliency of the MLPs) of the randomly initialised supernet, with no
training and no data:

  python search.py --config configs/tftas_t_search.py --workdir runs/tftas_t_search

writes search.json and prints the command that retrains the winner (the paper's TF-TAS-T is
registry `tftas_t`). That command uses `:retrain`, the authors' retraining recipe (TF_TAS
config.yaml: 300 epochs, global batch 256, lr 5e-4 x 256/512, 10 warmup epochs, repeated
augmentation, no EMA), which without overrides trains TF-TAS-T itself. The search's own
training fields are the AutoFormer supernet's; it trains nothing. `:quick` ranks 300 subnets
of the small `digits` space (about a minute).
"""
from configs import autoformer_common


def get_config(arg=None):
  return autoformer_common.search_config("t", "tf_tas", arg)
