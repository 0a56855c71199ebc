"""NASViT subnets under MACs limits (Gong et al., ICLR 2022), via `search.py`.

Method `nasvit_macs`: for each MACs target of `config.search.targets` (with its resolution), a
subnet is built by moving every choice list of the space (first conv, widths, depths, kernels,
expansions, last conv) to the same relative position f in [0, 1] (rounded index), and f is
bisected until the standalone subnet's MACs (jaxpr count, `compact_vit.profile`) are within
`config.search.tolerance` of the target. Every subnet measured is a candidate. This defines
`nasvit_a0`..`a5`; it is not the authors' accuracy-driven evolutionary search (that needs a
trained supernet and scores candidates on held-out images).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from compact_vit import profile, search
from compact_vit.models import nasvit


def interpolate(space: nasvit.Space, f: float) -> dict:
  """The subnet at relative position `f` of every choice list (python ints)."""
  at = lambda choices: sorted(choices)[int(round(f * (len(choices) - 1)))]
  return dict(first_conv=at(space.first_conv), last_conv=at(space.last_conv),
              **{k: tuple(at(getattr(s, k + "s")) for s in space.stages)
                 for k in ("width", "depth", "kernel", "expand")})


def subnet_macs(subnet: dict, resolution: int) -> tuple[float, int]:
  """(MACs, params) of the standalone subnet at `resolution`."""
  model = nasvit.NASViT(img_size=resolution, space=nasvit.subnet_space(subnet))
  shape = (1, resolution, resolution, 3)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
  return profile.count_macs(model, variables, shape), profile.count_params(variables["params"])


@search.register("nasvit_macs")
def nasvit_macs_search(config, workdir) -> search.SearchResult:
  del workdir
  s = config.search
  best, candidates = {}, []
  for name, target_m, resolution in s.targets:
    lo, hi, found = 0.0, 1.0, None
    for _ in range(s.max_iters):
      f = (lo + hi) / 2
      subnet = interpolate(nasvit.SPACE, f)
      if any(subnet.items() <= c.items() and c["name"] == name for c in candidates):
        break  # the choice grid is discrete: no new subnet between lo and hi
      macs, params = subnet_macs(subnet, resolution)
      entry = dict(name=name, f=f, resolution=resolution, macs=macs, params=params, **subnet)
      candidates.append(entry)
      print(f"[nasvit] {name}: f={f:.4f} {macs / 1e6:.1f} M MACs (target {target_m} M)",
            flush=True)
      if found is None or abs(macs / 1e6 - target_m) < abs(found["macs"] / 1e6 - target_m):
        found = entry
      if abs(macs / 1e6 - target_m) <= s.tolerance * target_m:
        break
      lo, hi = (f, hi) if macs / 1e6 < target_m else (lo, f)
    best[name] = dict(found, target_macs=target_m * 1e6)
  return search.SearchResult(best=best, candidates=candidates,
                             train_command="python train.py --config configs/nasvit_supernet.py")
