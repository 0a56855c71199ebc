"""Augmentation settings, validated, without TensorFlow (the accelerator-side augmentation reads them
too): `TrainAugment` (the `aug_cfg` fields) and `RandAugmentConfig` (timm's RandAugment spec)."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from compact_vit.errors import UserError

# dataset.canvas_min_side: with dataset.on_accelerator, crops travel in canvases of side
# max(2 img_size, this); 640 holds ImageNet's usual photos (longer side 500) and most larger crops
# whole at 224 (`accelerator.canvas_size`).
CANVAS_MIN_SIDE = 640
# Names a record a damaged TFRecord file could not deliver: FILE + LOST_MARK + its count in that
# file (`sources.TfdsDataset.shard`; `pipeline.Batches` names the file once).
LOST_MARK = ' (truncated or corrupt file): lost record '
LEVEL_DENOM = 10.  # timm: magnitude M is an op's fraction M / 10 of its full strength.


def resolve_on_accelerator(value: Any) -> bool:
  """`dataset.on_accelerator`: True, False, or None (the default) for 'auto': True when JAX's default
  backend is a GPU or TPU (the step resamples and augments, the host only decodes and crops), False
  on the CPU (there the host's TF kernels are faster than the batched JAX ops)."""
  if value is None or value == 'auto':
    import jax  # pylint: disable=g-import-not-at-top
    return jax.default_backend() != 'cpu'
  if isinstance(value, bool):
    return value
  raise UserError(f'dataset.on_accelerator={value!r}: use True, False or None (auto: on for a GPU or '
                  'TPU backend, off on the CPU).')


_RA_HELP = "timm syntax, e.g. 'rand-m9-mstd0.5-inc1' (sections m, n, mstd, mmax, inc), or '' for off"


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
  """Parsed timm RandAugment spec, e.g. 'rand-m9-mstd0.5-inc1'."""
  magnitude: float = 10.
  num_layers: int = 2
  magnitude_std: float = 0.  # inf: magnitude ~ U(0, magnitude).
  magnitude_max: float = 10.
  increasing: bool = False

  @classmethod
  def parse(cls, spec: str) -> 'RandAugmentConfig':
    parts = spec.split('-')
    if parts[0] != 'rand':
      raise UserError(f'randaugment={spec!r} must start with "rand": {_RA_HELP}.')
    fields = {'m': 'magnitude', 'n': 'num_layers', 'mstd': 'magnitude_std', 'mmax': 'magnitude_max',
              'inc': 'increasing'}
    kwargs = {}
    for part in parts[1:]:
      match = re.fullmatch(r'([a-z]+)(\d+(?:\.\d+)?)', part)
      if not match or match[1] not in fields:
        raise UserError(f'randaugment={spec!r}: unsupported section {part!r}; use {_RA_HELP}.')
      key, value = fields[match[1]], float(match[2])
      if key == 'magnitude_std' and value > 100:  # timm: mstd > 100 means uniform sampling.
        value = math.inf
      kwargs[key] = int(value) if key == 'num_layers' else bool(value) if key == 'increasing' else value
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class TrainAugment:
  """The train augmentation settings (`aug_cfg`), validated."""
  random_resized_crop: bool = True  # Else a plain resize to img_size.
  scale: tuple[float, float] = (0.08, 1.0)  # Crop area range, fractions of the image.
  ratio: tuple[float, float] = (3 / 4, 4 / 3)  # Crop aspect (w / h) range, sampled log-uniformly.
  hflip: bool = True  # Horizontal flip with probability 1/2.
  randaugment: str = ''  # timm spec, e.g. 'rand-m9-mstd0.5-inc1'; '' is off.
  random_erasing: float = 0.  # Probability (DeiT: 0.25); 0 is off.
  color_jitter: float = 0.  # Strength; only used when randaugment is off, as in timm.

  @classmethod
  def from_config(cls, aug_cfg: Any) -> 'TrainAugment':
    """From an attribute object with (a subset of) these fields; None means no augmentation."""
    if aug_cfg is None:
      return cls(random_resized_crop=False, hflip=False)
    kwargs = {f.name: getattr(aug_cfg, f.name, f.default) for f in dataclasses.fields(cls)}
    kwargs['scale'] = tuple(float(s) for s in kwargs['scale'])
    kwargs['ratio'] = tuple(float(r) for r in kwargs['ratio'])
    kwargs['randaugment'] = kwargs['randaugment'] or ''
    aug = cls(**kwargs)
    if len(aug.scale) != 2 or not 0 < aug.scale[0] <= aug.scale[1] <= 1:
      raise UserError(f'aug.scale={aug.scale} must be (min, max) area fractions with 0 < min <= max <= 1.')
    if len(aug.ratio) != 2 or not 0 < aug.ratio[0] <= aug.ratio[1]:
      raise UserError(f'aug.ratio={aug.ratio} must be (min, max) aspect ratios with 0 < min <= max.')
    for name in ('random_erasing', 'color_jitter'):
      if not 0 <= getattr(aug, name) <= 1:
        raise UserError(f'aug.{name}={getattr(aug, name)} must be in [0, 1] (0 turns it off).')
    if aug.randaugment:
      RandAugmentConfig.parse(aug.randaugment)
    return aug
