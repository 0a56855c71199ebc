"""Evaluation of the latest training checkpoint (or a converted one): accuracy, size, cost, speed."""
from __future__ import annotations

import functools
import json
from typing import Any

import jax
import ml_collections
import numpy as np

from compact_vit import checkpointing, paths, profile, sharding, trainer
from compact_vit.convert.published import published, published_top1
from compact_vit.errors import UserError


def load_eval_variables(config: ml_collections.ConfigDict, workdir: str,
                        model) -> tuple[dict[str, Any], int, dict[str, Any] | None]:
  """(variables, step, ema variables or None) from WORKDIR/checkpoints, else `config.init_from`.

  Only the model's variables are read from a training checkpoint (params, batch_stats and the EMA
  copy), not the optimizer state."""
  ckpt_dir = paths.join(workdir, "checkpoints")
  step = None
  if paths.isdir(ckpt_dir):
    ckpt = checkpointing.TrainCheckpointer(ckpt_dir, keep=config.keep_checkpoints)
    step = ckpt.latest_step()
  abstract = jax.eval_shape(
      lambda: trainer.init_variables(model, jax.random.key(0), config.img_size))
  if step is not None:
    wanted = dict(abstract)
    if config.ema_decay > 0:
      wanted["ema_params"] = abstract["params"]
    restored = ckpt.restore_subtree(wanted, step)
    ema = None
    if "ema_params" in restored:
      ema = dict(restored, params=restored.pop("ema_params"))
    return restored, step, ema
  if config.init_from:
    directory = trainer.resolve_weights(config.init_from, config, config.model.name,
                                        model.num_classes)
    return trainer.load_init_from(directory, abstract), 0, None
  raise UserError(f"No checkpoint found in {ckpt_dir} and no --config.init_from given. Train first "
                  f"(python train.py --config ... --workdir {workdir}) or convert weights with "
                  "`python -m compact_vit.convert` and pass --config.init_from=DIR.")


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        split: str | None = None, measure_speed: bool = True) -> dict[str, Any]:
  """Evaluates and writes WORKDIR/eval_<split>.json; returns the record."""
  trainer.validate_config(config, training=False)
  paths.check_workdir(workdir, jax.process_index())  # it gets eval_<split>.json
  from compact_vit.data import pipeline

  split = split or config.dataset.eval_split
  dataset_cfg = ml_collections.ConfigDict(config.dataset.to_dict())
  dataset_cfg.eval_split = split
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  info = pipeline.get_info(dataset_cfg)
  model = trainer.create_model(config, info.num_classes)
  variables, step, ema = load_eval_variables(config, workdir, model)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  # With dataset.on_accelerator (auto: on a GPU or TPU), the step resamples the host's crops itself.
  eval_fn = jax.jit(functools.partial(trainer.eval_step, model=model,
                                      input_fn=trainer.accelerator_inputs(config)[1]))

  def batches():
    return pipeline.eval_iterator(
        dataset_cfg, img_size=config.img_size,
        batch_size=config.eval_batch_size // jax.process_count(), crop_pct=config.crop_pct,
        resize=config.get("eval_resize", "shorter"),
        process_index=jax.process_index(), process_count=jax.process_count())

  res = trainer.evaluate(eval_fn, variables, batches(), mesh)
  shape = (1, config.img_size, config.img_size, 3)
  record = {
      "model": config.model.name, "split": split, "step": int(step),
      "top1": res["top1"], "top5": res["top5"], "num_examples": int(res["count"]),
      "unreadable": info.num_eval - int(res["count"]),  # named on stdout; accuracy over the rest
      "params": profile.count_params(variables["params"]),
      "gmacs": profile.count_macs(model, variables, shape) / 1e9,
      "images_per_sec": (profile.images_per_sec(model, variables, batch=config.eval_batch_size,
                                                img_size=config.img_size)
                         if measure_speed else None),
      "params_sha256": checkpointing.params_sha256(variables["params"]),
  }
  if step == 0 and config.init_from:
    record.update(published_comparison(config, info.num_classes, record["top1"]))
  if ema is not None:
    res_ema = trainer.evaluate(eval_fn, jax.device_put(ema, sharding.replicated(mesh)), batches(),
                               mesh)
    record.update({"ema_top1": res_ema["top1"], "ema_top5": res_ema["top5"]})
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, f"eval_{split}.json"), json.dumps(record, indent=2))
  return record


def published_comparison(config: ml_collections.ConfigDict, num_classes: int,
                         top1: float) -> dict[str, Any]:
  """For a published checkpoint evaluated as published: {"published_top1", "published_source"},
  printed beside the measured top-1 so that a wrong data copy or evaluation shows at once, with a
  warning for each evaluation setting (crop, normalisation) that differs from the checkpoint's."""
  pub = published_top1(config.init_from, model_name=config.model.name, img_size=config.img_size,
                       num_classes=num_classes)
  if pub is None:
    return {}
  entry = published(config.init_from)
  print(f"Published top-1 {pub.top1:.2%} ({pub.source}) vs measured {top1:.2%} "
        f"({top1 - pub.top1:+.2%}).", flush=True)
  settings = (("crop_pct", config.crop_pct, entry.crop_pct),
              ("dataset.mean", tuple(config.dataset.mean), entry.mean),
              ("dataset.std", tuple(config.dataset.std), entry.std))
  for name, ours, theirs in settings:
    if not np.allclose(ours, theirs):
      print(f"Warning: config.{name}={ours} but this checkpoint was evaluated with {theirs}; pass "
            f"--config.{name}={theirs} to compare like with like.", flush=True)
  return {"published_top1": pub.top1, "published_source": pub.source}


def format_table(record: dict[str, Any]) -> str:
  """A two-column text table of an eval record."""
  rows = []
  for k, v in record.items():
    if isinstance(v, float):
      v = f"{v:.4f}" if k in ("top1", "top5", "ema_top1", "ema_top5", "gmacs", "published_top1") else f"{v:.1f}"
    rows.append((k, str(v)))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
