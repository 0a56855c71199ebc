"""The second half of the input pipeline, in JAX, for the jitted train / eval step: resampling to
img_size, flip, RandAugment or colour jitter, normalisation and random erasing of a whole batch.

With `dataset.on_accelerator=True` the host only decodes (JPEGs: only the crop window) and crops;
each example arrives zero-padded in a square canvas (`canvas_size`: 2 img_size, at least 640) with its size, the
scale and translation of its resampling and a random key. (Crops larger than the canvas are
resampled on the host, and arrive at img_size with scale 1, which resamples to themselves.) Then,
inside the step:

  images = accelerator.train_batch(batch, settings.TrainAugment.from_config(config.aug),
                                   img_size=config.img_size, mean=mean, std=std)
  images = accelerator.eval_batch(batch, img_size=config.img_size, mean=mean, std=std)

Both are pure functions of the batch (its keys come from the host pipeline, keyed by (seed, step,
slice) as before), so resumed runs stay exact. The operations are those of `transforms` / `augment`
(timm's conventions, PIL's formulas), written for a batch: every example draws its own op and
magnitude, and each RandAugment layer costs four passes over the batch whatever the draws (one
lookup table for the eight pointwise ops, colour, sharpness, and one bilinear warp for the five
geometric ops), selected per example. Resampling is the separable bicubic (Keys, a = -0.5),
antialiased kernel of TF's ScaleAndTranslate as two batched matmuls against the bands of
per-example weight matrices (float32, full precision).

Departures, besides those of `augment` (bilinear geometric ops): AutoContrast's lookup table is
computed in float32 where PIL uses float64, so a value whose exact result is a whole number may come
out one level lower (tested: at most one level); the random numbers are JAX's, so a batch differs
from what the host path would draw for the same keys (the same distributions).

Imports neither TensorFlow nor the models.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from compact_vit.data.settings import CANVAS_MIN_SIDE, LEVEL_DENOM, RandAugmentConfig, TrainAugment

HIGHEST = jax.lax.Precision.HIGHEST
NUM_OPS = 15  # timm's RandAugment ops, in `augment._ops` order.
_LUT_OPS = (0, 1, 2, 4, 5, 6, 8, 9)  # autocontrast, equalize, invert, posterize, solarize,
# solarize_add, contrast, brightness: per-channel lookup tables.
_COLOR, _SHARPNESS, _ROTATE, _GEOMETRIC = 7, 10, 3, (3, 11, 12, 13, 14)
_BAND_OUTPUTS = 16  # Outputs per window of the banded resampling (`_band`).


def canvas_size(img_size: int, min_side: int = CANVAS_MIN_SIDE) -> int:
  """Side of the canvas the host sends when resampling runs on the accelerator: 2 img_size, and at
  least `min_side` (`dataset.canvas_min_side`, 640). Crops larger than the canvas are resampled on the
  host, ~3 ms each for a large photo's crop or window (one core). On benchmarks/input_pipeline.py's
  ImageNet-like JPEGs at 224, the crops larger than 448 / 512 / 640 pixels are 8.9% / 4.5% / 1.8% of
  random-resized crops (28% / 19% / 10% of their pixels, which set the host's time) and 17% / 7.0% /
  2.8% of eval windows. A canvas costs side² x 3 bytes per image to copy to the accelerator (1.2 MB at 640), and the banded
  resampling there grows with it (`resample`)."""
  return max(2 * img_size, int(min_side))


# ----------------------------------------------------------------------------- resampling

def _keys_cubic(x: jax.Array) -> jax.Array:
  """Keys' cubic convolution kernel, a = -0.5 (TF's 'keyscubic', PIL's bicubic)."""
  x = jnp.abs(x)
  near = ((1.5 * x - 2.5) * x) * x + 1.
  far = ((-0.5 * x + 2.5) * x - 4.) * x + 2.
  return jnp.where(x < 1., near, jnp.where(x < 2., far, 0.))


def resample_weights(out_size: int, in_size: jax.Array, scale: jax.Array, translation: jax.Array,
                     source: jax.Array) -> jax.Array:
  """Weights of TF's ScaleAndTranslate (antialiased) on input pixels `source`: output pixel i
  samples the input at (i + 0.5 - translation) / scale; the kernel widens by 1 / scale when
  downscaling; taps are clipped to the input's `in_size` pixels and renormalised. `in_size`, `scale`,
  `translation` (B,); `source` integer positions broadcasting against (B, out_size, S) → (B, out_size,
  S). With `source` = arange(canvas) the weights are the whole matrix; with a window that holds every
  tap of its outputs, the rows of the matrix restricted to it."""
  inv = 1. / scale[:, None, None]
  kernel_scale = jnp.maximum(inv, 1.)
  sample = (jnp.arange(out_size, dtype=jnp.float32)[None, :, None] + 0.5) * inv - translation[:, None, None] * inv
  source = source.astype(jnp.float32)
  n = in_size.astype(jnp.float32)[:, None, None]
  start = jnp.clip(jnp.ceil(sample - 2. * kernel_scale - 0.5), 0., n - 1.)
  end = jnp.clip(jnp.floor(sample + 2. * kernel_scale - 0.5), 0., n - 1.) + 1.
  inside = (source >= start) & (source < end) & (sample >= 0.) & (sample <= n)
  weights = jnp.where(inside, _keys_cubic((source + 0.5 - sample) / kernel_scale), 0.)
  total = weights.sum(-1, keepdims=True)
  return jnp.where(jnp.abs(total) > 0., weights / jnp.where(total == 0., 1., total), 0.)


def _band(out_size: int, canvas: int) -> tuple[int, int, int]:
  """(groups, outputs per group, window): each group of consecutive outputs reads one window of
  input pixels that holds all its taps, for any 1 / scale <= canvas / out_size (what the host sends:
  a crop or eval window that fits the canvas, resampled to out_size)."""
  per_group = min(_BAND_OUTPUTS, out_size)
  groups = -(-out_size // per_group)
  inv = max(canvas / out_size, 1.)
  window = min(canvas, math.ceil((per_group - 1) * inv + 4. * inv) + 2)
  return groups, per_group, window


def _band_weights(out_size: int, in_size: jax.Array, scale: jax.Array, translation: jax.Array,
                  canvas: int) -> tuple[jax.Array, jax.Array]:
  """Window starts (B, G) and weights (B, G, per_group, window) of `_band`'s groups."""
  groups, per_group, window = _band(out_size, canvas)
  inv = 1. / scale[:, None]
  first = (jnp.arange(groups, dtype=jnp.float32)[None] * per_group + 0.5) * inv - translation[:, None] * inv
  starts = jnp.ceil(first - 2. * jnp.maximum(inv, 1.) - 0.5)
  starts = jnp.clip(starts, 0, canvas - window).astype(jnp.int32)  # (B, G)
  source = (starts[..., None] + jnp.arange(window))  # (B, G, window)
  # Output i of group k reads window k: weights (B, G * per_group, window), then split per group.
  index = jnp.arange(groups * per_group) // per_group
  weights = resample_weights(groups * per_group, in_size, scale, translation, source[:, index])
  return starts, weights.reshape(-1, groups, per_group, window)


def _banded_pass(x: jax.Array, starts: jax.Array, weights: jax.Array, out_size: int) -> jax.Array:
  """Resamples axis 1 of x (B, N, M, 3) with `_band_weights` → float32 (B, out_size, M, 3)."""
  b, _, m, _ = x.shape
  _, groups, per_group, window = weights.shape
  take = jax.vmap(jax.vmap(lambda x, at: jax.lax.dynamic_slice_in_dim(x, at, window, 0), (None, 0)))
  windows = take(x, starts).astype(jnp.float32)  # (B, G, window, M, 3)
  out = jnp.einsum('bkil,bklmc->bkimc', weights, windows, precision=HIGHEST)
  return out.reshape(b, groups * per_group, m, 3)[:, :out_size]


def resample(canvas: jax.Array, size: jax.Array, scale: jax.Array, translation: jax.Array,
             img_size: int) -> jax.Array:
  """uint8 canvases (B, C, C, 3) holding (h, w) = size pixels → float32 (B, img_size, img_size, 3),
  unrounded; 1 / scale at most C / img_size (as the host pipeline sends). Separable, rows then
  columns, each a batched matmul against the band of the weight matrix that is not zero (`_band`):
  at 224 in a 512 canvas, 11x fewer FLOPs than the whole matrix."""
  c = canvas.shape[1]
  rows_at, wy = _band_weights(img_size, size[:, 0], scale[:, 0], translation[:, 0], c)
  cols_at, wx = _band_weights(img_size, size[:, 1], scale[:, 1], translation[:, 1], c)
  x = _banded_pass(canvas, rows_at, wy, img_size)  # (B, img_size, C, 3)
  x = _banded_pass(x.transpose(0, 2, 1, 3), cols_at, wx, img_size)  # (B, img_size (cols), img_size, 3)
  return x.transpose(0, 2, 1, 3)


def _round(x: jax.Array) -> jax.Array:
  """To whole numbers in 0..255, as the host rounds resampled images back to uint8."""
  return jnp.clip(jnp.round(x), 0., 255.)


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  scale = jnp.array([1. / (255. * s) for s in std], jnp.float32)
  offset = jnp.array([-m / s for m, s in zip(mean, std)], jnp.float32)
  return x * scale + offset


# ----------------------------------------------------------------------------- PIL's ops, batched
# Images are float32 (B, H, W, 3) holding whole numbers 0..255.

def _to_uint8_values(x: jax.Array) -> jax.Array:
  """PIL's clip and truncation to uint8, kept as float."""
  return jnp.floor(jnp.clip(x, 0., 255.))


def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL Image.blend(degenerate, image, factor), per example factor (B,)."""
  return _to_uint8_values(degenerate + factor[:, None, None, None] * (image - degenerate))


def _gray(x: jax.Array) -> jax.Array:
  """PIL convert('L'): (B, H, W, 1)."""
  return jnp.round(x @ jnp.array([0.299, 0.587, 0.114], jnp.float32))[..., None]


def _apply_lut(x: jax.Array, lut: jax.Array) -> jax.Array:
  """x (B, H, W, 3) whole numbers, lut (B, 3, 256) → lut[b, c, x]."""
  b = x.shape[0]
  index = x.astype(jnp.int32) + 256 * jnp.arange(3) + 768 * jnp.arange(b)[:, None, None, None]
  return lut.reshape(-1)[index]


def _equalize_lut(x: jax.Array) -> jax.Array:
  """ImageOps.equalize's table per example and channel: (B, 3, 256)."""
  b = x.shape[0]
  index = (x.astype(jnp.int32) + 256 * jnp.arange(3) + 768 * jnp.arange(b)[:, None, None, None])
  hist = jnp.zeros(b * 768, jnp.int32).at[index.reshape(-1)].add(1).reshape(b, 3, 256)
  used = jnp.where(hist > 0, jnp.arange(256), 0)
  last = jnp.take_along_axis(hist, used.max(-1, keepdims=True), -1)[..., 0]
  step = (hist.sum(-1) - last) // 255
  lut = (step[..., None] // 2 + jnp.cumsum(hist, -1) - hist) // jnp.maximum(step, 1)[..., None]
  return jnp.where(step[..., None] > 0, jnp.clip(lut, 0, 255), jnp.arange(256)).astype(jnp.float32)


def _autocontrast_lut(x: jax.Array) -> jax.Array:
  lo, hi = x.min((1, 2)), x.max((1, 2))  # (B, 3)
  scale = 255. / jnp.maximum(hi - lo, 1.)
  v = jnp.arange(256, dtype=jnp.float32)
  lut = jnp.floor(jnp.clip(v * scale[..., None] - (lo * scale)[..., None], 0., 255.))
  return jnp.where((hi > lo)[..., None], lut, v)


def _smooth(x: jax.Array) -> jax.Array:
  """PIL's SMOOTH filter (3x3, centre 5, / 13) with the border pixels kept."""
  h, w = x.shape[1:3]
  total = 4. * x[:, 1:h - 1, 1:w - 1]
  for dy in range(3):
    for dx in range(3):
      total = total + x[:, dy:h - 2 + dy, dx:w - 2 + dx]
  inner = jnp.round(total / 13.)
  return x.at[:, 1:h - 1, 1:w - 1].set(inner)


def _affine(x: jax.Array, matrix: jax.Array, fill: Sequence[int]) -> jax.Array:
  """PIL Image.transform(AFFINE) per example matrix (B, 6), bilinear, the image surrounded by
  `fill` (as `augment._affine`)."""
  b, h, w, _ = x.shape
  fill = jnp.array(fill, jnp.float32)
  pad = 2
  flat = jnp.pad(x - fill, ((0, 0), (pad, pad), (pad, pad), (0, 0))).reshape(b, -1, 3)
  wp, hp = w + 2 * pad, h + 2 * pad
  a, bb, c, d, e, f = [matrix[:, i, None, None] for i in range(6)]
  cols = jnp.arange(w, dtype=jnp.float32)[None, None, :]
  rows = jnp.arange(h, dtype=jnp.float32)[None, :, None]
  sx = a * cols + bb * rows + (c + 0.5 * (a + bb - 1.))
  sy = d * cols + e * rows + (f + 0.5 * (d + e - 1.))
  x0, y0 = jnp.floor(sx), jnp.floor(sy)
  fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
  ix = jnp.clip(x0.astype(jnp.int32) + pad, 0, wp - 2)
  iy = jnp.clip(y0.astype(jnp.int32) + pad, 0, hp - 2)
  corner = (iy * wp + ix).reshape(b, -1)

  def at(offset):
    return jnp.take_along_axis(flat, (corner + offset)[..., None], axis=1).reshape(b, h, w, 3)

  out = (((1. - fx) * at(0) + fx * at(1)) * (1. - fy) + ((1. - fx) * at(wp) + fx * at(wp + 1)) * fy
         + fill)
  return _round(out)


def _rotation(degrees: jax.Array, h: int, w: int) -> jax.Array:
  t = degrees * (math.pi / 180.)
  cos, sin = jnp.cos(t), jnp.sin(t)
  cx, cy = w / 2., h / 2.
  return jnp.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy], -1)


# ----------------------------------------------------------------------------- RandAugment

def _uniform(keys: jax.Array, minval=0., maxval=1.) -> jax.Array:
  return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, minval, maxval))(keys)


def _split(keys: jax.Array, num: int) -> list[jax.Array]:
  split = jax.vmap(lambda k: jax.random.split(k, num))(keys)
  return [split[:, i] for i in range(num)]


def randaugment(x: jax.Array, keys: jax.Array, config: RandAugmentConfig,
                fill: Sequence[int]) -> jax.Array:
  """timm RandAugment per example: `num_layers` ops drawn with replacement from the 15, each applied
  with probability 1/2 at magnitude ~ N(m, mstd) clipped to [0, mmax]."""
  for layer_keys in _split(keys, config.num_layers):
    k_op, k_apply, k_mag, k_sign = _split(layer_keys, 4)
    if math.isinf(config.magnitude_std):
      magnitude = _uniform(k_mag, 0., config.magnitude)
    else:
      magnitude = config.magnitude + config.magnitude_std * jax.vmap(
          lambda k: jax.random.normal(k, ()))(k_mag)
    level = jnp.clip(magnitude, 0., config.magnitude_max or LEVEL_DENOM) / LEVEL_DENOM
    op = jax.vmap(lambda k: jax.random.randint(k, (), 0, NUM_OPS))(k_op)
    op = jnp.where(_uniform(k_apply) <= 0.5, op, -1)  # -1: this layer does nothing.
    x = randaugment_layer(x, op, level, _uniform(k_sign) > 0.5, config.increasing, fill)
  return x


def randaugment_layer(x: jax.Array, op: jax.Array, level: jax.Array, negative: jax.Array,
                      increasing: bool, fill: Sequence[int]) -> jax.Array:
  """Op `op` (B,) (-1: none; `augment._ops` order) at `level` = magnitude / 10 (B,), the signed ops
  negated where `negative` (B,), on every example."""
  b, h, w, _ = x.shape
  v = jnp.arange(256, dtype=jnp.float32)
  signed = lambda value: jnp.where(negative, -value, value)
  if increasing:
    enhance = jnp.maximum(0.1, 1. + signed(level * 0.9))
    bits = 4 - jnp.floor(level * 4.)
    threshold = 256. - jnp.floor(level * 256.)
  else:
    enhance = level * 1.8 + 0.1
    bits = jnp.floor(level * 4.)
    threshold = jnp.floor(level * 256.)
  # Pointwise ops as one table per example and channel.
  col = lambda t: t[:, None, None]  # (B,) → (B, 1, 1) against (B, 3, 256)
  mask = 256. - 2. ** (8. - bits)
  mean_gray = jnp.floor(_gray(x).mean((1, 2, 3)) + 0.5)
  tables = {
      0: _autocontrast_lut(x),
      1: _equalize_lut(x),
      2: jnp.broadcast_to(255. - v, (b, 3, 256)),
      4: jnp.bitwise_and(v.astype(jnp.int32), col(mask).astype(jnp.int32)).astype(jnp.float32),
      5: jnp.where(v < col(threshold), v, 255. - v),
      6: jnp.where(v < 128., jnp.minimum(v + col(jnp.floor(level * 110.)), 255.), v),
      8: _to_uint8_values(col(mean_gray) + col(enhance) * (v - col(mean_gray))),
      9: _to_uint8_values(col(enhance) * v),
  }
  lut = jnp.broadcast_to(v, (b, 3, 256))
  for index, table in tables.items():
    lut = jnp.where(col(op == index), jnp.broadcast_to(table, (b, 3, 256)), lut)
  out = _apply_lut(x, lut)
  out = jnp.where((op == _COLOR)[:, None, None, None], _blend(_gray(x), x, enhance), out)
  out = jnp.where((op == _SHARPNESS)[:, None, None, None], _blend(_smooth(x), x, enhance), out)
  # Geometric ops as one warp per example (the identity for the others, whose warp is not used).
  shear, shift = signed(level * 0.3), signed(level * 0.45)
  zero, one = jnp.zeros_like(level), jnp.ones_like(level)
  matrices = {
      _ROTATE: _rotation(signed(level * 30.), h, w),
      11: jnp.stack([one, shear, zero, zero, one, zero], -1),
      12: jnp.stack([one, zero, zero, shear, one, zero], -1),
      13: jnp.stack([one, zero, shift * w, zero, one, zero], -1),
      14: jnp.stack([one, zero, zero, zero, one, shift * h], -1),
  }
  matrix = jnp.stack([one, zero, zero, zero, one, zero], -1)
  for index, m in matrices.items():
    matrix = jnp.where((op == index)[:, None], m, matrix)
  geometric = jnp.isin(op, jnp.array(_GEOMETRIC))
  return jnp.where(geometric[:, None, None, None], _affine(x, matrix, fill), out)


def color_jitter(x: jax.Array, keys: jax.Array, strength: float) -> jax.Array:
  """torchvision ColorJitter(brightness=s, contrast=s, saturation=s): factors U(max(0, 1 - s),
  1 + s), the three applied in a random order per example."""
  b = x.shape[0]
  k_order, *k_factors = _split(keys, 4)
  lo, hi = max(0., 1. - strength), 1. + strength
  factors = [_uniform(k, lo, hi) for k in k_factors]
  order = jax.vmap(lambda k: jax.random.permutation(k, 3))(k_order)
  v = jnp.arange(256, dtype=jnp.float32)
  for step in range(3):
    which = order[:, step][:, None, None, None]
    mean_gray = jnp.floor(_gray(x).mean((1, 2, 3)) + 0.5)[:, None, None]
    contrast_lut = _to_uint8_values(mean_gray + factors[1][:, None, None] * (v - mean_gray))
    brightness_lut = _to_uint8_values(factors[0][:, None, None] * v)
    x = jnp.where(which == 0, _apply_lut(x, jnp.broadcast_to(brightness_lut, (b, 3, 256))),
                  jnp.where(which == 1, _apply_lut(x, jnp.broadcast_to(contrast_lut, (b, 3, 256))),
                            _blend(_gray(x), x, factors[2])))
  return x


def random_erasing(x: jax.Array, keys: jax.Array, prob: float, *, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3) -> jax.Array:
  """timm RandomErasing(mode='pixel', max_count=1) per example on normalised float32 (B, H, W, C),
  as `augment.random_erasing`."""
  _, h, w, c = x.shape

  def one(key, image):
    k_apply, k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(key, 6)
    area = jax.random.uniform(k_area, (10,), minval=min_area, maxval=max_area) * (h * w)
    aspect = jnp.exp(jax.random.uniform(k_aspect, (10,), minval=math.log(min_aspect),
                                        maxval=-math.log(min_aspect)))
    eh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    ew = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (ew < w) & (eh < h)
    first = jnp.argmax(fits)
    eh, ew = eh[first], ew[first]
    erase = (jax.random.uniform(k_apply) < prob) & fits.any()
    top = jax.random.randint(k_top, (), 0, jnp.maximum(h - eh, 0) + 1)
    left = jax.random.randint(k_left, (), 0, jnp.maximum(w - ew, 0) + 1)
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew) & erase
    return jnp.where(inside[..., None], jax.random.normal(k_noise, (h, w, c)), image)

  return jax.vmap(one)(keys, x)


# ----------------------------------------------------------------------------- the steps' entry points

def _resampled(batch: Mapping[str, jax.Array], img_size: int) -> jax.Array:
  return _round(resample(batch['image'], batch['size'], batch['scale'], batch['translation'], img_size))


def train_batch(batch: Mapping[str, jax.Array], aug: TrainAugment, *, img_size: int,
                mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """A train batch of the host pipeline with `dataset.on_accelerator=True` ('image', 'size',
  'scale', 'translation', 'aug_key') → augmented, normalised float32 (B, img_size, img_size, 3)."""
  x = _resampled(batch, img_size)
  keys = jax.vmap(jax.random.wrap_key_data)(batch['aug_key'].astype(jnp.uint32))
  k_flip, k_color, k_erase = _split(keys, 3)
  if aug.hflip:
    x = jnp.where((_uniform(k_flip) < 0.5)[:, None, None, None], x[:, :, ::-1], x)
  if aug.randaugment:
    fill = [min(255, round(255 * m)) for m in mean]
    x = randaugment(x, k_color, RandAugmentConfig.parse(aug.randaugment), fill)
  elif aug.color_jitter > 0:
    x = color_jitter(x, k_color, aug.color_jitter)
  x = normalize(x, mean, std)
  if aug.random_erasing > 0:
    x = random_erasing(x, k_erase, aug.random_erasing)
  return x


def eval_batch(batch: Mapping[str, jax.Array], *, img_size: int, mean: Sequence[float],
               std: Sequence[float]) -> jax.Array:
  """An eval batch of the host pipeline with `dataset.on_accelerator=True` → normalised float32."""
  return normalize(_resampled(batch, img_size), mean, std)
