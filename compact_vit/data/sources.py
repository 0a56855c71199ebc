"""Where examples come from: TFDS datasets (the embedded `digits`, `imagenet2012`, any TFDS name) and
image folders (`folder:/root` with root/<split>/<class>/<image>).

A `Shard` is one process's slice of one split. `records(key)` streams (ref, label int32, name) in a
fixed order, or shuffled by a stateless seed tensor, and can be built inside tf.data functions, so one
pipeline spans all epochs; `load(ref)` turns a record into an image (encoded bytes or uint8), so
skipping records costs no decoding; `name` says where the record comes from (a file path, or a TFRecord
file and record index), for the log when it cannot be read.

Damaged input never shifts the stream: a TFRecord file yields exactly the records its split
instructions promise, those it cannot read (a truncated or corrupt file) replaced by empty records
named after the file, which fail to decode and are then skipped like any undecodable image
(`pipeline`). Slices follow `tfds.even_splits`: process i of n gets a
contiguous, near-equal part, the first (size % n) parts one example larger.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from typing import Any, Callable

import numpy as np

from compact_vit.data import transforms
from compact_vit.data._tf import plain, tf, tfds
from compact_vit.data.settings import LOST_MARK  # A damaged file's lost records: FILE + LOST_MARK + count.
from compact_vit.errors import UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
_KNOWN = ("'digits' (embedded, offline), 'imagenet2012' (TFDS, manual download), any other TFDS name "
          "(see tensorflow_datasets.list_builders()), or 'folder:/path/to/root' with "
          "root/train/<class>/*.jpg|png and root/val/<class>/...")


@dataclasses.dataclass(frozen=True)
class Shard:
  """One process's slice of one split.

  records(key): tf.data.Dataset of (ref, label int32, name string); in a fixed order when key is None, else
    shuffled by the stateless seed `key` (2,) int64: a full permutation when `exact_shuffle`, else
    only the file order (add a buffer shuffle on top).
  load(ref): encoded image bytes or uint8 (H, W, 3).
  """
  size: int
  records: Callable[[Any], Any]
  load: Callable[[Any], Any]
  exact_shuffle: bool
  fixed_shape: bool  # All images share one (H, W): caching them decoded is possible.


def _indexed(refs: np.ndarray, labels: np.ndarray, names: np.ndarray | None, load: Callable[[Any], Any],
             fixed_shape: bool) -> Shard:
  """A shard over in-memory refs, labels and names (None: the refs are the names); shuffles are full
  permutations."""
  refs, labels = tf.constant(refs), tf.constant(labels, tf.int32)
  names = refs if names is None else tf.constant(names)

  def records(key):
    index = tf.range(tf.shape(labels)[0])
    if key is not None:
      index = tf.random.experimental.stateless_shuffle(index, key)
    return tf.data.Dataset.from_tensor_slices(index).map(
        plain(lambda i: (tf.gather(refs, i), tf.gather(labels, i), tf.gather(names, i))))

  return Shard(size=int(labels.shape[0]), records=records, load=load, exact_shuffle=True,
               fixed_shape=fixed_shape)


def even_slice(n: int, index: int, count: int) -> tuple[int, int]:
  """[start, end) of part `index` of `count` near-equal parts of range(n), as tfds.even_splits."""
  per, extra = divmod(n, count)
  return per * index + min(index, extra), per * (index + 1) + min(index + 1, extra)


class TfdsDataset:
  """A prepared TFDS dataset; `digits` is prepared on first use, other datasets are downloaded
  and prepared by TFDS on first use except those needing a manual download (imagenet2012)."""

  def __init__(self, name: str, data_dir: str | None):
    if name == 'digits':
      from compact_vit.data import digits  # pylint: disable=g-import-not-at-top
      with _tfds_quiet():
        builder = digits.Digits(data_dir=data_dir)
        prepared = builder.is_prepared()
      if not prepared:
        print(f'Preparing the embedded digits dataset (1,797 images, once) in '
              f'{os.fspath(builder.data_dir_root)}.', flush=True)
        with _tfds_quiet():
          builder.download_and_prepare()
    else:
      try:
        builder = tfds.builder(name, data_dir=data_dir)
      except (tfds.core.registered.DatasetNotFoundError, ValueError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0]  # TFDS appends the list of all its datasets.
        raise UserError(f'Unknown dataset.name={name!r} ({reason}). Use {_KNOWN}.') from None
    if not builder.is_prepared():
      _prepare(builder, name)
    self.builder = builder
    keys = builder.info.supervised_keys
    self.image_key, self.label_key = keys[:2] if keys and isinstance(keys[0], str) else ('image', 'label')
    features = builder.info.features
    if (self.image_key not in features or self.label_key not in features or
        not isinstance(features[self.label_key], tfds.features.ClassLabel) or
        not isinstance(features[self.image_key], tfds.features.Image)):
      raise UserError(f'dataset.name={name!r} is not an image classification dataset with an Image '
                      f"feature and a ClassLabel; features: {list(features)}.")
    self.num_classes = features[self.label_key].num_classes
    self.fixed_shape = None not in features[self.image_key].shape[:2]

  def num_examples(self, split: str) -> int:
    try:
      return self.builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
      raise UserError(f'{self.builder.name} has no split {split!r}; its splits are '
                      f'{list(self.builder.info.splits)} (slices like "train[:90%]" work too). '
                      'Set dataset.train_split / dataset.eval_split.') from e

  def shard_size(self, split: str, index: int, count: int) -> int:
    self.num_examples(split)  # Validates the split.
    return self.builder.info.splits[tfds.even_splits(split, count)[index]].num_examples

  def shard(self, split: str, index: int, count: int) -> Shard:
    self.num_examples(split)  # Validates the split.
    info = self.builder.info
    if info.file_format != tfds.core.FileFormat.TFRECORD:
      raise UserError(f'{self.builder.name} in {self.builder.data_dir} is stored as '
                      f'{info.file_format.value}; prepare it as TFRecord (the TFDS default).')
    files = info.splits[tfds.even_splits(split, count)[index]].file_instructions
    names = tf.constant([f.filename for f in files], tf.string)
    skips = tf.constant([f.skip for f in files], tf.int64)
    takes = tf.constant([f.take for f in files], tf.int64)
    decoders = {self.image_key: tfds.decode.SkipDecoding()}

    def read(i):
      # A truncated file ends early without an error, a corrupt one with an error: either way the
      # file still yields takes[i] records, the missing ones empty (they fail to decode and are
      # skipped), so no later record moves.
      lost = tf.data.Dataset.range(takes[i]).map(plain(lambda j: (
          tf.constant(b''), tf.constant(0, tf.int32),
          tf.strings.join([names[i], LOST_MARK, tf.strings.as_string(j + 1)]))))
      ds = tf.data.TFRecordDataset(names[i]).skip(skips[i]).take(takes[i]).enumerate(skips[i])
      ds = ds.map(plain(lambda k, serialized: parse(serialized, names[i], k))).ignore_errors()
      return ds.concatenate(lost).take(takes[i])

    def parse(serialized, filename, k):
      example = info.features.deserialize_example(serialized, decoders=decoders)
      name = tf.strings.join([filename, '[', tf.strings.as_string(k), ']'])
      return example[self.image_key], tf.cast(example[self.label_key], tf.int32), name

    def records(key):
      # As TFDS's reader with shuffle_files: shuffle the files, interleave 16 at a time.
      order = tf.range(len(files))
      if key is not None:
        order = tf.random.experimental.stateless_shuffle(order, key)
      ds = tf.data.Dataset.from_tensor_slices(order).interleave(
          plain(read), cycle_length=16, block_length=16, num_parallel_calls=tf.data.AUTOTUNE,
          deterministic=True)
      return ds

    return Shard(size=sum(f.take for f in files), records=records, load=lambda r: r,
                 exact_shuffle=False, fixed_shape=self.fixed_shape)


@contextlib.contextmanager
def _tfds_quiet():
  """TFDS's preparation chatter (its 'Unknown size' lines on stdout, absl warnings about empty
  version folders) silenced: the embedded dataset prints one line of its own instead."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    logging.set_verbosity(verbosity)


def _prepare_command(name: str, root: str) -> str:
  return (f'python -c "import tensorflow_datasets as tfds; '
          f"tfds.builder('{name}', data_dir='{root}').download_and_prepare()\"")


def _prepare(builder: Any, name: str) -> None:
  """Prepares a TFDS dataset on first use, or explains how when that cannot be done here."""
  root = os.fspath(builder.data_dir_root)
  manual = os.path.join(root, 'downloads', 'manual')
  if builder.name == 'imagenet2012':
    missing = [f for f in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
               if not tf.io.gfile.exists(os.path.join(manual, f))]
    raise UserError(
        f'imagenet2012 is not prepared in {root}. TFDS cannot download ImageNet; prepare it once '
        '(takes hours and about 300 GB of disk):\n'
        '  1. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from '
        'https://image-net.org/download-images (needs an account).\n'
        f'  2. Put both files in {manual}/'
        + (f" (missing now: {', '.join(missing)})" if missing else ' (both are there now)') + '.\n'
        f'  3. Run: {_prepare_command(name, root)}\n'
        f'Then run again with dataset.data_dir={root}.')
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    raise UserError(
        f'{name} is not prepared in {root} and needs a manual download:\n'
        f'{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}\nPut the files in {manual}/ and run: '
        f'{_prepare_command(name, root)}')
  try:
    builder.download_and_prepare()
  except Exception as e:  # Network, disk or archive problems: say what to do, keep the cause.
    raise UserError(
        f'Could not download and prepare {name} into {root} ({type(e).__name__}: {e}). '
        f'On a machine with network access run {_prepare_command(name, "DIR")} and copy '
        f'DIR/{builder.name} to {root}/, or set dataset.data_dir to a directory where it is '
        "prepared. For an offline run use dataset.name='digits'.") from e


class FolderDataset:
  """Images in root/<split>/<class>/... (class names: the sorted subdirectories of the train split).

  Files are listed sorted, then put in one fixed pseudo-random order (seed 0, as TFDS shuffles at
  preparation) so that per-process slices and eval batches mix classes.
  """

  def __init__(self, root: str, train_split: str):
    if not os.path.isdir(root):
      raise UserError(f'dataset.name=folder:{root}: no such directory. Expected root/train/<class>/*.jpg '
                      'and root/val/<class>/*.jpg.')
    self.root = root
    train_dir = self._split_dir(train_split)
    self.classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not self.classes:
      raise UserError(f'{train_dir} has no class subdirectories; expected {train_dir}/<class>/*.jpg.')
    self.num_classes = len(self.classes)
    self._files = {}

  def _split_dir(self, split: str) -> str:
    aliases = {'validation': 'val', 'val': 'validation'}
    for name in (split, aliases.get(split)):
      if name and os.path.isdir(os.path.join(self.root, name)):
        return os.path.join(self.root, name)
    found = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
    raise UserError(f'folder:{self.root} has no split directory {split!r} (found {found}); set '
                    'dataset.train_split / dataset.eval_split to one of them.')

  def files(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(paths, labels int32) of a split, in the fixed order."""
    if split not in self._files:
      split_dir = self._split_dir(split)
      index = {c: i for i, c in enumerate(self.classes)}
      paths, labels = [], []
      for cls in sorted(e.name for e in os.scandir(split_dir) if e.is_dir()):
        if cls not in index:
          raise UserError(f'{split_dir}/{cls} is not a class of the train split ({self.num_classes} '
                          'classes); every split must use the train split\'s class directories.')
        for dirpath, dirnames, filenames in os.walk(os.path.join(split_dir, cls), followlinks=True):
          dirnames.sort()
          for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS):
              paths.append(os.path.join(dirpath, f))
              labels.append(index[cls])
      if not paths:
        raise UserError(f'{split_dir} has no images ({", ".join(IMAGE_EXTENSIONS)}) in class folders.')
      order = np.random.default_rng(0).permutation(len(paths))
      self._files[split] = np.array(paths)[order], np.array(labels, np.int32)[order]
    return self._files[split]

  def num_examples(self, split: str) -> int:
    return len(self.files(split)[0])

  def shard_size(self, split: str, index: int, count: int) -> int:
    start, end = even_slice(self.num_examples(split), index, count)
    return end - start

  def shard(self, split: str, index: int, count: int) -> Shard:
    start, end = even_slice(self.num_examples(split), index, count)
    paths, labels = self.files(split)
    return _indexed(paths[start:end], labels[start:end], None, tf.io.read_file, fixed_shape=False)


def open_dataset(name: str, data_dir: str | None, train_split: str) -> TfdsDataset | FolderDataset:
  """Resolves dataset.name; prepares `digits` or a downloadable TFDS dataset on first use."""
  if not isinstance(name, str) or not name:
    raise UserError(f'dataset.name={name!r} must be a non-empty string: {_KNOWN}.')
  if name.startswith('folder:'):
    return FolderDataset(os.path.expanduser(name[len('folder:'):]), train_split)
  return TfdsDataset(name, data_dir)


def in_memory(shard: Shard) -> Shard:
  """The shard read once into host memory: decoded uint8 when all images share a shape (digits,
  cifar10), else the encoded bytes. Its shuffles are full permutations. An image that cannot be
  decoded keeps its place: loading it fails as decoding it would, so the pipeline skips, names and
  counts it as it does without the cache."""
  records = shard.records(None)
  if not shard.fixed_shape:  # An unreadable file is cached empty, which does not decode.
    read = transforms.guarded(shard.load, tf.constant(b''))
    ds = records.map(plain(lambda ref, label, name: (read(ref)[0], label, name)), tf.data.AUTOTUNE)
    refs, labels, names = [], [], []
    for ref, label, name in ds.batch(1024).as_numpy_iterator():
      refs.append(ref)
      labels.append(label)
      names.append(name)
    if not labels:
      return shard
    return _indexed(np.concatenate(refs), np.concatenate(labels), np.concatenate(names),
                    lambda data: data, fixed_shape=False)
  decode = transforms.guarded(lambda ref: transforms.decode(shard.load(ref)), tf.zeros([0, 0, 3], tf.uint8))
  ds = records.map(plain(lambda ref, label, name: (*decode(ref), label, name)), tf.data.AUTOTUNE)
  batches = list(ds.padded_batch(1024, padded_shapes=([None, None, 3], [], [], [])).as_numpy_iterator())
  if not batches:
    return shard
  height_width = max(images.shape[1:3] for images, *_ in batches)  # A bad image decodes to 0 x 0.
  images = np.concatenate([images if images.shape[1:3] == height_width else
                           np.zeros((len(images), *height_width, 3), np.uint8)
                           for images, *_ in batches])
  readable = tf.constant(np.concatenate([ok for _, ok, *_ in batches]))
  images = tf.constant(images)

  def load(index):
    check = tf.debugging.Assert(tf.gather(readable, index),
                                ['An image of the in-memory cache that could not be decoded.'])
    with tf.control_dependencies([check]):
      return tf.gather(images, index)

  labels = np.concatenate([label for *_, label, _ in batches])
  names = np.concatenate([name for *_, name in batches])
  return _indexed(np.arange(len(labels), dtype=np.int32), labels, names, load, fixed_shape=True)
