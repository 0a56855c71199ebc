"""One test over every registered model: it builds, initialises, returns (B, num_classes) float32
logits, and has the parameter count of its reference.

Shapes only (jax.eval_shape): nothing is compiled, so the whole zoo takes seconds. The reference
count is, in order of preference: timm's own model of the same name (built on torch's meta
device, no weights), the number the authors' code or paper gives (REFERENCES, cited per row), or,
for models with no published count, the count of a model it extends plus the parameters the
extension adds by its definition. A model missing from every table fails the test, so a new
family must bring its reference."""
import jax
import jax.numpy as jnp
import pytest

from compact_vit import models
from compact_vit.nn.layers import to_pair

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

# Registered names that are timm's names for the same architecture.
TIMM = {n for n in models.list_models()
        if n.startswith(("deit_", "vit_", "efficientformer", "regnety_", "resnet", "resnext"))
        and not n.startswith("vit_slim")}

# name -> (parameters, absolute tolerance, source) where timm has no model of that name.
M = 1e6
PUBLISHED = {
    "sepvit_t": (31.18 * M, 0.005 * M, "authors' module at 224 (REFERENCES, SepViT)"),
    "sepvit_s": (46.57 * M, 0.005 * M, "authors' module at 224 (REFERENCES, SepViT)"),
    "sepvit_b": (82.38 * M, 0.005 * M, "authors' module at 224 (REFERENCES, SepViT)"),
    "sepvit_lite": (3.66 * M, 0.005 * M, "authors' module at 224 (REFERENCES, SepViT)"),
    "uninet_b0": (11.45 * M, 0.005 * M, "Sense-X/UniNet uninet.py (REFERENCES)"),
    "uninet_b1": (11.45 * M, 0.005 * M, "Sense-X/UniNet uninet.py (REFERENCES)"),
    "uninet_b2": (16.21 * M, 0.005 * M, "Sense-X/UniNet uninet.py (REFERENCES)"),
    "uninet_b3": (24.02 * M, 0.005 * M, "Sense-X/UniNet uninet.py (REFERENCES)"),
    "uninet_b4": (43.80 * M, 0.005 * M, "Sense-X/UniNet uninet.py (REFERENCES)"),
    "uninet_b5": (72.88 * M, 0.005 * M, "Sense-X/UniNet uninet.py (REFERENCES)"),
    "dynamicvit_deit_s": (22.77 * M, 0.005 * M, "authors' DeiT-S with predictors (REFERENCES)"),
    "autoformer_t": (5.8 * M, 0.1 * M, "microsoft/Cream AutoFormer README (5.7 in the paper)"),
    "autoformer_s": (22.9 * M, 0.05 * M, "AutoFormer paper, Table 3"),
    "autoformer_b": (53.7 * M, 0.05 * M, "AutoFormer paper, Table 3"),
    "vit_slim_deit_s": (15.7 * M, 0.05 * M, "ViT-Slim DeiT-S at budget 0.7 (REFERENCES)"),
}


def _extension(base: str, extra: int, why: str):
  return base, extra, why


def _predictor(c: int) -> int:
  """DynamicViT's score predictor at width c: LN(c), Linear c->c, Linear c->c/2, c/2->c/4, c/4->2."""
  return 2 * c + (c * c + c) + (c * c // 2 + c // 2) + (c // 2 * c // 4 + c // 4) + (c // 4 * 2 + 2)


# name -> (base model, parameters added, what adds them): counts defined by the extension.
EXTENSIONS = {
    "ats_deit_s": _extension("deit_small_patch16_224", 0, "ATS is parameter-free"),
    "patchmerger_vit_s16": _extension("vit_small_patch16_224", 384 * 8 + 2 * 384,
                                      "8 learned queries of width 384 and their LayerNorm"),
    "patchmerger_vit_b16": _extension("vit_base_patch16_224", 768 * 8 + 2 * 768,
                                      "8 learned queries of width 768 and their LayerNorm"),
    "dynamicvit_deit_b": _extension("deit_base_patch16_224", 3 * _predictor(768),
                                    "three score predictors of width 768"),
    "vit_slim_masked_deit_s": _extension(
        "deit_small_patch16_224", 12 * (6 * 64 + 4 * 384 + 197),
        "soft masks per block: attention (heads x head_dim), MLP hidden, patch tokens"),
}

# name -> (parameters, source): no published count; pinned from this implementation after its
# logits were checked against the authors' modules (tests/test_<family>.py), so that any change
# to the architecture shows here.
PINNED = {
    "autoformer_supernet_t": 10517272, "autoformer_supernet_s": 34790440,
    "autoformer_supernet_b": 76882264, "tftas_t": 6200776, "tftas_s": 23935336,
    "tftas_b": 56470792, "reformer_vit_ti16": 5272744, "reformer_vit_s16": 20276584,
    "reformer_vit_b16": 79480552, "nasvit_supernet": 17712110, "nasvit_supernet_tiny": 137400,
    "nasvit_a0": 9192558, "nasvit_a1": 9192558, "nasvit_a2": 9192558, "nasvit_a3": 10400957,
    "nasvit_a4": 9192558, "nasvit_a5": 10400957, "nasvit_largest": 17711534,
    "nasvit_smallest": 8557696,
}


def _abstract(name):
  model = models.create_model(name)
  x = jax.ShapeDtypeStruct((2, *to_pair(model.img_size), 3), jnp.float32)
  rngs = {k: jax.random.key(0) for k in ("params", "dropout", "sample")}
  variables = jax.eval_shape(lambda x: model.init(rngs, x), x)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  return variables, logits


def _count(variables) -> int:
  return sum(a.size for a in jax.tree.leaves(variables["params"]))


def _timm_count(name: str) -> int:
  with torch.device("meta"):
    model = timm.create_model(name, pretrained=False)
  return sum(p.numel() for p in model.parameters())


def test_every_model_has_a_reference():
  known = TIMM | set(PUBLISHED) | set(EXTENSIONS) | set(PINNED)
  assert not set(models.list_models()) - known, "add the new models' parameter references here"


@pytest.mark.parametrize("name", models.list_models())
def test_model_builds_applies_and_has_its_parameter_count(name):
  variables, logits = _abstract(name)
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  count = _count(variables)
  if name in TIMM:
    assert count == _timm_count(name)
  elif name in PUBLISHED:
    expected, tolerance, source = PUBLISHED[name]
    assert abs(count - expected) <= tolerance, (count, source)
  elif name in EXTENSIONS:
    base, extra, why = EXTENSIONS[name]
    assert count == _count(_abstract(base)[0]) + extra, why
  else:
    assert count == PINNED[name]
