"""NASViT subnets under MACs limits (Gong et al., ICLR 2022), via `search.py`.

Method `nasvit_macs`: for each MACs target of `config.search.targets` (with its resolution), a
subnet is built by moving every choice list of the space (first conv, widths, depths, kernels,
expansions, last conv) to the same relative position f in [0, 1] (rounded index), and f is
bisected until the standalone subnet's MACs (jaxpr count, `compact_vit.profile`) are within
`config.search.tolerance` of the target. Every subnet measured is a candidate. This defines
`nasvit_a0`..`a5`; it is not the authors' accuracy-driven evolutionary search (that needs a
trained supernet and scores candidates on held-out images). The space searched is the config
model's (`nasvit_supernet`: the paper's; `nasvit_supernet_tiny` under `:quick`).

With `config.search.evaluate` each found subnet is scored as the authors evaluate subnets: weights
from the trained supernet in `config.search.supernet_workdir` (a `train.py` workdir of
configs/nasvit_supernet.py), BatchNorm statistics recalibrated on `calib_batches` training
batches (`nasvit.recalibrate_batch_stats`), then val top-1 / top-5 at the subnet's resolution.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from compact_vit import paths, profile, trainer
from compact_vit.search import registry
from compact_vit.errors import UserError
from compact_vit.models import nasvit


def interpolate(space: nasvit.Space, f: float) -> dict:
  """The subnet at relative position `f` of every choice list (python ints)."""
  at = lambda choices: sorted(choices)[int(round(f * (len(choices) - 1)))]
  return dict(first_conv=at(space.first_conv), last_conv=at(space.last_conv),
              **{k: tuple(at(getattr(s, k + "s")) for s in space.stages)
                 for k in ("width", "depth", "kernel", "expand")})


def subnet_macs(subnet: dict, resolution: int,
                space: nasvit.Space = nasvit.SPACE) -> tuple[float, int]:
  """(MACs, params) of the standalone subnet at `resolution`."""
  model = nasvit.NASViT(img_size=resolution, space=nasvit.subnet_space(subnet, space))
  shape = (1, resolution, resolution, 3)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
  return profile.count_macs(model, variables, shape), profile.count_params(variables["params"])


def evaluate_subnets(config, subnets: dict) -> dict:
  """{name: {"top1", "top5"}} of each subnet (dict with "resolution") of the trained supernet,
  after BatchNorm recalibration on `config.search.calib_batches` training batches."""
  from compact_vit.data import pipeline  # pylint: disable=g-import-not-at-top
  from compact_vit.search import evolution  # pylint: disable=g-import-not-at-top
  s = config.search
  directory = s.supernet_workdir
  if not directory or not paths.isdir(paths.join(directory, "checkpoints")):
    raise UserError("search.evaluate needs the trained supernet: --config.search.supernet_workdir"
                    "=DIR, the --workdir of `python train.py --config configs/nasvit_supernet.py"
                    "` (with the same :quick flag).")
  info = pipeline.get_info(config.dataset)
  model = trainer.create_model(config, info.num_classes)
  params = evolution.load_supernet_params(config, model, directory)
  shapes = jax.eval_shape(lambda k: trainer.init_variables(model, k, config.img_size),
                          jax.random.key(0))
  stats = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes["batch_stats"])
  variables = {"params": params, "batch_stats": stats}  # every used entry is recalibrated
  dataset = trainer.host_dataset(config)  # batch['image'] goes to the model here, not via a step
  train = pipeline.train_iterator(dataset, config.aug, img_size=config.img_size,
                                  batch_size=config.batch_size, seed=config.seed)
  calib = [next(train)["image"] for _ in range(s.calib_batches)]
  scores = {}
  for name, subnet in subnets.items():
    size = int(subnet["resolution"])
    arch = {k: subnet[k] for k in ("first_conv", "last_conv", "width", "depth", "kernel",
                                   "expand")}
    v = nasvit.recalibrate_batch_stats(model, variables, dict(arch, resolution=size), calib)
    sub_model = model.clone(img_size=size)
    evaluate = jax.jit(lambda v, b: trainer.eval_step(v, b, model=_Subnet(sub_model, arch)))
    totals = None
    for batch in pipeline.eval_iterator(dataset, img_size=size,
                                        batch_size=config.eval_batch_size,
                                        crop_pct=config.crop_pct, process_index=0,
                                        process_count=1):
      out = evaluate(v, batch)
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    count = max(float(totals["count"]), 1.0)
    scores[name] = {"top1": float(totals["top1"]) / count, "top5": float(totals["top5"]) / count}
    print(f"[nasvit] {name}: val top-1 {scores[name]['top1']:.4f} after BN recalibration",
          flush=True)
  return scores


class _Subnet:
  """`model.apply` with a fixed subnet (what `trainer.eval_step` calls)."""

  def __init__(self, model, arch):
    self.model, self.arch = model, nasvit.as_arrays(arch)

  def apply(self, variables, x, train=False):
    return self.model.apply(variables, x, train=train, subnet=self.arch)


@registry.register("nasvit_macs")
def nasvit_macs_search(config, workdir) -> registry.SearchResult:
  del workdir
  s = config.search
  space = nasvit.SPACE
  if "model" in config and config.model.name == "nasvit_supernet_tiny":
    space = nasvit.TINY_SPACE
  best, candidates = {}, []
  for name, target_m, resolution in s.targets:
    lo, hi, found = 0.0, 1.0, None
    for _ in range(s.max_iters):
      f = (lo + hi) / 2
      subnet = interpolate(space, f)
      if any(subnet.items() <= c.items() and c["name"] == name for c in candidates):
        break  # the choice grid is discrete: no new subnet between lo and hi
      macs, params = subnet_macs(subnet, resolution, space)
      entry = dict(name=name, f=f, resolution=resolution, macs=macs, params=params, **subnet)
      candidates.append(entry)
      print(f"[nasvit] {name}: f={f:.4f} {macs / 1e6:.4g} M MACs (target {target_m} M)",
            flush=True)
      if found is None or abs(macs / 1e6 - target_m) < abs(found["macs"] / 1e6 - target_m):
        found = entry
      if abs(macs / 1e6 - target_m) <= s.tolerance * target_m:
        break
      lo, hi = (f, hi) if macs / 1e6 < target_m else (lo, f)
    best[name] = dict(found, target_macs=target_m * 1e6)
  if s.get("evaluate", False):
    for name, score in evaluate_subnets(config, best).items():
      best[name].update(score)
  return registry.SearchResult(best=best, candidates=candidates,
                             train_command="python train.py --config configs/nasvit_supernet.py")
