"""Training rules: what one train step differentiates, one file per rule, registered here.

An objective is `fn(params, ctx: StepContext) -> (loss, grads, new_batch_stats, metrics)`
(compact_vit/objectives/context.py), chosen by `config.objective.name` (default
`classification`); the other fields of `config.objective` reach it as `ctx.options`. Models know
nothing of these rules: what a rule needs from a model leaves it through its outputs
(`DistilledLogits`) or `sow` (`intermediates/keep_decisions`, `intermediates/features`).
"""
from __future__ import annotations

from compact_vit.errors import UserError
from compact_vit.objectives import classification, dynamic_vit, nasvit, supernet, vit_slim
from compact_vit.objectives.classification import compute_loss
from compact_vit.objectives.context import Objective, StepContext

OBJECTIVES: dict[str, Objective] = {
    "classification": classification.classification,
    "dynamicvit": dynamic_vit.dynamicvit,
    "autoformer_supernet": supernet.autoformer_supernet,
    "nasvit_sandwich": nasvit.nasvit_sandwich,
    "vit_slim": vit_slim.vit_slim_search,
}


def register(name: str):
  """Decorator adding a rule of one's own (an ablation, a test) to `OBJECTIVES` under `name`."""
  def wrap(fn: Objective) -> Objective:
    if name in OBJECTIVES:
      raise ValueError(f"Objective {name!r} is registered twice.")
    OBJECTIVES[name] = fn
    return fn
  return wrap


def get(name: str) -> Objective:
  """The objective registered as `name`; UserError listing the names otherwise."""
  if name not in OBJECTIVES:
    raise UserError(f"Unknown config.objective.name {name!r}. Available: "
                    f"{', '.join(sorted(OBJECTIVES))}.")
  return OBJECTIVES[name]


__all__ = ["OBJECTIVES", "Objective", "StepContext", "compute_loss", "get", "register"]
