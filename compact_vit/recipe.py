"""The recipe card: a config's training recipe as the trainer will run it, beside the authors'.

  python -m compact_vit.recipe --config configs/X.py[:ARGS] [--config.FIELD=V ...]

prints one JSON object (`recipe_card`): `total_epochs`, `global_batch`, `peak_lr` (after batch
scaling), `lr_at_epoch` ({"0": lr, ...}: the schedule `optim.create_optimizer` returns, at the first
step of every epoch), `lr_scales` (per-parameter lr multipliers: [regex, scale, from epoch]),
`weight_decay`, `no_decay` (the parameter paths of the real model that weight
decay skips, from `optim.weight_decay_mask` on `jax.eval_shape` parameters), `optimizer`,
`repeated_augmentation` (1 = off), `grad_clip`, `label_smoothing`, `mixup`, `cutmix`, `randaugment`,
`random_erasing`, `drop_path`, `ema_decay`, `distill`, `eval`, plus `objective`, `lr_schedule` (one
line), `sources` (config.recipe_sources: the authors' file behind each value) and `departures`
(config.departures: where the config differs from the authors, and why).

Steps per epoch are the trainer's: the train split's size // global batch (ImageNet-1k: 1,281,167
images, known here without opening TFDS; other datasets ask `compact_vit.data.pipeline.get_info`).

`AUTHORS` holds the authors' values per config (what docs/recipes.md shows and
tests/test_recipe.py checks every card against); `python -m compact_vit.recipe --docs
docs/recipes.md` rewrites that page from it.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import sys
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from compact_vit import cli, models, optim

IMAGENET_TRAIN = 1281167  # ImageNet-1k (ILSVRC 2012) train images
IMAGENET_CLASSES = 1000

CARD_FIELDS = ("total_epochs", "global_batch", "peak_lr", "lr_at_epoch", "lr_scales",
               "weight_decay", "no_decay", "optimizer", "repeated_augmentation", "grad_clip",
               "label_smoothing", "mixup", "cutmix", "randaugment", "random_erasing", "drop_path",
               "ema_decay", "distill", "eval")


# ----------------------------------------------------------------------------- configs

def load_config(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of 'configs/X.py[:ARGS]', as `train.py --config` builds it."""
  path, _, arg = spec.partition(":")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:  # config files import `configs.common`
    sys.path.insert(0, root)
  name = "_recipe_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  if module_spec is None:
    raise FileNotFoundError(f"No config file {path!r}.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def dataset_sizes(dataset_cfg) -> tuple[int, int]:
  """(train examples, classes): ImageNet-1k's without TFDS, else the pipeline's."""
  if dataset_cfg.name == "imagenet2012" and dataset_cfg.get("train_split", "train") == "train":
    return IMAGENET_TRAIN, IMAGENET_CLASSES
  from compact_vit.data import pipeline  # TensorFlow, only for other datasets
  info = pipeline.get_info(dataset_cfg)
  return info.num_train, info.num_classes


# ----------------------------------------------------------------------------- the card

def _frozen(value):
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  if isinstance(value, Mapping):
    return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
  return value


@functools.lru_cache(maxsize=None)
def _abstract_params(name: str, overrides: tuple) -> Any:
  model = models.create_model(name, **dict(overrides))
  size = dict(overrides)["img_size"]
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  key = jax.random.key(0)
  variables = jax.eval_shape(
      lambda x: model.init({"params": key, "dropout": key, "sample": key}, x, train=False), x)
  return variables["params"]


def abstract_params(config, num_classes: int) -> Any:
  """The parameters of the model the trainer builds (config.model with the dataset's classes and
  config.img_size) as ShapeDtypeStructs: nothing is computed."""
  overrides = {k: v for k, v in config.model.items() if k != "name"}
  overrides.update(num_classes=num_classes, img_size=config.img_size)
  return _abstract_params(config.model.name, _frozen(overrides))


def no_decay_paths(params: Any, no_decay, decay=()) -> list[str]:
  """Paths ('blocks_0/attn/qkv/bias') that `optim.weight_decay_mask` exempts from decay."""
  mask = flax.traverse_util.flatten_dict(
      optim.weight_decay_mask(params, tuple(no_decay), tuple(decay)), sep="/")
  return sorted(path for path, decayed in mask.items() if not decayed)


def grad_clip(config) -> dict[str, Any]:
  """{"mode": none|norm|agc, "value": v, "scope": "all"|"subnets"}: the optimizer's clipping of the
  whole gradient, or else the objective's of the subnets' summed gradient (NASViT's
  gradient_rule "authors", norm `subnet_clip_norm`)."""
  mode = config.optim.get("grad_clip_mode", "none")
  value = float(config.optim.get("grad_clip_value", 0.0))
  if mode != "none" and value > 0:
    return {"mode": mode, "value": value, "scope": "all"}
  objective = config.objective
  if objective.get("gradient_rule") == "authors" and objective.get("subnet_clip_norm", 1.0) > 0:
    return {"mode": "norm", "value": float(objective.get("subnet_clip_norm", 1.0)),
            "scope": "subnets"}
  return {"mode": "none", "value": 0.0}


def _plain(value):
  if isinstance(value, ml_collections.ConfigDict):
    return _plain(value.to_dict())
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (np.generic,)):
    return value.item()
  return value


def recipe_card(config: ml_collections.ConfigDict, *, num_train: int | None = None,
                num_classes: int | None = None) -> dict[str, Any]:
  """The recipe of `config` as the trainer runs it (see the module docstring)."""
  if num_train is None or num_classes is None:
    num_train, num_classes = dataset_sizes(config.dataset)
  batch = int(config.batch_size)
  epochs = config.total_epochs
  steps_per_epoch = max(num_train // batch, 1)
  whole_epochs = int(math.ceil(epochs))
  total_steps = int(math.ceil(epochs * steps_per_epoch))
  _, schedule = optim.create_optimizer(config.optim, batch_size=batch,
                                       steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                                       total_epochs=epochs)
  starts = jnp.arange(whole_epochs, dtype=jnp.int32) * steps_per_epoch
  # a constant schedule answers with one scalar
  lrs = np.broadcast_to(np.asarray(schedule(starts), np.float64), starts.shape)
  aug = config.aug
  distill = config.distill
  on = distill.type != "none"
  return {
      "total_epochs": epochs,
      "global_batch": batch,
      "peak_lr": optim.peak_lr(config.optim, batch),
      "lr_at_epoch": {str(e): float(lr) for e, lr in enumerate(lrs)},
      "lr_scales": _plain(config.optim.get("lr_scales", ())),
      "weight_decay": float(config.optim.weight_decay),
      "no_decay": no_decay_paths(abstract_params(config, num_classes), config.optim.no_decay,
                                 config.optim.get("decay", ())),
      "optimizer": {"name": "adamw", "betas": [config.optim.b1, config.optim.b2],
                    "eps": config.optim.eps},
      "repeated_augmentation": int(aug.get("repeated_aug", 1) or 1),
      "grad_clip": grad_clip(config),
      "label_smoothing": float(aug.label_smoothing),
      "mixup": float(aug.mixup_alpha),
      "cutmix": float(aug.cutmix_alpha),
      "randaugment": aug.randaugment or "",
      "random_erasing": float(aug.random_erasing),
      "drop_path": float(config.model.get("drop_path_rate", 0.0)),
      "ema_decay": float(config.ema_decay),
      "distill": {"type": distill.type, "teacher": distill.teacher if on else None,
                  "alpha": float(distill.alpha) if on else None,
                  "tau": float(distill.tau) if on else None},
      "eval": {"img_size": int(config.img_size), "crop_pct": float(config.crop_pct),
               "resize": config.get("eval_resize", "shorter")},
      "objective": _plain(config.objective),
      "lr_schedule": optim.schedule_summary(config.optim, batch_size=batch,
                                            steps_per_epoch=steps_per_epoch,
                                            total_steps=total_steps, total_epochs=epochs),
      "sources": _plain(config.get("recipe_sources", {})),
      "departures": _plain(config.get("departures", {})),
  }


# ----------------------------------------------------------------------------- the authors' values

# Each config's row: what its authors ran (their training script's defaults, their README
# command, their configs), or, for `status` "ours", what this repository chose where the authors
# published no recipe. `schedule` describes the lr curve the authors' scheduler draws ("timm_epoch":
# timm's CosineLRScheduler stepped once per epoch after it; "timm_step": the same per iteration;
# "linear_step": ConvNeXt-style warmup prefix then cosine per iteration; "constant"), from which
# tests/test_recipe.py recomputes `lr_at_epoch` independently. `no_decay` lists, beside every
# parameter that is 1-D or a bias in the authors' layout, what their optimizer also exempts
# ("also", regexes over our parameter paths) and what they decay although it is 1-D here ("decay").
ADAMW = {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8}
NO_CLIP = {"mode": "none", "value": 0.0}
NO_DISTILL = {"type": "none"}
M9 = "rand-m9-mstd0.5-inc1"
DEIT_NO_DECAY = {"also": ["^cls_token$", "^pos_embed$", "^dist_token$"]}


def _eval(img_size=224, crop_pct=0.875, resize="shorter"):
  return {"img_size": img_size, "crop_pct": crop_pct, "resize": resize}


def _cosine(kind="timm_epoch", warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=0):
  return {"kind": kind, "warmup_epochs": warmup_epochs, "warmup_lr": warmup_lr, "min_lr": min_lr,
          "cooldown_epochs": cooldown_epochs}


DEIT_ROW = dict(
    family="DeiT", status="exact", total_epochs=300, global_batch=1024, peak_lr=1e-3,
    schedule=_cosine(), weight_decay=0.05, no_decay=DEIT_NO_DECAY, optimizer=ADAMW,
    repeated_augmentation=3, grad_clip=NO_CLIP, label_smoothing=0.1, mixup=0.8, cutmix=1.0,
    randaugment=M9, random_erasing=0.25, drop_path=0.1, ema_decay=0.99996, distill=NO_DISTILL,
    eval=_eval(), lr_scales=[])
EF_ROW = dict(
    DEIT_ROW, family="EfficientFormer", schedule=_cosine(warmup_lr=1e-5), weight_decay=0.025,
    no_decay={}, grad_clip={"mode": "agc", "value": 0.01, "scope": "all"}, drop_path=0.0,
    distill={"type": "hard", "teacher": "regnety_160", "alpha": 0.5, "tau": 1.0})
EFV2_NO_DECAY = {"decay": [r"/ls[12]/gamma$"]}  # the authors' layer scales are (C, 1, 1)
SEPVIT_ROW = dict(DEIT_ROW, family="SepViT", no_decay={}, repeated_augmentation=1,
                  grad_clip={"mode": "norm", "value": 5.0, "scope": "all"}, ema_decay=0.0)
UNINET_ROW = dict(DEIT_ROW, family="UniNet", total_epochs=310,
                  schedule=_cosine(cooldown_epochs=10), no_decay={}, repeated_augmentation=1,
                  random_erasing=0.0, drop_path=0.0)
OURS_ROW = dict(DEIT_ROW, status="ours")  # DeiT's recipe where the authors published none
FINETUNE_ROW = dict(OURS_ROW, total_epochs=30, peak_lr=1e-4, schedule=_cosine(min_lr=1e-6))
DYNAMICVIT_ROW = dict(
    DEIT_ROW, family="DynamicViT", total_epochs=30,
    schedule=_cosine("linear_step", warmup_lr=0.0, min_lr=1e-6), repeated_augmentation=1,
    drop_path=0.0, ema_decay=0.9999,
    lr_scales=[["^(cls_token|pos_embed)$", 0.0], ["^(?!score_predictor)", 0.01, 5]],
    distill={"type": "soft", "teacher": "deit_small_patch16_224", "alpha": 0.5, "tau": 1.0})
AUTOFORMER_ROW = dict(DEIT_ROW, family="AutoFormer / TF-TAS", total_epochs=500,
                      schedule=_cosine(warmup_epochs=20), ema_decay=0.0,
                      no_decay={"also": ["^cls_token$", "^pos_embed$"]})
NASVIT_ROW = dict(
    DEIT_ROW, family="NASViT", status="exact but the global batch", total_epochs=400,
    global_batch=2048, peak_lr=3e-4 * 2048 / 512,
    schedule=_cosine("timm_step", warmup_lr=5e-7 * 4, min_lr=5e-6 * 4), weight_decay=0.0,
    no_decay=None, repeated_augmentation=1, mixup=0.01,
    grad_clip={"mode": "norm", "value": 1.0, "scope": "subnets"},
    cutmix=0.01, randaugment="rand-n1-m1-mstd0.5-inc1", random_erasing=0.01, drop_path=0.0,
    ema_decay=0.99985, eval=_eval(288),
    distill={"type": "soft", "teacher": "resnext101_32x4d,resnext101_32x8d",
             "alpha": 1.0, "tau": 0.2})
VIT_SLIM_ROW = dict(DEIT_ROW, family="ViT-Slim")

UNINET_SIZES = {"b0": 160, "b1": 224, "b2": 256, "b3": 288, "b4": 320, "b5": 384}
AUTHORS: dict[str, dict[str, Any]] = {
    **{f"deit_{s}.py": DEIT_ROW for s in ("ti", "s", "b")},
    **{f"efficientformer_{s}.py": EF_ROW for s in ("l1", "l3", "l7")},
    **{f"efficientformerv2_{s}.py": dict(EF_ROW, drop_path=dp, no_decay=EFV2_NO_DECAY)
       for s, dp in (("s0", 0.0), ("s1", 0.0), ("s2", 0.02), ("l", 0.1))},
    "efficientformerv2_s0.py:epochs=450": dict(EF_ROW, total_epochs=450, no_decay=EFV2_NO_DECAY),
    "sepvit_t.py": dict(SEPVIT_ROW, drop_path=0.2),
    "sepvit_s.py": dict(SEPVIT_ROW, drop_path=0.3, status="drop path from the authors' backbones"),
    "sepvit_b.py": dict(SEPVIT_ROW, drop_path=0.5, status="drop path from the authors' backbones"),
    **{f"uninet_{b}.py": dict(
        UNINET_ROW, status="exact" if b == "b1" else "B1's command",
        eval=_eval(size) if size < 320 else _eval(size, 1.0, "squash"))
       for b, size in UNINET_SIZES.items()},
    "reformer_vit_s16.py": dict(
        OURS_ROW, family="Reformer-ViT",
        no_decay={"also": DEIT_NO_DECAY["also"] + [r"^blocks/.*/(bias|scale)$"]}),
    "dynamicvit_deit_s.py": DYNAMICVIT_ROW,
    "dynamicvit_deit_b.py": dict(
        DYNAMICVIT_ROW, drop_path=0.2, distill=dict(DYNAMICVIT_ROW["distill"],
                                                    teacher="deit_base_patch16_224")),
    "ats_deit_s.py": dict(FINETUNE_ROW, family="ATS"),
    "patchmerger_vit_s16.py": dict(OURS_ROW, family="PatchMerger"),
    "patchmerger_vit_b16.py": dict(OURS_ROW, family="PatchMerger"),
    "patchmerger_vit_b16.py:finetune": dict(FINETUNE_ROW, family="PatchMerger"),
    **{f"autoformer_{s}_{kind}.py": AUTOFORMER_ROW
       for s in "tsb" for kind in ("supernet", "search")},
    **{f"autoformer_{s}_supernet.py:retrain": dict(
        OURS_ROW, family="AutoFormer / TF-TAS", no_decay=AUTOFORMER_ROW["no_decay"])
       for s in "tsb"},
    **{f"tftas_{s}_search.py": dict(AUTOFORMER_ROW, status="exact (the AutoFormer supernet's; "
                                    "the search trains nothing)") for s in "tsb"},
    **{f"tftas_{s}_search.py:retrain": dict(
        AUTOFORMER_ROW, total_epochs=300, global_batch=256, peak_lr=2.5e-4,
        schedule=_cosine(warmup_epochs=10)) for s in "tsb"},
    "nasvit_supernet.py": NASVIT_ROW,
    "nasvit_search.py": NASVIT_ROW,
    "vit_slim_deit_s.py": dict(
        VIT_SLIM_ROW, total_epochs=50, peak_lr=5e-4, schedule={"kind": "constant"},
        weight_decay=1e-3, no_decay=dict(DEIT_NO_DECAY, decay=["zeta$"])),
    "vit_slim_deit_s_retrain.py": VIT_SLIM_ROW,
}
FAMILY_FILES = {  # family -> the authors' repository
    "DeiT": "facebookresearch/deit", "EfficientFormer": "snap-research/EfficientFormer",
    "SepViT": "liwei109/SepViT", "UniNet": "Sense-X/UniNet", "Reformer-ViT": "none (DeiT's recipe)",
    "DynamicViT": "raoyongming/DynamicViT", "ATS": "adaptivetokensampling/ATS (evaluation only)",
    "PatchMerger": "none (DeiT's recipe)", "AutoFormer / TF-TAS":
    "microsoft/Cream AutoFormer, decemberzhou/TF_TAS", "NASViT": "facebookresearch/NASViT",
    "ViT-Slim": "Arnav0400/ViT-Slim"}


# ----------------------------------------------------------------------------- docs/recipes.md

def _num(x) -> str:
  return f"{x:g}"


def _cell(field: str, value) -> str:
  """A table cell for one of the authors' values."""
  if field == "schedule":
    kind = value["kind"]
    if kind == "constant":
      return "constant"
    unit = {"timm_epoch": "timm cosine / epoch", "timm_step": "timm cosine / step",
            "linear_step": "warmup + cosine / step"}[kind]
    text = (f"{unit}, warmup {_num(value['warmup_epochs'])} ep from {_num(value['warmup_lr'])}, "
            f"min {_num(value['min_lr'])}")
    return text + (f", {value['cooldown_epochs']} cooldown ep" if value["cooldown_epochs"] else "")
  if field == "no_decay":
    if value is None:
      return "n/a (no decay)"
    names = [p.strip("^$") for p in value.get("also", ())]
    text = ", ".join(["1-D", "bias"] + names)
    return text + "".join(f"; {p.rstrip('$')} decayed" for p in value.get("decay", ()))
  if field == "optimizer":
    return f"AdamW {tuple(value['betas'])}, eps {_num(value['eps'])}"
  if field == "grad_clip":
    if value["mode"] == "none":
      return "none"
    return f"{value['mode']} {_num(value['value'])}" + (
        "" if value["scope"] == "all" else f" ({value['scope']}' gradient)")
  if field == "distill":
    if value["type"] == "none":
      return "none"
    return (f"{value['type']}: {value['teacher']}, alpha {_num(value['alpha'])}, "
            f"tau {_num(value['tau'])}")
  if field == "eval":
    return f"{value['img_size']}, crop {_num(value['crop_pct'])}, {value['resize']}"
  if field == "lr_scales":
    return "; ".join(f"{r[0]} x{_num(r[1])}" + (f" from ep {_num(r[2])}" if len(r) > 2 else "")
                     for r in value) or "none"
  if field in ("repeated_augmentation",):
    return "off" if value == 1 else f"{value} copies"
  if isinstance(value, float):
    return _num(value)
  return str(value) if value != "" else "off"


DOC_TABLES = (  # two tables per family: optimisation, then data, regularisation and evaluation
    (("total_epochs", "epochs"), ("global_batch", "batch"), ("peak_lr", "peak lr"),
     ("schedule", "lr schedule"), ("lr_scales", "lr scales"), ("weight_decay", "wd"),
     ("no_decay", "no decay"),
     ("optimizer", "optimizer"), ("grad_clip", "clip"), ("ema_decay", "EMA")),
    (("repeated_augmentation", "rep. aug."), ("label_smoothing", "smoothing"), ("mixup", "mixup"),
     ("cutmix", "cutmix"), ("randaugment", "RandAugment"), ("random_erasing", "rand. erasing"),
     ("drop_path", "drop path"), ("distill", "distillation"), ("eval", "eval")))
SOURCE_FIELD = {"schedule": "lr_at_epoch"}  # the table's schedule is the card's lr_at_epoch


def render_docs(configs_dir: str = "configs") -> str:
  """docs/recipes.md: per family, the authors' values (`AUTHORS`), the file behind each (the
  configs' `recipe_sources`) and where each config departs (their `departures`)."""
  families: dict[str, list[str]] = {}
  for spec, row in AUTHORS.items():
    families.setdefault(row["family"], []).append(spec)
  out = [
      "# Training recipes: the authors' values", "",
      "Generated by `python -m compact_vit.recipe --docs docs/recipes.md` from `AUTHORS` in",
      "compact_vit/recipe.py (the authors' values) and the configs' `recipe_sources` and",
      "`departures`; tests/test_recipe.py checks that every config's recipe card equals its row",
      "unless the config records a departure for that field, and that this page is up to date.",
      "`python -m compact_vit.recipe --config configs/X.py` prints a config's card.", "",
      "Status: *exact* = every value from the authors' training code, configs or README command;",
      "otherwise the status names what is not (the sources below say where it comes from).",
      "*ours* = the authors published no ImageNet-1k recipe; the row is this repository's choice.",
      "Departures name the field of the card they concern (other names: behaviour the card has",
      "no field for).", ""]
  for family, specs in families.items():
    out += [f"## {family}", "", f"Authors' code: {FAMILY_FILES[family]}.", ""]
    for i, columns in enumerate(DOC_TABLES):
      first = ("status",) if i == 0 else ()
      out.append("| config | " + " | ".join(first + tuple(t for _, t in columns)) + " |")
      out.append("|---" * (len(columns) + 1 + len(first)) + "|")
      for spec in specs:
        row = AUTHORS[spec]
        cells = [row["status"]] * len(first) + [_cell(f, row[f]) for f, _ in columns]
        out.append(f"| `{spec}` | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
      out.append("")
    configs = {spec: load_config(os.path.join(configs_dir, spec)) for spec in specs}
    out += ["Sources:", ""]
    for field, title in (column for columns in DOC_TABLES for column in columns):
      key = SOURCE_FIELD.get(field, field)
      by_source: dict[str, list[str]] = {}
      for spec, config in configs.items():
        by_source.setdefault(config.recipe_sources.get(key, "(none)"), []).append(spec)
      if len(by_source) == 1:
        out.append(f"- {title}: {next(iter(by_source))}")
      else:
        out.append(f"- {title}:")
        out += [f"  - {', '.join(f'`{s}`' for s in specs_)}: {source}"
                for source, specs_ in by_source.items()]
    departures = [(spec, key, text) for spec, config in configs.items()
                  for key, text in config.departures.items()]
    out += ["", "Departures:" if departures else "Departures: none.", ""]
    out += [f"- `{spec}` {key}: {text}" for spec, key, text in departures]
    if departures:
      out.append("")
  return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------- command line

def main(argv) -> None:
  from absl import app, flags
  del argv
  cli.quiet_logs()
  if flags.FLAGS.docs:
    with open(flags.FLAGS.docs, "w") as f:
      f.write(render_docs())
    return
  if flags.FLAGS.config is None:
    raise app.UsageError("Give --config configs/X.py[:ARGS] (or --docs PATH).")
  config = flags.FLAGS.config
  cli.run_guarded(lambda: print(json.dumps(recipe_card(config), indent=1)))


if __name__ == "__main__":
  from absl import app, flags as _flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:ARGS]).",
                                  lock_config=True)
  _flags.DEFINE_string("docs", None, "Write docs/recipes.md (the authors' table) to this path.")
  app.run(main, flags_parser=cli.parse_flags)
