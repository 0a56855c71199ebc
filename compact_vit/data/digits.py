"""`digits`: the embedded offline dataset, a TFDS builder over scikit-learn's handwritten digits.

1,797 real 8x8 grayscale scans (UCI optdigits, bundled with scikit-learn, so preparing it needs no
network), 10 classes. Pixel values 0..16 are scaled to 0..255 (round(v * 255 / 16)) and the gray
channel is replicated to RGB: `image` uint8 (8, 8, 3), `label` ClassLabel(10).

Fixed stratified split: within each class the examples are permuted with
`numpy.random.default_rng(0)`; the first 36 of every class form `test` (360 examples), the rest
form `train` (1,437 examples).
"""
from __future__ import annotations

import numpy as np

from compact_vit.data._tf import tfds

TEST_PER_CLASS = 36
SPLIT_SEED = 0


def split_indices() -> dict[str, np.ndarray]:
  """The fixed stratified split: {'train': indices (1437,), 'test': indices (360,)} into load_digits."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  labels = load_digits().target
  rng = np.random.default_rng(SPLIT_SEED)
  train, test = [], []
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test.append(idx[:TEST_PER_CLASS])
    train.append(idx[TEST_PER_CLASS:])
  return {'train': np.sort(np.concatenate(train)), 'test': np.sort(np.concatenate(test))}


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits as (8, 8, 3) uint8 images; train 1,437 / test 360."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 3), encoding_format='png'),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything ships with scikit-learn.
    return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

  def _generate_examples(self, indices):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for i in indices:
      yield int(i), {'image': np.repeat(images[i][..., None], 3, axis=-1), 'label': int(digits.target[i])}
