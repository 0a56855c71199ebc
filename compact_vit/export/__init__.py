"""Deployment export: ONNX via jax2onnx, checked against `model.apply`, timed and quantized with
onnxruntime (compact_vit/export/onnx.py; CLI: `python -m compact_vit.export`, docs/export.md).

`to_onnx(model, variables, batch=1 | 'dynamic', layout='nhwc' | 'nchw', ...) -> Export` traces
the model under `compact_vit.nn.layers.export_forms()` and checks the logits on real photos before
it returns;
`quantize(export, 'dynamic' | 'static') -> Int8Report`. Needs requirements-export.txt; the models
themselves never import this package.
"""
from compact_vit.export.onnx import (DYNAMIC, LAYOUTS, PARITY_RTOL, Export, ExportError,
                                     Int8Report, feed, latency_ms, optimized_ops, photo_batch,
                                     quantize, run, session, to_onnx)

__all__ = ["DYNAMIC", "LAYOUTS", "PARITY_RTOL", "Export", "ExportError", "Int8Report", "feed",
           "latency_ms", "optimized_ops", "photo_batch", "quantize", "run", "session", "to_onnx"]
