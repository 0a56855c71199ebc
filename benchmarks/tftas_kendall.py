"""Kendall tau between TF-TAS's DSS score and the accuracy of briefly trained subnets on `digits`.

Draws N random subnets of the quick AutoFormer space (configs/autoformer_common.py), scores them by
DSS exactly as `configs/tftas_t_search.py:quick` does (same supernet init), trains each from scratch
as a standalone model with `configs/autoformer_t_supernet.py:quick,retrain` for --steps steps, and
reports Kendall's tau-b of DSS vs val top-1, next to the parameter count vs val top-1 as the
baseline proxy. Also times DSS scoring (candidates/s) at the quick size on this machine.

  python benchmarks/tftas_kendall.py --num 12 --steps 150
Writes benchmarks/results/tftas_kendall.md and .json.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from compact_vit import trainer  # noqa: E402
from compact_vit.search import space as space_lib, tf_tas  # noqa: E402
from configs import autoformer_common  # noqa: E402


def kendall_tau(a, b) -> float:
  """Kendall's tau-b (ties counted in neither concordant nor discordant pairs)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  conc = disc = ties_a = ties_b = 0
  for i in range(len(a)):
    for j in range(i + 1, len(a)):
      da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
      if da == 0 and db == 0:
        continue
      if da == 0:
        ties_a += 1
      elif db == 0:
        ties_b += 1
      elif da == db:
        conc += 1
      else:
        disc += 1
  denom = np.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
  return float((conc - disc) / denom) if denom else 0.0


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num", type=int, default=12)
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default="/tmp/tftas_kendall")
  args = parser.parse_args()

  search_cfg = autoformer_common.search_config("t", "tf_tas", "quick")
  model = trainer.create_model(search_cfg, search_cfg.search.num_classes)
  init = jax.jit(lambda k: trainer.init_variables(model, k, search_cfg.img_size)["params"])
  score = tf_tas.make_scorer(model, init(jax.random.key(search_cfg.search.init_seed)), chunk=16)
  costs = space_lib.Costs(model)
  rng = np.random.default_rng(args.seed)
  archs = [space_lib.random_arch(model.space, rng) for _ in range(args.num)]
  score(archs[:1])
  timing = [space_lib.random_arch(model.space, rng) for _ in range(256)]
  start = time.perf_counter()
  score(timing)
  rate = len(timing) / (time.perf_counter() - start)
  dss = score(archs)

  rows = []
  for i, (arch, value) in enumerate(zip(archs, dss)):
    cfg = autoformer_common.supernet_config("t", "quick,retrain")
    cfg.model.update(embed_dim=arch["embed_dim"], depth=arch["depth"],
                     num_heads=tuple(arch["num_heads"]), mlp_ratios=tuple(arch["mlp_ratios"]))
    cfg.total_steps = args.steps
    cfg.eval_every = args.steps
    cfg.checkpoint_every = args.steps
    cfg.log_every = args.steps
    cfg.seed = args.seed
    out = trainer.train_and_evaluate(cfg, os.path.join(args.workdir, f"cand{i}"))
    rows.append({"arch": arch, "dss": float(value), "params": costs(arch)[0],
                 "top1": out["val/top1"]})
    print(json.dumps(rows[-1]), flush=True)

  tau_dss = kendall_tau([r["dss"] for r in rows], [r["top1"] for r in rows])
  tau_params = kendall_tau([r["params"] for r in rows], [r["top1"] for r in rows])
  here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  os.makedirs(here, exist_ok=True)
  with open(os.path.join(here, "tftas_kendall.json"), "w") as f:
    json.dump({"tau_dss": tau_dss, "tau_params": tau_params, "dss_per_sec": rate,
               "steps": args.steps, "rows": rows}, f, indent=1)
  lines = ["# TF-TAS DSS vs trained accuracy (digits, quick AutoFormer space)", "",
           f"`python benchmarks/tftas_kendall.py --num {args.num} --steps {args.steps}` on "
           f"{os.cpu_count()} CPU cores (shared, timings noisy), JAX {jax.__version__}.", "",
           f"- DSS scoring: {rate:.1f} candidates/s (quick size: 16x16 inputs, <= 4 layers of "
           "width <= 64; batches of 16 under vmap, one compilation).",
           f"- Kendall tau-b, DSS vs val top-1: **{tau_dss:.3f}**; parameters vs val top-1 "
           f"(baseline proxy): {tau_params:.3f}; {len(rows)} subnets, each trained from scratch "
           f"for {args.steps} steps (batch 64) with the quick recipe.", "",
           "| embed | depth | heads | mlp ratios | params | DSS | val top-1 |",
           "|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: -r["dss"]):
    a = r["arch"]
    lines.append(f"| {a['embed_dim']} | {a['depth']} | {a['num_heads']} | {a['mlp_ratios']} | "
                 f"{r['params']} | {r['dss']:.3f} | {r['top1']:.4f} |")
  with open(os.path.join(here, "tftas_kendall.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
