"""ONNX export with jax2onnx, checked against `model.apply`, timed and quantized with onnxruntime.

The model traces under `compact_vit.nn.layers.export_forms()`, so the graph holds what onnxruntime
fuses (LayerNormalization, MatMul attention with Softmax, Gelu, AveragePool/MaxPool, grouped Conv)
rather than the XLA:CPU forms the models use for training. Every export is checked on real photos
(scikit-learn's bundled sample images, crops resized to the model's input and normalised) before
it is returned or written.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import logging
import os
import pathlib
import re
import tempfile
import time
import unittest.mock
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from compact_vit.errors import UserError
from compact_vit.imagenet import IMAGENET_MEAN, IMAGENET_STD
from compact_vit.nn.layers import export_forms, to_pair

PARITY_RTOL = 1e-4  # max |onnx - apply| / max |apply| of the logits
DYNAMIC = "dynamic"
LAYOUTS = ("nhwc", "nchw")  # the exported model's input: as model.apply takes it, or as torch's
LAYOUT_KEY = "input_layout"  # the ONNX metadata entry that records it
# jax.numpy as it is before jax2onnx is imported (only lazily, below): jax2onnx 0.12 replaces some
# of its functions when its lowerings load (jnp.cumsum, by one that refuses `jnp.cumsum(x, -1)`),
# for the whole process. They are put back at once and used only while a conversion runs.
_JNP = dict(vars(jnp))
_JNP_LOWERINGS: dict[str, Any] = {}


class ExportError(UserError):
  """A model that cannot be exported (what cannot, and why), or an export that fails its check."""


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
  """max |ours - ref| / max |ref|."""
  return float(np.abs(np.asarray(ours) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


def photo_batch(batch: int, img_size: int | tuple[int, int]) -> np.ndarray:
  """(batch, H, W, 3) float32 NHWC real photos, normalised with ImageNet's mean and std: crops of
  scikit-learn's two sample photos (each crop a different window), resized bilinearly."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_sample_images  # pylint: disable=import-outside-toplevel
  photos = load_sample_images().images
  height, width = to_pair(img_size)
  out = np.empty((batch, height, width, 3), np.float32)
  for i in range(batch):
    photo = photos[i % len(photos)]
    side = min(photo.shape[:2]) - 16 * (i // len(photos) % 8)
    top = (i * 37) % (photo.shape[0] - side + 1)
    left = (i * 53) % (photo.shape[1] - side + 1)
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    out[i] = np.asarray(crop.resize((width, height), Image.BILINEAR), np.float32) / 255.0
  return (out - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


@dataclasses.dataclass
class Export:
  """An ONNX model and what was checked: `max_rel_err` of its logits against `model.apply` on
  `check_batch` photos."""
  proto: Any  # onnx.ModelProto
  input_shape: tuple[int | str, ...]
  max_rel_err: float
  check_batch: int
  layout: str = "nhwc"

  @property
  def img_size(self) -> tuple[int, int]:
    """(height, width) of the exported input."""
    return tuple(self.input_shape[1:3] if self.layout == "nhwc" else self.input_shape[2:4])

  def save(self, path: str) -> str:
    """Writes the model to `path` (parent folders created); returns the path."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:
      f.write(self.proto.SerializeToString())
    return path


def session(proto_or_bytes: Any, threads: int = 2, optimized_path: str | None = None):
  """An onnxruntime CPU InferenceSession with `threads` intra-op threads and full optimisation;
  with `optimized_path`, onnxruntime also writes the graph it runs there."""
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  options = ort.SessionOptions()
  options.intra_op_num_threads = threads
  options.inter_op_num_threads = 1
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  options.log_severity_level = 3
  if optimized_path:
    options.optimized_model_filepath = optimized_path
  data = proto_or_bytes if isinstance(proto_or_bytes, bytes) else proto_or_bytes.SerializeToString()
  return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def optimized_ops(proto_or_bytes: Any, domains: bool = False) -> collections.Counter:
  """Operator counts of the graph onnxruntime's CPU session runs after all its optimisations
  (fusions and its blocked convolution layout), for a model as proto or bytes. With `domains`,
  an operator outside the standard ONNX domain is counted as 'name (domain)', e.g.
  'Gelu (com.microsoft)', apart from the standard op of the same name."""
  import onnx  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "optimized.onnx")
    session(proto_or_bytes, optimized_path=path)
    nodes = onnx.load(path).graph.node
  return collections.Counter(
      f"{n.op_type} ({n.domain})" if domains and n.domain not in ("", "ai.onnx") else n.op_type
      for n in nodes)


def feed(sess, images: np.ndarray) -> dict[str, np.ndarray]:
  """The input of an onnxruntime session of an export for NHWC `images` (B, H, W, 3), as
  `model.apply` takes them: transposed to (B, 3, H, W) for an export whose `input_layout` metadata
  says NCHW."""
  layout = sess.get_modelmeta().custom_metadata_map.get(LAYOUT_KEY, "nhwc")
  images = np.asarray(images, np.float32)
  if layout == "nchw":
    images = images.transpose(0, 3, 1, 2)
  return {sess.get_inputs()[0].name: np.ascontiguousarray(images)}


def run(sess, images: np.ndarray) -> np.ndarray:
  """Logits of an onnxruntime session of an export on NHWC `images` (whatever its layout)."""
  return sess.run(None, feed(sess, images))[0]


def to_onnx(model: nn.Module, variables: Any, *, batch: int | str = 1,
            img_size: int | tuple[int, int] | None = None, rtol: float = PARITY_RTOL,
            check_batch: int | None = None, path: str | None = None,
            model_name: str | None = None, layout: str = "nhwc") -> Export:
  """Exports `model.apply(variables, x, train=False)` to ONNX and checks it before returning.

  `batch`: a static batch size, or 'dynamic' (a symbolic batch axis; models whose shapes depend on
  the batch cannot). Input x is float32 NHWC (B, H, W, 3), normalised as for `model.apply`, or
  with `layout='nchw'` (B, 3, H, W) as torch's exports take it (a drop-in for timm's ONNX file;
  the transpose cancels against the first convolution's, so the graph has none); the output is
  the logits. The layout is recorded in the file's metadata (`input_layout`), which `run` reads.
  The exported logits must be within `rtol` (max |onnx - apply| / max |apply|) of `model.apply`
  on `check_batch` real photos (default: `batch`, or 2 if dynamic), else ExportError; with `path`
  the checked model is then written there.
  """
  if not (batch == DYNAMIC or (isinstance(batch, int) and batch >= 1)):
    raise UserError(f"batch={batch!r}: give a positive batch size or '{DYNAMIC}'.")
  if layout not in LAYOUTS:
    raise UserError(f"layout={layout!r}: use one of {', '.join(LAYOUTS)}.")
  height, width = to_pair(img_size if img_size is not None else model.img_size)
  input_shape = ("B" if batch == DYNAMIC else batch,
                 *((height, width, 3) if layout == "nhwc" else (3, height, width)))
  check_batch = check_batch or (2 if batch == DYNAMIC else batch)
  if batch != DYNAMIC and check_batch != batch:
    raise UserError(f"check_batch={check_batch} must equal the static batch={batch}.")
  name = model_name or type(model).__name__
  variables = jax.tree.map(jnp.asarray, variables)
  images = photo_batch(check_batch, (height, width))
  expected = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
  nhwc = (lambda x: x) if layout == "nhwc" else (lambda x: jnp.transpose(x, (0, 2, 3, 1)))
  proto = _convert(lambda x: model.apply(variables, nhwc(x), train=False), input_shape, name)
  _set_layout(proto, layout)
  try:
    got = run(session(proto), images)
  except Exception as e:  # onnxruntime's own errors: the graph does not run
    raise ExportError(f"{name}: onnxruntime cannot run the exported graph: {_one_line(e)}") from e
  err = rel_err(got, expected)
  if not err <= rtol:
    raise ExportError(f"{name}: exported logits differ from model.apply by {err:.2e} (relative), "
                      f"more than rtol={rtol:g}; nothing written.")
  result = Export(proto, input_shape, err, check_batch, layout)
  if path:
    result.save(path)
  return result


def _load_plugins() -> None:
  """Imports jax2onnx's lowerings of JAX and Flax only. Its first conversion otherwise imports
  every plugin tree, including the Equinox examples, which build and compile models at import
  (a minute of a small CPU's time); the skipped trees lower nothing this package traces."""
  from jax2onnx.plugins import plugin_system  # pylint: disable=import-outside-toplevel
  if getattr(plugin_system, "_already_imported_plugins", True):
    return
  root = os.path.dirname(plugin_system.__file__)
  quiet = logging.getLogger("jax2onnx")
  level, quiet.level = quiet.level, logging.ERROR  # jax2onnx 0.12's dm_pix plugins fail on jax 0.10
  try:
    for tree in ("jax", "flax"):
      plugin_system._import_tree(  # pylint: disable=protected-access
          pathlib.Path(root, tree), f"jax2onnx.plugins.{tree}")
  finally:
    quiet.setLevel(level)
  plugin_system._already_imported_plugins = True  # pylint: disable=protected-access


def _restore_jax_numpy() -> None:
  """Puts back the jax.numpy functions jax2onnx replaced, keeping its versions for `_convert`."""
  for name, value in list(vars(jnp).items()):
    if name in _JNP and value is not _JNP[name]:
      _JNP_LOWERINGS[name] = value
      setattr(jnp, name, _JNP[name])


@contextlib.contextmanager
def _jax2onnx_numpy():
  """jax2onnx's replacements of jax.numpy functions, in place while a conversion runs."""
  for name, value in _JNP_LOWERINGS.items():
    setattr(jnp, name, value)
  try:
    yield
  finally:
    for name in _JNP_LOWERINGS:
      setattr(jnp, name, _JNP[name])


def _convert(fn, input_shape: tuple[int | str, ...], name: str):
  """jax2onnx of `fn` under the export forms; failures as ExportError naming what failed."""
  from jax2onnx import to_onnx as j2o  # pylint: disable=import-outside-toplevel
  _load_plugins()
  _restore_jax_numpy()  # after jax2onnx's lowerings load, here or elsewhere
  from jax2onnx.converter import ir_optimizations  # pylint: disable=import-outside-toplevel
  chatter = io.StringIO()  # jax2onnx 0.12 prints debugging lines from its Flax Conv lowering
  try:
    # jax2onnx 0.12.5's removal of transpose pairs leaves ResNet-50's identity blocks adding
    # NCHW to NHWC (onnxruntime refuses the graph); onnxruntime's own transpose optimizer does
    # that work, so the pass is skipped.
    with export_forms(), contextlib.redirect_stdout(chatter), _jax2onnx_numpy(), \
        unittest.mock.patch.object(
            ir_optimizations, "remove_redundant_transpose_pairs_ir", lambda graph: None):
      proto = j2o(fn, [input_shape], model_name=re.sub(r"\W", "_", name), opset=21)
  except Exception as e:  # pylint: disable=broad-except  # jax2onnx raises many types
    raise ExportError(f"{name} cannot be exported to ONNX: {_why(e)}") from e
  _fold_max_pool_padding(proto)
  return proto


def _set_layout(proto, layout: str) -> None:
  """Records the input layout in the model's metadata (`input_layout`: nhwc or nchw)."""
  kept = [p for p in proto.metadata_props if p.key != LAYOUT_KEY]
  del proto.metadata_props[:]
  proto.metadata_props.extend(kept)
  entry = proto.metadata_props.add()
  entry.key, entry.value = LAYOUT_KEY, layout


def _fold_max_pool_padding(proto) -> None:
  """Moves each explicit -inf `Pad` in front of a `MaxPool` (through the NHWC -> NCHW `Transpose`
  jax2onnx puts between them) into the MaxPool's own `pads`, which ONNX defines as padding that no
  window takes its maximum from: the same values. Flax's `max_pool` has no torch-style symmetric
  padding, so the export form pads first; left as it is, onnxruntime runs the Pad as a separate
  op that also breaks its blocked-layout chain of convolutions (ResNet-50's stem: Pad and two
  reorders, ~1.1 ms of a 60 ms batch-1 run on 2 cores), where timm's graph has one MaxPool."""
  from onnx import helper, numpy_helper  # pylint: disable=import-outside-toplevel
  graph = proto.graph
  consts = {t.name: t for t in graph.initializer}
  users: dict[str, list[Any]] = {}
  for node in graph.node:
    for name in node.input:
      users.setdefault(name, []).append(node)
  attr = lambda node, key, default=None: next(
      (helper.get_attribute_value(a) for a in node.attribute if a.name == key), default)
  dropped: set[str] = set()
  for pad in [n for n in graph.node if n.op_type == "Pad"]:
    chain = users.get(pad.output[0], [])
    if (len(chain) != 1 or chain[0].op_type != "Transpose" or attr(pad, "mode", b"constant") !=
        b"constant" or len(pad.input) != 3 or not all(i in consts for i in pad.input[1:])):
      continue
    transpose = chain[0]
    pools = users.get(transpose.output[0], [])
    if len(pools) != 1 or pools[0].op_type != "MaxPool" or len(pools[0].output) != 1:
      continue
    pool, perm = pools[0], list(attr(transpose, "perm"))
    pads, value = (numpy_helper.to_array(consts[i]) for i in pad.input[1:])
    rank = len(perm)
    begin, end = ([int(pads[perm[k]]) for k in range(rank)],
                  [int(pads[rank + perm[k]]) for k in range(rank)])
    if (value.size != 1 or not np.isneginf(value).all() or any(begin[:2]) or any(end[:2]) or
        attr(pool, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID") or
        any(attr(pool, "pads", [0]))):
      continue
    transpose.input[0] = pad.input[0]
    kept = [a for a in pool.attribute if a.name not in ("auto_pad", "pads")]
    del pool.attribute[:]
    pool.attribute.extend(kept + [helper.make_attribute("pads", begin[2:] + end[2:])])
    graph.node.remove(pad)
    dropped.update(pad.input[1:])
  used = {name for node in graph.node for name in node.input}
  for name in dropped - used:
    graph.initializer.remove(consts[name])


def _why(e: BaseException) -> str:
  """What jax2onnx could not convert, and where in the model, in one line."""
  text = _one_line(e)
  where = re.search(r"while tracing the function (\S+) at (\S+)", text)
  text = re.sub(r" If using `jit`.*", "", text)
  primitive = re.search(r"(?:No plugin|not supported|unsupported)[^:]*?'([\w.]+)'", text, re.I)
  if primitive:
    text = f"jax2onnx has no ONNX lowering for the JAX primitive '{primitive.group(1)}' ({text})"
  if where:
    text = f"{text} (in {where.group(1)} at {where.group(2)})"
  return text[:600]


def _one_line(e: BaseException) -> str:
  return " ".join(f"{type(e).__name__}: {e}".split())


def latency_ms(sess, images: np.ndarray, *, rounds: int = 10, warmup: int = 2) -> float:
  """Median wall time (ms) of one onnxruntime run on NHWC `images` over `rounds` timed runs."""
  inputs = feed(sess, images)
  for _ in range(warmup):
    sess.run(None, inputs)
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    sess.run(None, inputs)
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


@dataclasses.dataclass
class Int8Report:
  """An int8 model beside its float one, on the same photos and threads: latencies (ms), logit
  drift (max |int8 - float| / max |float|) and the share of photos whose top-1 class changed."""
  proto: Any
  mode: str
  float_ms: float
  int8_ms: float
  logit_drift: float
  top1_changed: float
  float_top1: float | None = None  # accuracies on a labelled eval set, when one is given
  int8_top1: float | None = None

  @property
  def faster(self) -> bool:
    return self.int8_ms < self.float_ms


def predictions(sess, images: np.ndarray, batch: int) -> np.ndarray:
  """Top-1 classes of an onnxruntime session on `images`, run `batch` at a time (the last batch
  padded with repeats when the model's batch is static)."""
  out = []
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
    out.append(run(sess, padded)[:len(chunk)].argmax(-1))
  return np.concatenate(out)


def quantize(export: Export, mode: str = "dynamic", *, calibration_images: int = 64,
             threads: int = 2, rounds: int = 10,
             eval_set: tuple[np.ndarray, np.ndarray] | None = None) -> Int8Report:
  """onnxruntime int8 quantization of `export`: 'dynamic' (int8 weights, activations quantized at
  run time: MatMul/Gemm become MatMulInteger) or 'static' (QDQ, activations calibrated on
  `calibration_images` photos, or on `eval_set`'s images when given). Timed and
  compared with the float model on photos; with `eval_set` (images, labels), also the top-1
  accuracy of both on it."""
  from onnxruntime import quantization as q  # pylint: disable=import-outside-toplevel
  if mode not in ("dynamic", "static"):
    raise UserError(f"int8 mode {mode!r}: use 'dynamic' or 'static'.")
  batch = export.check_batch if isinstance(export.input_shape[0], str) else export.input_shape[0]
  size = export.img_size
  with tempfile.TemporaryDirectory() as tmp:
    src, pre, dst = (os.path.join(tmp, f) for f in ("float.onnx", "pre.onnx", "int8.onnx"))
    export.save(src)
    q.quant_pre_process(src, pre, skip_symbolic_shape=True)
    if mode == "dynamic":
      q.quantize_dynamic(pre, dst, weight_type=q.QuantType.QInt8)
    else:
      count = max(calibration_images // batch, 1) * batch
      calibration = eval_set[0][:count] if eval_set is not None else photo_batch(count, size)
      q.quantize_static(pre, dst, _Reader(export, calibration, batch),
                        quant_format=q.QuantFormat.QDQ, per_channel=True,
                        activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8)
    import onnx  # pylint: disable=import-outside-toplevel
    proto = onnx.load(dst)
  _set_layout(proto, export.layout)
  images = photo_batch(batch, size)
  float_sess, int8_sess = session(export.proto, threads), session(proto, threads)
  reference, quantized = run(float_sess, images), run(int8_sess, images)
  float_ms, int8_ms = _alternate(float_sess, int8_sess, images, rounds)
  report = Int8Report(proto, mode, float_ms, int8_ms, rel_err(quantized, reference),
                      float(np.mean(quantized.argmax(-1) != reference.argmax(-1))))
  if eval_set is not None:
    eval_images, labels = eval_set
    float_pred = predictions(float_sess, eval_images, batch)
    int8_pred = predictions(int8_sess, eval_images, batch)
    report.float_top1 = float(np.mean(float_pred == labels))
    report.int8_top1 = float(np.mean(int8_pred == labels))
    report.top1_changed = float(np.mean(float_pred != int8_pred))
  return report


def _alternate(first, second, images: np.ndarray, rounds: int) -> tuple[float, float]:
  """Median latencies (ms) of two sessions timed in alternating rounds."""
  a, b = [], []
  for _ in range(rounds):
    a.append(latency_ms(first, images, rounds=1, warmup=1))
    b.append(latency_ms(second, images, rounds=1, warmup=1))
  return float(np.median(a)), float(np.median(b))


class _Reader:
  """onnxruntime's CalibrationDataReader protocol over NHWC `images`, `batch` at a time."""

  def __init__(self, export: Export, images: np.ndarray, batch: int):
    sess = session(export.proto)
    self._feeds = iter([feed(sess, images[i:i + batch])
                        for i in range(0, len(images) - batch + 1, batch)])

  def get_next(self):
    return next(self._feeds, None)
