"""PyTorch state dicts -> Flax variables: the generic part, shared by every family.

A torch key maps to a Flax leaf by name: dots become path separators, a numeric index joins the
name before it (`blocks.0.attn.qkv.weight` -> `blocks_0/attn/qkv/...`), and the leaf is chosen by
what the model has at that path:

* `weight` -> `kernel` (Linear: (out, in) -> (in, out); ConvNd: (O, I, *k) -> (*k, I, O)),
  else `scale` (LayerNorm, BatchNorm, GroupNorm), else `embedding` (nn.Embedding);
* `bias` -> `bias`; `running_mean` / `running_var` -> `batch_stats` `mean` / `var`;
  `num_batches_tracked` is dropped;
* any other name (`cls_token`, `pos_embed`, `gamma`, ...) -> a parameter of the same name, as is.

A family registers a converter with `@register_converter(names, head=...)`: a function
`(state_dict, model) -> state_dict` that fixes what renaming cannot (key renames, resampling
position embeddings to the model's input size). The expected tree comes from
`jax.eval_shape(model.init, ...)`, so missing keys, unexpected keys and shape mismatches are all
reported, in torch naming, before anything is built.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from compact_vit.errors import UserError
from compact_vit.models import create_model
from compact_vit.nn.layers import to_pair

StateDict = dict[str, np.ndarray]
Prepare = Callable[[StateDict, nn.Module], StateDict]
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class FamilyConverter:
  """How one family's checkpoints convert.

  `prepare` fixes the state dict for the generic mapping; `head` names the classifier modules
  (torch naming) that `drop_head=True` leaves freshly initialised.
  """
  prepare: Prepare
  head: tuple[str, ...]


_CONVERTERS: dict[str, FamilyConverter] = {}


def register_converter(names: list[str] | tuple[str, ...],
                       head: tuple[str, ...] = ("head",)) -> Callable[[Prepare], Prepare]:
  """Decorator registering `prepare(state_dict, model) -> state_dict` for the model `names`."""
  def wrap(prepare: Prepare) -> Prepare:
    for name in names:
      if name in _CONVERTERS:
        raise ValueError(f"A converter for {name!r} is registered twice.")
      _CONVERTERS[name] = FamilyConverter(prepare, tuple(head))
    return prepare
  return wrap


def load_pytorch_state_dict(name: str, state_dict: Mapping[str, Any], *, drop_head: bool = False,
                            **overrides: Any) -> dict[str, Any]:
  """Converts a PyTorch `state_dict` (timm or the authors' naming) for model `name`.

  Values may be numpy arrays or torch tensors. `overrides` go to `create_model` (e.g.
  `img_size=384`: the ViT converter then resamples the position embedding). `drop_head=True`
  skips the checkpoint's classifier head(s) and keeps them freshly initialised (seed 0), which is
  how to load a checkpoint into a model with another `num_classes`.

  Returns Flax variables `{'params': ...}` (plus `'batch_stats'` where the model has BatchNorm) as
  numpy arrays in the model's parameter dtype. Raises UserError naming every missing key,
  unexpected key and shape mismatch.
  """
  if name not in _CONVERTERS:
    raise UserError(f"No PyTorch converter for model {name!r}. Models with one: "
                    f"{', '.join(sorted(_CONVERTERS))}.")
  family = _CONVERTERS[name]
  model = create_model(name, **overrides)
  sample = jnp.zeros((1, *to_pair(model.img_size), 3), jnp.float32)
  expected = _flatten(jax.eval_shape(model.init, jax.random.key(0), sample))
  expected = {p: s for p, s in expected.items() if p[0] in ("params", "batch_stats")}

  state_dict = {k: _to_numpy(v) for k, v in state_dict.items()}
  if drop_head:
    state_dict = {k: v for k, v in state_dict.items() if not _in_head(k, family.head)}
  state_dict = family.prepare(state_dict, model)

  found, unexpected, mismatched, mismatched_paths = {}, [], [], set()
  for key, value in state_dict.items():
    target = _target(key, expected)
    if target is None:
      if not key.endswith("num_batches_tracked"):
        unexpected.append(key)
      continue
    want = expected[target].shape
    got, want_torch = value, want
    if target[-1] == "kernel":  # torch (O, I, *k) <-> Flax (*k, I, O)
      want_torch = (*want[-1:-3:-1], *want[:-2])
      if value.ndim == len(want):
        got = np.transpose(value, (*range(2, value.ndim), 1, 0))
    if got.shape != tuple(want):
      mismatched.append(
          f"{key}: checkpoint {tuple(value.shape)}, model expects {tuple(want_torch)}")
      mismatched_paths.add(target)
      continue
    found[target] = np.asarray(got, dtype=expected[target].dtype)

  if drop_head:  # jit returning only the head lets XLA drop the rest of the init
    head_paths = [p for p in expected if _in_head(_torch_key(p), family.head)]
    init_head = jax.jit(lambda key: [_flatten(model.init(key, sample))[p] for p in head_paths])
    found.update(zip(head_paths, map(np.asarray, init_head(jax.random.key(0)))))
  missing = sorted(_torch_key(p) for p in expected if p not in found and p not in mismatched_paths)
  if missing or unexpected or mismatched:
    problems = {"missing keys": missing, "unexpected keys": sorted(unexpected),
                "shape mismatches": sorted(mismatched)}
    parts = [f"{what} ({len(keys)}): {', '.join(keys[:20])}{', ...' if len(keys) > 20 else ''}"
             for what, keys in problems.items() if keys]
    hint = ""
    if any(_in_head(m.split(":")[0], family.head) for m in mismatched):
      hint = (" The classifier head differs: to load this checkpoint with another num_classes, "
              "pass drop_head=True (CLI: --drop-head) to start the head freshly initialised.")
    model_desc = name + (f" with {overrides}" if overrides else "")
    raise UserError(f"Checkpoint does not match {model_desc}: " + " | ".join(parts) + "." + hint)
  return _unflatten(found)


def read_state_dict(path: str) -> StateDict:
  """Reads a state dict from `.pth`/`.pt`/`.bin` (torch, weights only), `.safetensors` or `.npz`.

  Unwraps `{'model': sd}` / `{'state_dict': sd}` / `{'model_state': sd}` and strips a DDP `module.`
  prefix. torch is imported only for torch files.
  """
  if not os.path.isfile(path):
    raise UserError(f"Checkpoint file {path} does not exist.")
  ext = os.path.splitext(path)[1].lower()
  try:
    if ext in (".pth", ".pt", ".bin"):
      import torch  # pylint: disable=import-outside-toplevel
      obj = torch.load(path, map_location="cpu", weights_only=True)
    elif ext == ".safetensors":
      from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
      obj = load_file(path)
    elif ext == ".npz":
      with np.load(path) as data:
        obj = dict(data)
    else:
      raise UserError(f"Unsupported checkpoint type {ext!r} ({path}); use .pth, .pt, .bin, "
                      ".safetensors or .npz.")
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"Could not read checkpoint {path}: {type(e).__name__}: {e}") from e
  for wrapper in ("model", "state_dict", "model_state"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise UserError(f"Checkpoint {path} holds a {type(obj).__name__}, not a state dict.")
  if obj and all(k.startswith("module.") for k in obj):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return {k: _to_numpy(v) for k, v in obj.items()}


def _to_numpy(value: Any) -> np.ndarray:
  torch = sys.modules.get("torch")
  if torch is not None and isinstance(value, torch.Tensor):
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  return np.asarray(value)


def _in_head(key: str, head: tuple[str, ...]) -> bool:
  return any(key == h or key.startswith(h + ".") for h in head)


def _target(key: str, expected: Mapping[Path, Any]) -> Path | None:
  """The Flax variable path for torch `key`, or None if the model has no such variable."""
  parts = []
  for part in key.split("."):
    if part.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  *module, leaf = parts
  candidates = {
      "weight": [("params", "kernel"), ("params", "scale"), ("params", "embedding"),
                 ("params", "weight")],
      "running_mean": [("batch_stats", "mean")],
      "running_var": [("batch_stats", "var")],
  }.get(leaf, [("params", leaf)])
  for collection, name in candidates:
    path = (collection, *module, name)
    if path in expected:
      return path
  return None


def _torch_key(path: Path) -> str:
  """Inverse of `_target` for messages: (params, blocks_0, norm1, scale) -> blocks.0.norm1.weight"""
  _, *module, leaf = path
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "mean": "running_mean",
          "var": "running_var"}.get(leaf, leaf)
  return ".".join([re.sub(r"_(\d+)$", r".\1", m) for m in module] + [leaf])


def _flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, (*prefix, k)))
    else:
      out[(*prefix, k)] = v
  return out


def _unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree
