"""Repeated augmentation (compact_vit.data.sampling) against timm's RepeatAugSampler, and in the train
iterator: resume, determinism, and copies augmented independently."""
import torch  # pylint: disable=unused-import  # Before TensorFlow: the two in one process need this order.

import ml_collections
import numpy as np
import pytest
from timm.data.distributed_sampler import RepeatAugSampler

from compact_vit.data import pipeline, sampling
from compact_vit.errors import UserError

IMG = 16


def arranged(perm, repeats, replicas, batch_size, process_count=1, num_examples=None):
  """Our rows of one epoch for the base order `perm` of a slice of a dataset of `num_examples`
  (default: len(perm)): (steps, batch_size) indices."""
  from compact_vit.data._tf import tf
  ra = sampling.RepeatedAug(repeats, replicas)
  steps = ra.steps_per_epoch(num_examples or len(perm), batch_size * process_count)
  ds = ra.arrange(tf.data.Dataset.from_tensor_slices(np.asarray(perm)), batch_size=batch_size,
                  process_count=process_count)
  rows = np.array([int(x) for x in ds.take(steps * batch_size).as_numpy_iterator()])
  return rows.reshape(steps, batch_size)


@pytest.mark.parametrize('num_examples,replicas,repeats,per_replica_batch', [
    (1000, 4, 3, 16), (300, 8, 3, 8), (257, 3, 2, 5), (600, 1, 3, 32), (100, 4, 3, 5), (90, 16, 4, 1)])
def test_blocks_hold_the_authors_replica_indices(num_examples, replicas, repeats, per_replica_batch):
  """One slice: block r of every global batch, over an epoch, is replica r's list of timm's sampler
  (with DeiT's drop_last), given the permutation timm draws for that epoch."""
  epoch = 5
  dataset = range(num_examples)
  theirs = []
  for rank in range(replicas):
    sampler = RepeatAugSampler(dataset, num_replicas=replicas, rank=rank, num_repeats=repeats)
    sampler.set_epoch(epoch)
    theirs.append(list(sampler))
  assert len(theirs[0]) == sampling.RepeatedAug(repeats, replicas).per_replica(num_examples)
  generator = torch.Generator()
  generator.manual_seed(epoch)
  perm = torch.randperm(num_examples, generator=generator).numpy()
  batch = replicas * per_replica_batch
  ours = arranged(perm, repeats, replicas, batch)
  steps = len(theirs[0]) // per_replica_batch
  assert ours.shape == (steps, batch)
  blocks = ours.reshape(steps, replicas, per_replica_batch)
  for rank in range(replicas):
    assert blocks[:, rank].ravel().tolist() == theirs[rank][:steps * per_replica_batch]


@pytest.mark.parametrize('num_examples,slices,replicas,repeats,slice_batch',
                         [(1000, 2, 4, 3, 24), (999, 3, 6, 3, 12), (512, 4, 4, 2, 8)])
def test_each_slice_is_the_authors_sampler_on_its_part(num_examples, slices, replicas, repeats,
                                                        slice_batch):
  """S slices: slice s, fed its own permutation, gives its R / S blocks the lists of an R / S replica
  sampler over its part, for the epoch's steps computed from the whole dataset."""
  ra = sampling.RepeatedAug(repeats, replicas)
  steps = ra.steps_per_epoch(num_examples, slice_batch * slices)
  blocks = replicas // slices
  per_block = slice_batch // blocks
  rng = np.random.default_rng(0)
  for s in range(slices):
    part = rng.permutation(num_examples // slices)
    ours = arranged(part, repeats, replicas, slice_batch, slices, num_examples)
    assert ours.shape == (steps, slice_batch)
    repeated = np.repeat(part, repeats)
    for j in range(blocks):
      positions = j + blocks * np.arange(steps * per_block)
      expected = repeated[positions % len(repeated)]
      np.testing.assert_array_equal(ours.reshape(steps, blocks, per_block)[:, j].ravel(), expected)


def test_steps_per_epoch_is_the_authors():
  """DeiT on ImageNet-1k: 1,281,167 images, 16 GPUs x 64 (DeiT-B) or 4 x 256 (DeiT-S): 1,251 steps."""
  for replicas, per_gpu in [(16, 64), (4, 256)]:
    ra = sampling.RepeatedAug(3, replicas)
    assert ra.per_replica(1281167) == 1281024 // replicas
    assert ra.steps_per_epoch(1281167, replicas * per_gpu) == 1251
    sampler = RepeatAugSampler(range(1281167), num_replicas=replicas, rank=0)
    assert len(sampler) // per_gpu == 1251


def test_config_and_auto_replicas():
  cfg = lambda **kw: ml_collections.ConfigDict(kw)
  assert not sampling.RepeatedAug.from_config(cfg(), batch_size=64, process_count=1).on
  assert not sampling.RepeatedAug.from_config(None, batch_size=64, process_count=1).on
  auto = lambda b, p: sampling.RepeatedAug.from_config(cfg(repeated_aug=3), batch_size=b,
                                                       process_count=p).replicas
  assert auto(64, 1) == 8 and auto(100, 1) == 5 and auto(64, 2) == 8 and auto(64, 16) == 16
  assert auto(13, 1) == 1  # A prime batch has one block: copies side by side.
  explicit = sampling.RepeatedAug.from_config(cfg(repeated_aug=3, repeated_aug_replicas=4),
                                              batch_size=32, process_count=2)
  assert explicit == sampling.RepeatedAug(3, 4)
  for bad in [dict(repeated_aug=0), dict(repeated_aug=2.5), dict(repeated_aug=3, repeated_aug_replicas=3),
              dict(repeated_aug=3, repeated_aug_replicas=-1)]:
    with pytest.raises(UserError, match='repeated_aug'):
      sampling.RepeatedAug.from_config(cfg(**bad), batch_size=32, process_count=2)


def dataset_cfg(data_dir, **overrides):
  cfg = dict(name='digits', data_dir=data_dir, train_split='train', eval_split='test',
             shuffle_buffer=200, cache=True)
  return ml_collections.ConfigDict({**cfg, **overrides})


def aug_cfg(**overrides):
  cfg = dict(random_resized_crop=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=True,
             randaugment='', random_erasing=0.25, repeated_aug=3, repeated_aug_replicas=4)
  return ml_collections.ConfigDict({**cfg, **overrides})


NO_AUG = dict(random_resized_crop=False, hflip=False, randaugment='', random_erasing=0.)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize('cache', [True, False])
def test_resume_and_determinism_with_repeated_aug(data_dir, cache):
  cfg = dataset_cfg(data_dir, train_split='train[:600]', cache=cache)
  batch = 48
  aug = aug_cfg() if cache else aug_cfg(randaugment='rand-m9-mstd0.5-inc1')
  assert pipeline.steps_per_epoch(cfg, batch_size=batch, aug_cfg=aug) == 512 // batch == 10
  make = lambda start, seed=7: pipeline.train_iterator(cfg, aug, img_size=IMG, batch_size=batch,
                                                       seed=seed, start_step=start)
  full = take(make(0), 12)
  for a, b in zip(full[8:12], take(make(8), 4)):  # Crosses the epoch boundary at step 10.
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  again = next(make(0))
  np.testing.assert_array_equal(full[0]['image'], again['image'])
  assert not np.array_equal(full[0]['image'], next(make(0, seed=8))['image'])


@pytest.mark.parametrize('process_count', [1, 2])
def test_copies_sit_in_different_blocks_with_different_augmentations(data_dir, process_count):
  """Without augmentation the rows that the arrangement says are copies of one image are equal
  (and each image of a batch has exactly 3 rows); with augmentation (erasing always on, so that two
  draws of an 8x8 digit cannot coincide) they all differ."""
  cfg = dataset_cfg(data_dir)
  batch, replicas = 48 // process_count, 4
  ra = sampling.RepeatedAug(3, replicas)
  blocks, per_block = replicas // process_count, batch * process_count // replicas
  rows = np.arange(batch)
  source = (rows // per_block + blocks * (rows % per_block)) // 3  # Base position of each row.
  for step in [0, 3]:
    for p in range(process_count):
      make = lambda aug: pipeline.train_iterator(cfg, aug_cfg(**aug), img_size=IMG, batch_size=batch,
                                                 seed=1, start_step=step, process_index=p,
                                                 process_count=process_count)
      plain, augmented = next(make(NO_AUG)), next(make(dict(random_erasing=1.0)))
      np.testing.assert_array_equal(plain['label'], augmented['label'])
      assert ra.replicas == replicas
      for base in np.unique(source):
        copies = np.flatnonzero(source == base)
        assert len(copies) == 3
        assert len(set(copies // per_block)) == min(3, blocks)  # Spread over the slice's blocks.
        for i in copies[1:]:
          np.testing.assert_array_equal(plain['image'][i], plain['image'][copies[0]])
          assert plain['label'][i] == plain['label'][copies[0]]
          assert not np.array_equal(augmented['image'][i], augmented['image'][copies[0]])
      distinct = {plain['image'][i].tobytes() for i in rows}
      assert len(distinct) >= len(np.unique(source)) - 2  # Allows a duplicate 8x8 scan or two.


def test_repeated_aug_errors(data_dir):
  cfg = dataset_cfg(data_dir)
  with pytest.raises(UserError, match='multiple of 256'):
    pipeline.train_iterator(dataset_cfg(data_dir, train_split='train[:300]'), aug_cfg(), img_size=IMG,
                            batch_size=512, seed=0)
  with pytest.raises(UserError, match='repeated_aug_replicas'):
    pipeline.train_iterator(cfg, aug_cfg(repeated_aug_replicas=5), img_size=IMG, batch_size=48, seed=0)
