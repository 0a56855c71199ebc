"""Every config's recipe card against its authors' values (compact_vit/recipe.py AUTHORS, the table
of docs/recipes.md): a field that differs needs a `departures` entry in the config, a departure
must name a field that differs, every field needs a source, and the page must be up to date.

The learning rates are recomputed here from each row's schedule description with the authors'
schedulers written out independently (timm's CosineLRScheduler per epoch or per step, ConvNeXt's
cosine_scheduler, constant), not with compact_vit.optim. Cards need no compilation: the model's
parameters come from jax.eval_shape.
"""
import functools
import glob
import json
import math
import os
import subprocess
import sys

import flax
import numpy as np
import pytest

from compact_vit import recipe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
HELPERS = {"__init__.py", "common.py", "autoformer_common.py", "token_reduction_common.py"}
FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.py"))
               if os.path.basename(p) not in HELPERS)
SPECS = sorted(recipe.AUTHORS)
LR_RTOL = 1e-3  # DynamicViT's warmup: linspace(0, lr, W) vs optax's k / W, 1.6e-4 apart


# ------------------------------------------------------------------------- the authors' schedulers

def timm_cosine(t, *, base, t_initial, warmup_t, warmup_lr, min_lr):
  """timm CosineLRScheduler (cycle_limit 1, warmup not a prefix) at t."""
  if t < warmup_t:
    return warmup_lr + t * (base - warmup_lr) / warmup_t
  if t < t_initial:
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / t_initial))
  return min_lr


def authors_lr_at_epoch(row, steps_per_epoch):
  """The lr each epoch of the authors' run starts with."""
  s, base, epochs = row["schedule"], row["peak_lr"], row["total_epochs"]
  if s["kind"] == "constant":
    return [base] * epochs
  if s["kind"] == "timm_epoch":  # scheduler.step(epoch) after epoch `epoch`: epoch e sees e - 1
    kw = dict(base=base, t_initial=epochs - s["cooldown_epochs"], warmup_t=s["warmup_epochs"],
              warmup_lr=s["warmup_lr"], min_lr=s["min_lr"])
    return [timm_cosine(max(e - 1, 0), **kw) for e in range(epochs)]
  total = epochs * steps_per_epoch
  warmup = s["warmup_epochs"] * steps_per_epoch
  if s["kind"] == "timm_step":  # step_update(epoch * num_steps + idx) after each iteration
    return [timm_cosine(e * steps_per_epoch, base=base, t_initial=total, warmup_t=warmup,
                        warmup_lr=s["warmup_lr"], min_lr=s["min_lr"]) for e in range(epochs)]
  assert s["kind"] == "linear_step"  # np.linspace warmup, then cosine over the remaining steps
  schedule = np.concatenate([
      np.linspace(s["warmup_lr"], base, warmup),
      [s["min_lr"] + 0.5 * (base - s["min_lr"]) * (1 + math.cos(math.pi * i / (total - warmup)))
       for i in range(total - warmup)]])
  return [schedule[e * steps_per_epoch] for e in range(epochs)]


# ----------------------------------------------------------------------------- comparison

@functools.lru_cache(maxsize=None)
def config_of(spec):
  return recipe.load_config(os.path.join(CONFIGS, spec))


@functools.lru_cache(maxsize=None)
def card_of(spec):
  return recipe.recipe_card(config_of(spec))


# The families whose authors' models timm builds with the authors' shapes (EfficientFormerV2 after
# `to_authors_v2`: the authors store its layer scales as (C, 1, 1)), by config file prefix.
AUTHORS_MODELS = {"deit_": None, "efficientformer_": None, "efficientformerv2_": "to_authors_v2"}

# The other families: the rank of every authors' tensor that is not a layer's weight or bias, as
# declared in the authors' code, by our parameter path (regex). Layer weights and biases (our
# `kernel`, `scale`, `bias`, `embedding` leaves) keep their rank through the converters
# (compact_vit/convert/core.py transposes kernels, no family converter reshapes one), so for them
# our rank is theirs. A parameter of ours that is neither fails `authors_ranks`: audit it first.
DEIT_TOKENS = {"^cls_token$": 3, "^pos_embed$": 3}  # timm / DeiT: zeros(1, 1, C), zeros(1, N, C)
AUTHORS_RAW_RANKS = {
    # liwei109/SepViT classification/sepvit.py: win_tokens = zeros(1, win_num, 1, dim)
    "sepvit_": {"/win_tokens$": 4},
    # Sense-X/UniNet uninet.py: gamma_1, gamma_2 = init_values * ones(out_features)
    "uninet_": {"/ls[12]/gamma$": 1},
    # microsoft/Cream AutoFormer model/vision_transformer/supernet_transformer.py: cls_token
    # zeros(1, 1, C), pos_embed zeros(1, N + 1, C); model/module/multihead_super.py
    # RelativePosition2D_super: embeddings_table_v / _h = randn(2 M + 2, num_units). TF-TAS trains
    # AutoFormer's model.
    "autoformer_": {**DEIT_TOKENS, "/embeddings_table_[vh]$": 2},
    "tftas_": {**DEIT_TOKENS, "/embeddings_table_[vh]$": 2},
    # raoyongming/DynamicViT models/dyvit.py: DeiT's tokens; PredictorLG is Linear / LayerNorm.
    "dynamicvit_": DEIT_TOKENS,
    "ats_": DEIT_TOKENS,  # DeiT's model, no parameters added
    "patchmerger_": {**DEIT_TOKENS, "^patch_merger/queries$": 2},  # no authors' code: (M, C), ours
    # Arnav0400/ViT-Slim ViT-Slim/models/layers.py: SparseAttention zeta ones(1, 1, heads, 1,
    # head_dim), patch_zeta ones(1, N, 1); SparseMlp zeta ones(1, 1, hidden); the fc biases of
    # our split projections (mlp_bias, proj_bias) are Linear biases there.
    "vit_slim_": {**DEIT_TOKENS, "/attn/zeta$": 5, "/mlp/zeta$": 3, "/patch_zeta$": 3,
                  "/(mlp|proj)_bias$": 1},
}
LAYER_LEAVES = ("kernel", "scale", "bias", "embedding")


def authors_ranks(spec):
  """Our parameter path -> (rank of the authors' tensor, whether its name ends in bias). Families
  timm builds: from the authors' model (timm's, in their layout) mapped onto our paths by the
  converter: each tensor is filled with a code of its rank, which the converter's renames,
  transposes and reshapes keep. Other families: `AUTHORS_RAW_RANKS`. None for the families
  without authors' code or weight decay (Reformer-ViT, NASViT)."""
  prefix = next((p for p in AUTHORS_MODELS if spec.startswith(p)), None)
  if prefix is None:
    return raw_ranks(spec)
  import timm
  import torch
  from compact_vit.convert import load_pytorch_state_dict
  config = config_of(spec)
  state = timm.create_model(config.model.name, num_classes=recipe.IMAGENET_CLASSES).state_dict()
  if AUTHORS_MODELS[prefix]:
    import test_efficientformer
    state = getattr(test_efficientformer, AUTHORS_MODELS[prefix])(state)
  coded = {k: torch.full(v.shape, float(v.ndim + 100 * k.endswith("bias"))) if v.is_floating_point()
           else v for k, v in state.items()}
  overrides = {k: v for k, v in config.model.items() if k != "name"}
  params = load_pytorch_state_dict(config.model.name, coded, num_classes=recipe.IMAGENET_CLASSES,
                                   img_size=config.img_size, **overrides)["params"]
  out = {}
  for path, leaf in flax.traverse_util.flatten_dict(params, sep="/").items():
    code, = np.unique(np.asarray(leaf))
    out[path] = (int(code) % 100, code >= 100)
  return out


def raw_ranks(spec):
  """`authors_ranks` of a family in `AUTHORS_RAW_RANKS`: layer leaves keep our rank, the others
  take the authors' declared rank; a path that neither covers is an assertion error."""
  import re
  prefix = next((p for p in AUTHORS_RAW_RANKS if spec.startswith(p)), None)
  if prefix is None:
    return None
  params = recipe.abstract_params(config_of(spec), recipe.IMAGENET_CLASSES)
  out, unaudited = {}, []
  for path, leaf in flax.traverse_util.flatten_dict(params, sep="/").items():
    declared = [rank for pattern, rank in AUTHORS_RAW_RANKS[prefix].items() if re.search(pattern, path)]
    if declared:
      assert len(declared) == 1, (path, declared)
      out[path] = (declared[0], path.endswith("bias"))
    elif path.rsplit("/", 1)[-1] in LAYER_LEAVES:
      out[path] = (len(leaf.shape), path.endswith("bias"))
    else:
      unaudited.append(path)
  assert not unaudited, f"{spec}: no authors' rank for {unaudited}"
  return out


def expected_no_decay(spec, rule):
  """The paths the authors' optimizer exempts (timm's rule): 1-D or bias in their layout (their
  tensors' shapes where `authors_ranks` has them), plus `also` (regexes over our paths); for a
  family without the authors' shapes (ours: Reformer-ViT), our shapes less `decay`."""
  import re
  params = recipe.abstract_params(config_of(spec), recipe.IMAGENET_CLASSES)
  ours = {path: (len(leaf.shape), path.endswith("bias"))
          for path, leaf in flax.traverse_util.flatten_dict(params, sep="/").items()}
  theirs = authors_ranks(spec)
  ranks = ours if theirs is None else theirs
  assert theirs is None or set(theirs) == set(ours)
  also = [re.compile(p) for p in rule.get("also", ())]
  decay = [re.compile(p) for p in rule.get("decay", ())]
  exempt = {path for path, (rank, bias) in ranks.items()
            if rank <= 1 or bias or any(p.search(path) for p in also)}
  if theirs is None:
    exempt = {path for path in exempt if not any(p.search(path) for p in decay)}
  return sorted(exempt)


def close(a, b):
  return a is None and b is None or (a is not None and b is not None and
                                     math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15))


def differing_fields(spec, card, row):
  """The card fields whose value is not the authors'."""
  differ = set()
  for field in ("total_epochs", "global_batch", "repeated_augmentation", "randaugment"):
    if card[field] != row[field]:
      differ.add(field)
  for field in ("peak_lr", "weight_decay", "label_smoothing", "mixup", "cutmix", "random_erasing",
                "drop_path", "ema_decay"):
    if not close(card[field], row[field]):
      differ.add(field)
  for field in ("optimizer", "lr_scales"):
    if card[field] != row[field]:
      differ.add(field)
  clip, theirs = card["grad_clip"], row["grad_clip"]
  if (clip["mode"], clip.get("scope")) != (theirs["mode"], theirs.get("scope")) or not close(
      clip["value"], theirs["value"]):
    differ.add("grad_clip")
  ours, theirs = card["distill"], {"teacher": None, "alpha": None, "tau": None, **row["distill"]}
  if (ours["type"], ours["teacher"]) != (theirs["type"], theirs["teacher"]) or not (
      close(ours["alpha"], theirs["alpha"]) and close(ours["tau"], theirs["tau"])):
    differ.add("distill")
  ev = card["eval"]
  if (ev["img_size"], ev["resize"]) != (row["eval"]["img_size"], row["eval"]["resize"]) or \
      not close(ev["crop_pct"], row["eval"]["crop_pct"]):
    differ.add("eval")
  if row["no_decay"] is not None and card["no_decay"] != expected_no_decay(spec, row["no_decay"]):
    differ.add("no_decay")
  ours = [card["lr_at_epoch"][str(e)] for e in range(len(card["lr_at_epoch"]))]
  theirs = authors_lr_at_epoch(row, recipe.IMAGENET_TRAIN // row["global_batch"])
  if len(ours) != len(theirs) or not np.allclose(ours, theirs, rtol=LR_RTOL, atol=1e-12):
    differ.add("lr_at_epoch")
  return differ


def problems(spec, card, row):
  """What the test fails on: departures not recorded, and departures recorded for equal values."""
  differ = differing_fields(spec, card, row)
  declared = set(card["departures"]) & set(recipe.CARD_FIELDS)
  out = [f"{f} differs from the authors' value without a departures entry"
         for f in sorted(differ - declared)]
  out += [f"departures[{f!r}] is recorded but the value equals the authors'"
          for f in sorted(declared - differ)]
  return out


# ----------------------------------------------------------------------------- tests

def test_every_config_has_an_authors_row():
  assert [f for f in FILES if f not in recipe.AUTHORS] == []
  assert {spec.partition(":")[0] for spec in SPECS} <= set(FILES)


@pytest.mark.parametrize("spec", SPECS)
def test_card_equals_authors_or_departs(spec):
  card = card_of(spec)
  assert problems(spec, card, recipe.AUTHORS[spec]) == []
  missing = [f for f in recipe.CARD_FIELDS if not card["sources"].get(f)]
  assert missing == [], f"fields without a source in config.recipe_sources: {missing}"
  assert all(card["departures"].values()), "every departure says why"


def test_the_authors_ranks_not_ours_decide_the_exemption():
  """ViT-Slim's masks are 1-D or 2-D here but 3-D and 5-D in the authors' code, so their optimizer
  decays them: the expected exemption follows from the authors' ranks alone, without the row's
  `decay` list. SepViT's window tokens (4-D) are decayed, UniNet's layer scales (1-D) are not."""
  spec = "vit_slim_deit_s.py"
  params = recipe.abstract_params(config_of(spec), recipe.IMAGENET_CLASSES)
  zetas = {path: len(leaf.shape) for path, leaf in flax.traverse_util.flatten_dict(params, sep="/").items()
           if path.endswith("zeta")}
  assert min(zetas.values()) <= 1 and {1, 2} <= set(zetas.values())  # ours would be exempt
  exempt = expected_no_decay(spec, {"also": recipe.AUTHORS[spec]["no_decay"]["also"]})
  assert not set(zetas) & set(exempt) and "cls_token" in exempt
  assert all(rank == (3 if "mlp" in path or "patch" in path else 5)
             for path, (rank, _) in authors_ranks(spec).items() if path in zetas)
  sepvit = authors_ranks("sepvit_t.py")
  assert {rank for path, (rank, _) in sepvit.items() if path.endswith("/win_tokens")} == {4}
  assert not any(p.endswith("/win_tokens") for p in expected_no_decay("sepvit_t.py", {}))
  assert any(p.endswith("ls1/gamma") for p in expected_no_decay("uninet_b2.py", {}))


def test_an_unrecorded_departure_fails():
  """The check catches a changed value (drop path, one epoch's lr, the decay set) and a
  departure recorded for a value that equals the authors'."""
  spec = "deit_s.py"
  card, row = card_of(spec), recipe.AUTHORS[spec]
  assert problems(spec, card, row) == []
  changed = dict(card, drop_path=0.2, lr_at_epoch=dict(card["lr_at_epoch"], **{"7": 1.01e-3}),
                 no_decay=card["no_decay"][:-1])
  assert problems(spec, changed, row) == [
      f"{f} differs from the authors' value without a departures entry"
      for f in ("drop_path", "lr_at_epoch", "no_decay")]
  stale = dict(card, departures={"mixup": "..."})
  assert problems(spec, stale, row) == [
      "departures['mixup'] is recorded but the value equals the authors'"]


def test_schedules_differ_where_they_should():
  """The reference schedulers tell the authors' variants apart (lag, warmup prefix, cooldown)."""
  deit = authors_lr_at_epoch(recipe.AUTHORS["deit_s.py"], 1251)
  assert deit[0] == deit[1] == 1e-6 and math.isclose(deit[6], 1e-3 * 0.5 * (1 + math.cos(
      math.pi * 5 / 300)), rel_tol=1e-6, abs_tol=1e-5)
  uninet = authors_lr_at_epoch(recipe.AUTHORS["uninet_b1.py"], 1251)
  assert len(uninet) == 310 and uninet[301:] == [1e-5] * 9 and uninet[300] > 1e-5
  spec = "nasvit_supernet.py"  # timm's per-step cosine runs under its warmup, not after it
  prefixed = config_of(spec).copy_and_resolve_references()
  prefixed.optim.warmup_prefix = True
  assert differing_fields(spec, recipe.recipe_card(prefixed), recipe.AUTHORS[spec]) == {
      "lr_at_epoch"} | differing_fields(spec, card_of(spec), recipe.AUTHORS[spec])


def test_docs_are_up_to_date():
  with open(os.path.join(ROOT, "docs", "recipes.md")) as f:
    assert f.read() == recipe.render_docs(CONFIGS), (
        "docs/recipes.md is stale: python -m compact_vit.recipe --docs docs/recipes.md")


def test_command_line_prints_the_card_with_overrides():
  out = subprocess.run(
      [sys.executable, "-m", "compact_vit.recipe", "--config", "configs/deit_ti.py",
       "--config.batch_size=512", "--config.total_epochs=10"],
      cwd=ROOT, capture_output=True, text=True, check=True).stdout
  card = json.loads(out)
  assert card["global_batch"] == 512 and math.isclose(card["peak_lr"], 5e-4)
  assert sorted(card["lr_at_epoch"], key=int) == [str(e) for e in range(10)]
  assert set(recipe.CARD_FIELDS) <= set(card) and card["sources"] and card["departures"] == {}
