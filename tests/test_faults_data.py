"""Bad input data: unreadable images and damaged TFRecord files are skipped deterministically
(resume stays exact), named once, counted and capped; PNG / CMYK / grayscale files named .JPEG are
used as RGB; evaluation reports what it could not read."""
import glob
import io
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from compact_vit.data import pipeline
from compact_vit.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG = 16
BATCH = 8
NO_AUG = dict(random_resized_crop=False, hflip=False, randaugment='', random_erasing=0.)


def _aug(**overrides):
  cfg = dict(random_resized_crop=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=True,
             randaugment='rand-m9-mstd0.5-inc1', random_erasing=0.25, color_jitter=0.)
  return ml_collections.ConfigDict({**cfg, **overrides})


def _encode(image: Image.Image, fmt: str = 'JPEG') -> bytes:
  out = io.BytesIO()
  image.save(out, fmt)
  return out.getvalue()


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """root/{train,val}/{a,b}/*.JPEG: noise photos; train holds 32 files (4 batches of 8, so every
  file is in every epoch), 3 of them unreadable and 3 odd formats; val 12, 1 unreadable."""
  root = tmp_path_factory.mktemp('folder')
  rng = np.random.default_rng(0)
  photo = lambda: Image.fromarray(rng.integers(0, 256, (20 + rng.integers(8), 28, 3), dtype=np.uint8))
  good = _encode(photo())
  files = {
      'train/a/empty.JPEG': b'',  # a zero-byte file
      'train/b/truncated.JPEG': good[:len(good) // 2],
      'train/a/corrupt.JPEG': b'\xff\xd8\xff\xe0' + rng.bytes(400),  # a JPEG header, then noise
      'train/a/png.JPEG': _encode(photo(), 'PNG'),
      'train/b/cmyk.JPEG': _encode(photo().convert('CMYK')),
      'train/b/gray.JPEG': _encode(photo().convert('L')),
      'val/a/corrupt.JPEG': b'\xff\xd8\xff\xe0' + rng.bytes(300),
  }
  for i in range(26):
    files[f'train/{"ab"[i % 2]}/{i}.JPEG'] = _encode(photo())
  for i in range(11):
    files[f'val/{"ab"[i % 2]}/{i}.JPEG'] = _encode(photo())
  for name, data in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  bad = {str(root / n) for n in ('train/a/empty.JPEG', 'train/b/truncated.JPEG', 'train/a/corrupt.JPEG')}
  return root, files, bad


def _cfg(root, **overrides):
  return ml_collections.ConfigDict({'name': f'folder:{root}', 'eval_split': 'val', 'on_accelerator': False,
                                    'max_skipped': 0.2, **overrides})


def test_odd_formats_under_jpeg_names_decode_as_rgb(folder):
  from compact_vit.data import transforms
  from compact_vit.data._tf import tf
  _, files, _ = folder
  for name in ('train/a/png.JPEG', 'train/b/cmyk.JPEG', 'train/b/gray.JPEG'):
    ours = transforms.decode(tf.constant(files[name])).numpy()
    reference = np.asarray(Image.open(io.BytesIO(files[name])).convert('RGB'))
    assert ours.shape == reference.shape and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - reference).max() <= 1, name  # PIL's conversion, within rounding


@pytest.mark.parametrize('cache', [False, True])  # cached: the encoded bytes, in host memory
def test_unreadable_train_examples_are_skipped_named_once_and_filled(folder, capsys, cache):
  root, _, bad = folder
  it = pipeline.train_iterator(_cfg(root, cache=cache), _aug(**NO_AUG), img_size=IMG, batch_size=BATCH,
                               seed=0)
  per_batch = []
  for _ in range(8):  # two epochs
    before = it.skipped
    batch = next(it)
    assert batch['image'].shape == (BATCH, IMG, IMG, 3) and set(batch) == {'image', 'label'}
    per_batch.append(it.skipped - before)
    # Without augmentation an image gives the same row each time: a skipped row is a copy of a
    # readable row of the same batch, so the batch holds exactly that many repeated rows.
    distinct = np.unique(batch['image'].reshape(BATCH, -1), axis=0).shape[0]
    assert BATCH - distinct == per_batch[-1]
  assert sum(per_batch[:4]) == sum(per_batch[4:]) == 3  # each unreadable file once per epoch
  assert set(it.unreadable) == bad  # the odd formats are used, not skipped
  out = capsys.readouterr().out
  for name in bad:
    assert out.count(name) == 1, out  # named once, not once per epoch


def test_skipping_keeps_resume_exact(folder):
  root, _, _ = folder
  aug = _aug(randaugment='', random_erasing=0.)  # random crops and flips: enough to tell rows apart
  make = lambda start: pipeline.train_iterator(_cfg(root), aug, img_size=IMG, batch_size=BATCH,
                                               seed=3, start_step=start)
  full = make(0)
  batches = [next(full) for _ in range(4)]
  assert full.skipped == 3  # epoch 0
  batches += [next(full) for _ in range(3)]
  for start in (2, 5):
    resumed = make(start)
    for k in range(start, 7):
      batch = next(resumed)
      np.testing.assert_array_equal(batch['image'], batches[k]['image'])
      np.testing.assert_array_equal(batch['label'], batches[k]['label'])


def test_too_many_unreadable_examples_stop_with_their_names(folder):
  root, _, bad = folder
  it = pipeline.train_iterator(_cfg(root, max_skipped=0.), _aug(**NO_AUG), img_size=IMG,
                               batch_size=BATCH, seed=0)
  with pytest.raises(UserError, match='dataset.max_skipped') as error:
    for _ in range(4):
      next(it)
  assert any(name in str(error.value) for name in bad)
  for fraction in (1.5, -0.1, True):
    with pytest.raises(UserError, match='max_skipped'):
      pipeline.train_iterator(_cfg(root, max_skipped=fraction), None, img_size=IMG, batch_size=BATCH,
                              seed=0)


def test_eval_masks_and_reports_unreadable_examples(folder, capsys):
  root, _, _ = folder
  for on_accelerator in (False, True):
    it = pipeline.eval_iterator(_cfg(root, on_accelerator=on_accelerator), img_size=IMG, batch_size=5,
                                crop_pct=0.875)
    batches = list(it)
    assert len(batches) == 3 and sum(int(b['mask'].sum()) for b in batches) == 11
    assert list(it.unreadable) == [str(root / 'val/a/corrupt.JPEG')]
  assert 'Skipped an unreadable eval example: ' + str(root / 'val/a/corrupt.JPEG') in capsys.readouterr().out


@pytest.fixture(scope='module')
def damaged_tfds(tmp_path_factory):
  """The digits dataset with its train TFRecord file cut at 90% (truncated) and, in a second copy,
  its test file with bytes flipped mid-file (corrupt: a record checksum fails)."""
  clean = str(tmp_path_factory.mktemp('tfds'))
  pipeline.get_info(ml_collections.ConfigDict({'name': 'digits', 'data_dir': clean, 'eval_split': 'test'}))
  damaged = str(tmp_path_factory.mktemp('damaged'))
  shutil.copytree(clean, damaged, dirs_exist_ok=True)
  train_file, = glob.glob(f'{damaged}/digits/*/digits-train.tfrecord*')
  data = open(train_file, 'rb').read()
  open(train_file, 'wb').write(data[:int(len(data) * 0.9)])
  test_file, = glob.glob(f'{damaged}/digits/*/digits-test.tfrecord*')
  data = bytearray(open(test_file, 'rb').read())
  data[len(data) // 2:len(data) // 2 + 8] = b'\x00' * 8
  open(test_file, 'wb').write(bytes(data))
  return clean, damaged, train_file


def _digits(data_dir, **overrides):
  return ml_collections.ConfigDict({'name': 'digits', 'data_dir': data_dir, 'eval_split': 'test',
                                    'shuffle_buffer': 500, 'on_accelerator': False, **overrides})


def test_damaged_tfrecord_files_lose_only_their_records(damaged_tfds, capsys):
  clean, damaged, train_file = damaged_tfds
  make = lambda data_dir, start=0: pipeline.train_iterator(
      _digits(data_dir, max_skipped=0.5), None, img_size=8, batch_size=64, seed=1, start_step=start)
  full, reference = make(damaged), make(clean)
  batches = [next(full) for _ in range(24)]  # 22 steps per epoch: into the second epoch
  clean_batches = [next(reference) for _ in range(24)]
  # The file keeps its length: the lost records (its last ~10%) are skipped, each once per epoch.
  lost = len(full.unreadable)
  assert 100 <= lost <= 160 and full.skipped >= lost
  assert all(name.startswith(train_file) for name in full.unreadable)
  assert reference.skipped == 0
  # Rows of records before the damage are those of the clean dataset; no record moved.
  same = sum(np.array_equal(a['image'][i], b['image'][i]) for a, b in zip(batches, clean_batches)
             for i in range(64))
  assert same >= 24 * 64 - full.skipped
  out = capsys.readouterr().out
  assert out.count(f'Skipping the unreadable train records of {train_file}') == 1
  resumed = make(damaged, start=21)
  for k in range(21, 24):
    np.testing.assert_array_equal(next(resumed)['image'], batches[k]['image'])
  # With the default cap (0.1% of an epoch) the run stops and names the file.
  with pytest.raises(UserError, match='could not be read') as error:
    it = pipeline.train_iterator(_digits(damaged), None, img_size=8, batch_size=64, seed=1)
    for _ in range(22):
      next(it)
  assert train_file in str(error.value)
  # A corrupt test file: evaluation counts every record it could not read.
  it = pipeline.eval_iterator(_digits(damaged), img_size=8, batch_size=90, crop_pct=1.)
  read = sum(int(b['mask'].sum()) for b in it)
  assert 0 < len(it.unreadable) == 360 - read


def test_damaged_records_in_the_decoded_cache_count_as_without_it(damaged_tfds, capsys):
  """dataset.cache=True on fixed-shape images (held decoded): the records that do not decode keep
  their place, and are masked, named and counted as without the cache."""
  _, damaged, train_file = damaged_tfds
  make = lambda cache: pipeline.eval_iterator(_digits(damaged, eval_split='train', cache=cache),
                                              img_size=8, batch_size=256, crop_pct=1.)
  uncached, cached = make(False), make(True)
  for a, b in zip(uncached, cached, strict=True):
    assert set(a) == set(b) == {'image', 'label', 'mask'}
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert 100 <= len(cached.unreadable) <= 160
  assert list(cached.unreadable) == list(uncached.unreadable)
  assert capsys.readouterr().out.count(f'Skipping the unreadable eval records of {train_file}') == 2
  # Training: each lost record is a distinct unreadable example, so the default cap stops the run.
  with pytest.raises(UserError, match='could not be read') as error:
    it = pipeline.train_iterator(_digits(damaged, cache=True), None, img_size=8, batch_size=64, seed=1)
    for _ in range(22):
      next(it)
  assert train_file in str(error.value)


def test_train_and_eval_report_skipped_examples(folder, tmp_path):
  """train.py: data/skipped in metrics.jsonl and the progress line, the unreadable validation image
  in the eval line; eval.py: eval_val.json counts it."""
  root, _, bad = folder
  flags = [f'--config.dataset.name=folder:{root}', '--config.dataset.eval_split=val',
           '--config.dataset.max_skipped=0.2', '--config.batch_size=8', '--config.eval_batch_size=4',
           '--config.model.depth=1', '--config.model.embed_dim=32', '--config.model.num_heads=2',
           '--config.total_steps=8', '--config.log_every=4', '--config.eval_every=8',
           '--config.checkpoint_every=8']
  env = dict(os.environ, PYTHONUNBUFFERED='1', TF_CPP_MIN_LOG_LEVEL='3')
  run = lambda script: subprocess.run(
      [sys.executable, script, '--config', 'configs/deit_s.py:quick', '--workdir', str(tmp_path), *flags],
      cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
  out = run('train.py')
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['data/skipped'] for r in records if 'data/skipped' in r] == [3, 3]  # per 4-step epoch
  assert [r['val/unreadable'] for r in records if 'val/unreadable' in r] == [1]
  assert '  skipped 3' in out.stdout and '  skipped 6' in out.stdout
  assert all(out.stdout.count(name) == 1 for name in bad), out.stdout
  assert '1 of 12 examples unreadable' in out.stdout
  out = run('eval.py')
  assert out.returncode == 0, out.stderr[-3000:]
  record = json.load(open(tmp_path / 'eval_val.json'))
  assert record['unreadable'] == 1 and record['num_examples'] == 11
