"""AutoFormer-S evolutionary search (Chen et al., ICCV 2021; microsoft/Cream
AutoFormer/evolution.py).

Population 50, 20 generations, top-10 parents, 25 mutations (probability 0.2 per layer, 0.4 for
depth and embed dim) + 25 crossovers per generation, parameter limits
(--config.search.min_params_m / max_params_m, optional max_gmacs); each candidate is scored by val
top-1 with weights inherited from a trained supernet:

  python search.py --config configs/autoformer_s_search.py --workdir runs/autoformer_s_search \
      --config.search.supernet_workdir=runs/autoformer_s_supernet

Resumable (rerun the command); writes search.json and prints the command that trains the winner.
`:quick` trains a small supernet on `digits` into WORKDIR/supernet first, then searches it
(minutes on a 2-core CPU).
"""
from configs import autoformer_common


def get_config(arg=None):
  return autoformer_common.search_config("s", "autoformer_evolution", arg)
