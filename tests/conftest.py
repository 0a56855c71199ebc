"""Helpers shared by the tests: logits of our models and of their PyTorch references, and the error
measure the parity tests use. Test modules import them with `from conftest import ...`."""
import jax
import jax.numpy as jnp
import numpy as np

from compact_vit.models import create_model


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
