"""Weights by name: Hugging Face Hub checkpoints (`hf-hub:timm/deit_small_patch16_224.fb_in1k`)
and PyTorch checkpoint files, converted once and kept.

`resolve_init_from(spec, model_name=..., **overrides)` turns what a user may pass as
`config.init_from` / `config.distill.teacher_init_from` into a directory that
`compact_vit.checkpointing.load_variables` reads:

* a directory is returned unchanged (a `python -m compact_vit.convert` output);
* `hf-hub:OWNER/NAME[/FILE][@REVISION]` is downloaded with `huggingface_hub` into its standard
  cache (`HF_HUB_CACHE`, by default `~/.cache/huggingface/hub`): `model.safetensors`, else
  `pytorch_model.bin`, or FILE when named (`.safetensors`, `.bin`, `.pth`, `.pt`, `.npz`);
* a checkpoint file is read as it is.

The checkpoint is converted with `load_pytorch_state_dict` and saved with `save_variables` under
`COMPACT_VIT_CACHE` (default `~/.cache/compact_vit`) in `converted/<repo or file>/<model>-<key>`,
keyed by the repository, the commit the revision resolved to (or the file's path, size and
modification time), the file, the model and its overrides; the next call finds it and converts
nothing. With `HF_HUB_OFFLINE=1` (or no network) a cached download is used as it is; when there is
none, a one-line UserError says what to download and where to put it, before any model is built.

When `num_classes` differs from the checkpoint's classifier, the head starts freshly initialised
(as timm's `create_model(..., pretrained=True, num_classes=N)`). `COMPACT_VIT_CACHE` may be a
bucket (`gs://BUCKET/cache`): then in a multi-process run process 0 downloads and converts once
while the others wait for its copy and read it. With a local cache, converted copies are written by
single-process runs (a GPU host, a single-host TPU VM); a multi-host run takes a bucket cache or a
directory converted beforehand with `python -m compact_vit.convert --checkpoint hf-hub:...`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from compact_vit import models, paths
from compact_vit.checkpointing import check_tree_matches, load_variables, save_variables
from compact_vit.convert.core import load_pytorch_state_dict, read_state_dict
from compact_vit.convert.published import default_spec, hub_repo
from compact_vit.errors import UserError

HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def cache_root() -> str:
  """Where converted copies are kept: $COMPACT_VIT_CACHE, else $XDG_CACHE_HOME/compact_vit, else
  ~/.cache/compact_vit."""
  if os.environ.get("COMPACT_VIT_CACHE"):
    return paths.absolute(paths.check_path(os.environ["COMPACT_VIT_CACHE"], "COMPACT_VIT_CACHE"))
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(xdg, "compact_vit")


def download(spec: str) -> tuple[str, dict[str, str]]:
  """Local path of the checkpoint file of `hf-hub:OWNER/NAME[/FILE][@REVISION]` (downloaded into
  the Hugging Face cache if not there), and its source: repo, file and the commit the revision
  resolved to.

  Raises a one-line UserError when the repository, revision or file does not exist, and, when the
  file is not cached and the Hub cannot be reached, says which command fills the cache."""
  from huggingface_hub import constants, hf_hub_download  # pylint: disable=import-outside-toplevel
  from huggingface_hub import errors as hf_errors  # pylint: disable=import-outside-toplevel
  repo_id, file, revision = hub_repo(spec)
  files = (file,) if file else HUB_FILES
  not_cached = []
  for name in files:
    try:  # once the Hub proved unreachable, look only in the cache (no more retries)
      path = hf_hub_download(repo_id, name, revision=revision, library_name="compact_vit",
                             local_files_only=bool(not_cached))
    except hf_errors.LocalEntryNotFoundError:  # not cached, and offline or the Hub unreachable
      not_cached.append(name)
      continue
    except hf_errors.EntryNotFoundError:  # the repository has no such file
      continue
    except hf_errors.GatedRepoError as e:
      raise UserError(f"{repo_id} is gated: accept its terms on https://huggingface.co/{repo_id} "
                      "and log in with `hf auth login`, then rerun.") from e
    except hf_errors.RepositoryNotFoundError as e:
      raise UserError(f"No Hub repository {repo_id!r} (or it is private: log in with "
                      "`hf auth login`). Published timm weights are named like "
                      "hf-hub:timm/deit_small_patch16_224.fb_in1k.") from e
    except hf_errors.RevisionNotFoundError as e:
      raise UserError(f"{repo_id} has no revision {revision!r}.") from e
    except (hf_errors.HfHubHTTPError, OSError) as e:
      raise UserError(f"Could not download {name} of {repo_id}: {_one_line(e)}") from e
    snapshot = Path(path).parents[len(Path(name).parts) - 1]
    return path, {"repo": repo_id, "file": name, "commit": snapshot.name}
  if not_cached:
    offline = (" (HF_HUB_OFFLINE is set)" if constants.is_offline_mode()
               else " (with no network, HF_HUB_OFFLINE=1 skips the connection attempts)")
    cache = constants.HF_HUB_CACHE
    rev = f" --revision {revision}" if revision else ""
    raise UserError(
        f"{repo_id}: {not_cached[0]} is not in the Hugging Face cache {cache} and the Hub cannot "
        f"be reached{offline}. On a machine with network run `hf download {repo_id} "
        f"{not_cached[0]}{rev} --cache-dir {cache}`, copy {cache} to this machine (or set "
        "HF_HUB_CACHE to where the copy is), then rerun.")
  raise UserError(f"{repo_id} has none of {', '.join(files)}: name the checkpoint file, as in "
                  f"hf-hub:{repo_id}/FILE.")


def checkpoint_file(spec: str) -> str:
  """The local checkpoint file for `spec`: downloaded for `hf-hub:...`, else `spec` itself."""
  return download(spec)[0] if hub_repo(spec) else spec


def resolve_init_from(spec: str, *, model_name: str, img_size: int | None = None,
                      num_classes: int | None = None, **overrides: Any) -> str:
  """A directory `checkpointing.load_variables` reads, for the weights `spec` names, converted for
  `create_model(model_name, img_size=..., num_classes=..., **overrides)`.

  `spec` is a converted directory (returned unchanged), `hf-hub:OWNER/NAME[/FILE][@REVISION]` or
  a PyTorch checkpoint file. Pass the overrides that shape the model's variables (those of
  `config.model`, the image size, the class count); a `num_classes` other than the checkpoint's
  starts a fresh head. The first call converts and saves under `cache_root()`; later calls with
  the same checkpoint (the same commit) and model return that directory without converting.
  """
  if not isinstance(spec, str) or not spec:
    raise UserError(f"Checkpoint {spec!r}: give a converted directory, a checkpoint file or "
                    "hf-hub:OWNER/NAME.")
  if paths.is_remote(spec):  # a converted directory in a bucket
    if paths.isfile(paths.check_input(spec, "Checkpoint")):
      raise UserError(f"Checkpoint {spec} is a file in a bucket: copy it to local disk (gcloud "
                      "storage cp) or convert it once with `python -m compact_vit.convert "
                      "--checkpoint FILE --out gs://BUCKET/DIR` and pass that directory.")
    return spec
  if os.path.isdir(spec):
    return spec
  overrides = dict(overrides, img_size=img_size, num_classes=num_classes)
  overrides = _non_default(model_name, {k: v for k, v in overrides.items() if v is not None})
  root = cache_root()
  _check_single_process(spec, root)
  if _waits_for_process_0(root):
    return _wait_for_converted(spec, model_name, overrides, root)
  if hub_repo(spec):
    path, source = download(spec)
    folder = source["repo"].replace("/", "--")
  elif os.path.isfile(spec):
    path, stat = os.path.abspath(spec), os.stat(spec)
    source = {"file": path, "size": str(stat.st_size), "mtime_ns": str(stat.st_mtime_ns)}
    folder = "files"
  else:
    raise UserError(f"Checkpoint {spec!r} does not exist: give a converted directory "
                    "(python -m compact_vit.convert --out DIR), a PyTorch checkpoint file or a Hub "
                    "name such as hf-hub:timm/deit_small_patch16_224.fb_in1k.")
  key = json.dumps({"source": source, "model": model_name, "overrides": overrides},
                   sort_keys=True, default=str)
  target = paths.join(root, "converted", folder,
                      f"{model_name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
  if not _is_converted(target):
    variables = _convert(model_name, read_state_dict(path), overrides)
    _save_once(target, lambda d: save_variables(d, variables, model_name, overrides), key)
  _announce(root, spec, model_name, overrides, target)
  return target


def load_pretrained(model_name: str, pretrained: bool | str = True, **overrides: Any):
  """`(model, variables)`: `create_model(model_name, **overrides)` with the weights `pretrained`
  names: True for the model's default published checkpoint, else anything `resolve_init_from`
  takes. Variables are numpy arrays, ready for `model.apply`."""
  model = models.create_model(model_name, **overrides)
  spec = default_spec(model_name) if pretrained is True else pretrained
  directory = resolve_init_from(spec, model_name=model_name, **overrides)
  variables, meta = load_variables(directory)
  if directory == spec:  # a directory the user made: check it fits this model
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from compact_vit.nn.layers import to_pair  # pylint: disable=import-outside-toplevel
    sample = jax.ShapeDtypeStruct((1, *to_pair(model.img_size), 3), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), sample)
    check_tree_matches({k: v for k, v in abstract.items() if k in ("params", "batch_stats")},
                       variables,
                       f"Checkpoint {directory} (model {meta.get('model')!r})")
  return model, variables


def _convert(model_name: str, state_dict: dict[str, Any], overrides: dict[str, Any]):
  """Converts keeping the checkpoint's head, or, if only a `num_classes` override keeps it from
  fitting, with a fresh head."""
  try:
    return load_pytorch_state_dict(model_name, state_dict, **overrides)
  except UserError:
    if "num_classes" not in overrides:
      raise
    return load_pytorch_state_dict(model_name, state_dict, drop_head=True, **overrides)


def _non_default(model_name: str, overrides: dict[str, Any]) -> dict[str, Any]:
  """The overrides that differ from the model's defaults (validating the name and the keys), so
  that `img_size=224` and no `img_size` share one converted copy."""
  models.create_model(model_name, **overrides)  # unknown model or override: a UserError now
  default = models.create_model(model_name)
  return {k: v for k, v in sorted(overrides.items()) if getattr(default, k, object()) != v}


def _check_single_process(spec: str, root: str) -> None:
  """Converted copies are written by one process. With a bucket cache, process 0 writes and the
  others wait for it; a local cache (one per host) takes single-process runs only."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1 and not paths.is_remote(root):
    raise UserError(
        f"{spec} is converted in single-process runs only; this run has {jax.process_count()} "
        f"processes and a local cache ({root}). Set COMPACT_VIT_CACHE=gs://BUCKET/cache (process 0 "
        "converts, the others read its copy), or convert once with `python -m "
        f"compact_vit.convert --model NAME --checkpoint {spec} --out gs://BUCKET/DIR` and pass that "
        "directory instead.")


def _waits_for_process_0(root: str) -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  return paths.is_remote(root) and jax.process_count() > 1 and jax.process_index() != 0


def _request_key(spec: str, model_name: str, overrides: dict[str, Any]) -> str:
  request = json.dumps({"spec": spec, "model": model_name, "overrides": overrides},
                       sort_keys=True, default=str)
  return hashlib.sha256(request.encode()).hexdigest()[:16]


def _announce(root: str, spec: str, model_name: str, overrides: dict[str, Any],
              target: str) -> None:
  """Process 0 of a multi-process run with a bucket cache names its converted copy for the others
  (`requests/<key>`: the request is what they know; the copy's key needs the download)."""
  import jax  # pylint: disable=import-outside-toplevel
  if paths.is_remote(root) and jax.process_count() > 1:
    paths.write_text(paths.join(root, "requests", _request_key(spec, model_name, overrides)),
                     target)


def _wait_for_converted(spec: str, model_name: str, overrides: dict[str, Any], root: str,
                        timeout_s: float = 3600.0, poll_s: float = 2.0) -> str:
  """The directory process 0 converted `spec` into, once it is complete."""
  request = paths.join(root, "requests", _request_key(spec, model_name, overrides))
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if paths.exists(request):
      target = paths.read_text(request).strip()
      if _is_converted(target):
        return target
    time.sleep(poll_s)
  raise UserError(f"Waited {timeout_s:.0f} s for process 0 to convert {spec} into {root}; it did "
                  "not finish. Look at process 0's log, or convert beforehand with `python -m "
                  "compact_vit.convert ... --out DIR` and pass DIR.")


def _is_converted(directory: str) -> bool:
  """model.json is written last (save_variables), so its presence marks a complete copy."""
  return (paths.isfile(paths.join(directory, "model.json"))
          and bool(paths.listdir(paths.join(directory, "variables"))))


def _save_once(target: str, save: Callable[[str], Any], key: str) -> None:
  """Writes with `save` into a fresh folder beside `target`, then renames it to `target`; a
  concurrent writer that got there first wins. In a bucket (no renames) it writes `target` itself,
  model.json last, so a reader never takes a partial copy for a whole one."""
  if paths.is_remote(target):
    save(target)
    paths.write_text(paths.join(target, "source.json"), key + "\n")
    return
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = f"{target}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    save(tmp)
    with open(os.path.join(tmp, "source.json"), "w") as f:
      f.write(key + "\n")
    try:
      os.rename(tmp, target)
    except OSError:
      if not _is_converted(target):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__
