"""The input pipeline's speed beside timm's DataLoader and beside the decoding floor, on real JPEGs
read through TFDS's imagenet2012 path, per host core.

  python benchmarks/input_pipeline.py [--cores 2] [--images 2560] [--rounds 5] [--batches 10]
      [--workdir /tmp/input_pipeline_bench] [--out benchmarks/results/input_pipeline_cpu.md]

Data: `--images` train and as many validation JPEGs cut from scikit-learn's two sample photographs
(`load_sample_images`, 640x427): a random region of one photo with the output's aspect ratio
(4:3 55%, 3:2 25%, 1:1 10%, 16:9 10%; portrait 20%), resized (bicubic) so that the longer side is
500 pixels for 70% of the images and log-uniform in [250, 1100] for the rest (ImageNet's spread:
mostly 500x375 / 500x333, with a tail of larger and smaller ones), saved at JPEG quality 90-95. They
are packed as ImageNet's manual download (ILSVRC2012_img_train.tar of per-synset tars,
ILSVRC2012_img_val.tar) and prepared by TFDS's own imagenet2012 builder, which stores the bytes as
they are; the same bytes are also written as an image folder for timm. Both are in `--workdir` and
reused by later runs.

Pipelines, each with batch 128, 224x224, all processes pinned to the same `--cores` cores:
  * train, ours: `pipeline.train_iterator` with DeiT's recipe (random resized crop, flip,
    RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25) → normalised float32 batches;
  * train, timm: `timm.data.create_transform(224, is_training=True, auto_augment=
    'rand-m9-mstd0.5-inc1', re_prob=0.25, interpolation='bicubic')` on PIL images read by timm's
    `ImageDataset`, in a torch DataLoader with `--cores` workers. Pillow 13 refuses
    ImageOps.posterize(img, 0), which timm's increasing Posterize asks for when the magnitude reaches
    10 (m9 + 0.5 sigma noise, ~2% of its draws); here bits 0 gives a black image, what
    posterize(img, 0) gave before Pillow 13 and what our posterize gives;
  * train floor: `tf.image.decode_and_crop_jpeg` of the same random crop windows, nothing else;
  * train, decode + resample: the floor plus the bicubic antialiased resampling to 224x224, no
    augmentation (where the time between the floor and ours goes);
  * ours, on_accelerator (train and eval): the same iterators with `dataset.on_accelerator=True`,
    the host's part only: decoded crops padded into 640x640 uint8 canvases (resampling and
    augmentation then run in the jitted step: `compact_vit.data.accelerator`, timed once on these
    cores for information);
  * eval, ours: `pipeline.eval_iterator` (crop_pct 0.875); eval, timm: create_transform(224,
    crop_pct=0.875, interpolation='bicubic') in the same DataLoader setting; eval floor: decoding
    the window ours decodes.
The floors run their map with the same tf.data options and parallel calls as ours
(`pipeline.parallel_calls()`).
timm runs in a child process (TensorFlow and PyTorch are never in one process). Each timing builds a
fresh iterator, takes 5 untimed batches (start-up, then what was made ahead: the DataLoader keeps 2
batches per worker in flight) and then times `--batches` batches, with at least 5 more batches left in
the pass so that no pipeline is winding down when the clock stops; the iterator is then closed, so no pipeline works in the background while another is
timed. Rounds alternate the pipelines, in reverse order every other round. Reported per pipeline:
images/s (wall clock; the median round), images/s per core (that over `--cores`), and CPU time per
image (all threads and worker processes of the pipeline; steadier on a shared machine); ratios are
medians over rounds of same-round ratios, with their range. Writes the table to `--out`.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import subprocess
import sys
import tarfile
import time

import numpy as np

import _report  # benchmarks/_report.py (this script's folder is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG, BATCH, CROP_PCT = 224, 128, 0.875
# Untimed batches per timing: start-up, then what the pipelines had made ahead (timm's DataLoader
# keeps 2 batches per worker in flight), so the timed batches are made at the steady rate.
SKIP = 5
OURS, OURS_ACCEL = 'ours', 'ours, on_accelerator: host part'
# Batches of a pass left after the timed ones, so that the pipelines are still at work (not winding
# down at the end of a pass) when the clock stops: CPU time in the window is then the steady cost.
TAIL = 5
RANDAUGMENT, ERASING = 'rand-m9-mstd0.5-inc1', 0.25


# ----------------------------------------------------------------------------- data

def photo_jpegs(count: int, seed: int) -> list[bytes]:
  """`count` JPEGs cut from scikit-learn's sample photographs, in ImageNet's size spread."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_sample_images  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  photos = [Image.fromarray(x) for x in load_sample_images().images]
  out = []
  for _ in range(count):
    photo = photos[rng.integers(len(photos))]
    long_side = 500 if rng.random() < 0.7 else int(math.exp(rng.uniform(math.log(250), math.log(1100))))
    aspect = rng.choice([4 / 3, 3 / 2, 1., 16 / 9], p=[.55, .25, .1, .1])
    w, h = long_side, int(round(long_side / aspect))
    if rng.random() < 0.2:
      w, h = h, w
    fit = min(photo.size[0] / w, photo.size[1] / h) * rng.uniform(0.5, 1.0)
    sw, sh = int(w * fit), int(h * fit)
    x0, y0 = rng.integers(0, photo.size[0] - sw + 1), rng.integers(0, photo.size[1] - sh + 1)
    image = photo.crop((x0, y0, x0 + sw, y0 + sh)).resize((w, h), Image.BICUBIC)
    data = io.BytesIO()
    image.save(data, 'JPEG', quality=int(rng.integers(90, 96)))
    out.append(data.getvalue())
  return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def prepare(workdir: str, count: int) -> tuple[str, str]:
  """(TFDS data_dir with imagenet2012 prepared, image folder root for timm), made once."""
  data_dir, folder = os.path.join(workdir, 'tfds'), os.path.join(workdir, 'folder')
  done = os.path.join(workdir, f'done_{count}')
  if os.path.exists(done):
    return data_dir, folder
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  labels_dir = os.path.join(os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012')
  with open(os.path.join(labels_dir, 'labels.txt')) as f:
    synsets = [line.strip() for line in f][:8]
  with open(os.path.join(labels_dir, 'validation_labels.txt')) as f:
    val_synsets = [line.strip() for line in f][:count]
  manual = os.path.join(data_dir, 'downloads', 'manual')
  os.makedirs(manual, exist_ok=True)
  train, val = photo_jpegs(count, 0), photo_jpegs(count, 1)
  with tarfile.open(os.path.join(manual, 'ILSVRC2012_img_train.tar'), 'w') as train_tar:
    for c, synset in enumerate(synsets):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as class_tar:
        for i in range(c, count, len(synsets)):
          _add(class_tar, f'{synset}_{i}.JPEG', train[i])
          _write(os.path.join(folder, 'train', synset, f'{synset}_{i}.JPEG'), train[i])
      _add(train_tar, f'{synset}.tar', inner.getvalue())
  with tarfile.open(os.path.join(manual, 'ILSVRC2012_img_val.tar'), 'w') as val_tar:
    for i, (data, synset) in enumerate(zip(val, val_synsets)):
      _add(val_tar, f'ILSVRC2012_val_{i + 1:08d}.JPEG', data)
      _write(os.path.join(folder, 'val', synset, f'ILSVRC2012_val_{i + 1:08d}.JPEG'), data)
  print(f'Preparing {count} train and {count} validation JPEGs with TFDS imagenet2012 ...', flush=True)
  tfds.builder('imagenet2012', data_dir=data_dir).download_and_prepare()
  open(done, 'w').close()
  return data_dir, folder


def _write(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def describe(folder: str) -> str:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  sizes, nbytes = [], []
  for dirpath, _, files in os.walk(os.path.join(folder, 'train')):
    for name in files:
      path = os.path.join(dirpath, name)
      sizes.append(Image.open(path).size)
      nbytes.append(os.path.getsize(path))
  pixels = np.array([w * h for w, h in sizes])
  longer = np.array([max(s) for s in sizes])
  return (f'{len(sizes)} train JPEGs: mean {pixels.mean() / 1e3:.0f}k pixels (median '
          f'{np.median(pixels) / 1e3:.0f}k), longer side {longer.min()}-{longer.max()} (500 for '
          f'{np.mean(longer == 500):.0%}), mean {np.mean(nbytes) / 1e3:.0f} kB')


# ----------------------------------------------------------------------------- timm (child process)

def timm_server(folder: str, cores: int) -> None:
  """Reads 'train N' / 'eval N' lines; answers {'wall', 'cpu', 'images'} for N batches."""
  import torch  # pylint: disable=import-outside-toplevel
  import timm.data  # pylint: disable=import-outside-toplevel
  from timm.data import auto_augment  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  posterize = auto_augment.posterize

  def posterize_0_is_black(img, bits, **kwargs):  # Pillow 13 refuses 0 bits.
    return posterize(img, bits, **kwargs) if bits >= 1 else Image.new(img.mode, img.size)

  for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
    auto_augment.NAME_TO_OP[name] = posterize_0_is_black
  transforms = {
      'train': timm.data.create_transform(IMG, is_training=True, auto_augment=RANDAUGMENT,
                                          re_prob=ERASING, interpolation='bicubic'),
      'eval': timm.data.create_transform(IMG, is_training=False, crop_pct=CROP_PCT,
                                         interpolation='bicubic')}
  datasets = {split: timm.data.ImageDataset(os.path.join(folder, 'train' if split == 'train' else 'val'),
                                            transform=transforms[split]) for split in transforms}
  tick = os.sysconf('SC_CLK_TCK')

  def cpu_seconds(workers):
    total = time.process_time()
    for worker in workers:
      with open(f'/proc/{worker.pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / tick
    return total

  print('ready', flush=True)
  for line in sys.stdin:
    split, batches = line.split()
    loader = torch.utils.data.DataLoader(datasets[split], batch_size=BATCH, num_workers=cores,
                                         shuffle=split == 'train', drop_last=True)
    it = iter(loader)
    for _ in range(SKIP):
      next(it)
    workers = it._workers  # pylint: disable=protected-access
    cpu, wall = cpu_seconds(workers), time.perf_counter()
    for _ in range(int(batches)):
      next(it)
    result = {'wall': time.perf_counter() - wall, 'cpu': cpu_seconds(workers) - cpu,
              'images': int(batches) * BATCH}
    del it
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- ours and the floors

def our_pipelines(data_dir: str):
  """name → function making a fresh iterator of batches (seeded by the round)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from compact_vit.data import pipeline, sources, transforms  # pylint: disable=import-outside-toplevel
  from compact_vit.data._tf import tf  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict(dict(name='imagenet2012', data_dir=data_dir, shuffle_buffer=1024))
  accel_cfg = ml_collections.ConfigDict({**cfg.to_dict(), 'on_accelerator': True})
  aug = ml_collections.ConfigDict(dict(random_resized_crop=True, hflip=True, randaugment=RANDAUGMENT,
                                       random_erasing=ERASING))
  dataset = sources.open_dataset('imagenet2012', data_dir, 'train')
  scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)

  def floor(split, seed, resample):
    shard = dataset.shard(split, 0, 1)

    def decode(i, record):
      data = record[0]
      shape = tf.image.extract_jpeg_shape(data)
      if split == 'train':
        key = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), i)
        k_crop = tf.random.experimental.stateless_split(key, 4)[0]
        box = tf.stack(transforms.random_resized_crop_box(shape, k_crop, scale, ratio))
      else:
        box = transforms.eval_window(shape, IMG, CROP_PCT)[0]
      image = tf.image.decode_and_crop_jpeg(data, box, channels=3, dct_method='INTEGER_ACCURATE')
      if resample:
        return transforms.resize_float(image, [IMG, IMG])
      return tf.shape(image)

    ds = shard.records(None).repeat().enumerate().map(decode,
                                                      num_parallel_calls=pipeline.parallel_calls())
    return ds.batch(BATCH).prefetch(2).with_options(pipeline._options()).as_numpy_iterator()  # pylint: disable=protected-access

  def eval_batches(config):
    while True:  # Passes over the split, as many as asked for.
      yield from pipeline.eval_iterator(config, img_size=IMG, batch_size=BATCH, crop_pct=CROP_PCT)

  def train_batches(config, seed):
    return pipeline.train_iterator(config, aug, img_size=IMG, batch_size=BATCH, seed=seed)

  return {
      ('train', 'floor: decode the crop window'): lambda seed: floor('train', seed, False),
      ('train', 'decode + resample, no augmentation'): lambda seed: floor('train', seed, True),
      ('train', OURS): lambda seed: train_batches(cfg, seed),
      ('train', OURS_ACCEL): lambda seed: train_batches(accel_cfg, seed),
      ('eval', 'floor: decode the centre window'): lambda seed: floor('validation', seed, False),
      ('eval', OURS): lambda seed: eval_batches(cfg),
      ('eval', OURS_ACCEL): lambda seed: eval_batches(accel_cfg),
  }


def accelerator_part_on_cpu(data_dir: str, calls: int = 3) -> dict[str, float]:
  """ms per image of `accelerator.train_batch` / `eval_batch` jitted on this CPU (informational: on an
  accelerator it runs inside the step), median of `calls` calls on one batch."""
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from compact_vit.data import accelerator, pipeline, settings  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict(dict(name='imagenet2012', data_dir=data_dir, on_accelerator=True))
  aug = settings.TrainAugment(hflip=True, randaugment=RANDAUGMENT, random_erasing=ERASING)
  mean, std = pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD
  fns = {'train': (jax.jit(lambda b: accelerator.train_batch(b, aug, img_size=IMG, mean=mean, std=std)),
                   next(pipeline.train_iterator(cfg, aug, img_size=IMG, batch_size=BATCH, seed=0))),
         'eval': (jax.jit(lambda b: accelerator.eval_batch(b, img_size=IMG, mean=mean, std=std)),
                  next(pipeline.eval_iterator(cfg, img_size=IMG, batch_size=BATCH, crop_pct=CROP_PCT)))}
  out = {}
  for split, (fn, batch) in fns.items():
    batch = {k: v for k, v in batch.items() if k not in ('label', 'mask')}
    cost = fn.lower(batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out[split + '_gflop'] = float(cost['flops']) / BATCH / 1e9
    fn(batch).block_until_ready()
    times = []
    for _ in range(calls):
      start = time.perf_counter()
      fn(batch).block_until_ready()
      times.append(time.perf_counter() - start)
    out[split] = float(np.median(times)) / BATCH * 1e3
  return out


def time_iterator(make, seed: int, batches: int) -> dict:
  it = make(seed)
  for _ in range(SKIP):
    next(it)
  cpu, wall = time.process_time(), time.perf_counter()
  for _ in range(batches):
    next(it)
  result = {'wall': time.perf_counter() - wall, 'cpu': time.process_time() - cpu,
            'images': batches * BATCH}
  del it
  return result


# ----------------------------------------------------------------------------- main

def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cores', type=int, default=2)
  parser.add_argument('--images', type=int, default=2560, help='train and validation JPEGs each')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--batches', type=int, default=10, help='timed batches of 128 per timing')
  parser.add_argument('--workdir', default='/tmp/input_pipeline_bench')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'input_pipeline_cpu.md'))
  parser.add_argument('--timm-server', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.timm_server:
    timm_server(args.timm_server, args.cores)
    return
  if args.images < BATCH * (args.batches + SKIP + TAIL):
    parser.error(f'--images must be at least {BATCH * (args.batches + SKIP + TAIL)} ({args.batches} + '
                 f'{SKIP} + {TAIL} batches of {BATCH}).')
  _report.cpu_setup(args.cores)  # Pins this process and the timm child it starts.
  load_start = os.getloadavg()
  data_dir, folder = prepare(args.workdir, args.images)
  child = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--timm-server', folder,
                            '--cores', str(args.cores)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
  assert child.stdout.readline().strip() == 'ready'

  def timm_run(split):
    def run(seed):
      del seed
      child.stdin.write(f'{split} {args.batches}\n')
      child.stdin.flush()
      return json.loads(child.stdout.readline())
    return run

  ours = our_pipelines(data_dir)
  runs = {key: (lambda seed, make=make: time_iterator(make, seed, args.batches))
          for key, make in ours.items()}
  runs[('train', 'timm DataLoader')] = timm_run('train')
  runs[('eval', 'timm DataLoader')] = timm_run('eval')
  for key, run in runs.items():  # Untimed: first compilations, page cache, worker start.
    run(1000)
  results = {key: [] for key in runs}
  for r in range(args.rounds):
    for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
      results[key].append(runs[key](r))
    print(f'round {r + 1}/{args.rounds} done', flush=True)
  child.stdin.close()
  child.wait()
  accel = accelerator_part_on_cpu(data_dir)
  write_table(args, results, accel, describe(folder), load_start, os.getloadavg())


def write_table(args, results, accel, data_description, load_start, load_end) -> None:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import PIL  # pylint: disable=import-outside-toplevel
  rate = {key: np.array([m['images'] / m['wall'] for m in ms]) for key, ms in results.items()}
  cpu_ms = {key: np.array([m['cpu'] / m['images'] * 1e3 for m in ms]) for key, ms in results.items()}
  versions = subprocess.run([sys.executable, '-c', 'import torch, timm; print(torch.__version__, '
                             'timm.__version__)'], capture_output=True, text=True).stdout.split()
  lines = [
      f'# Input pipeline on {args.cores} CPU cores: ours, timm\'s DataLoader and the decoding floor',
      '',
      f'`python benchmarks/input_pipeline.py --cores {args.cores} --images {args.images} --rounds '
      f'{args.rounds} --batches {args.batches}`; {platform.processor() or platform.machine()}, '
      f'TensorFlow {tf.__version__}, torch {versions[0]}, timm {versions[1]}, Pillow {PIL.__version__}. '
      f'Load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end (a shared '
      'machine: other work ran on the same cores, so wall-clock rates move between rounds; the CPU '
      'time per image is steadier).',
      '',
      f'Data: {data_description}; read by ours through TFDS imagenet2012 (TFRecords), by timm from '
      'the same bytes as files. Batch 128, 224x224. Rates: median over rounds; per core = rate / '
      f'{args.cores}.',
      '',
      '| split | pipeline | images/s | images/s per core | CPU ms per image |',
      '|---|---|---|---|---|',
  ]
  for (split, name) in results:
    key = (split, name)
    lines.append(f'| {split} | {name} | {np.median(rate[key]):.0f} | '
                 f'{np.median(rate[key]) / args.cores:.0f} | {np.median(cpu_ms[key]):.2f} |')
  lines += ['', '| split | ratio | wall clock, median (range) over rounds | CPU time per image, '
            'median (range) |', '|---|---|---|---|']
  for split in ('train', 'eval'):
    names = [name for s, name in results if s == split]
    floor = next(n for n in names if n.startswith('floor'))
    for a, b, label in [(OURS, 'timm DataLoader', 'ours / timm'), (OURS, floor, 'ours / floor'),
                        (OURS_ACCEL, 'timm DataLoader', 'on_accelerator host part / timm'),
                        (OURS_ACCEL, floor, 'on_accelerator host part / floor')]:
      wall = rate[(split, a)] / rate[(split, b)]
      cpu = cpu_ms[(split, b)] / cpu_ms[(split, a)]
      lines.append(f'| {split} | {label} (speed) | {np.median(wall):.2f}x ({wall.min():.2f}-'
                   f'{wall.max():.2f}) | {np.median(cpu):.2f}x ({cpu.min():.2f}-{cpu.max():.2f}) |')
  from compact_vit.data import accelerator  # pylint: disable=import-outside-toplevel
  canvas = accelerator.canvas_size(IMG)
  resample = ('train', 'decode + resample, no augmentation')
  floor_cpu, res_cpu, ours_cpu = (np.median(cpu_ms[k]) for k in
                                  [('train', 'floor: decode the crop window'), resample, ('train', OURS)])
  lines += ['', f'Train CPU time per image: decoding {floor_cpu:.2f} ms, resampling to 224x224 '
            f'{res_cpu - floor_cpu:.2f} ms, everything else (flip, RandAugment, normalisation, '
            f'erasing, batching) {ours_cpu - res_cpu:.2f} ms.', '',
            f'With `dataset.on_accelerator=True` the host decodes and crops only (crops larger than '
            f'the {canvas}x{canvas} canvas are resampled on the host) and the jitted step resamples '
            'and augments the batch (`compact_vit.data.accelerator`). That part, jitted on these CPU '
            'cores for information (on an accelerator it runs inside the train step): '
            f'{accel["train"]:.2f} ms per image for train, {accel["eval"]:.2f} ms for eval; XLA counts '
            f'{accel["train_gflop"]:.2f} and {accel["eval_gflop"]:.2f} GFLOP per image (float32).',
            '', "TensorFlow's host allocator: TF_CPU_ALLOCATOR_USE_BFC="
            f'{os.environ.get("TF_CPU_ALLOCATOR_USE_BFC")} (`compact_vit/data/_tf.py` sets 1: pooled, '
            'no page faults per batch).', '']
  _report.write_markdown('\n'.join(lines), args.out)


if __name__ == '__main__':
  main()
