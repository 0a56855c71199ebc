"""ONNX export (compact_vit.export): every family on a small config and full-size DeiT-S and
EfficientFormer-L1 run in onnxruntime within 1e-4 (relative) of `model.apply`; the export forms of
nn/layers.py give the same logits; int8, dynamic batch, the CLI and its errors."""
import json
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compact_vit import export
from compact_vit.errors import UserError
from compact_vit.export import __main__ as cli
from compact_vit.models import create_model, efficientformer_v2
from compact_vit.nn import layers
from compact_vit.profile import random_variables

from conftest import random_images, rel_err

RTOL = 1e-4  # max |onnxruntime - apply| / max |apply| (measured: at most ~5e-7 in float32)

# One small configuration per family (names as registered; token reducers with static shapes).
SMALL = {
    "deit_tiny_distilled_patch16_224": dict(img_size=32, depth=1),
    "efficientformer_l1": dict(img_size=64, embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 2)),
    "efficientformerv2_s0": dict(img_size=64, embed_dims=(16, 24, 32, 48), depths=(1, 1, 2, 2),
                                 num_vit=1, mlp_ratios=(4, 4, 4, 4)),
    "regnety_160": dict(img_size=32, depths=(1, 1, 1, 1), widths=(16, 32, 48, 64), group_size=8,
                        stem_width=16),
    "resnext50_32x4d": dict(img_size=32, depths=(1, 1, 1, 1), base_width=2, stem_width=16),
    "sepvit_lite": dict(img_size=36, depths=(1, 2, 1, 1),
                        window_sizes=((7,), (7, 14), (2,), (7,))),
    "uninet_b0": dict(img_size=32, repeats=(1, 1, 1, 1, 1, 1)),
    "vit_slim_deit_s": dict(img_size=32),
    "autoformer_t": dict(img_size=32, depth=1),
    "nasvit_supernet_tiny": dict(img_size=32),
    "dynamicvit_deit_s": dict(img_size=64, depth=4, pruning_loc=(1, 2, 3), embed_dim=96,
                              num_heads=2),
    "ats_deit_s": dict(img_size=64, depth=3, ats_blocks=(1, 2), num_tokens=(13, 9), embed_dim=96,
                       num_heads=2),
    "patchmerger_vit_s16": dict(img_size=64, depth=3, merge_after=1, num_merged_tokens=4),
}
# Families jax2onnx 0.12.5 cannot export (Reformer's LSH attention: a scan over hashed buckets):
# to_onnx must say so, and what failed.
UNSUPPORTED = {
    "reformer_vit_ti16": dict(img_size=32, depth=2),
}


def _model(name: str, overrides: dict, seed: int = 0):
  model = create_model(name, num_classes=10, **overrides)
  return model, random_variables(model, (1, *layers.to_pair(model.img_size), 3), seed)


def _apply(model, variables, images):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_config_runs_in_onnxruntime_like_apply(name):
  model, variables = _model(name, SMALL[name])
  exported = export.to_onnx(model, variables, batch=2, model_name=name)
  assert exported.max_rel_err <= RTOL
  images = random_images(2, layers.to_pair(model.img_size)[0], seed=1)  # not the check's photos
  got = export.onnx.run(export.session(exported.proto), images)
  assert rel_err(got, _apply(model, variables, images)) <= RTOL


def test_export_leaves_jax_numpy_as_it_was():
  """jax2onnx replaces jnp.cumsum for the whole process when its lowerings load, by a version that
  refuses an axis given by position (the on-accelerator RandAugment's `jnp.cumsum(hist, -1)` then
  failed in any process that had exported a model). ATS's sampling, which uses jnp.cumsum, still
  exports; afterwards jnp.cumsum is jax's own again."""
  cumsum = jnp.cumsum
  model, variables = _model("ats_deit_s", SMALL["ats_deit_s"])
  assert export.to_onnx(model, variables, batch=2, model_name="ats_deit_s").max_rel_err <= RTOL
  assert jnp.cumsum is cumsum
  np.testing.assert_array_equal(jnp.cumsum(jnp.arange(6).reshape(2, 3), -1), [[0, 1, 3], [3, 7, 12]])


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "efficientformer_l1"])
def test_full_size_parity(name):
  model = create_model(name)
  variables = random_variables(model, (1, 224, 224, 3))
  exported = export.to_onnx(model, variables, batch=1, model_name=name)
  assert exported.max_rel_err <= RTOL
  images = random_images(1, 224, seed=2)
  got = export.onnx.run(export.session(exported.proto), images)
  assert rel_err(got, _apply(model, variables, images)) <= RTOL


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_family_fails_naming_the_model_and_the_cause(name):
  model, variables = _model(name, UNSUPPORTED[name])
  with pytest.raises(export.ExportError, match=rf"^{name}") as info:
    export.to_onnx(model, variables, batch=1, model_name=name)
  assert len(str(info.value)) > len(name) + 40  # says what failed, not just that it failed


@pytest.fixture(scope="module")
def efficientformer():
  return _model("efficientformer_l1", SMALL["efficientformer_l1"])


def test_export_forms_give_the_same_logits(efficientformer):
  """The switch alone, without ONNX: the XLA forms and the export forms of every block of a small
  EfficientFormer (pooling, GELU, attention) and of a grouped-conv EfficientFormerV2 agree."""
  images = random_images(2, 64, seed=3)
  for model, variables in (efficientformer,
                           _model("efficientformerv2_s0", SMALL["efficientformerv2_s0"])):
    plain = _apply(model, variables, images)
    with layers.export_forms():
      exported = _apply(model, variables, images)
    assert rel_err(exported, plain) <= 1e-5


def test_export_forms_reach_the_graph(efficientformer):
  """Under the switch the graph holds ONNX Gelu, AveragePool, Softmax, MatMul and a Split of the
  fused qkv instead of the written-out GELU (Erf), shifted-slice pooling, Einsum attention and
  three Slices."""
  model, variables = efficientformer
  ops = Counter(n.op_type for n in export.to_onnx(model, variables).proto.graph.node)
  assert ops["Gelu"] and ops["AveragePool"] and ops["Softmax"] and ops["MatMul"] and ops["Split"]
  assert not ops["Erf"] and not ops["Einsum"]


@pytest.mark.parametrize("module", [
    efficientformer_v2.Attention2d(num_heads=2, key_dim=4),
    efficientformer_v2.Attention2d(num_heads=2, key_dim=4, stride=2),
    efficientformer_v2.Attention2dDownsample(8, num_heads=2, key_dim=4)], ids=str)
def test_efficientformerv2_attention_export_forms_match(module):
  """EfficientFormerV2's attention alone (in the whole model its random 1e-5 layer scales hide it):
  heads-first MatMuls with the talking heads as convolutions, and Resize for the upsampling, against
  the einsum forms, with every parameter perturbed so that none is zero or one."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 16))
  variables = module.init(jax.random.PRNGKey(1), x)
  variables = jax.tree.map(
      lambda t: t + 0.3 * jax.random.normal(jax.random.PRNGKey(t.size), t.shape), variables)
  plain = module.apply(variables, x)
  with layers.export_forms():
    exported = module.apply(variables, x)
  assert rel_err(exported, plain) <= 1e-5


def test_efficientformerv2_exports_matmul_attention_and_resize():
  """EfficientFormerV2's graph holds MatMul attention and one Resize per strided attention, no
  Einsum; with its layer scales set to one (the attention then moves the logits), it still runs
  in onnxruntime like `model.apply`. After onnxruntime's optimisation no Transpose is left but the
  NHWC input's: q, k and v enter the MatMuls channels-first, as in timm's graph (which keeps one
  Transpose per attention); the downsampling attention's query subsampling is an AveragePool kept
  in onnxruntime's blocked layout (a strided Slice there costs two layout reorders and one more
  Add)."""
  name = "efficientformerv2_s0"
  model, variables = _model(name, SMALL[name])
  variables = jax.tree_util.tree_map_with_path(
      lambda path, t: jnp.ones_like(t) if "['ls" in jax.tree_util.keystr(path) else t, variables)
  exported = export.to_onnx(model, variables, batch=2, model_name=name)
  assert exported.max_rel_err <= RTOL
  ops = Counter(n.op_type for n in exported.proto.graph.node)
  assert ops["MatMul"] >= 4 and ops["Resize"] == 1 and not ops["Einsum"]
  optimized = export.optimized_ops(exported.proto)
  assert optimized["Transpose"] == 1 and optimized["FusedMatMul"] >= 4, optimized
  assert optimized["AveragePool"] == 1 and not optimized["Slice"], optimized


@pytest.mark.parametrize("name", ["efficientformerv2_s0", "resnext50_32x4d"])
def test_nchw_layout_takes_torch_input_without_a_transpose(name):
  """`layout='nchw'`: the file takes (B, 3, H, W) as a PyTorch model's export does, says so in its
  metadata (so `run` and the int8 calibration still take NHWC photos), gives the same logits, and
  after onnxruntime's optimisation holds no Transpose at all (the NHWC export keeps the input's)."""
  model, variables = _model(name, SMALL[name])
  size = layers.to_pair(model.img_size)[0]
  nhwc = export.to_onnx(model, variables, batch=2)
  nchw = export.to_onnx(model, variables, batch=2, layout="nchw")
  assert nchw.input_shape == (2, 3, size, size) and nchw.img_size == (size, size)
  sess = export.session(nchw.proto)
  assert sess.get_modelmeta().custom_metadata_map["input_layout"] == "nchw"
  images = random_images(2, size, seed=5)
  torch_layout = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
  logits = sess.run(None, {sess.get_inputs()[0].name: torch_layout})[0]
  assert rel_err(logits, _apply(model, variables, images)) <= RTOL
  np.testing.assert_array_equal(export.run(sess, images), logits)
  assert export.optimized_ops(nhwc.proto)["Transpose"] == 1
  assert export.optimized_ops(nchw.proto)["Transpose"] == 0
  if name == "resnext50_32x4d":  # static int8: calibration batches go in through the layout
    report = export.quantize(nchw, "static", calibration_images=4, rounds=1)
    assert report.proto.metadata_props[-1].value == "nchw" and report.logit_drift < 0.5


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "efficientformerv2_s0"])
def test_dynamic_batch_runs_at_other_batch_sizes(name):
  """A symbolic batch axis, for a ViT and for the hybrid whose upsampling is a Resize only at a
  static batch (jax2onnx's Resize needs static shapes)."""
  model, variables = _model(name, SMALL[name])
  exported = export.to_onnx(model, variables, batch="dynamic")
  sess = export.session(exported.proto)
  size = layers.to_pair(model.img_size)[0]
  for batch in (1, 3):
    images = random_images(batch, size, seed=batch)
    assert rel_err(export.onnx.run(sess, images), _apply(model, variables, images)) <= RTOL


def test_int8_dynamic_quantizes_and_reports_drift(efficientformer):
  model, variables = efficientformer
  report = export.quantize(export.to_onnx(model, variables, batch=2), "dynamic", rounds=2)
  ops = Counter(n.op_type for n in report.proto.graph.node)
  assert ops["DynamicQuantizeLinear"] or ops["MatMulInteger"] or ops["ConvInteger"]
  assert 0 < report.logit_drift < 0.5 and 0 <= report.top1_changed <= 1
  assert report.float_ms > 0 and report.int8_ms > 0


def test_cli_writes_a_checked_model(tmp_path, capsys):
  out = tmp_path / "deit.onnx"
  assert cli.main(["--model", "deit_tiny_patch16_224", "--img-size", "32", "--batch", "2",
                   "--out", str(out)]) == 0
  record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert record["params"] > 5e6 and record["gmacs"] > 0 and record["latency_ms"] > 0
  assert record["max_rel_err"] <= RTOL and record["out"] == str(out)
  sess = export.session(out.read_bytes())
  assert sess.get_inputs()[0].shape == [2, 32, 32, 3] and record["layout"] == "nhwc"
  assert cli.main(["--model", "deit_tiny_patch16_224", "--img-size", "32", "--layout", "nchw",
                   "--out", str(out)]) == 0
  assert export.session(out.read_bytes()).get_inputs()[0].shape == [1, 3, 32, 32]


def test_cli_refuses_a_slower_int8_model(tmp_path, capsys, monkeypatch):
  slower = lambda exported, mode, **_: export.Int8Report(  # noqa: E731
      exported.proto, mode, float_ms=1.0, int8_ms=2.0, logit_drift=0.01, top1_changed=0.0)
  monkeypatch.setattr(export.onnx, "quantize", slower)
  out = tmp_path / "int8.onnx"
  assert cli.main(["--model", "deit_tiny_patch16_224", "--img-size", "32", "--int8", "dynamic",
                   "--out", str(out)]) == 1
  assert "runs slower than float32" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--model", "deit_tiny_patch16_224", "--batch", "0"], "positive integer or 'dynamic'"),
    (["--model", "no_such_model"], "Unknown model 'no_such_model'"),
    (["--workdir", "runs/x", "--model", "deit_tiny_patch16_224"], "--workdir needs --config"),
])
def test_cli_user_errors(tmp_path, capsys, argv, message):
  assert cli.main([*argv, "--out", str(tmp_path / "m.onnx")]) == 1
  assert message in capsys.readouterr().err
  assert not (tmp_path / "m.onnx").exists()


def test_bad_batch_is_a_user_error(efficientformer):
  with pytest.raises(UserError, match="positive batch size"):
    export.to_onnx(*efficientformer, batch=-1)
  with pytest.raises(UserError, match="use one of nhwc, nchw"):
    export.to_onnx(*efficientformer, layout="NCWH")


@pytest.mark.parametrize("window,stride,padding", [(3, 2, 1), (3, 1, 1), (5, 2, 2)])
@pytest.mark.parametrize("batch", [2, "B"], ids=["static", "dynamic"])
def test_max_pool_padding_folds_into_the_max_pool(window, stride, padding, batch):
  """The export form's -inf Pad before a MaxPool becomes the MaxPool's own `pads` (no Pad left in
  the graph), with the same values as the XLA form on inputs with negatives and odd sizes (zero
  padding would differ at the borders)."""
  from compact_vit.export import onnx as export_onnx
  x = np.random.default_rng(0).standard_normal((3, 15, 16, 8), dtype=np.float32)
  pool = lambda x: layers.pool2d(x, window, stride, padding, "max")
  proto = export_onnx._convert(pool, (batch, 15, 16, 8), "max_pool")  # pylint: disable=protected-access
  ops = Counter(n.op_type for n in proto.graph.node)
  assert ops["MaxPool"] == 1 and not ops["Pad"], ops
  (node,) = [n for n in proto.graph.node if n.op_type == "MaxPool"]
  assert [list(a.ints) for a in node.attribute if a.name == "pads"] == [[padding] * 4]
  used = {name for n in proto.graph.node for name in n.input}
  assert all(t.name in used for t in proto.graph.initializer)  # the Pad's constants went with it
  x = x if batch == "B" else x[:2]
  np.testing.assert_array_equal(export_onnx.run(export_onnx.session(proto), x), np.asarray(pool(x)))


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("batch", [2, "B"], ids=["static", "dynamic"])
def test_spatial_mean_exports_as_one_global_average_pool(keepdims, batch):
  """`spatial_mean`'s export form is one GlobalAveragePool (jax2onnx's lowering of a pool over the
  whole map; onnxruntime runs it in its blocked layout), not ReduceSum and Div, with the values of
  numpy's mean over height and width (odd, non-square map)."""
  from compact_vit.export import onnx as export_onnx
  x = np.random.default_rng(1).standard_normal((3, 7, 9, 8), dtype=np.float32)
  mean = lambda x: layers.spatial_mean(x, keepdims=keepdims)
  proto = export_onnx._convert(mean, (batch, 7, 9, 8), "spatial_mean")  # pylint: disable=protected-access
  ops = Counter(n.op_type for n in proto.graph.node)
  assert ops["GlobalAveragePool"] == 1 and not ops["ReduceSum"] and not ops["ReduceMean"], ops
  x = x if batch == "B" else x[:2]
  out = export_onnx.run(export_onnx.session(proto), x)
  np.testing.assert_allclose(out, x.mean(axis=(1, 2), keepdims=keepdims), rtol=1e-6, atol=1e-6)


def test_squeeze_excite_means_run_in_the_blocked_layout():
  """RegNetY's squeeze-excite means and its head's mean reach onnxruntime's optimised graph as
  GlobalAveragePool (one per block and the head), with no ReduceSum or ReduceMean left; timm's
  export, whose squeeze-excite mean is a ReduceMean, keeps a layout reorder for each."""
  name = "regnety_160"
  model, variables = _model(name, SMALL[name])
  exported = export.to_onnx(model, variables, batch=2, layout="nchw")
  assert exported.max_rel_err <= RTOL
  optimized = export.optimized_ops(exported.proto)
  blocks = sum(SMALL[name]["depths"])
  assert optimized["GlobalAveragePool"] == blocks + 1, optimized
  assert not optimized["ReduceSum"] and not optimized["ReduceMean"], optimized
