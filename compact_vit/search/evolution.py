"""AutoFormer's evolutionary search over a trained supernet (method `autoformer_evolution`).

Chen et al., ICCV 2021; microsoft/Cream AutoFormer/evolution.py. A first population of random
subnets within the limits; then each generation keeps the best `select` candidates seen so far,
draws `mutations` mutants and `crossovers` children of them (up to 10 tries each, as the authors),
fills the population with random subnets, and scores every new candidate once: val top-1 of the
supernet's weights under the candidate's masks (one compiled evaluation for all candidates).

Departures: candidates are scored on `config.dataset.eval_split` (the authors use a held-out part
of ImageNet train, their subImageNet, and report ImageNet val separately); the search state is a
JSON file (WORKDIR/evolution_state.json) written after every generation, from which a rerun
resumes exactly.
"""
from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from compact_vit import checkpointing, paths, trainer
from compact_vit.search import registry
from compact_vit.errors import UserError
from compact_vit.models import autoformer
from compact_vit.search import space as space_lib


def supernet_model(config: ml_collections.ConfigDict, num_classes: int):
  model = trainer.create_model(config, num_classes)
  if not isinstance(model, autoformer.AutoFormerSupernet):
    raise UserError(f"config.model.name={config.model.name!r} is not an AutoFormer supernet "
                    "(autoformer_supernet_t/s/b).")
  return model


def limits_of(config: ml_collections.ConfigDict) -> space_lib.Limits:
  s = config.search
  return space_lib.Limits(s.min_params_m, s.max_params_m, s.max_gmacs)


def load_supernet_params(config: ml_collections.ConfigDict, model, directory: str) -> Any:
  """Parameters (the EMA copy when the run kept one) of the latest train.py checkpoint in
  `directory` (its checkpoints/ folder); the optimizer state is not read."""
  ckpt = checkpointing.TrainCheckpointer(paths.join(directory, "checkpoints"), keep=1000)
  if ckpt.latest_step() is None:
    raise UserError(f"No supernet checkpoint under {directory}/checkpoints; train it with "
                    "python train.py --config configs/autoformer_<size>_supernet.py --workdir "
                    f"{directory}.")
  abstract = jax.eval_shape(
      lambda: trainer.init_variables(model, jax.random.key(0), config.img_size))
  wanted = {"params": abstract["params"]}
  if config.ema_decay > 0:
    wanted["ema_params"] = abstract["params"]
  state = ckpt.restore_subtree(wanted)
  print(f"Loaded supernet step {ckpt.latest_step()} from {ckpt.directory}.", flush=True)
  return state["ema_params"] if "ema_params" in state else state["params"]


def _supernet_params(config, model, workdir):
  s = config.search
  directory = s.supernet_workdir
  if not directory:
    directory = paths.join(workdir, "supernet")
    print(f"No supernet given: training one in {directory} first.", flush=True)
    trainer.train_and_evaluate(config, directory)
  return load_supernet_params(config, model, directory)


def _eval_batches(config, limit: int) -> list[dict[str, np.ndarray]]:
  """The eval split in memory (the first `limit` examples when `limit` > 0)."""
  from compact_vit.data import pipeline
  batches, seen = [], 0
  for batch in pipeline.eval_iterator(trainer.host_dataset(config), img_size=config.img_size,
                                      batch_size=config.eval_batch_size, crop_pct=config.crop_pct,
                                      process_index=0, process_count=1):
    batch = dict(batch)
    if limit:
      keep = np.arange(len(batch["mask"])) < limit - seen
      batch["mask"] = np.logical_and(batch["mask"], keep)
    batches.append(batch)
    seen += int(np.sum(batch["mask"]))
    if limit and seen >= limit:
      break
  return batches


def make_scorer(model, params, batches):
  """arch -> val top-1 of the supernet under that arch; one compilation for all archs."""
  @jax.jit
  def hits(params, images, labels, mask, arch):
    logits = model.apply({"params": params}, images, train=False, arch=arch)
    correct = (jnp.argmax(logits, -1) == labels) & mask
    return correct.sum(), mask.sum()

  def score(arch) -> float:
    arrays = autoformer.arch_arrays(arch, model.max_depth)
    total = count = 0
    for b in batches:
      c, n = hits(params, b["image"], b["label"], b["mask"].astype(bool), arrays)
      total, count = total + c, count + n
    return float(total) / max(float(count), 1.0)
  score.jit = hits
  return score


class Evolution:
  """The search state and its operators; `run()` does the remaining generations."""

  def __init__(self, s: ml_collections.ConfigDict, space: autoformer.SearchSpace,
               costs: space_lib.Costs, limits: space_lib.Limits, score_fn, state_path: str):
    self.s, self.space, self.costs, self.limits = s, space, costs, limits
    self.score_fn, self.state_path = score_fn, state_path
    self.rng = np.random.default_rng(s.seed)
    self.scored: dict[str, dict[str, Any]] = {}  # arch key -> record
    self.population: list[str] = []
    self.generation = 0
    self.load()

  def settings(self) -> dict[str, Any]:
    return {k: self.s[k] for k in ("seed", "population", "select", "mutations", "crossovers",
                                   "layer_prob", "structure_prob", "min_params_m",
                                   "max_params_m", "max_gmacs")}

  def load(self) -> None:
    if not paths.exists(self.state_path):
      return
    state = json.loads(paths.read_text(self.state_path))
    if state["settings"] != self.settings():
      raise UserError(f"{self.state_path} was written with other search settings "
                      f"({state['settings']}); use another --workdir or delete it.")
    self.scored, self.population = state["scored"], state["population"]
    self.generation = state["generation"]
    self.rng.bit_generator.state = state["rng"]
    print(f"Resuming the search at generation {self.generation} "
          f"({len(self.scored)} candidates scored).", flush=True)

  def save(self) -> None:
    state = {"settings": self.settings(), "generation": self.generation, "scored": self.scored,
             "population": self.population, "rng": self.rng.bit_generator.state}
    paths.write_text(self.state_path, json.dumps(state))

  def _try_add(self, arch, out: list[str]) -> bool:
    """Scores `arch` if new and within the limits; appends its key to `out`."""
    key = space_lib.arch_key(arch)
    if key in self.scored or key in out or not self.limits.allows(*self.costs(arch)):
      return False
    self.scored[key] = space_lib.record(arch, self.costs, self.score_fn(arch),
                                       generation=self.generation)
    out.append(key)
    return True

  def _fill_random(self, out: list[str]) -> None:
    tries = 0
    while len(out) < self.s.population:
      tries += 1
      if tries > 100 * self.s.population:
        break  # the space within the limits is exhausted
      self._try_add(space_lib.sample_valid(self.space, self.rng, self.limits, self.costs), out)

  def _top(self) -> list[dict[str, Any]]:
    return sorted(self.scored.values(), key=lambda r: -r["score"])[:self.s.select]

  def step(self) -> None:
    parents = [r["arch"] for r in self._top()]
    new: list[str] = []
    for _ in range(10 * self.s.mutations):
      if len(new) >= self.s.mutations:
        break
      parent = parents[int(self.rng.integers(len(parents)))]
      self._try_add(space_lib.mutate(parent, self.space, self.rng, layer_prob=self.s.layer_prob,
                                     structure_prob=self.s.structure_prob), new)
    made = 0
    for _ in range(10 * self.s.crossovers):
      if made >= self.s.crossovers:
        break
      a, b = (parents[int(self.rng.integers(len(parents)))] for _ in range(2))
      for _ in range(50):  # the authors redraw until the parents have the same depth
        if a["depth"] == b["depth"]:
          break
        a, b = (parents[int(self.rng.integers(len(parents)))] for _ in range(2))
      if a["depth"] == b["depth"]:
        made += self._try_add(space_lib.crossover(a, b, self.rng), new)
    self._fill_random(new)
    self.population = new

  def run(self) -> None:
    start = time.perf_counter()
    if self.generation == 0 and not self.population:
      self._fill_random(self.population)
      self.save()
    while self.generation < self.s.generations:
      self.generation += 1
      self.step()
      self.save()
      best = self._top()[0]
      print(f"[generation {self.generation}/{self.s.generations}] best top-1 "
            f"{best['score']:.4f} ({best['params'] / 1e6:.3f}M params, {best['gmacs']:.3f} "
            f"GMACs)  scored {len(self.scored)}  {time.perf_counter() - start:.1f}s", flush=True)


@registry.register("autoformer_evolution")
def autoformer_evolution(config: ml_collections.ConfigDict, workdir: str) -> registry.SearchResult:
  if not config.search.supernet_workdir and not config.search.train_supernet:
    raise UserError("Give the trained supernet: --config.search.supernet_workdir=DIR (the "
                    "--workdir of `python train.py --config configs/autoformer_<size>_"
                    "supernet.py`).")
  from compact_vit.data import pipeline
  info = pipeline.get_info(config.dataset)
  model = supernet_model(config, info.num_classes)
  costs, limits = space_lib.Costs(model), limits_of(config)
  space_lib.check_satisfiable(model.space, limits, costs)
  params = _supernet_params(config, model, workdir)
  paths.makedirs(workdir)
  start = time.perf_counter()
  score = make_scorer(model, params, _eval_batches(config, config.search.eval_examples))
  evolution = Evolution(config.search, model.space, costs, limits, score,
                        paths.join(workdir, "evolution_state.json"))
  evolution.run()
  print(f"Search took {time.perf_counter() - start:.1f}s for {len(evolution.scored)} "
        "candidates.", flush=True)
  candidates = sorted(evolution.scored.values(), key=lambda r: -r["score"])
  return registry.SearchResult(
      best=candidates[0], candidates=candidates,
      train_command=space_lib.train_command(config.search.retrain_config, candidates[0]["arch"]))
