"""compact_vit.data.accelerator: the JAX half of the pipeline (dataset.on_accelerator=True) against
PIL op by op, against TF's resampling, and end to end against the all-host pipeline."""
import os
import subprocess
import sys

import torch  # pylint: disable=unused-import  # Before TensorFlow: the two in one process need this order.

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from compact_vit.data import accelerator, pipeline, settings

MEAN, STD = pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD
FILL = (124, 116, 104)


def test_imports_without_tensorflow():
  code = 'import sys, compact_vit.data.accelerator; assert "tensorflow" not in sys.modules'
  subprocess.run([sys.executable, '-c', code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def image_batch():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 24, 20, 3), dtype=np.uint8)
  images[:, :12] //= 3  # Uneven histograms for equalize / autocontrast.
  images[2, ..., 1] = 77  # A flat channel.
  return images


# timm's increasing RandAugment ops in `augment._ops` order, with the argument each takes at level L.
TIMM_OPS = [('AutoContrast', None), ('Equalize', None), ('Invert', None), ('Rotate', lambda l, s: s * l * 30),
            ('PosterizeIncreasing', lambda l, s: 4 - int(l * 4)),
            ('SolarizeIncreasing', lambda l, s: 256 - int(l * 256)), ('SolarizeAdd', lambda l, s: int(l * 110)),
            ('ColorIncreasing', lambda l, s: max(0.1, 1 + s * l * 0.9)),
            ('ContrastIncreasing', lambda l, s: max(0.1, 1 + s * l * 0.9)),
            ('BrightnessIncreasing', lambda l, s: max(0.1, 1 + s * l * 0.9)),
            ('SharpnessIncreasing', lambda l, s: max(0.1, 1 + s * l * 0.9)),
            ('ShearX', lambda l, s: s * l * 0.3), ('ShearY', lambda l, s: s * l * 0.3),
            ('TranslateXRel', lambda l, s: s * l * 0.45), ('TranslateYRel', lambda l, s: s * l * 0.45)]


@pytest.mark.parametrize('index', range(accelerator.NUM_OPS))
def test_randaugment_ops_match_timm(index):
  """Each RandAugment op of the batched layer, at m9 and m5, both signs, against timm's own op on PIL
  (bilinear for the geometric ops, our departure): equal, except AutoContrast (at most one level,
  see the module) and the warps (at most one level, away from the filled border)."""
  from timm.data import auto_augment  # pylint: disable=import-outside-toplevel
  name, arg = TIMM_OPS[index]
  images = image_batch()
  levels = [0.9, 0.9, 0.5]
  negative = [False, True, False]
  ours = np.asarray(accelerator.randaugment_layer(
      jnp.asarray(images, jnp.float32), jnp.full((3,), index), jnp.array(levels, jnp.float32),
      jnp.array(negative), True, FILL)).astype(int)
  for i, (image, level, neg) in enumerate(zip(images, levels, negative)):
    args = () if arg is None else (arg(level, -1 if neg else 1),)
    theirs = np.asarray(auto_augment.NAME_TO_OP[name](Image.fromarray(image), *args, fillcolor=FILL,
                                                       resample=Image.BILINEAR)).astype(int)
    diff = np.abs(ours[i] - theirs)
    if index in accelerator._GEOMETRIC:
      # Away from the filled border (PIL clamps edge samples where we blend in the fill colour):
      # pixels whose 3x3 neighbourhood samples inside the image.
      white = Image.fromarray(np.full_like(image, 255))
      inside = np.asarray(auto_augment.NAME_TO_OP[name](white, *args, fillcolor=(0, 0, 0),
                                                        resample=Image.NEAREST))[..., 0] == 255
      interior = np.zeros_like(inside)
      interior[1:-1, 1:-1] = np.all([inside[1 + dy:inside.shape[0] - 1 + dy, 1 + dx:inside.shape[1] - 1 + dx]
                                     for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
      interior = np.repeat(interior[..., None], 3, -1)
      assert interior.mean() > 0.3 and diff[interior].max() <= 1, (name, level, neg)
    elif name == 'AutoContrast':
      assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    else:
      assert diff.max() == 0, (name, level, neg)


def test_geometric_warp_matches_pil_bilinear():
  images = image_batch()
  x = jnp.asarray(images, jnp.float32)
  h, w = images.shape[1:3]
  matrices = [(1, 0.2, 0, 0, 1, 0), (1, 0, 0, 0.15, 1, 0), (1, 0, 3.4, 0, 1, 0)]
  ours = np.asarray(accelerator._affine(x, jnp.array(matrices, jnp.float32), FILL)).astype(int)
  for i, matrix in enumerate(matrices):
    theirs = np.asarray(Image.fromarray(images[i]).transform((w, h), Image.AFFINE, matrix, Image.BILINEAR,
                                                             fillcolor=FILL)).astype(int)
    assert np.abs(ours[i] - theirs)[:-5, :-6].max() <= 1, matrix  # Away from the filled border.
  rotation = accelerator._rotation(jnp.full((3,), 12.), h, w)
  ours = np.asarray(accelerator._affine(x, rotation, FILL)).astype(int)
  theirs = np.asarray(Image.fromarray(images[0]).rotate(12, Image.BILINEAR, fillcolor=FILL)).astype(int)
  assert np.abs(ours[0] - theirs)[6:-6, 6:-6].max() <= 1


def test_resampling_matches_tensorflow():
  """Against TF's ScaleAndTranslate (what the host path runs): crops of several sizes in a canvas,
  plain resizes and an eval-style scale + translation."""
  from compact_vit.data import transforms
  from compact_vit.data._tf import tf
  rng = np.random.default_rng(1)
  img, canvas = 32, accelerator.canvas_size(32, min_side=0)
  cases = [((40, 50), None, None), ((17, 9), None, None), ((64, 33), None, None),
           ((60, 61), (0.7, 0.65), (-3.2, -5.0))]
  batch = {k: [] for k in ('image', 'size', 'scale', 'translation')}
  expected = []
  for (h, w), scale, translation in cases:
    crop = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    scale = np.array(scale or (img / h, img / w), np.float32)
    translation = np.array(translation or (0., 0.), np.float32)
    expected.append(transforms.resize_float(tf.constant(crop), [img, img], scale, translation).numpy())
    batch['image'].append(np.pad(crop, ((0, canvas - h), (0, canvas - w), (0, 0))))
    batch['size'].append((h, w))
    batch['scale'].append(scale)
    batch['translation'].append(translation)
  batch = {k: np.array(v) for k, v in batch.items()}
  ours = np.asarray(accelerator.resample(batch['image'], batch['size'], batch['scale'],
                                         batch['translation'], img))
  assert np.abs(ours - np.stack(expected)).max() < 0.02
  assert (np.round(ours) == np.round(np.stack(expected))).mean() > 0.999


def test_banded_resampling_equals_the_whole_matrix():
  """The banded matmuls against the naive one (every weight of the matrix, `resample_weights` over
  the whole canvas) where the band is tightest: crops as large as the canvas, 1 x 1 crops, the
  identity, and eval-style scales with translations at the canvas' limit, at several canvas /
  output ratios."""
  rng = np.random.default_rng(0)

  def whole_matrix(canvas, size, scale, translation, out):
    source = jnp.arange(canvas.shape[1])
    wy = accelerator.resample_weights(out, size[:, 0], scale[:, 0], translation[:, 0], source)
    wx = accelerator.resample_weights(out, size[:, 1], scale[:, 1], translation[:, 1], source)
    rows = jnp.einsum('bic,bcwk->biwk', wy, canvas.astype(jnp.float32), precision=accelerator.HIGHEST)
    return jnp.einsum('bjw,biwk->bijk', wx, rows, precision=accelerator.HIGHEST)

  for out, side in ((32, 64), (40, 100), (24, 96), (7, 64)):
    size = rng.integers(1, side + 1, (8, 2))
    size[:3] = [(side, side), (1, 1), (out, out)]
    scale = (out / size).astype(np.float32)
    translation = np.zeros((8, 2), np.float32)
    eval_scale = np.maximum([0.6, 0.45], out / side)  # The host never sends 1 / scale > side / out.
    scale[3], translation[3] = eval_scale, (-3.5, -1.25)
    size[3] = np.minimum(side, (out / eval_scale).astype(int) + 8)
    canvas = np.zeros((8, side, side, 3), np.uint8)
    for b, (h, w) in enumerate(size):
      canvas[b, :h, :w] = rng.integers(0, 256, (h, w, 3))
    banded = np.asarray(jax.jit(accelerator.resample, static_argnums=4)(canvas, size, scale,
                                                                          translation, out))
    naive = np.asarray(whole_matrix(canvas, size, scale, translation, out))
    np.testing.assert_allclose(banded, naive, atol=1e-3)
    np.testing.assert_allclose(banded[2], canvas[2, :out, :out], atol=1e-3)  # scale 1: itself.


def dataset_cfg(data_dir, on_accelerator):
  return ml_collections.ConfigDict(dict(name='digits', data_dir=data_dir, train_split='train',
                                        eval_split='test', shuffle_buffer=500,
                                        on_accelerator=on_accelerator, canvas_min_side=0))


def test_same_batches_as_the_host_pipeline_without_random_ops(data_dir):
  """Crop on the host, resampling on the accelerator: the host pipeline's images (flip, RandAugment
  and erasing off), train and eval, up to float rounding."""
  aug = ml_collections.ConfigDict(dict(random_resized_crop=True, hflip=False, randaugment='',
                                       random_erasing=0.))
  kwargs = dict(img_size=24, batch_size=16, seed=2, start_step=3)
  split = next(pipeline.train_iterator(dataset_cfg(data_dir, True), aug, **kwargs))
  host = next(pipeline.train_iterator(dataset_cfg(data_dir, False), aug, **kwargs))
  assert split['image'].dtype == np.uint8 and split['image'].shape == (16, 48, 48, 3)
  again = next(pipeline.train_iterator(dataset_cfg(data_dir, True), aug, **kwargs))
  for key, value in split.items():  # Batch k is a function of (seed, k, slice), keys included.
    np.testing.assert_array_equal(value, again[key])
  ours = jax.jit(lambda b: accelerator.train_batch(b, settings.TrainAugment.from_config(aug), img_size=24,
                                                   mean=MEAN, std=STD))(split)
  np.testing.assert_array_equal(split['label'], host['label'])
  np.testing.assert_allclose(np.asarray(ours), host['image'], atol=1e-4)
  evals = zip(pipeline.eval_iterator(dataset_cfg(data_dir, True), img_size=24, batch_size=100, crop_pct=0.9),
              pipeline.eval_iterator(dataset_cfg(data_dir, False), img_size=24, batch_size=100, crop_pct=0.9))
  for split, host in evals:
    np.testing.assert_array_equal(split['mask'], host['mask'])
    ours = accelerator.eval_batch(split, img_size=24, mean=MEAN, std=STD)
    np.testing.assert_allclose(np.asarray(ours)[split['mask']], host['image'][host['mask']], atol=1e-4)


def test_augmentation_draws_per_example_and_is_a_function_of_the_batch(data_dir):
  """DeiT's recipe on the accelerator: deterministic for a batch, drawn per example: unchanged but for
  a flip are the images with neither a RandAugment op (0.5 x 0.5) nor erasing (0.75), 0.19, plus
  those whose ops left them as they were (AutoContrast of a digit that already spans 0..255, ...):
  0.3 here; half of those flipped; about a quarter have erasing noise (values off the grid of
  normalised uint8 levels)."""
  aug = settings.TrainAugment(hflip=True, randaugment='rand-m9-mstd0.5-inc1', random_erasing=0.25)
  batch = next(pipeline.train_iterator(dataset_cfg(data_dir, True), None, img_size=16, batch_size=512,
                                       seed=0))
  plain = np.asarray(accelerator.train_batch(batch, settings.TrainAugment(hflip=False), img_size=16,
                                             mean=MEAN, std=STD))
  step = jax.jit(lambda b: accelerator.train_batch(b, aug, img_size=16, mean=MEAN, std=STD))
  out = np.asarray(step(batch))
  np.testing.assert_array_equal(out, np.asarray(step(batch)))
  same = np.all(np.isclose(out, plain, atol=1e-5), axis=(1, 2, 3))
  flipped = np.all(np.isclose(out, plain[:, :, ::-1], atol=1e-5), axis=(1, 2, 3)) & ~same
  assert 0.15 < (same | flipped).mean() < 0.4
  assert 0.3 < flipped.sum() / (same | flipped).sum() < 0.7
  levels = out * np.array(STD) * 255 + np.array(MEAN) * 255
  erased = np.any(np.abs(levels - np.round(levels)) > 0.01, axis=(1, 2, 3))
  assert 0.18 < erased.mean() < 0.32


def test_images_for_a_fixed_seed_and_step_are_pinned(data_dir):
  """The GPU/TPU default (on_accelerator): batch 3 of seed 0 with DeiT's augmentation, host part and
  step part, as recorded: labels exactly, per-image mean and standard deviation within 2e-3 (as the
  host path's pin in test_data.py). A change here changes every accelerator run's data: update the
  numbers only on purpose."""
  aug = ml_collections.ConfigDict(dict(random_resized_crop=True, hflip=True,
                                       randaugment='rand-m9-mstd0.5-inc1', random_erasing=0.25))
  batch = next(pipeline.train_iterator(dataset_cfg(data_dir, True), aug, img_size=32, batch_size=8,
                                       seed=0, start_step=3))
  images = np.asarray(jax.jit(lambda b: accelerator.train_batch(
      b, settings.TrainAugment.from_config(aug), img_size=32, mean=MEAN, std=STD))(batch))
  assert batch['label'].tolist() == [9, 1, 5, 0, 1, 0, 3, 2]
  np.testing.assert_allclose(images.mean(axis=(1, 2, 3)),
                             [-1.516, -0.5236, 0.9691, 0.6358, -0.8631, -0.4477, -0.6288, 0.8941], atol=2e-3)
  np.testing.assert_allclose(images.std(axis=(1, 2, 3)),
                             [0.9634, 1.6392, 1.604, 1.6792, 1.3585, 1.166, 1.2748, 1.6072], atol=2e-3)


def test_canvas_side(data_dir):
  """max(2 img_size, dataset.canvas_min_side), 640 by default: ImageNet's usual 500-pixel photos
  travel whole at 224."""
  assert accelerator.canvas_size(224) == 640 and accelerator.canvas_size(400) == 800
  assert accelerator.canvas_size(24, min_side=0) == 48
  cfg = dataset_cfg(data_dir, True)
  del cfg['canvas_min_side']  # The default.
  batch = next(pipeline.eval_iterator(cfg, img_size=24, batch_size=2, crop_pct=1.))
  assert batch['image'].shape == (2, 640, 640, 3) and batch['image'].dtype == np.uint8
  for image, (h, w) in zip(batch['image'], batch['size']):
    assert 0 < h <= 640 and 0 < w <= 640 and not image[h:].any() and not image[:, w:].any()


def test_evaluator_resamples_on_the_accelerator(data_dir, tmp_path, monkeypatch):
  """eval.py's evaluator with dataset.on_accelerator (auto on a GPU or TPU): the step resamples the
  host's crops, and top-1 / top-5 of one set of weights match the host path's (the images differ
  only by float rounding)."""
  from configs import deit_s  # pylint: disable=import-outside-toplevel
  from compact_vit import evaluator, trainer  # pylint: disable=import-outside-toplevel
  config = deit_s.get_config('quick')
  config.dataset.data_dir = data_dir
  model = trainer.create_model(config, 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, config.img_size, config.img_size, 3)))
  monkeypatch.setattr(evaluator, 'load_eval_variables', lambda *args: (variables, 0, None))
  records = {}
  for on in (False, True):
    config.dataset.on_accelerator = on
    records[on] = evaluator.evaluate_checkpoint(config, str(tmp_path / str(on)), measure_speed=False)
  assert records[True]['num_examples'] == records[False]['num_examples'] > 0
  for key in ('top1', 'top5'):
    assert abs(records[True][key] - records[False][key]) <= 2 / records[False]['num_examples']
