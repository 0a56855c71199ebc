"""Repeated augmentation: DeiT's `RASampler` (Hoffer et al. 2020, "Augment your batch"; Touvron et al.
2021, DeiT, 3 repeats), the same as timm's `RepeatAugSampler` with its defaults, as an order of records.

The authors' sampler, per epoch e, with N examples, R replicas (GPUs) and `repeats` copies:
  1. permute range(N) with a generator seeded by e;
  2. repeat each index `repeats` times in a row: [a, a, a, b, b, b, ...];
  3. replica r takes positions r, r + R, r + 2R, ... of that list (wrapping around past its end);
  4. keeping the first n = floor((N // 256) * 256 / R) of them (ceil(N / R) when N < 256);
each replica then batches its list in order with its own batch b (drop_last), so an epoch has n // b
steps, and the R per-replica batches of step k together hold positions [k R b, (k + 1) R b) of the
list: every image of a global batch comes `repeats` times, its copies on different replicas.

Here (`arrange`): the global batch B = R b is split into R equal blocks in row order, block r playing
replica r. Rows of a global batch come from input slices (`process_count` slices of the train
iterator, each B / S rows), so slice s holds the R / S blocks s R / S ... (s + 1) R / S - 1 (S must
divide R and R must divide B). With one slice and the same base permutation, block r over an epoch
holds exactly the first (n // b) b indices of replica r's list in the authors' sampler. Each row gets
its own augmentation key (by position, not by example), so the copies of an image are augmented
independently, as in the authors' data loader.

Departures from the authors' sampler:
  * with S > 1 slices, each slice applies steps 1-3 to its own part of the data (the slices of
    `tfds.even_splits`, as without repeated augmentation) with R / S replicas, keeping the authors'
    per-replica count n computed from the whole dataset: an epoch has the same steps and the same
    number of copies per image, but the copies of an image stay in their slice's blocks;
  * the base order of a TFDS source is its stream order (files shuffled, then a buffer shuffle,
    as without repeated augmentation), not a uniform permutation; folder and cached sources are
    permuted uniformly (by a stateless seed of (seed, epoch), not torch's generator);
  * `repeats` is an integer (timm also accepts fractional repeats).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from compact_vit.errors import UserError

SELECTED_ROUND = 256  # The authors round the examples of an epoch down to a multiple of 256.
DEFAULT_BLOCKS = 8  # Auto replicas: blocks of the global batch (DeiT's 8-GPU node), per the rule below.


@dataclasses.dataclass(frozen=True)
class RepeatedAug:
  """Repeated augmentation settings: `repeats` copies per image (1: off), `replicas` blocks of the
  global batch."""
  repeats: int = 1
  replicas: int = 1

  @property
  def on(self) -> bool:
    return self.repeats > 1

  @classmethod
  def from_config(cls, aug_cfg: Any, *, batch_size: int, process_count: int) -> 'RepeatedAug':
    """From `aug_cfg.repeated_aug` (repeats; absent, None or 1: off; DeiT: 3) and
    `aug_cfg.repeated_aug_replicas` (absent, None or 0: auto). Auto picks, per slice, the largest
    divisor of the slice batch that is at most max(1, 8 // process_count), times process_count: 8
    blocks for one slice with a batch divisible by 8, one block per slice from 8 slices on."""
    repeats = getattr(aug_cfg, 'repeated_aug', None) if aug_cfg is not None else None
    repeats = 1 if repeats is None else repeats
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
      raise UserError(f'aug.repeated_aug={repeats!r} must be an integer >= 1: the copies of each image '
                      'per epoch (DeiT: 3; 1 turns repeated augmentation off).')
    if repeats == 1:
      return cls()
    replicas = getattr(aug_cfg, 'repeated_aug_replicas', None) or 0
    if isinstance(replicas, bool) or not isinstance(replicas, (int, np.integer)) or replicas < 0:
      raise UserError(f'aug.repeated_aug_replicas={replicas!r} must be an integer >= 0 (0: auto).')
    if replicas == 0:
      most = max(1, DEFAULT_BLOCKS // process_count)
      replicas = process_count * max(d for d in range(1, most + 1) if batch_size % d == 0)
    global_batch = batch_size * process_count
    if replicas % process_count or global_batch % replicas:
      raise UserError(
          f'aug.repeated_aug_replicas={replicas} must be a multiple of the {process_count} input '
          f'slices and divide the global batch {global_batch}: each replica is an equal block of the '
          'global batch, within one slice. Set it to such a number (DeiT: its GPU count), or to 0 '
          'for automatic.')
    return cls(int(repeats), int(replicas))

  def per_replica(self, num_examples: int) -> int:
    """The examples each replica keeps per epoch (timm's num_selected_samples)."""
    if num_examples >= SELECTED_ROUND:
      selected = num_examples // SELECTED_ROUND * SELECTED_ROUND // self.replicas
    else:
      selected = math.ceil(num_examples / self.replicas)
    return min(selected, math.ceil(num_examples * self.repeats / self.replicas))

  def steps_per_epoch(self, num_examples: int, global_batch: int) -> int:
    """Steps of one epoch: the authors' per-replica count over the per-replica batch (drop_last)."""
    return self.per_replica(num_examples) // (global_batch // self.replicas)

  def arrange(self, records: Any, *, batch_size: int, process_count: int) -> Any:
    """tf.data records of one epoch in base order → this slice's rows in batch order (infinite:
    cut it to steps * batch_size). `batch_size` is the slice's; the slice holds R / S blocks."""
    from compact_vit.data._tf import plain, tf  # pylint: disable=g-import-not-at-top
    blocks = self.replicas // process_count
    per_block = batch_size // blocks
    # Row j * per_block + i of a slice batch is position j + blocks * i of the slice's chunk.
    rows = np.arange(batch_size)
    order = tf.constant((rows // per_block) + blocks * (rows % per_block), tf.int32)
    repeats = self.repeats

    def copies(*record):
      out = tuple(tf.stack([x] * repeats) for x in record)
      return out if len(out) > 1 else out[0]

    def place(*batch):
      out = tuple(tf.gather(x, order) for x in batch)
      return out if len(out) > 1 else out[0]

    ds = records.map(plain(copies)).unbatch().repeat()  # Wraps around past the end, as the authors'.
    return ds.batch(batch_size, drop_remainder=True).map(plain(place)).unbatch()
