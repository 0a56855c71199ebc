"""Input pipeline: TFDS / image folders → tf.data on the host → numpy batches (see `pipeline`).

TensorFlow is only imported inside this package, and only when a pipeline function runs, so the
rest of compact_vit imports without it.
"""
