"""Imports TensorFlow and TFDS for host-side input pipelines: quiet, never on an accelerator, and
with TF's pooling CPU allocator (below).

TensorFlow's C++ runtime prints a oneDNN notice (twice, with absl's "before InitializeLog" line)
while it loads, before any Python logging setting applies. The import runs with the process's
stderr captured; known notices are dropped and anything else is written back to stderr."""
import os
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# TF's pooling (BFC) allocator for host tensors instead of malloc: a batch (tens of MB) is then carved
# from memory TF already holds, where malloc maps fresh pages for every batch and the kernel
# zero-fills them on first touch, ~0.5 ms of system time per 224x224 image (measured by
# benchmarks/input_pipeline.py: 148 page faults per image before, none after). The pool grows up to
# the machine's memory and keeps what it took. Set TF_CPU_ALLOCATOR_USE_BFC=0 to turn it off (and
# TF_ENABLE_ONEDNN_OPTS=0 on x86 CPUs with AVX-512, where TF turns oneDNN on and takes host tensors
# from oneDNN's own pool, whatever TF_CPU_ALLOCATOR_USE_BFC says).
os.environ.setdefault('TF_CPU_ALLOCATOR_USE_BFC', '1')
try:
  _memory_mb = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**20
except (ValueError, OSError, AttributeError):  # No sysconf: TF's own limit (64 GB).
  _memory_mb = None
if _memory_mb:
  os.environ.setdefault('TF_CPU_BFC_MEM_LIMIT_IN_MB', str(_memory_mb))

# At the end of its import TensorFlow imports Keras's optimizers whenever Keras is installed (for
# SavedModel registrations this project does not use): about 2 of the 6 seconds the import takes
# on 2 cores, at every start. Held off by a `None` entry in sys.modules while TF imports (TF
# catches the ImportError); afterwards `import keras`, `tf.keras` and `tensorflow.keras` load as
# usual.
_KERAS_EAGER = 'keras.src.optimizers'

_NOISE = ('oneDNN custom operations are on',
          'All log messages before absl::InitializeLog() is called are written to STDERR')


def _import_quietly():
  """`import tensorflow, tensorflow_datasets` with stderr (file descriptor 2) captured; returns
  the modules. Lines that are not known notices are passed on."""
  sys.stderr.flush()
  hold_keras = 'tensorflow' not in sys.modules and _KERAS_EAGER not in sys.modules
  if hold_keras:
    sys.modules[_KERAS_EAGER] = None
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+b') as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow as tf_module  # pylint: disable=import-outside-toplevel
      import tensorflow_datasets as tfds_module  # pylint: disable=import-outside-toplevel
    finally:
      if hold_keras and sys.modules.get(_KERAS_EAGER, 0) is None:
        del sys.modules[_KERAS_EAGER]
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode(errors='replace').splitlines(keepends=True)
              if not any(noise in line for noise in _NOISE)]
      sys.stderr.write(''.join(kept))
  return tf_module, tfds_module


tf, tfds = _import_quietly()

try:  # TF must not take GPU/TPU memory that JAX needs.
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
except RuntimeError:  # Devices already initialised by someone else; nothing left to do.
  pass
tfds.disable_progress_bar()



def plain(fn):
  """`fn` for a tf.data `map`, `filter`, `flat_map` or `interleave`, traced as written instead of
  rewritten by AutoGraph first. Our input functions branch only on Python values (a config's
  setting) or with `tf.cond`, so the rewrite changes nothing but costs time: converting the
  pipeline's functions took 6 of a quick run's 25 s on a 2-core machine, at every start."""
  return tf.autograph.experimental.do_not_convert(fn)


__all__ = ['tf', 'tfds', 'plain']
