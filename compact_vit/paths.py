"""Paths of runs and inputs, local or in a bucket (`gs://BUCKET/...`), through `etils.epath`.

Every read or write of a workdir, a converted checkpoint, the converted-weights cache or a
picture goes through here (Orbax checkpoints use `etils.epath` and tensorstore themselves).
`etils.epath` reaches `gs://` through fsspec/gcsfs (not TensorFlow's file system, which would load
TensorFlow into every process), and Orbax's tensorstore writes array data straight to GCS.

A bucket has no directories and no appends: `makedirs` is a no-op there, and a whole object is
written at once (`write_text`, atomic in both places: local files are written beside and renamed).
`check_workdir` is the preflight every command runs before it compiles anything.
"""
from __future__ import annotations

import errno
import os
import re
import uuid
from typing import IO

os.environ.setdefault("EPATH_USE_TF", "false")  # gs:// through gcsfs, not tf.io.gfile
# gcsfs otherwise asks the storage-layout API of every bucket first (minutes against an emulator).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position

from compact_vit.errors import UserError  # pylint: disable=wrong-import-position

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_GS = re.compile(r"^gs:(/*)(.*)$", re.IGNORECASE)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
SCHEMES = ("gs",)


def is_remote(path: str | os.PathLike) -> bool:
  """True for `gs://...` (an object store), False for a local path."""
  return _URL.match(os.fspath(path)) is not None


def check_path(path: str | os.PathLike, what: str = "path") -> str:
  """Returns `path` as a string; raises UserError for a malformed or unsupported URL
  (`gs:/b`, `gs://`, `gs://Bad_Name`, `s4://b`)."""
  path = os.fspath(path)
  url = _URL.match(path)
  if url is not None and url.group(1) not in SCHEMES:
    raise UserError(f"{what} {path!r}: unsupported scheme {url.group(1)}:// (use a local path or "
                    "gs://BUCKET/...).")
  match = _GS.match(path)
  if match is None:
    return path
  slashes, rest = match.groups()
  bucket = rest.split("/", 1)[0]
  if not path.startswith("gs:") or slashes != "//" or not _BUCKET.match(bucket) or "//" in rest:
    raise UserError(f"{what} {path!r} is not a valid gs:// path: write gs://BUCKET/FOLDER with a "
                    "bucket name of lowercase letters, digits, '-', '_' and '.' (3 to 222 "
                    "characters) and no empty folder names.")
  return path


def path(p: str | os.PathLike) -> epath.Path:
  """`epath.Path` of a local path or a gs:// URL (checked, see `check_path`)."""
  return epath.Path(check_path(p))


def join(base: str | os.PathLike, *parts: str) -> str:
  """`base/part/...` as a string, for local paths and URLs alike."""
  base = os.fspath(base)
  if not is_remote(base):
    return os.path.join(base, *parts)
  return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def absolute(p: str | os.PathLike) -> str:
  """An absolute local path (user home expanded); URLs unchanged."""
  p = os.fspath(p)
  return p if is_remote(p) else os.path.abspath(os.path.expanduser(p))


def exists(p: str | os.PathLike) -> bool:
  return path(p).exists()


def isdir(p: str | os.PathLike) -> bool:
  return path(p).is_dir()


def isfile(p: str | os.PathLike) -> bool:
  return path(p).is_file()


def listdir(p: str | os.PathLike) -> list[str]:
  """Names of the entries of a directory (prefix), [] when there is none."""
  try:
    return sorted(child.name for child in path(p).iterdir())
  except (FileNotFoundError, NotADirectoryError):
    return []


def makedirs(p: str | os.PathLike) -> None:
  """Creates a local directory and its parents; nothing to do in a bucket (no directories)."""
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)


def open_file(p: str | os.PathLike, mode: str = "r") -> IO:
  """A file object for reading or (whole-object) writing."""
  return path(p).open(mode)


def read_text(p: str | os.PathLike) -> str:
  return path(p).read_text()


def read_bytes(p: str | os.PathLike) -> bytes:
  return path(p).read_bytes()


def write_text(p: str | os.PathLike, text: str) -> None:
  """Writes the whole file at once: a reader sees the old or the new content, never a part."""
  write_bytes(p, text.encode())


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
  """As `write_text`, for bytes. Local: written beside, then renamed; a bucket: one upload."""
  p = os.fspath(p)
  if is_remote(p):
    path(p).write_bytes(data)
    return
  tmp = f"{p}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, p)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def remove(p: str | os.PathLike) -> None:
  path(p).unlink(missing_ok=True)


def describe_error(error: BaseException) -> str:
  """A short reason for a storage failure: 'the disk is full', 'permission denied', ..."""
  text = " ".join(str(error).split())
  code = getattr(error, "errno", None)
  if code == errno.ENOSPC or "No space left on device" in text or "os_error_code='28'" in text:
    return "the disk is full (no space left on device)"
  if code == errno.EROFS or "Read-only file system" in text:
    return "the file system is read-only"
  if (code in (errno.EACCES, errno.EPERM) or isinstance(error, PermissionError)
      or "PERMISSION_DENIED" in text or " 403" in text or "Forbidden" in text):
    return "permission denied"
  if "bucket" in text.lower() and ("NOT_FOUND" in text or "404" in text or
                                   isinstance(error, FileNotFoundError)):
    return "the bucket does not exist"
  return f"{type(error).__name__}: {text[:300]}"


def check_workdir(workdir: str | os.PathLike, process_index: int = 0) -> None:
  """The preflight: the workdir's URL is valid and this process can create a file in it.

  Raises a UserError that says why not (malformed gs:// path, missing bucket, no permission,
  read-only or full file system). Writes and removes one small probe file."""
  workdir = check_path(workdir, "--workdir")
  probe = join(workdir, f".write-check-{process_index}-{uuid.uuid4().hex[:8]}")
  try:
    makedirs(workdir)
    write_bytes(probe, b"ok")
    remove(probe)
  except Exception as e:  # pylint: disable=broad-except  (any client's error: one line)
    reason = describe_error(e)
    if is_remote(workdir) and isinstance(e, FileNotFoundError):
      reason = "the bucket does not exist"
    raise UserError(f"Cannot write to the workdir {workdir}: {reason}. Pass a --workdir this "
                    "process can write to (for gs://, a bucket that exists and credentials with "
                    "write access: gcloud auth application-default login, or the VM's service "
                    "account).") from e


def check_input(p: str | os.PathLike, what: str) -> str:
  """`p` if it exists; else a UserError naming `what` (e.g. 'config.init_from')."""
  p = check_path(p, what)
  try:
    found = exists(p)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{what} {p}: cannot read it: {describe_error(e)}.") from e
  if not found:
    raise UserError(f"{what} {p} does not exist.")
  return p
