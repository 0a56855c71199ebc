"""Train-time augmentations in TF ops, after timm: RandAugment, color jitter, random erasing.

Every random draw comes from `key`, a stateless seed (2,) int64, so each function is a pure function of
(image, key). Images are uint8 (H, W, 3) except in `random_erasing`, which works on normalised float32.

The PIL image ops (AutoContrast, Equalize, Posterize, Solarize, ImageEnhance Color/Contrast/
Brightness/Sharpness, ...) follow PIL's formulas, including its truncation to uint8 when blending.
Departure from timm: the geometric RandAugment ops (Rotate, ShearX/Y, TranslateX/YRel) sample
bilinearly and blend the fill colour into the edge pixels, where PIL (with timm's 'bicubic' setting)
samples bicubically with a hard edge.

Every op but `random_erasing` compiles with XLA (`tf.function(jit_compile=True)`): no data-dependent
shapes, histograms with a fixed bin count, and gathers instead of TF's image-transform op.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from compact_vit.data._tf import tf
from compact_vit.data.settings import LEVEL_DENOM, RandAugmentConfig  # pylint: disable=unused-import


def uniform(key: tf.Tensor, shape=(), minval=0., maxval=1.) -> tf.Tensor:
  """Stateless float32 U(minval, maxval) of `shape`."""
  return tf.random.stateless_uniform(shape, key, minval, maxval)


def randint(key: tf.Tensor, low: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
  """Uniform int32 in [low, high], both ends included (Python's random.randint)."""
  return tf.random.stateless_uniform([], key, low, high + 1, dtype=tf.int32)


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
  """Clips and truncates float → uint8, as PIL does when blending."""
  return tf.cast(tf.clip_by_value(x, 0., 255.), tf.uint8)


def _gray(image: tf.Tensor) -> tf.Tensor:
  """PIL convert('L'): ITU-R 601-2 luma, float (H, W, 1) of whole numbers."""
  x = tf.cast(image, tf.float32)
  return tf.round(tf.tensordot(x, tf.constant([0.299, 0.587, 0.114]), 1))[..., None]


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL Image.blend(degenerate, image, factor): factor 0 gives `degenerate`, 1 gives `image`."""
  d = tf.cast(degenerate, tf.float32)
  return _to_uint8(d + factor * (tf.cast(image, tf.float32) - d))


# PIL ImageOps / ImageEnhance equivalents on uint8 (H, W, 3).

def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """ImageOps.autocontrast: stretch each channel to 0..255 (channels with one value stay)."""
  x = tf.cast(image, tf.float64)  # PIL's arithmetic, so that truncation agrees.
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = 255. / tf.maximum(hi - lo, 1.)
  stretched = tf.cast(tf.clip_by_value(x * scale - lo * scale, 0., 255.), tf.uint8)
  return tf.where(hi > lo, stretched, image)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """ImageOps.equalize: per-channel histogram equalisation with PIL's lookup table."""
  x = tf.cast(image, tf.int32) + tf.constant([0, 256, 512])  # One histogram of 3 x 256 bins.
  hist = tf.reshape(tf.raw_ops.DenseBincount(input=tf.reshape(x, [-1]), size=768,
                                             weights=tf.constant([], tf.int32)), [3, 256])
  used = tf.cast(hist > 0, tf.int32) * tf.range(256)
  last = tf.gather(hist, tf.reduce_max(used, axis=1), batch_dims=1)  # count of the brightest used value
  step = (tf.reduce_sum(hist, axis=1) - last) // 255
  lut = (step[:, None] // 2 + tf.cumsum(hist, axis=1, exclusive=True)) // tf.maximum(step, 1)[:, None]
  lut = tf.where(step[:, None] > 0, tf.clip_by_value(lut, 0, 255), tf.range(256)[None])
  return tf.cast(tf.gather(tf.reshape(lut, [-1]), x), tf.uint8)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  """ImageOps.posterize: keep the `bits` (0..8) most significant bits."""
  mask = 256 - tf.bitwise.left_shift(1, 8 - tf.cast(bits, tf.int32))
  return tf.bitwise.bitwise_and(image, tf.cast(mask, tf.uint8))


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
  """ImageOps.solarize: invert values >= threshold."""
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image: tf.Tensor, add: tf.Tensor, threshold: int = 128) -> tf.Tensor:
  """timm solarize_add: values below threshold get `add` added (saturating)."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < threshold, tf.minimum(x + tf.cast(add, tf.int32), 255), x), tf.uint8)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """ImageEnhance.Color: 0 gives grayscale, 1 the image."""
  return _blend(tf.tile(_gray(image), [1, 1, 3]), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """ImageEnhance.Contrast: 0 gives a flat image at the mean gray level."""
  mean = tf.floor(tf.reduce_mean(_gray(image)) + 0.5)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """ImageEnhance.Brightness: 0 gives black."""
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """ImageEnhance.Sharpness: 0 gives PIL's SMOOTH filter (3x3, centre 5, /13; border pixels kept)."""
  x = tf.cast(image, tf.float32)
  h, w = tf.shape(x)[0], tf.shape(x)[1]
  # Sums of whole numbers are exact, so the order of the nine shifted sums does not matter.
  total = 4. * x[1:h - 1, 1:w - 1]
  for dy in range(3):
    for dx in range(3):
      total += x[dy:h - 2 + dy, dx:w - 2 + dx]
  inner = tf.pad(tf.round(total / 13.), [[1, 1], [1, 1], [0, 0]])
  border = tf.pad(tf.zeros_like(total, tf.bool), [[1, 1], [1, 1], [0, 0]], constant_values=True)
  return _blend(tf.where(border, x, inner), image, factor)


def _affine(image: tf.Tensor, matrix: Sequence[tf.Tensor], fill: Sequence[int]) -> tf.Tensor:
  """PIL Image.transform(AFFINE, matrix): output pixel (x, y) samples the input at
  (a x + b y + c, d x + e y + f) in PIL's continuous coordinates, bilinearly, as if the image were
  surrounded by `fill` (so edge pixels blend into it). Gathers only, so XLA compiles it."""
  matrix = tf.cast(tf.stack(matrix), tf.float32)
  # `+ 0 * sum(matrix)` hides the constant entries of translate and shear from XLA, whose gathers with
  # constant-folded indices ran 7x slower than generic ones here; XLA does not fold a float times 0
  # (it could be NaN) unless it knows the float is finite.
  a, b, c, d, e, f = tf.unstack(matrix + 0. * tf.reduce_sum(matrix))
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  fill = tf.constant(fill, tf.float32)
  # Two pixels of padding hold `fill` (zero after the shift by -fill); samples further out are
  # clamped onto it, so their four neighbours are all fill.
  pad = 2
  flat = tf.reshape(tf.pad(tf.cast(image, tf.float32) - fill, [[pad, pad], [pad, pad], [0, 0]]), [-1, 3])
  wp, hp = w + 2 * pad, h + 2 * pad
  cols = tf.range(tf.cast(w, tf.float32))[None, :]
  rows = tf.range(tf.cast(h, tf.float32))[:, None]
  # Pixel indices of the sample (PIL measures from pixel corners, indices from pixel centres).
  sx = a * cols + b * rows + (c + 0.5 * (a + b - 1.))
  sy = d * cols + e * rows + (f + 0.5 * (d + e - 1.))
  x0, y0 = tf.floor(sx), tf.floor(sy)
  fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
  ix = tf.clip_by_value(tf.cast(x0, tf.int32) + pad, 0, wp - 2)
  iy = tf.clip_by_value(tf.cast(y0, tf.int32) + pad, 0, hp - 2)
  corner = iy * wp + ix
  v00, v01, v10, v11 = tf.unstack(tf.gather(flat, tf.stack([corner, corner + 1, corner + wp,
                                                            corner + wp + 1])))
  out = ((1. - fx) * v00 + fx * v01) * (1. - fy) + ((1. - fx) * v10 + fx * v11) * fy + fill
  return tf.cast(tf.clip_by_value(tf.round(out), 0., 255.), tf.uint8)


def rotate(image: tf.Tensor, degrees: tf.Tensor, fill: Sequence[int]) -> tf.Tensor:
  """Image.rotate: counter-clockwise about the centre."""
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  t = degrees * (math.pi / 180.)
  cos, sin = tf.cos(t), tf.sin(t)
  cx, cy = w / 2., h / 2.
  return _affine(image, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy], fill)


def shear_x(image: tf.Tensor, factor: tf.Tensor, fill: Sequence[int]) -> tf.Tensor:
  return _affine(image, [1., factor, 0., 0., 1., 0.], fill)


def shear_y(image: tf.Tensor, factor: tf.Tensor, fill: Sequence[int]) -> tf.Tensor:
  return _affine(image, [1., 0., 0., factor, 1., 0.], fill)


def translate_x(image: tf.Tensor, pixels: tf.Tensor, fill: Sequence[int]) -> tf.Tensor:
  return _affine(image, [1., 0., pixels, 0., 1., 0.], fill)


def translate_y(image: tf.Tensor, pixels: tf.Tensor, fill: Sequence[int]) -> tf.Tensor:
  return _affine(image, [1., 0., 0., 0., 1., pixels], fill)


# RandAugment.

def _negate(value: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
  """timm _randomly_negate: flips the sign with probability 1/2."""
  return tf.where(uniform(key) > 0.5, -value, value)


def _trunc(x: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.floor(x), tf.int32)


Op = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]  # (image, magnitude, key) → image.


def _ops(increasing: bool, fill: Sequence[int]) -> list[Op]:
  """timm's _RAND_TRANSFORMS (or _RAND_INCREASING_TRANSFORMS) with their magnitude→argument maps."""
  def level(m):
    return m / LEVEL_DENOM

  if increasing:
    enhance = lambda m, k: tf.maximum(0.1, 1. + _negate(level(m) * 0.9, k))
    bits = lambda m: 4 - _trunc(level(m) * 4.)
    threshold = lambda m: 256 - _trunc(level(m) * 256.)
  else:
    enhance = lambda m, k: level(m) * 1.8 + 0.1
    bits = lambda m: _trunc(level(m) * 4.)
    threshold = lambda m: _trunc(level(m) * 256.)

  def width(img):
    return tf.cast(tf.shape(img)[1], tf.float32)

  def height(img):
    return tf.cast(tf.shape(img)[0], tf.float32)

  return [
      lambda img, m, k: auto_contrast(img),
      lambda img, m, k: equalize(img),
      lambda img, m, k: invert(img),
      lambda img, m, k: rotate(img, _negate(level(m) * 30., k), fill),
      lambda img, m, k: posterize(img, bits(m)),
      lambda img, m, k: solarize(img, threshold(m)),
      lambda img, m, k: solarize_add(img, _trunc(level(m) * 110.)),
      lambda img, m, k: color(img, enhance(m, k)),
      lambda img, m, k: contrast(img, enhance(m, k)),
      lambda img, m, k: brightness(img, enhance(m, k)),
      lambda img, m, k: sharpness(img, enhance(m, k)),
      lambda img, m, k: shear_x(img, _negate(level(m) * 0.3, k), fill),
      lambda img, m, k: shear_y(img, _negate(level(m) * 0.3, k), fill),
      lambda img, m, k: translate_x(img, _negate(level(m) * 0.45, k) * width(img), fill),
      lambda img, m, k: translate_y(img, _negate(level(m) * 0.45, k) * height(img), fill),
  ]


def randaugment(image: tf.Tensor, key: tf.Tensor, config: RandAugmentConfig,
                fill: Sequence[int]) -> tf.Tensor:
  """timm RandAugment on uint8 (H, W, 3): `num_layers` ops drawn with replacement from the 15, each
  applied with probability 1/2 at magnitude ~ N(m, mstd) clipped to [0, mmax]; `fill` is the RGB
  fill of the geometric ops (timm: round(255 * mean))."""
  ops = _ops(config.increasing, fill)
  for layer_key in tf.unstack(tf.random.experimental.stateless_split(key, config.num_layers)):
    k_op, k_apply, k_mag, k_arg = tf.unstack(tf.random.experimental.stateless_split(layer_key, 4))
    magnitude = tf.constant(config.magnitude, tf.float32)
    if math.isinf(config.magnitude_std):
      magnitude = uniform(k_mag, maxval=config.magnitude)
    elif config.magnitude_std > 0:
      magnitude += config.magnitude_std * tf.random.stateless_normal([], k_mag)
    magnitude = tf.clip_by_value(magnitude, 0., config.magnitude_max or LEVEL_DENOM)
    index = tf.random.stateless_uniform([], k_op, 0, len(ops), dtype=tf.int32)
    branches = [lambda op=op, img=image, m=magnitude, k=k_arg: op(img, m, k) for op in ops]
    image = tf.cond(uniform(k_apply) <= 0.5, lambda b=branches: tf.switch_case(index, b),
                    lambda img=image: img)
  return image


def color_jitter(image: tf.Tensor, key: tf.Tensor, strength: float) -> tf.Tensor:
  """torchvision ColorJitter(brightness=s, contrast=s, saturation=s) as timm uses it: each factor
  ~ U(max(0, 1 - s), 1 + s), the three applied in random order."""
  k_order, *k_factors = tf.unstack(tf.random.experimental.stateless_split(key, 4))
  factors = [uniform(k, minval=max(0., 1. - strength), maxval=1. + strength) for k in k_factors]
  order = tf.argsort(uniform(k_order, [3]))
  fns = [brightness, contrast, color]
  for i in range(3):
    image = tf.switch_case(order[i], [lambda f=f, x=factors[j], img=image: f(img, x)
                                      for j, f in enumerate(fns)])
  return image


def random_erasing(x: tf.Tensor, key: tf.Tensor, prob: float, *, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3) -> tf.Tensor:
  """timm RandomErasing(mode='pixel', max_count=1) on normalised float32 (H, W, C) of static shape:
  with probability `prob`, one rectangle (area fraction U(min_area, max_area), log aspect
  U(log min_aspect, -log min_aspect), first of 10 tries that fits) becomes N(0, 1) noise."""
  h, w, c = x.shape
  k_apply, k_area, k_aspect, k_top, k_left, k_noise = tf.unstack(
      tf.random.experimental.stateless_split(key, 6))
  area = uniform(k_area, [10], min_area, max_area) * (h * w)
  aspect = tf.exp(uniform(k_aspect, [10], math.log(min_aspect), -math.log(min_aspect)))
  eh = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  ew = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (ew < w) & (eh < h)
  first = tf.argmax(tf.cast(fits, tf.int32))
  eh, ew = tf.gather(eh, first), tf.gather(ew, first)  # Not eh[first]: XLA would recompile per value.
  erase = (uniform(k_apply) < prob) & tf.reduce_any(fits)
  top = randint(k_top, 0, h - eh)
  left = randint(k_left, 0, w - ew)

  def erased():
    # Noise for the rectangle only, padded into place (outside XLA, whose random numbers on CPU
    # came out 30x slower than TF's).
    noise = tf.random.stateless_normal([eh, ew, c], k_noise)
    placed = tf.pad(noise, [[top, h - top - eh], [left, w - left - ew], [0, 0]])
    inside = tf.pad(tf.ones([eh, ew, 1], tf.bool), [[top, h - top - eh], [left, w - left - ew], [0, 0]])
    return tf.where(inside, placed, x)

  return tf.cond(erase, erased, lambda: x)  # The noise is only drawn for erased images.
