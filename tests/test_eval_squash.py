"""UniNet's evaluation from 320 px on (Sense-X/UniNet datasets.py: torchvision `Resize((size, size))`,
bicubic, no crop): `eval_resize='squash'` on the host and with `dataset.on_accelerator`, against the
authors' transform."""
import io

import torch  # pylint: disable=unused-import  # Before TensorFlow: the two in one process need this order.
from torchvision import transforms as T
import ml_collections
import numpy as np
import pytest
from PIL import Image

from compact_vit.data import pipeline
from compact_vit.errors import UserError

MEAN, STD = pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD
SIZE = 32
LEVEL = 1 / (255 * min(STD))  # one uint8 step, normalised


def _photo(rng, h, w):
  """A smooth random image (upsampled noise), like a photo's spectrum more than white noise."""
  small = rng.integers(0, 256, (h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _authors(image):
  """Sense-X/UniNet datasets.py for size >= 320: Resize((size, size), bicubic), ToTensor, Normalize."""
  transform = T.Compose([T.Resize((SIZE, SIZE), interpolation=T.InterpolationMode.BICUBIC),
                         T.ToTensor(), T.Normalize(MEAN, STD)])
  return transform(Image.fromarray(image)).permute(1, 2, 0).numpy()


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('squash')
  rng = np.random.default_rng(0)
  images = {}
  for i, (h, w) in enumerate([(75, 120), (140, 50), (32, 32), (20, 45), (300, 200), (90, 91)]):
    image = _photo(rng, h, w)
    for split in ('train', 'val'):
      path = root / split / 'c' / f'{i}.png'
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(path)
    images[str(root / 'val' / 'c' / f'{i}.png')] = image
  return root, images


def _cfg(root, on_accelerator):
  return ml_collections.ConfigDict({'name': f'folder:{root}', 'eval_split': 'val', 'cache': False,
                                    'on_accelerator': on_accelerator, 'canvas_min_side': 0})


def test_squash_matches_the_authors_transform(folder):
  from compact_vit.data import transforms
  from compact_vit.data._tf import tf
  _, images = folder
  for image in images.values():
    for data in (tf.constant(image), tf.constant(Image_bytes(image))):
      ours = transforms.eval_transform(data, img_size=SIZE, crop_pct=0.875, mean=MEAN, std=STD,
                                       resize='squash').numpy()
      diff = np.abs(ours - _authors(image)) / LEVEL  # in uint8 steps
      assert diff.max() <= 2.01 and diff.mean() < 0.3, (image.shape, diff.max(), diff.mean())
    # The default mode crops: a non-square image gives something else.
    if max(image.shape[:2]) > 1.2 * min(image.shape[:2]):
      cropped = transforms.eval_transform(tf.constant(image), img_size=SIZE, crop_pct=1.0, mean=MEAN,
                                          std=STD).numpy()
      assert np.abs(cropped - _authors(image)).max() > 10 * LEVEL


def Image_bytes(image):  # pylint: disable=invalid-name
  out = io.BytesIO()
  Image.fromarray(image).save(out, 'PNG')
  return out.getvalue()


def test_squash_on_the_accelerator_matches_the_host(folder):
  import jax
  from compact_vit.data import accelerator
  root, images = folder
  host, split = (list(pipeline.eval_iterator(_cfg(root, on), img_size=SIZE, batch_size=6, crop_pct=1.,
                                             resize='squash')) for on in (False, True))
  assert len(host) == len(split) == 1 and host[0]['mask'].all()
  ours = np.asarray(jax.jit(lambda b: accelerator.eval_batch(b, img_size=SIZE, mean=MEAN, std=STD))(
      split[0]))
  assert np.abs(ours - host[0]['image']).max() <= 1.01 * LEVEL
  # The host batch holds the authors' images (the fixed eval order is the folder's permutation).
  authors = np.stack([_authors(image) for image in images.values()])
  for row in host[0]['image']:
    assert np.abs(authors - row).reshape(len(authors), -1).max(axis=1).min() <= 2.01 * LEVEL
  with pytest.raises(UserError, match='eval_resize'):
    pipeline.eval_iterator(_cfg(root, False), img_size=SIZE, batch_size=6, crop_pct=1., resize='fit')


def test_uninet_b4_b5_evaluate_as_the_authors():
  from configs import uninet_b1, uninet_b4, uninet_b5
  for module in (uninet_b4, uninet_b5):
    config = module.get_config()
    assert config.eval_resize == 'squash' and 'eval' not in config.get('departures', {})
  assert uninet_b1.get_config().eval_resize == 'shorter'
