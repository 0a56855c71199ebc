"""The training loop: one jitted, donated `train_step` over a sharded pytree state.

Read top to bottom: validate the config, mesh, input, model and optimizer, state (initialised
sharded, restored from the latest checkpoint or a converted one), teacher, update step, loop with
logging, evaluation, checkpointing and preemption handling.

Exact resume: the step RNG is `fold_in(key(seed), step)` and the input pipeline is a pure function of
(seed, step), so a run stopped and resumed from a checkpoint reproduces the uninterrupted run.
"""
from __future__ import annotations

import functools
import math
import os
import signal
import time
from typing import Any, Callable, Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from compact_vit import checkpointing, losses, models, objectives, optim, sharding
from compact_vit.errors import UserError
from compact_vit.writers import MetricWriter, Progress

State = dict[str, Any]


# ----------------------------------------------------------------------------- model and state

def create_model(config: ml_collections.ConfigDict, num_classes: int):
  """The model of `config.model` (name + overrides) with the dataset's classes and image size."""
  overrides = {k: v for k, v in config.model.items() if k != "name"}
  overrides.update(num_classes=num_classes, img_size=config.img_size)
  if config.dtype != "float32":
    overrides["dtype"] = jnp.dtype(config.dtype)
  return models.create_model(config.model.name, **overrides)


def init_variables(model, rng: jax.Array, img_size: int) -> dict[str, Any]:
  x = jnp.zeros((1, img_size, img_size, 3), jnp.float32)
  return model.init({"params": rng, "dropout": rng, "sample": rng}, x, train=False)


def create_train_state(model, tx: optax.GradientTransformation, rng: jax.Array, img_size: int,
                       use_ema: bool) -> State:
  """{step, params, opt_state[, batch_stats][, ema_params]}: a plain pytree."""
  variables = init_variables(model, rng, img_size)
  params = variables["params"]
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  if "batch_stats" in variables:
    state["batch_stats"] = variables["batch_stats"]
  if use_ema:  # a copy: params and EMA are donated separately
    state["ema_params"] = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
  return state


def model_variables(state: State, params_key: str = "params") -> dict[str, Any]:
  variables = {"params": state[params_key]}
  if "batch_stats" in state:
    variables["batch_stats"] = state["batch_stats"]
  return variables


# ----------------------------------------------------------------------------- steps

compute_loss = objectives.compute_loss  # re-exported: the default objective's loss


def train_step(state: State, batch: Mapping[str, jax.Array], teacher_vars: Any, *, model, tx,
               schedule: Callable, base_rng: jax.Array, num_classes: int, aug: Mapping[str, Any],
               distill: Mapping[str, Any], teacher=None, ema_decay: float = 0.0,
               objective: Mapping[str, Any] | None = None):
  """One update. Returns (new state, {'loss', 'lr', 'grad_norm', ...objective metrics}).

  Pure; RNG = fold_in(seed key, step). `objective` is config.objective ({'name': ..., options});
  the objective (compact_vit/objectives.py) returns the loss and gradients.
  """
  objective = dict(objective or {"name": "classification"})
  objective_fn = objectives.get(objective.pop("name"))
  rng = jax.random.fold_in(base_rng, state["step"])
  k_mix, k_drop, k_sample, k_objective = jax.random.split(rng, 4)
  images, targets = losses.mixup_cutmix(
      k_mix, batch["image"], batch["label"], num_classes=num_classes,
      mixup_alpha=aug["mixup_alpha"], cutmix_alpha=aug["cutmix_alpha"], prob=aug["mixup_prob"],
      switch_prob=aug["mixup_switch_prob"], label_smoothing=aug["label_smoothing"])
  ctx = objectives.StepContext(
      model=model, images=images, targets=targets, rngs={"dropout": k_drop, "sample": k_sample},
      key=k_objective, step=state["step"], batch_stats=state.get("batch_stats"), distill=distill,
      options=objective, teacher=teacher, teacher_vars=teacher_vars)
  loss, grads, batch_stats, extra = objective_fn(state["params"], ctx)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
  if batch_stats is not None:
    new_state["batch_stats"] = batch_stats
  if "ema_params" in state:
    new_state["ema_params"] = jax.tree.map(
        lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state["ema_params"], params)
  metrics = {**extra, "loss": loss, "lr": schedule(state["step"]),
             "grad_norm": optax.global_norm(grads)}
  return new_state, metrics


def eval_step(variables: Any, batch: Mapping[str, jax.Array], *, model) -> dict[str, jax.Array]:
  """Sums of top-1/top-5 hits over the valid (mask=True) examples, and their count."""
  logits = model.apply(variables, batch["image"], train=False)
  mask = batch["mask"].astype(jnp.float32)
  k = min(5, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  hits = top == batch["label"][:, None]
  return {"top1": jnp.sum(hits[:, 0] * mask), "top5": jnp.sum(jnp.any(hits, axis=1) * mask),
          "count": jnp.sum(mask)}


def evaluate(eval_fn: Callable, variables: Any, batches: Iterator[Mapping[str, np.ndarray]],
             mesh) -> dict[str, float]:
  """Runs `eval_fn` over every batch; returns top1/top5 as fractions and the example count."""
  totals = None
  for batch in batches:
    out = eval_fn(variables, sharding.shard_batch(batch, mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.tree.map(float, jax.device_get(totals))
  count = max(totals["count"], 1.0)
  return {"top1": totals["top1"] / count, "top5": totals["top5"] / count, "count": totals["count"]}


# ----------------------------------------------------------------------------- helpers

def validate_config(config: ml_collections.ConfigDict, training: bool = True) -> None:
  """User-fixable config errors, raised before any data is read or anything compiles.

  `training=False` (evaluation) skips the checks of what only training uses (the teacher).
  """
  names = models.list_models()
  if config.model.name not in names:
    raise UserError(f"Unknown model {config.model.name!r}. Available: {', '.join(names)}.")
  if not training:
    return
  if config.distill.type not in ("none", "soft", "hard"):
    raise UserError(f"config.distill.type={config.distill.type!r}: use none, soft or hard.")
  if config.distill.type != "none":
    if config.distill.teacher not in names:
      raise UserError(f"config.distill.teacher={config.distill.teacher!r} is not a registered "
                      f"model. Available: {', '.join(names)}.")
    if not config.distill.teacher_init_from:
      raise UserError("Distillation needs trained teacher weights: set "
                      "--config.distill.teacher_init_from=DIR (a `python -m compact_vit.convert` "
                      "output).")
  if config.dtype not in ("float32", "bfloat16", "float16"):
    raise UserError(f"config.dtype={config.dtype!r}: use float32 or bfloat16.")
  for field in ("batch_size", "eval_batch_size", "log_every", "eval_every", "checkpoint_every"):
    if int(config[field]) <= 0:
      raise UserError(f"config.{field} must be positive, got {config[field]}.")
  if config.total_steps is None and config.total_epochs <= 0:
    raise UserError("Set config.total_epochs > 0 or config.total_steps.")
  objectives.get(objective_options(config)["name"])


def objective_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.objective as a dict ({'name': 'classification'} when the config has none)."""
  objective = config.get("objective")
  return objective.to_dict() if objective is not None else {"name": "classification"}


def load_init_from(directory: str, abstract_params: Any) -> dict[str, Any]:
  """Variables of a converted checkpoint, checked against the model's parameter tree."""
  variables, meta = checkpointing.load_variables(directory)
  try:
    checkpointing.check_tree_matches(
        abstract_params, variables["params"],
        f"Checkpoint {directory} (model {meta.get('model')!r})")
  except UserError as e:
    raise UserError(f"{e}. For another input size or class count, convert the weights again "
                    "with `python -m compact_vit.convert ... --img-size S --num-classes N`.") from e
  return variables


def load_teacher(config: ml_collections.ConfigDict):
  variables, meta = checkpointing.load_variables(config.distill.teacher_init_from)
  overrides = dict(meta.get("overrides", {}))
  overrides.pop("img_size", None)
  teacher = models.create_model(config.distill.teacher, img_size=config.img_size, **overrides)
  abstract = jax.eval_shape(lambda: init_variables(teacher, jax.random.key(0), config.img_size))
  checkpointing.check_tree_matches(abstract, variables,
                                   f"Teacher checkpoint {config.distill.teacher_init_from}")
  return teacher, variables


def schedule_lengths(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps); total_steps overrides total_epochs when set."""
  steps_per_epoch = max(num_train // config.batch_size, 1)
  total = config.total_steps
  if total is None:
    total = int(math.ceil(config.total_epochs * steps_per_epoch))
  return steps_per_epoch, int(total)


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks, so it can save before exiting."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# ----------------------------------------------------------------------------- the loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if possible), evaluates, checkpoints. Returns final metrics."""
  validate_config(config)
  from compact_vit.data import pipeline  # TensorFlow is only needed for input

  # Mesh and input.
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  info = pipeline.get_info(config.dataset)
  steps_per_epoch, total_steps = schedule_lengths(config, info.num_train)
  nproc, pid = jax.process_count(), jax.process_index()
  local_batch = config.batch_size // nproc
  local_eval_batch = config.eval_batch_size // nproc

  # Model, optimizer, state shapes.
  model = create_model(config, info.num_classes)
  tx, schedule = optim.create_optimizer(config.optim, batch_size=config.batch_size,
                                        steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  use_ema = config.ema_decay > 0
  init_fn = functools.partial(create_train_state, model, tx, img_size=config.img_size,
                              use_ema=use_ema)
  rng = jax.random.key(config.seed)
  abstract_state = jax.eval_shape(init_fn, rng)
  state_sh = sharding.state_shardings(abstract_state, mesh)
  repl = sharding.replicated(mesh)
  init_variables_from = None
  if config.init_from:
    init_variables_from = load_init_from(config.init_from, abstract_state["params"])
  teacher, teacher_vars = (None, None)
  if config.distill.type != "none":
    teacher, teacher_vars = load_teacher(config)
    teacher_vars = jax.device_put(teacher_vars, repl)

  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpointing.TrainCheckpointer(os.path.join(workdir, "checkpoints"),
                                         keep=config.keep_checkpoints)
  writer = MetricWriter(workdir, enabled=pid == 0)
  if pid == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # State: latest checkpoint, else fresh init (+ converted weights).
  abstract_sharded = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)
  start_step = ckpt.latest_step()
  if start_step is not None:
    state = ckpt.restore(abstract_sharded, start_step)
    print(f"Resumed from {ckpt.directory} at step {start_step}.", flush=True)
  else:
    start_step = 0
    state = jax.jit(init_fn, out_shardings=state_sh)(rng)
    if init_variables_from is not None:
      state["params"] = jax.device_put(init_variables_from["params"], state_sh["params"])
      if "batch_stats" in state and "batch_stats" in init_variables_from:
        state["batch_stats"] = jax.device_put(init_variables_from["batch_stats"],
                                              state_sh["batch_stats"])
      if use_ema:
        state["ema_params"] = jax.device_put(init_variables_from["params"], state_sh["params"])
      state["opt_state"] = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(state["params"])
      print(f"Initialised parameters from {config.init_from}.", flush=True)

  # Compiled steps.
  step_fn = jax.jit(
      functools.partial(
          train_step, model=model, tx=tx, schedule=schedule, base_rng=jax.random.key(config.seed),
          num_classes=info.num_classes, aug=config.aug.to_dict(),
          distill=config.distill.to_dict(), teacher=teacher, ema_decay=config.ema_decay,
          objective=objective_options(config)),
      donate_argnums=(0,), out_shardings=(state_sh, repl))
  eval_fn = jax.jit(functools.partial(eval_step, model=model), out_shardings=repl)

  def eval_batches():
    return pipeline.eval_iterator(
        config.dataset, img_size=config.img_size, batch_size=local_eval_batch,
        crop_pct=config.crop_pct, process_index=pid, process_count=nproc)

  def run_eval(step: int) -> dict[str, float]:
    result = {}
    for prefix, key in [("val", "params")] + ([("val_ema", "ema_params")] if use_ema else []):
      res = evaluate(eval_fn, model_variables(state, key), eval_batches(), mesh)
      result.update({f"{prefix}/top1": res["top1"], f"{prefix}/top5": res["top5"]})
    writer.write(step, result)
    print(f"[eval step {step}] top1 {result['val/top1']:.4f}  top5 {result['val/top5']:.4f}",
          flush=True)
    return result

  train_iter = pipeline.train_iterator(
      config.dataset, config.aug, img_size=config.img_size, batch_size=local_batch,
      seed=config.seed, start_step=start_step, process_index=pid, process_count=nproc)

  # Loop. The loss of step s is checked after step s+1 is dispatched, and always before a save,
  # so a NaN never reaches a checkpoint and the host never waits on every step.
  progress = Progress(total_steps, config.batch_size)
  final_eval: dict[str, float] = {}
  pending = None  # (step, metrics) not yet checked
  last_saved = start_step if ckpt.latest_step() is not None else None

  def check(pending_metrics):
    step_done, metrics = pending_metrics
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      where = (f"the last good checkpoint (step {last_saved}) is kept in {ckpt.directory}"
               if last_saved is not None else "no checkpoint had been written yet")
      raise UserError(f"Loss became {loss} at step {step_done}; stopping. {where}. Lower "
                      "config.optim.lr, enable config.optim.grad_clip_norm or use float32.")
    return loss

  step = start_step
  stopped_by = None
  with _StopRequest() as stop:
    while step < total_steps:
      batch = sharding.shard_batch(next(train_iter), mesh)
      state, metrics = step_fn(state, batch, teacher_vars)
      step += 1
      if step == start_step + 1:
        progress.update(step)  # the first step includes compilation; rates start after it
      if pending is not None:
        check(pending)
      pending = (step, metrics)
      is_last = step == total_steps
      if step % config.log_every == 0 or is_last:
        loss = check(pending)
        host = jax.device_get(metrics)
        record = {f"train/{k}": float(v) for k, v in host.items()}
        record.update({"train/loss": loss, "train/epoch": step / steps_per_epoch})
        if step > start_step + 1:
          record["train/images_per_sec"] = progress.update(step)
        writer.write(step, record)
        progress.show(step, loss, float(host["lr"]))
      if step % config.eval_every == 0 or is_last:
        final_eval = run_eval(step)
      if step % config.checkpoint_every == 0 or is_last or stop.signal:
        check(pending)
        ckpt.save(step, state)
        last_saved = step
      if stop.signal:
        stopped_by = stop.signal
        break
  ckpt.wait()
  writer.close()
  if stopped_by:
    print(f"Received {stopped_by}: saved a checkpoint at step {step} in {ckpt.directory}; "
          "rerun the same command to resume.", flush=True)
  elif final_eval:
    print(f"Done: step {step}, val top-1 {final_eval['val/top1']:.4f}, top-5 "
          f"{final_eval['val/top5']:.4f}. Outputs in {os.path.abspath(workdir)}.", flush=True)
  return {"step": step, "stopped": stopped_by, **final_eval}
