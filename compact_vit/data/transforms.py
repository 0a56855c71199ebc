"""Per-example image transforms in TF ops, with timm's conventions.

Train (timm `transforms_imagenet_train`): random-resized crop to img_size (bicubic), or a plain
resize when that is off → horizontal flip → RandAugment, or color jitter when RandAugment is off (as
in timm) → normalise → random erasing.
Eval (timm `transforms_imagenet_eval`): resize the shorter side to floor(img_size / crop_pct)
(bicubic, antialiased) → center crop img_size → normalise; or, with resize 'squash' (UniNet's
evaluation from 320 px on, torchvision `Resize((size, size))`), resize the whole image to
img_size x img_size, aspect ratio not kept, without a crop → normalise.

Inputs are encoded image bytes (decoded here; JPEGs with the crop fused into decoding, and with the
accurate DCT as PIL) or already decoded uint8 (H, W, 3). Images stay uint8 until normalisation and are
rounded back to uint8 after resampling, as with PIL. All randomness comes from `key`, a stateless seed
(2,) int64, so a train example is a pure function of (image, key).

Speed (see benchmarks/input_pipeline.py): JPEGs decode only the pixels the crop needs (train: the
random crop; eval: the centre window plus the resampling kernel's reach, resampled straight to the
output window); everything after resampling that has a static shape (rounding, flip, RandAugment,
colour jitter, normalisation) runs as one XLA-compiled function per example, which fuses the pixel
loops TF would run op by op (`_finish_train`). Random erasing stays outside XLA, whose random
numbers on CPU are slow, and draws noise for the erased rectangle only. Resampling (TF's
ScaleAndTranslate on the decoded crop, whose size varies) is now the largest cost after decoding.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

from compact_vit.data import augment
from compact_vit.data._tf import plain, tf
from compact_vit.data.settings import RandAugmentConfig, TrainAugment  # pylint: disable=unused-import  (re-exported)


def guarded(fn: Callable[..., Any], fallback: Any) -> Callable[..., tuple[Any, tf.Tensor]]:
  """fn wrapped for use inside a tf.data map: returns (fn(*args), True), or (fallback, False) when fn
  raises (an image that does not decode, a file that cannot be read). The call runs as a one-element
  dataset whose errors are dropped, so no second pass over the bytes is needed; `fallback` must have
  fn's structure and dtypes."""
  ok_fallback = (fallback, tf.constant(False))

  def call(*args):
    attempt = tf.data.Dataset.from_tensors(args).map(plain(lambda *a: (fn(*a), tf.constant(True))))
    return attempt.ignore_errors().concatenate(
        tf.data.Dataset.from_tensors(ok_fallback)).take(1).get_single_element()

  return call


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


def resize_float(image: tf.Tensor, size: Sequence[Any], scale: Any = None,
                 translation: Any = None) -> tf.Tensor:
  """Bicubic (Keys, a = -0.5), antialiased resampling of (H, W, C) to float32 `size` (h, w), unrounded.
  Output pixel (i, j) samples the input at ((i + 0.5 - translation) / scale) - 0.5 (pixel centres);
  scale defaults to size / (H, W) and translation to 0: a plain resize, as tf.image.resize."""
  if scale is None:
    scale = tf.cast(tf.stack(size), tf.float32) / tf.cast(tf.shape(image)[:2], tf.float32)
  if translation is None:
    translation = tf.zeros([2], tf.float32)
  return tf.raw_ops.ScaleAndTranslate(images=image[None], size=tf.stack(size), scale=scale,
                                      translation=translation, kernel_type='keyscubic',
                                      antialias=True)[0]


def round_to_uint8(x: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(x), 0., 255.), tf.uint8)


def resize(image: tf.Tensor, size: Sequence[Any]) -> tf.Tensor:
  """Bicubic, antialiased resize of uint8 (H, W, 3) to `size` (h, w), rounded back to uint8."""
  return round_to_uint8(resize_float(image, size))


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """uint8 → float32 (x / 255 - mean) / std."""
  scale = [1. / (255. * s) for s in std]
  offset = [-m / s for m, s in zip(mean, std)]
  return tf.cast(image, tf.float32) * tf.constant(scale, tf.float32) + tf.constant(offset, tf.float32)


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


@functools.lru_cache(maxsize=None)
def _finish_train(aug: TrainAugment, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]):
  """XLA-compiled: resized float32 (img_size, img_size, 3) and the keys of flip and colour → rounded to
  uint8, flipped, RandAugment / colour jitter, normalised. One compilation per setting; XLA fuses the
  pixel loops that TF would run op by op."""
  fill = [min(255, round(255 * m)) for m in mean]
  ra_config = RandAugmentConfig.parse(aug.randaugment) if aug.randaugment else None

  @tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
  def finish(resized, k_flip, k_color):
    image = round_to_uint8(resized)
    if aug.hflip:
      image = tf.cond(augment.uniform(k_flip) < 0.5, lambda: tf.reverse(image, [1]), lambda: image)
    if ra_config is not None:
      image = augment.randaugment(image, k_color, ra_config, fill)
    elif aug.color_jitter > 0:
      image = augment.color_jitter(image, k_color, aug.color_jitter)
    return normalize(image, mean, std)

  return finish


@functools.lru_cache(maxsize=None)
def _finish_eval(mean: tuple[float, ...], std: tuple[float, ...]):
  """XLA-compiled: resized float32 → rounded to uint8 → normalised."""
  return tf.function(lambda resized: normalize(round_to_uint8(resized), mean, std), jit_compile=True,
                     reduce_retracing=True, autograph=False)


def train_transform(data: tf.Tensor, key: tf.Tensor, aug: TrainAugment, *, img_size: int,
                    mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """Encoded bytes or uint8 (H, W, 3) → augmented, normalised float32 (img_size, img_size, 3)."""
  return train_finish(train_crop(data, key, aug), key, aug, img_size=img_size, mean=mean, std=std)


def train_crop(data: tf.Tensor, key: tf.Tensor, aug: TrainAugment) -> tf.Tensor:
  """The decoding part of `train_transform` (the only part bad data can fail): the decoded random
  resized crop (or whole image), uint8."""
  k_crop = tf.random.experimental.stateless_split(key, 4)[0]
  if aug.random_resized_crop:
    return decode_and_crop(data, lambda s: random_resized_crop_box(s, k_crop, aug.scale, aug.ratio))
  return decode(data)


def train_finish(image: tf.Tensor, key: tf.Tensor, aug: TrainAugment, *, img_size: int,
                 mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """The rest of `train_transform`, from the decoded crop."""
  _, k_flip, k_color, k_erase = tf.unstack(tf.random.experimental.stateless_split(key, 4))
  resized = tf.ensure_shape(resize_float(image, [img_size, img_size]), [img_size, img_size, 3])
  finish = _finish_train(aug, img_size, tuple(mean), tuple(std))
  x = tf.ensure_shape(finish(resized, k_flip, k_color), [img_size, img_size, 3])
  if aug.random_erasing > 0:  # Outside XLA: see augment.random_erasing.
    x = augment.random_erasing(x, k_erase, aug.random_erasing)
  return x


EVAL_RESIZES = ('shorter', 'squash')


def eval_window(shape: tf.Tensor, img_size: int, crop_pct: float, resize: str = 'shorter'):
  """Where the eval transform reads: (box [top, left, height, width] of the input, scale (2,),
  translation (2,)) such that resampling the box with that scale and translation gives the centre
  img_size crop of the image resized to a shorter side of floor(img_size / crop_pct), the box being
  every input pixel the bicubic kernel reaches plus a 2-pixel margin. With resize 'squash': the
  whole image, scaled to img_size x img_size (crop_pct unused)."""
  hw = tf.cast(shape[:2], tf.float64)
  if resize == 'squash':
    box = tf.concat([tf.zeros([2], tf.int32), tf.cast(shape[:2], tf.int32)], 0)
    return box, tf.cast(img_size / hw, tf.float32), tf.zeros([2], tf.float32)
  scale_size = math.floor(img_size / crop_pct)
  # torchvision Resize(int): the shorter side becomes scale_size, the longer int(scale_size * long / short).
  long_side = tf.floor(scale_size * tf.reduce_max(hw) / tf.reduce_min(hw))
  new_hw = tf.where(hw[0] <= hw[1], tf.stack([float(scale_size), long_side]),
                    tf.stack([long_side, float(scale_size)]))
  offset = tf.round((new_hw - img_size) / 2.)  # The centre crop, in resized pixels.
  scale = new_hw / hw
  radius = 2. / tf.minimum(scale, 1.)  # The antialiased kernel widens when downscaling.
  first = (offset + 0.5) / scale - 0.5
  last = (offset + img_size - 0.5) / scale - 0.5
  start = tf.maximum(tf.floor(first - radius) - 2., tf.zeros_like(first))
  end = tf.minimum(hw, tf.math.ceil(last + radius) + 3.)
  box = tf.cast(tf.concat([start, end - start], 0), tf.int32)
  translation = -offset + start * scale  # In the box's coordinates.
  return box, tf.cast(scale, tf.float32), tf.cast(translation, tf.float32)


def _in_eval_window(data: tf.Tensor, img_size: int, crop_pct: float, fn: Callable[..., Any],
                    resize: str = 'shorter') -> Any:
  """fn(decoded centre window of `data`, scale, translation) (see `eval_window`); JPEGs decode only
  the window."""
  def window(image, shape, crop_to_box):
    box, scale, translation = eval_window(shape, img_size, crop_pct, resize)
    return fn(crop_to_box(image, box), scale, translation)

  def crop(image, box):
    return image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]

  def jpeg():
    return window(data, tf.image.extract_jpeg_shape(data), lambda d, box: tf.image.decode_and_crop_jpeg(
        d, box, channels=3, dct_method='INTEGER_ACCURATE'))

  def other():
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return window(image, tf.shape(image), crop)

  if data.dtype == tf.uint8:
    return window(data, tf.shape(data), crop)
  return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def eval_transform(data: tf.Tensor, *, img_size: int, crop_pct: float, mean: Sequence[float],
                   std: Sequence[float], resize: str = 'shorter') -> tf.Tensor:
  """Encoded bytes or uint8 (H, W, 3) → resized, center-cropped (or squashed: `eval_window`),
  normalised float32 (img_size, img_size, 3). Only the centre window is decoded (JPEG) and
  resampled."""
  return eval_finish(*eval_crop(data, img_size=img_size, crop_pct=crop_pct, resize=resize),
                     img_size=img_size, mean=mean, std=std)


def eval_crop(data: tf.Tensor, *, img_size: int, crop_pct: float,
              resize: str = 'shorter') -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """The decoding part of `eval_transform` (the only part bad data can fail): (the decoded window,
  scale, translation), see `eval_window`."""
  return _in_eval_window(data, img_size, crop_pct, lambda *window: window, resize)


def eval_finish(window: tf.Tensor, scale: tf.Tensor, translation: tf.Tensor, *, img_size: int,
                mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """The rest of `eval_transform`, from `eval_crop`'s output."""
  resized = tf.ensure_shape(resize_float(window, [img_size, img_size], scale, translation),
                            [img_size, img_size, 3])
  return tf.ensure_shape(_finish_eval(tuple(mean), tuple(std))(resized), [img_size, img_size, 3])


# With the resampling and augmentation on the accelerator (`accelerator.py`), the host only decodes
# and crops: examples for `accelerator.train_batch` / `accelerator.eval_batch`.

def _for_accelerator(image: tf.Tensor, img_size: int, canvas: int, scale: Any = None,
                     translation: Any = None) -> dict[str, tf.Tensor]:
  """A decoded crop as it travels to the accelerator: as it is when it fits the canvas, else
  resampled here to img_size (scale 1 then resamples it to itself)."""
  hw = tf.shape(image)[:2]
  if scale is None:
    scale = tf.cast(img_size, tf.float32) / tf.cast(hw, tf.float32)
  if translation is None:
    translation = tf.zeros([2], tf.float32)
  fits = tf.reduce_all(hw <= canvas)
  image, scale, translation = tf.cond(
      fits, lambda: (image, scale, translation),
      lambda: (round_to_uint8(resize_float(image, [img_size, img_size], scale, translation)),
               tf.ones([2], tf.float32), tf.zeros([2], tf.float32)))
  return {'image': image, 'size': tf.shape(image)[:2], 'scale': scale, 'translation': translation}


def train_example_for_accelerator(data: tf.Tensor, key: tf.Tensor, aug: TrainAugment, *,
                                  img_size: int, canvas: int) -> dict[str, tf.Tensor]:
  """The host's part of `train_transform` (decode, random resized crop) with the key the
  accelerator draws flip, RandAugment and erasing from ('aug_key', uint32 (2,))."""
  return accelerator_train_example(train_crop(data, key, aug), key, img_size=img_size, canvas=canvas)


def accelerator_train_example(image: tf.Tensor, key: tf.Tensor, *, img_size: int,
                              canvas: int) -> dict[str, tf.Tensor]:
  """`train_example_for_accelerator` from the decoded crop (`train_crop`)."""
  k_color = tf.random.experimental.stateless_split(key, 4)[2]
  example = _for_accelerator(image, img_size, canvas)
  example['aug_key'] = tf.random.stateless_uniform([2], k_color, None, None, tf.uint32)
  return example


def eval_example_for_accelerator(data: tf.Tensor, *, img_size: int, crop_pct: float, canvas: int,
                                 resize: str = 'shorter') -> dict[str, tf.Tensor]:
  """The host's part of `eval_transform`: the decoded centre window and its resampling."""
  return accelerator_eval_example(*eval_crop(data, img_size=img_size, crop_pct=crop_pct,
                                             resize=resize), img_size=img_size, canvas=canvas)


def accelerator_eval_example(window: tf.Tensor, scale: tf.Tensor, translation: tf.Tensor, *,
                             img_size: int, canvas: int) -> dict[str, tf.Tensor]:
  """`eval_example_for_accelerator` from `eval_crop`'s output."""
  return _for_accelerator(window, img_size, canvas, scale, translation)
