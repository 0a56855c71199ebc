"""Helpers shared by the tests: logits of our models and of their PyTorch references, and the error
measure the parity tests use. Test modules import them with `from conftest import ...`.

The session shares one persistent JAX compilation cache (JAX_COMPILATION_CACHE_DIR, set here before
JAX is imported, so xdist's workers and every `train.py` / `eval.py` the tests start inherit it):
the many runs that compile the same small model compile it once. It starts empty each session, so
first compilations are tested too, and is removed at the end. A cache you set yourself is used."""
import atexit
import fcntl
import os
import shutil
import sys
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="compact_vit_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, True)  # in the process that made it: pytest's main one

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from compact_vit.models import create_model  # pylint: disable=wrong-import-position


def pytest_sessionfinish(session):
  """Stops this process's GCS-compatible server, if a test started one, when the session ends rather
  than only at exit (after one CI run a server was found still running)."""
  del session
  gcs_server = sys.modules.get("gcs_server")
  if gcs_server is not None and gcs_server._SERVER is not None:  # pylint: disable=protected-access
    gcs_server._SERVER.stop()  # pylint: disable=protected-access


def rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref|: the parity tests' error measure."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def random_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
  """(batch, size, size, 3) float32 N(0, 1): normalised-image-like NHWC inputs."""
  return np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32)


def our_logits(name: str, variables, images: np.ndarray, **overrides) -> np.ndarray:
  """Eval-mode logits of the registered model `name` (with `overrides`) on NHWC `images`."""
  model = create_model(name, **overrides)
  return np.asarray(jax.jit(model.apply)(variables, jnp.asarray(images)))


def torch_logits(model, images: np.ndarray) -> np.ndarray:
  """Eval-mode logits of a PyTorch model on NHWC `images` (given to it as NCHW)."""
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)).numpy()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data_dir holding the embedded digits dataset, prepared once for the session: xdist's
  workers share it (the first prepares it under a lock, the others wait). Tests only read it."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from compact_vit.data import pipeline  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the folder above every worker's own
  directory = root / "digits_tfds"
  with open(root / "digits_tfds.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    pipeline.get_info(ml_collections.ConfigDict({"name": "digits", "data_dir": str(directory),
                                                  "eval_split": "test"}))
  return str(directory)
