"""ViT-Slim search (Chavan et al., CVPR 2022; Arnav0400/ViT-Slim search.py): learn soft masks on a
pretrained DeiT with L1 penalties, keep a budget of each dimension, extract a smaller ViT.

`python search.py --config configs/vit_slim_deit_s.py[:quick] --workdir DIR`:

1. starting weights: `config.search.init_from` (a converted DeiT checkpoint directory, e.g.
   `python -m compact_vit.convert --model deit_small_patch16_224 ...`), or, when it is unset and
   `config.search.pretrain_epochs > 0`, a DeiT trained first by `trainer.train_and_evaluate` in
   DIR/pretrain (what `:quick` does on `digits`);
2. the masked model (`models.vit_slim.MaskedViT`, masks at their initial values) is written to
   DIR/masked_init and trained with the `vit_slim` objective in DIR/search (the trainer: resumable,
   metrics.jsonl), a checkpoint every `config.search.trajectory_every` steps;
3. the masks of each checkpoint form `candidates` (the trajectory: kept dims per layer at the
   budgets, mean |ζ|); the last one is binarised at the budgets, extracted into a `SlimViT`, saved
   to DIR/slim (`model.json` + variables, registry name `vit_slim_deit_s`) and evaluated.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from compact_vit import checkpointing, paths, profile, sharding, trainer
from compact_vit.search import registry
from compact_vit.errors import UserError
from compact_vit.models import create_model
from compact_vit.models import vit_slim

SLIM_NAME = "vit_slim_deit_s"


def _unlocked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = config.copy_and_resolve_references()
  c.unlock()
  return c


def _checkpoint_params(ckpt_dir: str, step: int) -> dict[str, Any]:
  """The `params` of the trainer's checkpoint at `step` (numpy), read without a target."""
  tree = ocp.StandardCheckpointer().restore(paths.join(ckpt_dir, str(step), "default"))
  return jax.tree.map(np.asarray, tree["params"])


def _steps(ckpt_dir: str) -> list[int]:
  return sorted(int(d) for d in paths.listdir(ckpt_dir) if d.isdigit())


def _starting_weights(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """DeiT params: converted checkpoint, or trained here first (config.search.pretrain_epochs)."""
  s = config.search
  if s.init_from:
    variables, _ = checkpointing.load_variables(s.init_from)
    return variables["params"]
  if s.pretrain_epochs <= 0:
    raise UserError("ViT-Slim needs pretrained DeiT weights: set --config.search.init_from=DIR "
                    "(a `python -m compact_vit.convert --model deit_small_patch16_224` output) or "
                    "--config.search.pretrain_epochs=N to train one first.")
  c = _unlocked(config)
  c.model.name = s.base_model
  c.total_epochs = s.pretrain_epochs
  c.total_steps = None
  c.objective = ml_collections.ConfigDict({"name": "classification"})
  c.checkpoint_every = c.eval_every = 10**9  # the trainer still saves and evaluates at the end
  del c["search"]
  pre_dir = paths.join(workdir, "pretrain")
  print(f"[vit_slim] no init_from: training {s.base_model} for {s.pretrain_epochs} epochs in "
        f"{pre_dir}", flush=True)
  trainer.train_and_evaluate(c, pre_dir)
  ckpt_dir = paths.join(pre_dir, "checkpoints")
  return _checkpoint_params(ckpt_dir, _steps(ckpt_dir)[-1])


def _trajectory_entry(step: int, params: dict[str, Any], s) -> dict[str, Any]:
  z = vit_slim.mask_values(params)
  binary = vit_slim.binarize_masks(params, s.budget_attn, s.budget_mlp, s.budget_patch)
  blocks = [binary[f"blocks_{i}"] for i in range(len(z["attn"]))]
  return {"step": step,
          "attn_dims": [int(b["attn"]["zeta"].sum()) for b in blocks],
          "mlp_hidden": [int(b["mlp"]["zeta"].sum()) for b in blocks],
          "tokens": [int(b["patch_zeta"].sum()) for b in blocks],
          "mean_abs_zeta": {k: float(np.mean([np.abs(v).mean() for v in z[k]])) for k in z}}


def _evaluate(config, model, params) -> float:
  from compact_vit.data import pipeline
  mesh = sharding.make_mesh(config.mesh)
  eval_fn = jax.jit(functools.partial(trainer.eval_step, model=model))
  batches = pipeline.eval_iterator(trainer.host_dataset(config), img_size=config.img_size,
                                   batch_size=config.eval_batch_size, crop_pct=config.crop_pct)
  return trainer.evaluate(eval_fn, {"params": params}, batches, mesh)["top1"]


def _profile(model, params, img_size: int) -> tuple[int, float]:
  macs = profile.count_macs(model, {"params": params}, (1, img_size, img_size, 3))
  return profile.count_params(params), macs


@registry.register("vit_slim")
def vit_slim_search(config: ml_collections.ConfigDict, workdir: str) -> registry.SearchResult:
  """Mask search + extraction; see the module docstring."""
  s = config.search
  trainer.validate_config(config)
  from compact_vit.data import pipeline
  num_classes = pipeline.get_info(config.dataset).num_classes
  base = _starting_weights(config, workdir)

  # Masked model initialised from the DeiT weights.
  c = _unlocked(config)
  del c["search"]
  c.checkpoint_every = s.trajectory_every
  c.keep_checkpoints = 10**6
  masked = trainer.create_model(c, num_classes)
  init = trainer.init_variables(masked, jax.random.key(c.seed), c.img_size)
  merged = vit_slim.merge_pretrained(init["params"], base)
  overrides = {k: v for k, v in c.model.items() if k != "name"}
  overrides.update(num_classes=num_classes, img_size=c.img_size)
  c.init_from = checkpointing.save_variables(paths.join(workdir, "masked_init"),
                                             {"params": merged}, c.model.name, overrides)
  search_dir = paths.join(workdir, "search")
  final = trainer.train_and_evaluate(c, search_dir)

  ckpt_dir = paths.join(search_dir, "checkpoints")
  steps = _steps(ckpt_dir)
  candidates = [_trajectory_entry(0, merged, s)]
  candidates += [_trajectory_entry(st, _checkpoint_params(ckpt_dir, st), s) for st in steps]
  params = _checkpoint_params(ckpt_dir, steps[-1])

  # Binarise, extract, save, measure.
  binary = vit_slim.binarize_masks(params, s.budget_attn, s.budget_mlp, s.budget_patch)
  slim_params, dims = vit_slim.extract(binary)
  slim_overrides = {k: v for k, v in overrides.items() if k not in ("drop_path_rate", "searched")}
  slim_overrides.update(dims)
  slim = create_model(SLIM_NAME, **slim_overrides)
  slim_dir = checkpointing.save_variables(paths.join(workdir, "slim"), {"params": slim_params},
                                          SLIM_NAME, slim_overrides)
  dense = create_model(s.base_model, **{k: v for k, v in overrides.items() if k != "searched"})
  dense_params = jax.eval_shape(lambda: trainer.init_variables(
      dense, jax.random.key(0), c.img_size))["params"]
  n_params, macs = _profile(slim, slim_params, c.img_size)
  n_dense, dense_macs = _profile(dense, dense_params, c.img_size)
  top1_binary = _evaluate(c, create_model(c.model.name, searched=True, **{
      k: v for k, v in overrides.items() if k != "searched"}), binary)
  top1_slim = _evaluate(c, slim, slim_params)
  best = {"head_dims": dims["head_dims"], "mlp_hidden": dims["mlp_hidden"],
          "attn_dims": [int(sum(h)) for h in dims["head_dims"]],
          "tokens": candidates[-1]["tokens"],
          "budgets": {"attn": s.budget_attn, "mlp": s.budget_mlp, "patch": s.budget_patch},
          "params": n_params, "macs": macs, "gmacs": macs / 1e9,
          "dense_params": n_dense, "dense_gmacs": dense_macs / 1e9,
          "val_top1_soft_masks": final.get("val/top1"),
          "val_top1_binary_masks": top1_binary, "val_top1_extracted": top1_slim,
          "checkpoint": slim_dir}
  quick = ",quick" if config.dataset.name == "digits" else ""
  command = (f"python train.py --config configs/vit_slim_deit_s_retrain.py:slim_dir={slim_dir}"
             f"{quick} --workdir {paths.join(workdir, 'retrain')}")
  return registry.SearchResult(best=best, candidates=candidates, train_command=command)
