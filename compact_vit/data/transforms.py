"""Per-example image transforms in TF ops, with timm's conventions.

Train (timm `transforms_imagenet_train`): random-resized crop to img_size (bicubic), or a plain
resize when that is off → horizontal flip → RandAugment, or color jitter when RandAugment is off (as
in timm) → normalise → random erasing.
Eval (timm `transforms_imagenet_eval`): resize the shorter side to floor(img_size / crop_pct)
(bicubic, antialiased) → center crop img_size → normalise.

Inputs are encoded image bytes (decoded here; JPEGs with the crop fused into decoding, and with the
accurate DCT as PIL) or already decoded uint8 (H, W, 3). Images stay uint8 until normalisation and are
rounded back to uint8 after resampling, as with PIL. All randomness comes from `key`, a stateless seed
(2,) int64, so a train example is a pure function of (image, key).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

from compact_vit.data import augment
from compact_vit.data._tf import tf
from compact_vit.errors import UserError


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
      augment.RandAugmentConfig.parse(aug.randaugment)
    return aug


def decode(data: tf.Tensor) -> tf.Tensor:
  """Encoded image (JPEG, PNG, GIF, BMP) → uint8 (H, W, 3); a uint8 image passes through."""
  if data.dtype == tf.uint8:
    return data
  return tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE'),
      lambda: tf.io.decode_image(data, channels=3, expand_animations=False))


def decode_and_crop(data: tf.Tensor, box_fn: Callable[[tf.Tensor], Sequence[tf.Tensor]]) -> tf.Tensor:
  """Decodes and crops to box_fn(shape) = (top, left, height, width); JPEGs decode only the crop."""
  def crop(image):
    top, left, h, w = box_fn(tf.shape(image))
    return image[top:top + h, left:left + w]

  if data.dtype == tf.uint8:
    return crop(data)

  def jpeg():
    box = tf.stack(box_fn(tf.image.extract_jpeg_shape(data)))
    return tf.image.decode_and_crop_jpeg(data, box, channels=3, dct_method='INTEGER_ACCURATE')

  return tf.cond(tf.io.is_jpeg(data), jpeg,
                 lambda: crop(tf.io.decode_image(data, channels=3, expand_animations=False)))


def resize(image: tf.Tensor, size: Sequence[Any]) -> tf.Tensor:
  """Bicubic, antialiased resize of uint8 (H, W, 3) to `size` (h, w), rounded back to uint8."""
  out = tf.image.resize(image, size, method='bicubic', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(out), 0., 255.), tf.uint8)


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """uint8 → float32 (x / 255 - mean) / std."""
  return (tf.cast(image, tf.float32) / 255. - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def random_resized_crop_box(shape: tf.Tensor, key: tf.Tensor, scale: Sequence[float],
                            ratio: Sequence[float]) -> list[tf.Tensor]:
  """timm RandomResizedCrop.get_params for an image of `shape` (H, W, ...): the first of 10 tries of
  area ~ U(scale) * H * W and log aspect ~ U(log ratio) that fits, else the center crop with the
  aspect clamped into `ratio`. Returns int32 [top, left, height, width]."""
  h = tf.cast(shape[0], tf.float32)
  w = tf.cast(shape[1], tf.float32)
  k_area, k_ratio, k_top, k_left = tf.unstack(tf.random.experimental.stateless_split(key, 4))
  area = tf.random.stateless_uniform([10], k_area, scale[0], scale[1]) * h * w
  aspect = tf.exp(tf.random.stateless_uniform([10], k_ratio, math.log(ratio[0]), math.log(ratio[1])))
  cw = tf.round(tf.sqrt(area * aspect))
  ch = tf.round(tf.sqrt(area / aspect))
  fits = (cw <= w) & (ch <= h) & (cw >= 1) & (ch >= 1)
  first = tf.argmax(tf.cast(fits, tf.int32))
  found = tf.reduce_any(fits)
  in_ratio = w / h
  fallback_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
  fallback_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  ch = tf.cast(tf.where(found, ch[first], fallback_h), tf.int32)
  cw = tf.cast(tf.where(found, cw[first], fallback_w), tf.int32)
  h, w = tf.cast(h, tf.int32), tf.cast(w, tf.int32)
  top = tf.where(found, augment.randint(k_top, 0, h - ch), (h - ch) // 2)
  left = tf.where(found, augment.randint(k_left, 0, w - cw), (w - cw) // 2)
  return [top, left, ch, cw]


def train_transform(data: tf.Tensor, key: tf.Tensor, aug: TrainAugment, *, img_size: int,
                    mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """Encoded bytes or uint8 (H, W, 3) → augmented, normalised float32 (img_size, img_size, 3)."""
  k_crop, k_flip, k_color, k_erase = tf.unstack(tf.random.experimental.stateless_split(key, 4))
  if aug.random_resized_crop:
    image = decode_and_crop(data, lambda s: random_resized_crop_box(s, k_crop, aug.scale, aug.ratio))
  else:
    image = decode(data)
  image = resize(image, [img_size, img_size])
  if aug.hflip:
    image = tf.cond(augment.uniform(k_flip) < 0.5, lambda: image[:, ::-1], lambda: image)
  if aug.randaugment:
    fill = [min(255, round(255 * m)) for m in mean]
    image = augment.randaugment(image, k_color, augment.RandAugmentConfig.parse(aug.randaugment), fill)
  elif aug.color_jitter > 0:
    image = augment.color_jitter(image, k_color, aug.color_jitter)
  x = tf.ensure_shape(normalize(image, mean, std), [img_size, img_size, 3])
  if aug.random_erasing > 0:
    x = augment.random_erasing(x, k_erase, aug.random_erasing)
  return x


def eval_transform(data: tf.Tensor, *, img_size: int, crop_pct: float, mean: Sequence[float],
                   std: Sequence[float]) -> tf.Tensor:
  """Encoded bytes or uint8 (H, W, 3) → resized, center-cropped, normalised float32
  (img_size, img_size, 3)."""
  image = decode(data)
  scale_size = math.floor(img_size / crop_pct)
  h = tf.shape(image)[0]
  w = tf.shape(image)[1]
  # torchvision Resize(int): the shorter side becomes scale_size, the longer int(scale_size * long / short).
  long_side = tf.cast(scale_size * tf.cast(tf.maximum(h, w), tf.float64) /
                      tf.cast(tf.minimum(h, w), tf.float64), tf.int32)
  new_h = tf.where(h <= w, scale_size, long_side)
  new_w = tf.where(h <= w, long_side, scale_size)
  image = resize(image, [new_h, new_w])
  top = tf.cast(tf.round(tf.cast(new_h - img_size, tf.float32) / 2.), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - img_size, tf.float32) / 2.), tf.int32)
  image = image[top:top + img_size, left:left + img_size]
  return tf.ensure_shape(normalize(image, mean, std), [img_size, img_size, 3])
