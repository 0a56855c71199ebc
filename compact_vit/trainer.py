"""The training loop: one jitted, donated `train_step` over a sharded pytree state.

Read top to bottom: validate the config, mesh, input, model and optimizer, state (initialised
sharded, restored from the latest checkpoint or a converted one), teacher, update step, loop with
logging, evaluation, checkpointing and preemption handling.

Exact resume: the step RNG is `fold_in(key(seed), step)` and the input pipeline is a pure function of
(seed, step), so a run stopped and resumed from a checkpoint reproduces the uninterrupted run.

Scale-out (compact_vit/sharding.py): `config.mesh` (data / fsdp / model axes) decides how the state
and the batch are split; `config.grad_accum` splits each batch into micro-batches; `config.remat`
recomputes blocks in the backward pass. Multi-host: every process runs this same loop on its own
input slices (`config.input_shards`, default one per process: a global batch is the concatenation
of the slices' batches in slice order, so it does not depend on how many processes read them),
only process 0 writes logs and metrics, Orbax saves/restores the sharded state from every process,
and a SIGTERM/SIGINT on any host makes all of them save the same step and exit.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from compact_vit import checkpointing, losses, models, objectives, optim, paths, sharding, xla
from compact_vit.convert.hub import resolve_init_from
from compact_vit.errors import UserError
from compact_vit.writers import MetricWriter, Progress

State = dict[str, Any]


# ----------------------------------------------------------------------------- model and state

def create_model(config: ml_collections.ConfigDict, num_classes: int):
  """The model of `config.model` (name + overrides) with the dataset's classes and image size."""
  overrides = {k: v for k, v in config.model.items() if k != "name"}
  overrides.update(num_classes=num_classes, img_size=config.img_size)
  if config.remat and "remat" in models.accepted_overrides(config.model.name):
    overrides["remat"] = True  # training checks in validate_config that the model has the field
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


def accumulate(objective_fn: Callable, params: Any, ctx: objectives.StepContext,
               grad_accum: int) -> tuple:
  """The objective averaged over `grad_accum` equal micro-batches, one at a time (`lax.scan`).

  For a loss that is a mean over examples this is the update of the whole batch (up to float
  rounding; BatchNorm statistics are those of each micro-batch, carried from one to the next).
  Micro-batch i holds examples i, i + A, i + 2A, ... so each is split over the devices like the
  whole batch. The model's RNG streams are folded with i (different dropout per micro-batch);
  `ctx.key` is shared, so objective-level choices such as a sampled subnet hold for the whole step.
  Returns what the objective returns: (loss, grads, batch_stats, metrics), means over micro-batches.
  """
  def split(x):  # (B, ...) -> (A, B / A, ...)
    return jnp.moveaxis(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 1, 0)

  def body(carry, xs):
    grads_sum, batch_stats = carry
    i, images, targets = xs
    rngs = {name: jax.random.fold_in(key, i) for name, key in ctx.rngs.items()}
    micro = dataclasses.replace(ctx, images=images, targets=targets, rngs=rngs,
                                batch_stats=batch_stats)
    loss, grads, new_stats, metrics = objective_fn(params, micro)
    return (jax.tree.map(jnp.add, grads_sum, grads), new_stats), (loss, metrics)

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, batch_stats), (loss, metrics) = jax.lax.scan(
      body, (zeros, ctx.batch_stats),
      (jnp.arange(grad_accum), split(ctx.images), split(ctx.targets)))
  mean = lambda x: jnp.mean(x, axis=0)
  return (mean(loss), jax.tree.map(lambda g: g / grad_accum, grads), batch_stats,
          jax.tree.map(mean, metrics))


def train_step(state: State, batch: Mapping[str, jax.Array], teacher_vars: Any, *, model, tx,
               schedule: Callable, base_rng: jax.Array, num_classes: int, aug: Mapping[str, Any],
               distill: Mapping[str, Any], teacher=None, ema_decay: float = 0.0,
               objective: Mapping[str, Any] | None = None, grad_accum: int = 1,
               steps_per_epoch: float = 1.0, input_fn: Callable | None = None):
  """One update. Returns (new state, {'loss', 'lr', 'grad_norm', ...objective metrics}).

  Pure; RNG = fold_in(seed key, step). `objective` is config.objective ({'name': ..., options});
  the objective (compact_vit/objectives/) returns the loss and gradients. Mixup/CutMix pairs
  examples across the whole batch, then `grad_accum` > 1 runs the objective per micro-batch.
  """
  objective = dict(objective or {"name": "classification"})
  objective_fn = objectives.get(objective.pop("name"))
  rng = jax.random.fold_in(base_rng, state["step"])
  k_mix, k_drop, k_sample, k_objective = jax.random.split(rng, 4)
  images = batch["image"] if input_fn is None else input_fn(batch)
  images, targets = losses.mixup_cutmix(
      k_mix, images, batch["label"], num_classes=num_classes,
      mixup_alpha=aug["mixup_alpha"], cutmix_alpha=aug["cutmix_alpha"], prob=aug["mixup_prob"],
      switch_prob=aug["mixup_switch_prob"], label_smoothing=aug["label_smoothing"])
  ctx = objectives.StepContext(
      model=model, images=images, targets=targets, rngs={"dropout": k_drop, "sample": k_sample},
      key=k_objective, step=state["step"], batch_stats=state.get("batch_stats"), distill=distill,
      options=objective, teacher=teacher, teacher_vars=teacher_vars,
      epoch=state["step"] / steps_per_epoch)
  if grad_accum > 1:
    loss, grads, batch_stats, extra = accumulate(objective_fn, state["params"], ctx, grad_accum)
  else:
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


def eval_step(variables: Any, batch: Mapping[str, jax.Array], *, model,
              input_fn: Callable | None = None) -> dict[str, jax.Array]:
  """Sums of top-1/top-5 hits over the valid (mask=True) examples, and their count."""
  images = batch["image"] if input_fn is None else input_fn(batch)
  logits = model.apply(variables, images, train=False)
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

def accelerator_inputs(config: ml_collections.ConfigDict) -> tuple[Callable | None,
                                                                  Callable | None]:
  """(train, eval) functions from a host batch to normalised images, run inside the jitted steps,
  when `config.dataset.on_accelerator` (None: auto, on for a GPU or TPU backend;
  compact_vit/data/accelerator.py: the host only decodes and crops); (None, None) otherwise."""
  from compact_vit.data import accelerator, settings  # TF-free
  if not settings.resolve_on_accelerator(config.dataset.get("on_accelerator")):
    return None, None
  norm = dict(img_size=config.img_size, mean=tuple(config.dataset.mean),
              std=tuple(config.dataset.std))
  aug = settings.TrainAugment.from_config(config.aug)
  return (functools.partial(accelerator.train_batch, aug=aug, **norm),
          functools.partial(accelerator.eval_batch, **norm))


def host_dataset(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.dataset` with `on_accelerator` off, for tools that give `batch["image"]` to the model
  themselves (the searches' scoring and calibration) rather than through `train_step` /
  `eval_step` with `accelerator_inputs`: the host then resamples and augments whatever the backend."""
  dataset = config.dataset.copy_and_resolve_references()
  dataset.on_accelerator = False
  return dataset


def validate_config(config: ml_collections.ConfigDict, training: bool = True) -> None:
  """User-fixable config errors, raised before any data is read or anything compiles.

  `training=False` (evaluation) skips the checks of what only training uses (the teacher).
  """
  names = models.list_models()
  if config.model.name not in names:
    raise UserError(f"Unknown model {config.model.name!r}. Available: {', '.join(names)}.")
  if config.get("eval_resize", "shorter") not in ("shorter", "squash"):
    raise UserError(f"config.eval_resize={config.eval_resize!r}: use 'shorter' (resize the shorter "
                    "side, centre crop) or 'squash' (the whole image to img_size x img_size).")
  if not training:
    return
  if config.distill.type not in ("none", "soft", "hard"):
    raise UserError(f"config.distill.type={config.distill.type!r}: use none, soft or hard.")
  if config.distill.type != "none":
    names_given = teacher_names(config)
    unknown = [n for n in names_given if n not in names]
    if not names_given or unknown:
      raise UserError(f"config.distill.teacher={config.distill.teacher!r}: {unknown or 'empty'} is "
                      f"not a registered model. Available: {', '.join(names)}.")
    dirs = teacher_dirs(config)
    if len(dirs) != len(names_given) or not all(dirs):
      raise UserError("Distillation needs trained teacher weights, one per teacher: set "
                      "--config.distill.teacher_init_from=SPEC[,SPEC2], comma-separated like "
                      "config.distill.teacher; a SPEC is a `python -m compact_vit.convert` output "
                      "directory, a PyTorch checkpoint file or hf-hub:OWNER/NAME.")
  if config.dtype not in ("float32", "bfloat16", "float16"):
    raise UserError(f"config.dtype={config.dtype!r}: use float32 or bfloat16.")
  for field in ("batch_size", "eval_batch_size", "log_every", "eval_every", "checkpoint_every"):
    if int(config[field]) <= 0:
      raise UserError(f"config.{field} must be positive, got {config[field]}.")
  if config.total_steps is None and config.total_epochs <= 0:
    raise UserError("Set config.total_epochs > 0 or config.total_steps.")
  if int(config.grad_accum) < 1:
    raise UserError(f"config.grad_accum={config.grad_accum} must be >= 1 (1 = no accumulation).")
  if int(config.input_shards) % jax.process_count():
    raise UserError(f"config.input_shards={config.input_shards} must be a multiple of the "
                    f"{jax.process_count()} processes (or 0: one per process).")
  if config.remat and "remat" not in models.accepted_overrides(config.model.name):
    raise UserError(f"config.remat=True needs a model with a `remat` field (the ViT/DeiT family "
                    f"has one); {config.model.name!r} has none. Set --config.remat=False, or give "
                    "the model's blocks `nn.remat` behind a `remat` field as VisionTransformer "
                    "does.")
  objectives.get(objective_options(config)["name"])
  optim.check_config(config.optim)


def objective_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.objective as a dict: its `name` and the rule's options."""
  return config.objective.to_dict()


def check_remat(model, abstract_params: Any, img_size: int) -> None:
  """Raises unless the training forward pass of `model` contains rematerialised (checkpointed)
  computations: a model can inherit a `remat` field without applying it."""
  x = jax.ShapeDtypeStruct((1, img_size, img_size, 3), jnp.float32)
  rngs = {"dropout": jax.random.key(0), "sample": jax.random.key(0)}
  jaxpr = jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x, train=True, rngs=rngs,
                                                  mutable=["batch_stats"]))(abstract_params, x)
  if "checkpoint" not in str(jaxpr) and "remat" not in str(jaxpr):
    raise UserError(f"{type(model).__name__} has a `remat` field but does not rematerialise any "
                    "block (it overrides the forward pass); set --config.remat=False or apply "
                    "`nn.remat` to its blocks.")


def resolve_weights(spec: str, config: ml_collections.ConfigDict, model_name: str,
                    num_classes: int | None = None) -> str:
  """The converted directory for `spec`: a directory as given, or a PyTorch checkpoint file or
  `hf-hub:OWNER/NAME` downloaded and converted once for this config's model (its `config.model`
  overrides, image size and class count; compact_vit.convert.hub)."""
  overrides = {k: v for k, v in config.model.items() if k != "name"} if (
      model_name == config.model.name) else {}
  return resolve_init_from(spec, model_name=model_name, img_size=config.img_size,
                           num_classes=num_classes, **overrides)


def load_init_from(directory: str, abstract_variables: Any) -> dict[str, Any]:
  """Variables of a converted checkpoint, checked against the model's variables (params, and
  batch_stats where the model has them)."""
  variables, meta = checkpointing.load_variables(directory)
  try:
    checkpointing.check_tree_matches(
        abstract_variables, variables,
        f"Checkpoint {directory} (model {meta.get('model')!r})")
  except UserError as e:
    raise UserError(f"{e}. For another input size or class count, convert the weights again "
                    "with `python -m compact_vit.convert ... --img-size S --num-classes N`.") from e
  return variables


def teacher_names(config: ml_collections.ConfigDict) -> list[str]:
  """config.distill.teacher as a list: one registry name, or several comma-separated."""
  return [n.strip() for n in str(config.distill.teacher or "").split(",") if n.strip()]


def teacher_dirs(config: ml_collections.ConfigDict) -> list[str]:
  """config.distill.teacher_init_from as a list, one directory per teacher."""
  return [d.strip() for d in str(config.distill.teacher_init_from or "").split(",")]


def load_teacher(config: ml_collections.ConfigDict):
  """(teacher module, variables) for one teacher, or (tuple of modules, tuple of variables) when
  config.distill.teacher names several; each checked against its converted checkpoint."""
  teachers, all_variables = [], []
  for name, directory in zip(teacher_names(config), teacher_dirs(config)):
    variables, meta = checkpointing.load_variables(resolve_weights(directory, config, name))
    overrides = dict(meta.get("overrides", {}))
    overrides.pop("img_size", None)
    teacher = models.create_model(name, img_size=config.img_size, **overrides)
    abstract = jax.eval_shape(lambda t=teacher: init_variables(t, jax.random.key(0),
                                                               config.img_size))
    checkpointing.check_tree_matches(abstract, variables, f"Teacher checkpoint {directory}")
    teachers.append(teacher)
    all_variables.append(variables)
  if len(teachers) == 1:
    return teachers[0], all_variables[0]
  return tuple(teachers), tuple(all_variables)


def schedule_lengths(config: ml_collections.ConfigDict,
                     steps_per_epoch: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps) for the input pipeline's `steps_per_epoch` (the batches of one
  epoch: the train split over the global batch, or DeiT's count with repeated augmentation);
  total_steps overrides total_epochs when set."""
  total = config.total_steps
  if total is None:
    total = int(math.ceil(config.total_epochs * steps_per_epoch))
  return steps_per_epoch, int(total)


def schedule_steps_per_epoch(config: ml_collections.ConfigDict, total_steps: int) -> float:
  """Steps per epoch of the recipe's schedule: total_steps / total_epochs. A run shortened (or
  lengthened) with `total_steps` compresses the recipe's epochs into it, so epoch-based rules
  (warmup, a projection switch at epoch 100, frozen first epochs) keep their share of the run."""
  return total_steps / max(float(config.total_epochs), 1e-9)


def input_slices(config: ml_collections.ConfigDict) -> tuple[list[int], int]:
  """(the input slices this process reads, their count): `config.input_shards` slices (0: one per
  process), process p reading the p-th contiguous group. The global batch is the slices' batches
  concatenated in slice order, whatever the number of processes."""
  nproc, pid = jax.process_count(), jax.process_index()
  count = int(config.input_shards) or nproc
  if config.batch_size % count:
    raise UserError(f"config.batch_size={config.batch_size} is not divisible by "
                    f"config.input_shards={count}.")
  per_process = count // nproc
  return list(range(pid * per_process, (pid + 1) * per_process)), count


def concat_batches(iterators: list[Iterator[Mapping[str, np.ndarray]]]) -> Iterator[dict]:
  """Batches of several iterators concatenated along the batch dimension, in order."""
  if len(iterators) == 1:
    yield from iterators[0]
    return
  for parts in zip(*iterators):
    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def process_sum(mesh) -> Callable[[int], int]:
  """A function summing an integer over all processes (a small all-reduce every process must join;
  plain `int` for one process)."""
  if jax.process_count() == 1:
    return int
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
  total = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))

  def fn(value: int) -> int:
    parts = np.zeros((len(mesh.local_devices),), np.int32)
    parts[0] = value
    return int(total(jax.make_array_from_process_local_data(data_sharding, parts)))

  return fn


class _StopAgreement:
  """Agrees across processes on a stop request: each call contributes this process's flag and
  returns whether any process had set its flag at the previous call (one step behind, so the
  all-reduce overlaps the next step instead of stalling the host). Every process reads the same
  value at the same step, so they all save the same step and exit together."""

  def __init__(self, mesh):
    self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
    self._local = len(mesh.local_devices)
    self._any = jax.jit(jnp.max, out_shardings=sharding.replicated(mesh))
    self._pending = None

  def __call__(self, local_flag: bool) -> bool:
    agreed = self._pending is not None and bool(self._pending)
    flags = np.full((self._local,), int(local_flag), np.int32)
    self._pending = self._any(jax.make_array_from_process_local_data(self._sharding, flags))
    return agreed


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


class LossGuard:
  """Stops a run whose loss is not finite, without making the host wait on every step.

  The loss of step s is checked only after step s+1 has been dispatched (`defer`), so the host
  never blocks on the device; `check_now` checks what is pending at once, and the loop calls it
  before every save, so a NaN never reaches a checkpoint. The error names the last good checkpoint,
  which is kept."""

  def __init__(self, checkpoint_dir: str, last_saved: int | None):
    self.checkpoint_dir = checkpoint_dir
    self.last_saved = last_saved  # the step of the newest checkpoint on disk, or None
    self._pending: tuple[int, Mapping[str, jax.Array]] | None = None

  def defer(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    """Checks the previous step's loss, then holds this step's until the next call."""
    self.check_now()
    self._pending = (step, metrics)

  def check_now(self) -> float | None:
    """Checks the pending loss (blocking on it); returns it, or None when nothing is pending."""
    if self._pending is None:
      return None
    step, metrics = self._pending
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      where = (f"the last good checkpoint (step {self.last_saved}) is kept in "
               f"{self.checkpoint_dir}" if self.last_saved is not None
               else "no checkpoint had been written yet")
      raise UserError(f"Loss became {loss} at step {step}; stopping. {where}. Lower "
                      "config.optim.lr, enable gradient clipping (config.optim.grad_clip_mode) or "
                      "use float32.")
    return loss


def restore_or_init(ckpt: checkpointing.TrainCheckpointer, init_fn: Callable, rng: jax.Array,
                    abstract_state: State, state_sh: Any, tx: optax.GradientTransformation, *,
                    init_from: Mapping[str, Any] | None, use_ema: bool,
                    log: Callable = print) -> tuple[State, int]:
  """(state, start step): the latest checkpoint in `ckpt` if there is one; otherwise a fresh
  state initialised sharded (`jit(init_fn, out_shardings=state_sh)`), its parameters (and
  BatchNorm statistics, EMA copy and optimizer state) taken from `init_from` variables when
  given."""
  step = ckpt.latest_step()
  if step is not None:
    abstract_sharded = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_state, state_sh)
    log(f"Resumed from {ckpt.directory} at step {step}.")
    return ckpt.restore(abstract_sharded, step), step
  state = jax.jit(init_fn, out_shardings=state_sh)(rng)
  if init_from is not None:
    state["params"] = jax.device_put(init_from["params"], state_sh["params"])
    if "batch_stats" in state and "batch_stats" in init_from:
      state["batch_stats"] = jax.device_put(init_from["batch_stats"], state_sh["batch_stats"])
    if use_ema:
      state["ema_params"] = jax.device_put(init_from["params"], state_sh["params"])
    state["opt_state"] = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(state["params"])
  return state, 0


# ----------------------------------------------------------------------------- the loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if possible), evaluates, checkpoints. Returns final metrics."""
  validate_config(config)
  from compact_vit.data import pipeline  # TensorFlow is only needed for input

  # Mesh and input.
  nproc, pid = jax.process_count(), jax.process_index()
  log = functools.partial(print, flush=True) if pid == 0 else lambda *a, **k: None
  paths.check_workdir(workdir, pid)  # a bad path, bucket or permission fails before compiling
  mesh = sharding.make_mesh(config.mesh)
  grad_accum = int(config.grad_accum)
  sharding.check_batch_size(config.batch_size, mesh, grad_accum=grad_accum)
  sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  slices, num_slices = input_slices(config)
  info = pipeline.get_info(config.dataset)
  steps_per_epoch, total_steps = schedule_lengths(config, pipeline.steps_per_epoch(
      config.dataset, batch_size=config.batch_size // num_slices, process_count=num_slices,
      aug_cfg=config.aug))
  local_eval_batch = config.eval_batch_size // nproc

  # Model, optimizer, state shapes.
  model = create_model(config, info.num_classes)
  tx, schedule = optim.create_optimizer(config.optim, batch_size=config.batch_size,
                                        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                                        total_epochs=config.total_epochs)
  log(optim.schedule_summary(config.optim, batch_size=config.batch_size,
                             steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                             total_epochs=config.total_epochs))
  use_ema = config.ema_decay > 0
  init_fn = functools.partial(create_train_state, model, tx, img_size=config.img_size,
                              use_ema=use_ema)
  rng = jax.random.key(config.seed)
  abstract_state = jax.eval_shape(init_fn, rng)
  state_sh = sharding.state_shardings(abstract_state, mesh, sharding.rules_from_config(config))
  if config.remat:
    check_remat(model, abstract_state["params"], config.img_size)
  repl = sharding.replicated(mesh)
  init_variables_from = None
  if config.init_from:
    init_variables_from = load_init_from(
        resolve_weights(config.init_from, config, config.model.name, info.num_classes), {k: abstract_state[k] for k in ("params", "batch_stats")
                           if k in abstract_state})
  teacher, teacher_vars = (None, None)
  if config.distill.type != "none":
    teacher, teacher_vars = load_teacher(config)
    teacher_vars = jax.device_put(teacher_vars, repl)

  ckpt = checkpointing.TrainCheckpointer(paths.join(workdir, "checkpoints"),
                                         keep=config.keep_checkpoints)
  if pid == 0:
    paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

  # State: latest checkpoint, else fresh init (+ converted weights).
  state, start_step = restore_or_init(ckpt, init_fn, rng, abstract_state, state_sh, tx,
                                      init_from=init_variables_from, use_ema=use_ema, log=log)
  writer = MetricWriter(workdir, enabled=pid == 0, start_step=start_step, on_error=ckpt.check)
  if start_step == 0 and init_variables_from is not None:
    log(f"Initialised parameters from {config.init_from}.")

  # Compiled steps; with dataset.on_accelerator the batch's resampling and augmentation run in them.
  train_input_fn, eval_input_fn = accelerator_inputs(config)
  step_fn = jax.jit(
      functools.partial(
          train_step, model=model, tx=tx, schedule=schedule, base_rng=jax.random.key(config.seed),
          num_classes=info.num_classes, aug=config.aug.to_dict(),
          distill=config.distill.to_dict(), teacher=teacher, ema_decay=config.ema_decay,
          objective=objective_options(config), grad_accum=grad_accum,
          steps_per_epoch=schedule_steps_per_epoch(config, total_steps),
          input_fn=train_input_fn),
      donate_argnums=(0,), out_shardings=(state_sh, repl),
      compiler_options=xla.train_compiler_options())
  eval_fn = jax.jit(functools.partial(eval_step, model=model, input_fn=eval_input_fn),
                    out_shardings=repl)

  def eval_batches():
    return pipeline.eval_iterator(
        config.dataset, img_size=config.img_size, batch_size=local_eval_batch,
        crop_pct=config.crop_pct, process_index=pid, process_count=nproc,
        resize=config.get("eval_resize", "shorter"))

  def run_eval(state: State, step: int) -> dict[str, float]:
    result = {}
    for prefix, key in [("val", "params")] + ([("val_ema", "ema_params")] if use_ema else []):
      res = evaluate(eval_fn, model_variables(state, key), eval_batches(), mesh)
      result.update({f"{prefix}/top1": res["top1"], f"{prefix}/top5": res["top5"]})
    unreadable = info.num_eval - int(res["count"])  # every readable example counts once
    if unreadable:
      result["val/unreadable"] = unreadable
    writer.write(step, result)
    log(f"[eval step {step}] top1 {result['val/top1']:.4f}  top5 {result['val/top5']:.4f}" +
        (f"  ({unreadable} of {info.num_eval} examples unreadable, named above; accuracy over the "
         "rest)" if unreadable else ""))
    return result

  # Unreadable train examples are skipped (their rows filled from the same batch) and counted.
  train_iters = [
      pipeline.train_iterator(
          config.dataset, config.aug, img_size=config.img_size,
          batch_size=config.batch_size // num_slices, seed=config.seed, start_step=start_step,
          process_index=index, process_count=num_slices)
      for index in slices]
  train_iter = concat_batches(train_iters)
  sum_over_processes = process_sum(mesh)
  skipped_counted = skipped_total = 0

  # Loop. Losses are checked one step late (LossGuard), and always before a save.
  hint = ""
  if train_input_fn is None and jax.default_backend() != "cpu":
    hint = ("The host's input pipeline sets the pace: dataset.on_accelerator is False in this run; "
            "unset (auto) or True, it leaves the host only decoding and cropping (docs/speed.md: "
            "Input pipeline speed, and host cores per accelerator).")
  progress = Progress(total_steps, config.batch_size, input_bound_hint=hint)
  final_eval: dict[str, float] = {}
  guard = LossGuard(ckpt.directory, start_step if ckpt.latest_step() is not None else None)
  step = start_step
  stopped_by = None
  last_loss = None
  stop_agreed = _StopAgreement(mesh) if nproc > 1 else (lambda flag: flag)
  with _StopRequest() as stop:
    while step < total_steps:
      waited = time.perf_counter()
      host_batch = next(train_iter)
      progress.input_wait(time.perf_counter() - waited)
      state, metrics = step_fn(state, sharding.shard_batch(host_batch, mesh), teacher_vars)
      step += 1
      if step == start_step + 1:
        progress.update(step)  # the first step includes compilation; rates start after it
      guard.defer(step, metrics)
      is_last = step == total_steps
      if step % config.log_every == 0 or is_last:
        loss = last_loss = guard.check_now()
        host = jax.device_get(metrics)
        record = {f"train/{k}": float(v) for k, v in host.items()}
        record.update({"train/loss": loss, "train/epoch": step / steps_per_epoch})
        if step > start_step + 1:
          record["train/images_per_sec"] = progress.update(step)
          record["train/input_wait_fraction"] = progress.input_fraction
        skipped = sum(it.skipped for it in train_iters)  # rows skipped since the last log line
        record["data/skipped"] = sum_over_processes(skipped - skipped_counted)
        skipped_counted, skipped_total = skipped, skipped_total + record["data/skipped"]
        writer.write(step, record)
        if pid == 0:
          progress.show(step, loss, float(host["lr"]), skipped=skipped_total)
      if step % config.eval_every == 0 or is_last:
        final_eval = run_eval(state, step)
      stopping = stop_agreed(stop.signal is not None)
      if step % config.checkpoint_every == 0 or is_last or stopping:
        guard.check_now()
        writer.flush()  # the lines up to this step are durable before its checkpoint is
        ckpt.save(step, state)
        guard.last_saved = step
      if stopping:
        stopped_by = stop.signal or "a stop request on another process"
        break
  ckpt.wait()
  ckpt.close()
  writer.close()
  if stopped_by:
    log(f"Received {stopped_by}: saved a checkpoint at step {step} in {ckpt.directory}; "
        "rerun the same command to resume.")
  elif final_eval:
    if pid == 0:  # marks the run finished (compact_vit.sweep reads it)
      paths.write_text(paths.join(workdir, "final.json"), json.dumps(
          {"step": step, "train/loss": last_loss, **final_eval}, indent=2))
    log(f"Done: step {step}, val top-1 {final_eval['val/top1']:.4f}, top-5 "
        f"{final_eval['val/top5']:.4f}. Outputs in {paths.absolute(workdir)}.")
  return {"step": step, "stopped": stopped_by, **final_eval}
