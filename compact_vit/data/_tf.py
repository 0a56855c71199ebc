"""Imports TensorFlow and TFDS for host-side input pipelines: quiet, and never on an accelerator."""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position

try:  # TF must not take GPU/TPU memory that JAX needs.
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
except RuntimeError:  # Devices already initialised by someone else; nothing left to do.
  pass
tfds.disable_progress_bar()

__all__ = ['tf', 'tfds']
