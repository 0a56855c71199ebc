"""The input pipeline the trainer uses: `dataset_cfg` → per-process numpy batches, deterministic and
resumable.

`dataset_cfg` fields (defaults when absent): `name` ('digits', 'imagenet2012', any TFDS name, or
'folder:/root' with root/<split>/<class>/*.jpg|png), `data_dir` (None: TFDS's default), `train_split`
('train'), `eval_split` ('validation'), `shuffle_buffer` (10_000; TFDS sources only, folder and cached
sources are fully permuted), `cache` (False: keep the process's slice in host memory, decoded when all
images share a shape), `mean`/`std` (ImageNet's, on the 0..1 scale). `aug_cfg`: see
`transforms.TrainAugment`, plus `repeated_aug` / `repeated_aug_replicas` (`sampling.RepeatedAug`:
DeiT's repeated augmentation, off when absent). Batch sizes are per process.

`dataset_cfg.on_accelerator` (True, False, or None: auto, True when JAX's backend is a GPU or TPU;
`settings.resolve_on_accelerator`): when on, the host only decodes and crops, and the batches carry uint8
crops zero-padded into a square canvas of side max(2 img_size, `canvas_min_side` (640)) with 'size',
'scale', 'translation' and (train) 'aug_key'; the jitted step turns them into images with `accelerator.train_batch` /
`accelerator.eval_batch` (resampling, flip, RandAugment, normalisation, erasing in JAX). The same
(seed, step, slice) gives the same batch either way; the images differ only by the random draws.

Train (`train_iterator`), infinite: each process reads its fixed, near-equal slice of the train split
(`tfds.even_splits`). Epoch e shuffles that slice with the stateless seed (seed, e) (TFDS: file order
plus a `shuffle_buffer` shuffle; folder and cached: a full permutation) and yields exactly
steps_per_epoch = num_train // (batch_size * process_count) batches, dropping the rest of the slice
(less than one global batch, a different random part each epoch). So steps [e * steps_per_epoch,
(e + 1) * steps_per_epoch) are epoch e on every process, and batches never cross epochs. Example j
of epoch e is augmented by stateless ops keyed by (seed, e, j * process_count + process_index).
With repeated augmentation on, epoch e's records are first arranged as DeiT's sampler arranges them
(`sampling.RepeatedAug.arrange`: each record `repeated_aug` times, spread over blocks of the global
batch) and steps_per_epoch is the authors' count; j still counts rows, so every copy of an image has
its own key. Batch k is thus a pure function of (seed, k, process_index, process_count), and `start_step=k`
yields exactly what an uninterrupted iterator yields from its k-th batch on: it starts at epoch
k // steps_per_epoch and skips (k % steps_per_epoch) * batch_size records before decoding them.
All epochs form one tf.data pipeline (counter → flat_map), so nothing is rebuilt between epochs.

Eval (`eval_iterator`): one pass in a fixed order; the last batches are padded (mask False) so every
process yields `num_eval_batches(...)` batches and every example counts once across processes.

Bad data (`Batches`): an example whose file cannot be read or decoded (truncated or corrupt JPEG, empty
file, a record of a damaged TFRecord file) is skipped without moving any other example: in training
its row is filled with a copy of another row of the same batch (the first good rows in turn; with
on_accelerator it keeps its own augmentation key), so batch k stays a pure function of (seed, k, slice)
and a resumed run stays exact; in evaluation its row is masked out. Each one is named once on stdout
and counted (`Batches.skipped`); training stops with a `UserError` listing them once more distinct
examples are unreadable than `dataset.max_skipped` (default 0.001) times this process's examples per
epoch. PNG, CMYK and grayscale images, whatever their file name, decode to RGB and are used. The check
is nearly free on good data: each batch is made unguarded first, and only a batch with an unreadable
example is made again example by example (`_guarded_batches`). With `cache` on, an image that does not
decode keeps its place in the cache and is skipped the same way.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Iterator

import numpy as np

from compact_vit.data.settings import CANVAS_MIN_SIDE, LOST_MARK, resolve_on_accelerator
from compact_vit.errors import UserError
from compact_vit.imagenet import IMAGENET_MEAN, IMAGENET_STD

_DEFAULTS = dict(data_dir=None, train_split='train', eval_split='validation', shuffle_buffer=10_000,
                 cache=False, mean=IMAGENET_MEAN, std=IMAGENET_STD, on_accelerator=None,
                 canvas_min_side=CANVAS_MIN_SIDE, max_skipped=0.001)
# The name of the records that pad an eval pass to whole batches (rows with mask False).
_PADDING = '(padding)'


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Class count and split sizes of a dataset."""
  num_classes: int
  num_train: int  # Examples in the train split (whole, all processes).
  num_eval: int  # Examples in the eval split.


def _field(cfg: Any, name: str) -> Any:
  if name == 'name':
    return cfg.name
  value = getattr(cfg, name, _DEFAULTS[name])
  return _DEFAULTS[name] if value is None and name != 'data_dir' else value


@functools.lru_cache(maxsize=8)
def _dataset(name: str, data_dir: str | None, train_split: str):
  from compact_vit.data import sources  # pylint: disable=g-import-not-at-top
  return sources.open_dataset(name, data_dir, train_split)


@functools.lru_cache(maxsize=4)
def _in_memory(name: str, data_dir: str | None, train_split: str, split: str, index: int, count: int):
  from compact_vit.data import sources  # pylint: disable=g-import-not-at-top
  return sources.in_memory(_dataset(name, data_dir, train_split).shard(split, index, count))


def _open(cfg: Any):
  return _dataset(_field(cfg, 'name'), _field(cfg, 'data_dir'), _field(cfg, 'train_split'))


def _shard(cfg: Any, split: str, index: int, count: int):
  if _field(cfg, 'cache'):
    return _in_memory(_field(cfg, 'name'), _field(cfg, 'data_dir'), _field(cfg, 'train_split'), split,
                      index, count)
  return _open(cfg).shard(split, index, count)


def _check(*, batch_size: int, process_index: int, process_count: int, img_size: int | None = None) -> None:
  if batch_size < 1:
    raise UserError(f'The per-process batch size must be >= 1, got {batch_size}.')
  if process_count < 1 or not 0 <= process_index < process_count:
    raise UserError(f'Bad process_index={process_index} / process_count={process_count}.')
  if img_size is not None and img_size < 3:
    raise UserError(f'img_size={img_size} must be >= 3.')


def _mean_std(cfg: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
  mean = tuple(float(m) for m in _field(cfg, 'mean'))
  std = tuple(float(s) for s in _field(cfg, 'std'))
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise UserError(f'dataset.mean={mean} / dataset.std={std} must be RGB 3-tuples on the 0..1 scale '
                    f'with std > 0, e.g. ImageNet {IMAGENET_MEAN} / {IMAGENET_STD}.')
  return mean, std


# Examples in flight in the decode / augment map, per host core. The map keeps its input order (batch
# k must be a pure function of the seed), so one slow example (a crop larger than the canvas,
# resampled on the host, takes ~5x the median) holds back every finished one behind it; AUTOTUNE
# keeps about one example per core in flight, so the other cores idle until it is done. A deeper
# window keeps them busy (benchmarks/input_pipeline.py, 2 cores: on_accelerator train host part
# ~0.72x -> ~0.8x the floor's images/s); only the window grows, not the threads (tf.data's pool has
# one per core). Costs memory: the window's decoded examples (up to 1.2 MB each with on_accelerator).
IN_FLIGHT_PER_CORE = 8


def parallel_calls() -> int:
  """num_parallel_calls of the per-example map: IN_FLIGHT_PER_CORE x the cores this process may use."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # No affinity API (macOS).
    cores = os.cpu_count() or 1
  return IN_FLIGHT_PER_CORE * cores


def _options():
  from compact_vit.data._tf import tf  # pylint: disable=g-import-not-at-top
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1  # Parallelism comes from parallel map calls.
  return options


def get_info(dataset_cfg: Any) -> DatasetInfo:
  """Class count and split sizes; prepares `digits` (or a downloadable TFDS dataset) on first use."""
  dataset = _open(dataset_cfg)
  return DatasetInfo(num_classes=dataset.num_classes,
                     num_train=dataset.num_examples(_field(dataset_cfg, 'train_split')),
                     num_eval=dataset.num_examples(_field(dataset_cfg, 'eval_split')))


def _repeated_aug(aug_cfg: Any, batch_size: int, process_count: int):
  from compact_vit.data import sampling  # pylint: disable=g-import-not-at-top
  return sampling.RepeatedAug.from_config(aug_cfg, batch_size=batch_size, process_count=process_count)


def steps_per_epoch(dataset_cfg: Any, *, batch_size: int, process_count: int = 1,
                    aug_cfg: Any = None) -> int:
  """The batches each process yields per epoch: num_train // (batch_size * process_count), or with
  repeated augmentation on in `aug_cfg` the authors' count (`sampling.RepeatedAug.steps_per_epoch`)."""
  _check(batch_size=batch_size, process_index=0, process_count=process_count)
  num_train = get_info(dataset_cfg).num_train
  global_batch = batch_size * process_count
  repeated = _repeated_aug(aug_cfg, batch_size, process_count)
  steps = repeated.steps_per_epoch(num_train, global_batch) if repeated.on else num_train // global_batch
  if steps < 1:
    raise UserError(f'The global batch ({batch_size} x {process_count} processes) is larger than the '
                    f'train split ({num_train} examples' +
                    (', of which repeated augmentation uses a multiple of 256 per epoch' if repeated.on
                     else '') + '); use a smaller batch_size.')
  return steps


def train_iterator(dataset_cfg: Any, aug_cfg: Any, *, img_size: int, batch_size: int, seed: int,
                   start_step: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Infinite train batches from step `start_step` on: {'image': float32 (B, img_size, img_size, 3)
  normalised, 'label': int32 (B,)} with B = batch_size (per process)."""
  from compact_vit.data import transforms  # pylint: disable=g-import-not-at-top
  from compact_vit.data._tf import plain, tf  # pylint: disable=g-import-not-at-top
  _check(batch_size=batch_size, process_index=process_index, process_count=process_count,
         img_size=img_size)
  if start_step < 0:
    raise UserError(f'start_step={start_step} must be >= 0.')
  aug = transforms.TrainAugment.from_config(aug_cfg)
  mean, std = _mean_std(dataset_cfg)
  steps = steps_per_epoch(dataset_cfg, batch_size=batch_size, process_count=process_count,
                          aug_cfg=aug_cfg)
  repeated = _repeated_aug(aug_cfg, batch_size, process_count)
  shard = _shard(dataset_cfg, _field(dataset_cfg, 'train_split'), process_index, process_count)
  buffer = int(_field(dataset_cfg, 'shuffle_buffer'))
  first_epoch, skip_steps = divmod(start_step, steps)

  def epoch_records(epoch):
    key = tf.stack([tf.constant(seed % 2**63, tf.int64), epoch])
    ds = shard.records(key)
    if not shard.exact_shuffle and buffer > 1:
      ds = ds.shuffle(buffer, seed=tf.random.stateless_uniform([], key, None, None, tf.int64))
    if repeated.on:
      ds = repeated.arrange(ds, batch_size=batch_size, process_count=process_count)
    ds = ds.take(steps * batch_size)
    return ds.enumerate().map(plain(lambda i, rec: (key, i, rec)))

  on_accelerator = resolve_on_accelerator(_field(dataset_cfg, 'on_accelerator'))
  canvas = _canvas(dataset_cfg, img_size) if on_accelerator else 0

  # Only reading and decoding can fail on bad data: they are guarded, the rest runs as usual (on a
  # 1x1 stand-in crop for an unreadable example, whose row `_fill_skipped_rows` then replaces).
  crop = lambda ref, key: transforms.train_crop(shard.load(ref), key, aug)

  def preprocess(guard, key, i, record):
    ref, label, name = record
    key = tf.random.experimental.stateless_fold_in(key, i * process_count + process_index)
    image, ok = guard(crop, tf.zeros([1, 1, 3], tf.uint8))(ref, key)
    if on_accelerator:
      out = transforms.accelerator_train_example(image, key, img_size=img_size, canvas=canvas)
    else:
      out = {'image': transforms.train_finish(image, key, aug, img_size=img_size, mean=mean, std=std)}
    return {**out, 'label': label, **_outcome(ok, name)}

  # One pipeline for all epochs, so the augmentation graph is instantiated once.
  ds = tf.data.Dataset.counter(first_epoch).flat_map(plain(epoch_records)).skip(skip_steps * batch_size)
  ds = _guarded_batches(ds.batch(batch_size, drop_remainder=True), preprocess, canvas)
  ds = ds.map(plain(_fill_skipped_rows))
  epoch_examples = steps * batch_size
  return Batches(ds.prefetch(2).with_options(_options()).as_numpy_iterator(), what='train',
                 max_skipped=_max_skipped(dataset_cfg, epoch_examples), epoch_examples=epoch_examples)


# Batches made at once (each by a map with `parallel_calls()` examples in flight), so the next
# batch's examples keep the cores busy while the last examples of one are finished. Costs memory:
# on_accelerator, a batch of canvases is batch x 1.2 MB.
BATCHES_IN_FLIGHT = 2


def _unguarded(fn: Any, fallback: Any) -> Any:
  """`transforms.guarded`'s interface without the guard: (fn(*args), True)."""
  from compact_vit.data._tf import tf  # pylint: disable=g-import-not-at-top
  del fallback
  return lambda *args: (fn(*args), tf.constant(True))


def _guarded_batches(record_batches: Any, preprocess: Any, canvas: int) -> Any:
  """Batches of `preprocess(guard, *record)` for each batch of records, where `guard(fn, fallback)`
  wraps the part that bad data can fail (`transforms.guarded`'s interface).

  A batch is first made with nothing guarded, in a nested dataset whose errors are dropped; only
  when a record of it fails (the attempt then yields no whole batch) is the batch made again with
  each example guarded, so an unreadable example becomes its `fallback` row and no other row moves.
  A good batch thus pays for one nested dataset instead of one per example (on the JPEGs of
  benchmarks/input_pipeline.py, 2 cores: the per-example guard cost 0.25-0.3 ms of CPU per image, a
  sixth of the on_accelerator train host part, and this way costs nothing measurable); a batch
  with a bad example is made twice. Two batches are made at once (`BATCHES_IN_FLIGHT`: 4 measured
  slower)."""
  from compact_vit.data import transforms  # pylint: disable=g-import-not-at-top
  from compact_vit.data._tf import plain, tf  # pylint: disable=g-import-not-at-top

  def make(*records):
    count = tf.shape(tf.nest.flatten(records)[0], out_type=tf.int64)[0]
    examples = tf.data.Dataset.from_tensor_slices(records)

    def attempt(guard):
      made = examples.map(plain(functools.partial(preprocess, guard)), num_parallel_calls=parallel_calls())
      return _batch(made, count, canvas)

    # After an error the inner batch goes on with the records behind the failed one: a short batch.
    whole = attempt(_unguarded).ignore_errors().filter(
        plain(lambda batch: tf.equal(tf.shape(batch['skipped'], out_type=tf.int64)[0], count)))
    return whole.concatenate(attempt(transforms.guarded)).take(1).get_single_element()

  return record_batches.map(plain(make), num_parallel_calls=BATCHES_IN_FLIGHT)


def _max_skipped(cfg: Any, epoch_examples: int) -> int:
  """The most distinct unreadable train examples a process may skip: dataset.max_skipped (a fraction
  of an epoch) times its examples per epoch."""
  fraction = _field(cfg, 'max_skipped')
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
    raise UserError(f'dataset.max_skipped={fraction!r} must be a fraction of an epoch in [0, 1): the '
                    'share of unreadable train examples to skip before stopping (0: stop at the first).')
  return int(fraction * epoch_examples)


def _padded(records: Any, count: int) -> Any:
  """`records` followed by records named `_PADDING` up to `count`."""
  from compact_vit.data._tf import tf  # pylint: disable=g-import-not-at-top
  ref_spec, label_spec, _ = records.element_spec
  padding = (tf.zeros([d or 0 for d in ref_spec.shape], ref_spec.dtype), tf.zeros([], label_spec.dtype),
             tf.constant(_PADDING))
  return records.concatenate(tf.data.Dataset.from_tensors(padding).repeat()).take(count)


def _outcome(ok: Any, name: Any) -> dict[str, Any]:
  """The per-example fields `Batches` reads and removes: 'skipped' (bool) and 'source' (its name)."""
  from compact_vit.data._tf import tf  # pylint: disable=g-import-not-at-top
  return {'skipped': tf.logical_not(ok), 'source': name}


def _fill_skipped_rows(batch: dict[str, Any]) -> dict[str, Any]:
  """A train batch whose skipped rows hold copies of its readable rows (the first ones in turn),
  except the on_accelerator augmentation key, which stays the row's own; unchanged when no row (or
  every row) was skipped."""
  from compact_vit.data._tf import tf  # pylint: disable=g-import-not-at-top
  skipped = batch['skipped']
  good = tf.cast(tf.where(tf.logical_not(skipped))[:, 0], tf.int32)
  rows = tf.range(tf.shape(skipped)[0])
  source = tf.where(skipped, tf.gather(good, rows % tf.maximum(tf.size(good), 1)), rows)
  copied = ('skipped', 'source', 'aug_key')
  fill = lambda: {k: v if k in copied else tf.gather(v, source) for k, v in batch.items()}
  return tf.cond(tf.reduce_any(skipped) & (tf.size(good) > 0), fill, lambda: dict(batch))


class Batches:
  """An iterator of numpy batches that takes out the 'skipped' and 'source' fields: each unreadable
  example is named once on stdout and counted. `skipped`: rows skipped so far (every time an
  example comes round again); `unreadable`: the distinct names. Training (`max_skipped` not None)
  raises a `UserError` listing them once there are more than `max_skipped`, or when every row of a
  batch is unreadable."""

  def __init__(self, batches: Iterator[dict[str, np.ndarray]], *, what: str,
               max_skipped: int | None = None, epoch_examples: int = 0):
    self._batches = batches
    self._what = what
    self._max_skipped = max_skipped
    self._epoch_examples = epoch_examples
    self.skipped = 0
    self.unreadable: dict[str, None] = {}  # Insertion-ordered set.
    self._damaged_files: set[str] = set()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._batches)
    skipped, source = batch.pop('skipped'), batch.pop('source')
    if skipped.any():
      self._count(skipped, source)
    return batch

  def _count(self, skipped: np.ndarray, source: np.ndarray) -> None:
    self.skipped += int(skipped.sum())
    for name in source[skipped]:
      name = name.decode(errors='replace')
      if name not in self.unreadable:
        self.unreadable[name] = None
        file, lost, _ = name.partition(LOST_MARK)
        if not lost:
          print(f'Skipped an unreadable {self._what} example: {name}', flush=True)
        elif file not in self._damaged_files:
          self._damaged_files.add(file)
          print(f'Skipping the unreadable {self._what} records of {file} (truncated or corrupt); '
                'those after the damage are lost.', flush=True)
    if self._max_skipped is None:
      return
    names = list(self.unreadable)
    listed = '\n  '.join(names[:50]) + (f'\n  ... and {len(names) - 50} more' if len(names) > 50 else '')
    if skipped.all():
      raise UserError(f'Every example of a {self._what} batch is unreadable; check the dataset files. '
                      f'Unreadable so far:\n  {listed}')
    if len(names) > self._max_skipped:
      raise UserError(
          f'{len(names)} {self._what} examples could not be read, more than dataset.max_skipped allows '
          f'({self._max_skipped} of this process\'s {self._epoch_examples} per epoch). Replace or '
          f'delete these files (or raise --config.dataset.max_skipped), then rerun the same command '
          f'to resume:\n  {listed}')


def _canvas(cfg: Any, img_size: int) -> int:
  from compact_vit.data import accelerator  # pylint: disable=g-import-not-at-top
  min_side = _field(cfg, 'canvas_min_side')
  if not isinstance(min_side, int) or min_side < 0:
    raise UserError(f'dataset.canvas_min_side={min_side!r} must be an int >= 0 (the canvas side is '
                    f'max(2 img_size, canvas_min_side); 0 = 2 img_size).')
  return accelerator.canvas_size(img_size, min_side)


def _batch(ds, batch_size: int, canvas: int, drop_remainder: bool = False):
  """Batches; with a `canvas` side (on_accelerator), crops are zero-padded into the canvas as they
  are copied in."""
  if not canvas:
    return ds.batch(batch_size, drop_remainder=drop_remainder)
  shapes = {k: [canvas, canvas, 3] if k == 'image' else spec.shape for k, spec in ds.element_spec.items()}
  return ds.padded_batch(batch_size, padded_shapes=shapes, drop_remainder=drop_remainder)


def num_eval_batches(dataset_cfg: Any, *, batch_size: int, process_count: int = 1) -> int:
  """The batches every process yields in one eval pass: ceil(largest process slice / batch_size)."""
  _check(batch_size=batch_size, process_index=0, process_count=process_count)
  dataset, split = _open(dataset_cfg), _field(dataset_cfg, 'eval_split')
  largest = max(dataset.shard_size(split, i, process_count) for i in range(process_count))
  return math.ceil(largest / batch_size)


def eval_iterator(dataset_cfg: Any, *, img_size: int, batch_size: int, crop_pct: float,
                  process_index: int = 0, process_count: int = 1,
                  resize: str = 'shorter') -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's slice of the eval split: {'image': float32 (B, img_size,
  img_size, 3), 'label': int32 (B,), 'mask': bool (B,)}, padded with mask False to exactly
  `num_eval_batches(...)` batches. `resize` (config.eval_resize): 'shorter' (the shorter side to
  floor(img_size / crop_pct), then the centre crop: timm's) or 'squash' (the whole image to
  img_size x img_size, no crop: UniNet's from 320 px)."""
  from compact_vit.data import transforms  # pylint: disable=g-import-not-at-top
  from compact_vit.data._tf import tf  # pylint: disable=g-import-not-at-top
  _check(batch_size=batch_size, process_index=process_index, process_count=process_count,
         img_size=img_size)
  if not 0 < crop_pct <= 1:
    raise UserError(f'crop_pct={crop_pct} must be in (0, 1] (timm: 0.875 for most models).')
  if resize not in ('shorter', 'squash'):
    raise UserError(f"eval_resize={resize!r}: use 'shorter' (resize the shorter side, centre crop) "
                    "or 'squash' (the whole image to img_size x img_size).")
  mean, std = _mean_std(dataset_cfg)
  num_batches = num_eval_batches(dataset_cfg, batch_size=batch_size, process_count=process_count)
  shard = _shard(dataset_cfg, _field(dataset_cfg, 'eval_split'), process_index, process_count)

  on_accelerator = resolve_on_accelerator(_field(dataset_cfg, 'on_accelerator'))
  canvas = _canvas(dataset_cfg, img_size) if on_accelerator else 0

  crop = lambda ref: transforms.eval_crop(shard.load(ref), img_size=img_size, crop_pct=crop_pct,
                                         resize=resize)
  stand_in = (tf.zeros([1, 1, 3], tf.uint8), tf.ones([2]), tf.zeros([2]))  # Guarded as in training.

  blank = {'image': tf.zeros([img_size, img_size, 3])}
  if on_accelerator:
    blank = {'image': tf.zeros([img_size, img_size, 3], tf.uint8), 'size': tf.constant([img_size] * 2),
             'scale': tf.ones([2]), 'translation': tf.zeros([2])}
  padding_row = {**blank, 'label': tf.constant(0, tf.int32), 'mask': tf.constant(False),
                 'skipped': tf.constant(False), 'source': tf.constant('')}

  def example(guard, ref, label, name):
    (window, scale, translation), ok = guard(crop, stand_in)(ref)
    if on_accelerator:
      out = transforms.accelerator_eval_example(window, scale, translation, img_size=img_size,
                                                canvas=canvas)
    else:
      out = {'image': transforms.eval_finish(window, scale, translation, img_size=img_size, mean=mean,
                                             std=std)}
    outcome = _outcome(ok, name)
    return {**out, 'label': label, 'mask': tf.logical_not(outcome['skipped']), **outcome}

  def preprocess(guard, ref, label, name):
    return tf.cond(tf.equal(name, _PADDING), lambda: padding_row,
                   lambda: example(guard, ref, label, name))

  records = _padded(shard.records(None), num_batches * batch_size)
  ds = _guarded_batches(records.batch(batch_size), preprocess, canvas)
  return Batches(ds.prefetch(2).with_options(_options()).as_numpy_iterator(), what='eval')
