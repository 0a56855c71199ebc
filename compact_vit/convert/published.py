"""Published ImageNet-1K weights on the Hugging Face Hub: which checkpoint each model loads by
default, and the top-1 it reaches.

Every registered model that timm publishes weights for has a default Hub repository here (timm's
default pretrained tag for that architecture, except RegNetY-160, whose default is DeiT's teacher
`regnety_160.deit_in1k`, and the ResNeXt-101 teachers of NASViT, `fb_swsl_ig1b_ft_in1k`). Each
checkpoint records how it is evaluated (input size, centre-crop fraction, resize interpolation and
normalisation, from timm's `pretrained_cfg`) and its ImageNet-1K validation top-1 under exactly
that evaluation, from timm's results table (`results/results-imagenet.csv` in
huggingface/pytorch-image-models). Note the ViT (`augreg`) checkpoints: they expect inputs
normalised with mean = std = 0.5, not the ImageNet statistics.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from compact_vit.errors import UserError
from compact_vit.models import list_models
from compact_vit.imagenet import IMAGENET_MEAN, IMAGENET_STD

HUB_PREFIX = "hf-hub:"
HALF = (0.5, 0.5, 0.5)
TIMM_RESULTS = "timm results-imagenet.csv"


@dataclasses.dataclass(frozen=True)
class Published:
  """A published checkpoint: the model it is for, how it is evaluated and the top-1 it reaches.

  `top1` is a fraction (as `eval_<split>.json` writes it); `source` says where it comes from.
  """
  repo_id: str
  model: str
  top1: float
  source: str
  img_size: int = 224
  crop_pct: float = 0.875
  interpolation: str = "bicubic"
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  num_classes: int = 1000


def _timm(tag: str, top1_percent: float, **eval_settings) -> Published:
  model = tag.split(".", 1)[0]
  return Published(f"timm/{tag}", model, round(top1_percent / 100, 5), TIMM_RESULTS,
                   **eval_settings)


_DEIT = dict(crop_pct=0.9)
_AUGREG = dict(crop_pct=0.9, mean=HALF, std=HALF)
_SNAP = dict(crop_pct=0.95)
_SWSL = dict(crop_pct=0.875, interpolation="bilinear")

# Default checkpoint per model, in the registry's naming. Top-1 at the checkpoint's own evaluation
# (224 px, the crop and normalisation given), from timm's results table.
DEFAULTS: dict[str, Published] = {p.model: p for p in (
    _timm("deit_tiny_patch16_224.fb_in1k", 72.190, **_DEIT),
    _timm("deit_small_patch16_224.fb_in1k", 79.856, **_DEIT),
    _timm("deit_base_patch16_224.fb_in1k", 81.980, **_DEIT),
    _timm("deit_tiny_distilled_patch16_224.fb_in1k", 74.538, **_DEIT),
    _timm("deit_small_distilled_patch16_224.fb_in1k", 81.204, **_DEIT),
    _timm("deit_base_distilled_patch16_224.fb_in1k", 83.384, **_DEIT),
    _timm("vit_tiny_patch16_224.augreg_in21k_ft_in1k", 75.452, **_AUGREG),
    _timm("vit_small_patch16_224.augreg_in21k_ft_in1k", 81.402, **_AUGREG),
    _timm("vit_base_patch16_224.augreg2_in21k_ft_in1k", 85.108, **_AUGREG),
    _timm("efficientformer_l1.snap_dist_in1k", 80.502, **_SNAP),
    _timm("efficientformer_l3.snap_dist_in1k", 82.562, **_SNAP),
    _timm("efficientformer_l7.snap_dist_in1k", 83.396, **_SNAP),
    _timm("efficientformerv2_s0.snap_dist_in1k", 76.102, **_SNAP),
    _timm("efficientformerv2_s1.snap_dist_in1k", 79.684, **_SNAP),
    _timm("efficientformerv2_s2.snap_dist_in1k", 82.156, **_SNAP),
    _timm("efficientformerv2_l.snap_dist_in1k", 83.642, **_SNAP),
    _timm("regnety_160.deit_in1k", 83.000, **_SNAP),
    _timm("resnext101_32x4d.fb_swsl_ig1b_ft_in1k", 83.268, **_SWSL),
    _timm("resnext101_32x8d.fb_swsl_ig1b_ft_in1k", 84.276, **_SWSL),
)}

# Other published checkpoints of the same architectures (load them with `hf-hub:REPO`).
OTHERS: tuple[Published, ...] = (
    _timm("vit_small_patch16_224.augreg_in1k", 78.842, **_AUGREG),
    _timm("vit_base_patch16_224.augreg_in1k", 79.154, **_AUGREG),
    _timm("vit_base_patch16_224.augreg_in21k_ft_in1k", 84.534, **_AUGREG),
)

BY_REPO: dict[str, Published] = {p.repo_id: p for p in (*DEFAULTS.values(), *OTHERS)}


class PublishedTop1(NamedTuple):
  top1: float  # fraction
  source: str


def hub_repo(spec: str) -> tuple[str, str | None, str | None] | None:
  """`hf-hub:OWNER/NAME[/FILE][@REVISION]` -> (repo_id, file or None, revision or None); None if
  `spec` does not start with `hf-hub:`. Raises UserError for a malformed name."""
  if not spec.startswith(HUB_PREFIX):
    return None
  name, at, revision = spec[len(HUB_PREFIX):].partition("@")
  parts = name.split("/")
  if len(parts) < 2 or not all(parts) or (at and not revision):
    raise UserError(f"{spec!r} is not a Hub checkpoint name: use hf-hub:OWNER/NAME, optionally "
                    "followed by /FILE and @REVISION, e.g. hf-hub:timm/deit_small_patch16_224.fb_in1k.")
  return "/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None


def models_with_weights() -> list[str]:
  """Registered models with a default published checkpoint."""
  return sorted(set(DEFAULTS) & set(list_models()))


def default_spec(model_name: str) -> str:
  """`hf-hub:REPO` of the default published checkpoint of `model_name`.

  Raises UserError when it has none, listing the models that have one."""
  if model_name not in models_with_weights():
    raise UserError(
        f"Model {model_name!r} has no published weights on the Hugging Face Hub. Models with "
        f"them: {', '.join(models_with_weights())}. For other weights pass a Hub name "
        "(pretrained='hf-hub:OWNER/NAME'), a PyTorch checkpoint file or a converted directory.")
  return HUB_PREFIX + DEFAULTS[model_name].repo_id


def published(spec: str) -> Published | None:
  """The table entry for a Hub checkpoint name (`hf-hub:timm/...`), or None if it has none."""
  repo = hub_repo(spec) if isinstance(spec, str) else None
  return BY_REPO.get(repo[0]) if repo else None


def published_top1(spec: str, *, model_name: str | None = None, img_size: int | None = None,
                   num_classes: int | None = None) -> PublishedTop1 | None:
  """(top-1 as a fraction, source) published for the checkpoint `spec`, or None when there is no
  published number to compare with: `spec` is not a published checkpoint, or it is loaded into
  another model (e.g. DeiT weights into DynamicViT), at another input size, or with another head.
  """
  entry = published(spec)
  if entry is None or (model_name is not None and model_name != entry.model):
    return None
  if (img_size is not None and img_size != entry.img_size) or (
      num_classes is not None and num_classes != entry.num_classes):
    return None
  return PublishedTop1(entry.top1, entry.source)
