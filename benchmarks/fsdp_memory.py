"""Per-device memory of the train state (parameters + AdamW moments) with FSDP over 1, 2, 4, 8
simulated CPU devices, from XLA's compiled memory analysis; data parallel (replicated state) as the
baseline on the same devices.

  python benchmarks/fsdp_memory.py [--model deit_base_patch16_224] [--step]

`--step` also compiles one train step (batch 8 at 224px) per setting and reports its per-device
argument + temporary bytes. Nothing is allocated: the state is compiled from `jax.eval_shape`.
Writes benchmarks/results/fsdp_memory.md.
"""
from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time

DEVICES = (1, 2, 4, 8)


def measure(model_name: str, with_step: bool) -> list[dict]:
  import jax
  import jax.numpy as jnp
  from compact_vit import models, optim, sharding, trainer
  from configs import common

  cfg = common.deit_recipe(model_name)
  model = models.create_model(model_name)
  tx, schedule = optim.create_optimizer(cfg.optim, batch_size=1024, steps_per_epoch=1251,
                                        total_steps=300 * 1251)
  init = functools.partial(trainer.create_train_state, model, tx, img_size=224, use_ema=False)
  abstract = jax.eval_shape(init, jax.random.key(0))
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  rows = []
  for n in DEVICES:
    for kind, mesh_cfg in (("data parallel", {"data": -1, "fsdp": 1, "model": 1}),
                           ("FSDP", {"data": 1, "fsdp": -1, "model": 1})):
      if n == 1 and kind == "FSDP":
        continue
      mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:n])
      state_sh = sharding.state_shardings(abstract, mesh)
      start = time.perf_counter()
      compiled = jax.jit(init, out_shardings=state_sh).lower(jax.random.key(0)).compile()
      state_bytes = compiled.memory_analysis().output_size_in_bytes
      row = dict(devices=n, kind=kind, state_mib=state_bytes / 2**20,
                 fraction=state_bytes / total, compile_s=time.perf_counter() - start)
      if with_step:
        step = jax.jit(functools.partial(
            trainer.train_step, model=model, tx=tx, schedule=schedule,
            base_rng=jax.random.key(0), num_classes=1000, aug=cfg.aug.to_dict(),
            distill=cfg.distill.to_dict()), donate_argnums=(0,),
            out_shardings=(state_sh, sharding.replicated(mesh)))
        batch = {"image": jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.float32,
                                               sharding=sharding.data_sharding(mesh)),
                 "label": jax.ShapeDtypeStruct((8,), jnp.int32,
                                               sharding=sharding.data_sharding(mesh))}
        state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, state_sh)
        mem = step.lower(state_in, batch, None).compile().memory_analysis()
        row["step_mib"] = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20
      rows.append(row)
      print(row, flush=True)
  return rows, total


def write_table(rows: list[dict], total: int, model_name: str, with_step: bool, path: str) -> None:
  header = ["devices", "sharding", "state per device (MiB)", "fraction of full state", "ideal 1/n"]
  if with_step:
    header.append("train step args + temp per device (MiB)")
  lines = [
      f"# Per-device train-state memory: {model_name}, FSDP vs data parallel",
      "",
      f"State = parameters + AdamW moments (mu, nu) + step, float32: {total / 2**20:.1f} MiB in all.",
      "Per-device bytes from `jax.jit(init, out_shardings=...).lower().compile().memory_analysis()"
      ".output_size_in_bytes` on simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_"
      "count=8); FSDP splits the largest divisible dimension of every >= 2-D leaf over `fsdp` "
      "(compact_vit/sharding.py); 1-D leaves (biases, norms) stay replicated.",
      "",
      "Command: `python benchmarks/fsdp_memory.py" + (" --step" if with_step else "") + "`",
      "",
      "| " + " | ".join(header) + " |",
      "|" + "---|" * len(header),
  ]
  for r in rows:
    ideal = 1.0 / r["devices"] if r["kind"] == "FSDP" else 1.0
    cells = [str(r["devices"]), r["kind"], f"{r['state_mib']:.1f}", f"{r['fraction']:.4f}",
             f"{ideal:.4f}"]
    if with_step:
      cells.append(f"{r['step_mib']:.1f}")
    lines.append("| " + " | ".join(cells) + " |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="deit_base_patch16_224")
  parser.add_argument("--step", action="store_true", help="also compile a train step")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "fsdp_memory.md"))
  args = parser.parse_args()
  flag = f"--xla_force_host_platform_device_count={max(DEVICES)}"
  if flag not in os.environ.get("XLA_FLAGS", ""):  # the device count is fixed at JAX start-up
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flag).strip(),
               JAX_PLATFORMS="cpu")
    sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  rows, total = measure(args.model, args.step)
  write_table(rows, total, args.model, args.step, args.out)
  print(open(args.out).read())


if __name__ == "__main__":
  main()
