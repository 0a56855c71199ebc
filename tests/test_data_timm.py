"""The eval transform against timm's on real photographs, and its decoded window against resizing the
whole image."""
import torch  # pylint: disable=unused-import  # Before TensorFlow: the two in one process need this order.

import io

import numpy as np
import pytest
import timm.data
from PIL import Image
from sklearn.datasets import load_sample_images

from compact_vit.data import pipeline

MEAN, STD = pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD


def photos():
  """Real photographs at several sizes and aspects: (name, uint8 array, JPEG bytes at quality 95)."""
  out = []
  for i, image in enumerate(load_sample_images().images):
    for size in [(500, 375), (333, 500), (640, 427), (180, 240)]:
      pil = Image.fromarray(image).resize(size, Image.BICUBIC)
      data = io.BytesIO()
      pil.save(data, 'JPEG', quality=95)
      out.append((f'{i}-{size}', np.asarray(pil), data.getvalue()))
  return out


def levels(a, b):
  """|a - b| of normalised images in 0..255 levels."""
  return np.abs(a - b) * np.array(STD, np.float32) * 255


@pytest.mark.parametrize('img_size,crop_pct', [(224, 0.875), (160, 0.95), (288, 1.0)])
def test_eval_matches_timm_eval_transform(img_size, crop_pct):
  """Tolerance: PIL rounds to uint8 between its horizontal and vertical passes and decodes the whole
  JPEG, we resample in one float pass and decode the window, so a few pixels at sharp edges differ by
  several levels; on average they agree within 0.25 levels (0.16 when written; a one-pixel shift
  gives several levels)."""
  from compact_vit.data import transforms
  from compact_vit.data._tf import tf
  theirs_fn = timm.data.create_transform(img_size, is_training=False, crop_pct=crop_pct,
                                         interpolation='bicubic')
  diffs = []
  for _, _, jpeg in photos():
    theirs = theirs_fn(Image.open(io.BytesIO(jpeg)).convert('RGB')).permute(1, 2, 0).numpy()
    ours = transforms.eval_transform(tf.constant(jpeg), img_size=img_size, crop_pct=crop_pct,
                                     mean=MEAN, std=STD).numpy()
    assert ours.shape == theirs.shape == (img_size, img_size, 3)
    diffs.append(levels(ours, theirs))
  d = np.stack(diffs)
  assert d.mean() < 0.25 and (d > 1.5).mean() < 1e-3 and d.max() <= 8, (d.mean(), (d > 1.5).mean(), d.max())


@pytest.mark.parametrize('img_size,crop_pct', [(224, 0.875), (96, 0.9)])
def test_eval_window_equals_resizing_the_whole_image(img_size, crop_pct):
  """Resampling only the centre window (what eval_transform does) against resizing the whole image
  to a shorter side of floor(img_size / crop_pct) and cropping its centre: the same up to float
  rounding (a pixel may round one level apart)."""
  import math
  from compact_vit.data import transforms
  from compact_vit.data._tf import tf
  for _, image, _ in photos():
    h, w = image.shape[:2]
    short = math.floor(img_size / crop_pct)
    new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    full = transforms.resize(tf.constant(image), [new_h, new_w]).numpy()
    top, left = round((new_h - img_size) / 2), round((new_w - img_size) / 2)
    expected = transforms.normalize(full[top:top + img_size, left:left + img_size], MEAN, STD).numpy()
    ours = transforms.eval_transform(tf.constant(image), img_size=img_size, crop_pct=crop_pct,
                                     mean=MEAN, std=STD).numpy()
    d = levels(ours, expected)
    assert d.max() < 1.01 and (d > 0.5).mean() < 0.01
