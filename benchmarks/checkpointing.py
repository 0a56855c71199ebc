"""Checkpoint saves against the train step: do asynchronous Orbax saves stall training?

For DeiT-S- and DeiT-B-sized train states (parameters + AdamW moments, float32), saved with
`compact_vit.checkpointing.TrainCheckpointer` (Orbax's async path) to a local folder and to an
emulated bucket (fake-gcs-server on loopback, as in the tests), measures:

* the train step alone (a real DeiT forward/backward + AdamW update, jitted and donated);
* the train step while a save is in flight (every step between `save` and the save's commit);
* how long `save` blocks the loop (the copy to host memory), and the save until it commits.

  python benchmarks/checkpointing.py [--models deit_small_patch16_224,deit_base_patch16_224]
      [--batch 8] [--img-size 224] [--steps 6] [--out benchmarks/results/checkpointing_cpu.md]

Ratios (step under a save / step alone) come from the same process and state; the target is
1.2x or less.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def make_step(model_name: str, batch: int, img_size: int):
  """(jitted donated step, initial state, batch) for `model_name`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from compact_vit import models  # pylint: disable=import-outside-toplevel

  model = models.create_model(model_name, img_size=img_size)
  x = jax.random.normal(jax.random.key(1), (batch, img_size, img_size, 3), jnp.float32)
  y = jnp.arange(batch) % 1000
  params = model.init(jax.random.key(0), x[:1])["params"]
  tx = optax.adamw(1e-4)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  def loss_fn(p):
    logits = model.apply({"params": p}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(state):
    grads = jax.grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}

  return jax.jit(step, donate_argnums=0), state


def measure(step, state, directory: str, steps: int) -> tuple[dict[str, float], dict]:
  """(timings, the state after the steps: the one given is donated)."""
  import jax  # pylint: disable=import-outside-toplevel
  from compact_vit import checkpointing  # pylint: disable=import-outside-toplevel

  for _ in range(2):  # compile, warm
    state = jax.block_until_ready(step(state))
  alone = []
  for _ in range(steps):
    start = time.perf_counter()
    state = jax.block_until_ready(step(state))
    alone.append(time.perf_counter() - start)
  ckpt = checkpointing.TrainCheckpointer(directory, keep=2)
  start = time.perf_counter()
  ckpt.save(int(state["step"]), state)
  blocked = time.perf_counter() - start
  under = []
  while ckpt._manager.is_saving_in_progress():  # pylint: disable=protected-access
    t = time.perf_counter()
    state = jax.block_until_ready(step(state))
    under.append(time.perf_counter() - t)
  ckpt.wait()
  saved = time.perf_counter() - start
  ckpt.close()
  return {"step": statistics.median(alone),
          "step_under_save": statistics.median(under) if under else float("nan"),
          "steps_under_save": len(under), "save_blocks": blocked, "save_total": saved}, state


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="deit_small_patch16_224,deit_base_patch16_224")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--img-size", type=int, default=224)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "checkpointing_cpu.md"))
  args = parser.parse_args()

  import gcs_server  # pylint: disable=import-outside-toplevel
  server = gcs_server.server()
  gcs_server.use_in_process(server.url)
  server.create_bucket("bench")
  import jax  # pylint: disable=import-outside-toplevel
  from compact_vit import profile  # pylint: disable=import-outside-toplevel

  rows = []
  for name in args.models.split(","):
    step, state = make_step(name, args.batch, args.img_size)
    megabytes = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    params_m = profile.count_params(state["params"]) / 1e6
    local = tempfile.mkdtemp(prefix="ckpt-bench-")
    for where, directory in (("local", local), ("bucket", f"gs://bench/{name}")):
      r, state = measure(step, state, directory, args.steps)
      rows.append((name, f"{params_m:.1f}M", f"{megabytes:.0f}", where, r))
      print(name, where, r, flush=True)
    shutil.rmtree(local, ignore_errors=True)

  lines = [
      f"# Checkpoint saves vs the train step ({jax.devices()[0].device_kind}, "
      f"{len(os.sched_getaffinity(0))} host cores, batch {args.batch} at {args.img_size} px)",
      "",
      "`python benchmarks/checkpointing.py` (state: params + AdamW moments, float32; bucket: "
      "fake-gcs-server on loopback).",
      "",
      "| model | params | state MiB | to | step s | step under a save s | ratio | steps in the "
      "save | save blocks s | save until committed s |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for name, params_m, mib, where, r in rows:
    ratio = r["step_under_save"] / r["step"]
    lines.append(f"| {name} | {params_m} | {mib} | {where} | {r['step']:.3f} | "
                 f"{r['step_under_save']:.3f} | {ratio:.2f}x | {r['steps_under_save']} | "
                 f"{r['save_blocks']:.2f} | {r['save_total']:.2f} |")
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
