"""TensorFlow's host allocator: page faults and time per batch with the pooling (BFC) allocator that
`compact_vit/data/_tf.py` turns on, and with malloc (`TF_CPU_ALLOCATOR_USE_BFC=0`, and
`TF_ENABLE_ONEDNN_OPTS=0`: on x86 with AVX-512 TF turns oneDNN on, whose allocator pools as well).

Each measurement is a fresh process making 40 MB batches one after another through tf.data; the
two settings alternate over rounds. malloc's count depends on glibc's dynamic mmap threshold and on
the machine's memory state (a freed block can be handed back without touching the kernel), which is
why the suite asserts only the pooled side (tests/test_data.py) and this script measures both.

  python benchmarks/host_allocator.py --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # pylint: disable=wrong-import-position

_PROBE = '''
import json, resource, statistics, time
from compact_vit.data._tf import tf
ds = tf.data.Dataset.range({batches}).map(lambda i: tf.fill([10_000_000], tf.cast(i, tf.float32))).batch(1)
faults, stamps = [], []
for _ in ds.as_numpy_iterator():
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
  stamps.append(time.perf_counter())
skip = 10  # warm-up: the pool grows to its working size
print(json.dumps({{
    'faults': statistics.median(b - a for a, b in zip(faults[skip:], faults[skip + 1:])),
    'ms': 1e3 * statistics.median(b - a for a, b in zip(stamps[skip:], stamps[skip + 1:]))}}))
'''

SETTINGS = {'pooled (BFC, the default)': '1',
            'malloc (TF_CPU_ALLOCATOR_USE_BFC=0, TF_ENABLE_ONEDNN_OPTS=0)': '0'}


def measure(use_bfc: str, batches: int) -> dict[str, float]:
  env = {k: v for k, v in os.environ.items() if not k.startswith('TF_CPU_')}
  env['TF_CPU_ALLOCATOR_USE_BFC'] = use_bfc
  if use_bfc == '0':  # where TF turns oneDNN on (x86 with AVX-512), its allocator pools as well
    env['TF_ENABLE_ONEDNN_OPTS'] = '0'
  env['PYTHONPATH'] = ROOT
  out = subprocess.run([sys.executable, '-c', _PROBE.format(batches=batches)], check=True, cwd=ROOT,
                       text=True, capture_output=True, env=env).stdout
  return json.loads(out.splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--batches', type=int, default=40, help='40 MB batches per process')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'host_allocator_cpu.md'))
  args = parser.parse_args()
  results = {name: [] for name in SETTINGS}
  for r in range(args.rounds):
    for name in (list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]):
      results[name].append(measure(SETTINGS[name], args.batches))
      print(name, results[name][-1], flush=True)
  lines = ['# TensorFlow host allocator: page faults and time per 40 MB batch', '',
           f'`python benchmarks/host_allocator.py --rounds {args.rounds} --batches {args.batches}`; '
           f'median per batch after 10 warm-up batches, one fresh process per round and setting '
           f'(load average {os.getloadavg()[0]:.1f} at the end).', '',
           '| allocator | page faults per batch, median (range over rounds) | ms per batch, median (range) |',
           '|---|---|---|']
  for name, rows in results.items():
    faults = [row['faults'] for row in rows]
    ms = [row['ms'] for row in rows]
    lines.append(f'| {name} | {statistics.median(faults):.0f} ({min(faults):.0f}-{max(faults):.0f}) | '
                 f'{statistics.median(ms):.2f} ({min(ms):.2f}-{max(ms):.2f}) |')
  _report.write_markdown('\n'.join(lines) + '\n', args.out)


if __name__ == '__main__':
  main()
