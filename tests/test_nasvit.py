"""NASViT (tiny space, 16 px): one compilation across subnets, standalone subnet == masked
supernet, the transformer block against a NumPy restatement of the authors' block, the converter
on the authors' key names, gradient projection and the alpha-divergence against NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compact_vit.convert import load_pytorch_state_dict
from compact_vit.models import create_model
from compact_vit.models import nasvit
from compact_vit.objectives import nasvit as nasvit_rule

# Exercises every mask: stage-1 shortcut projection (8 -> 16), kernel 3 of 5, expansion 2 of 3,
# transformer width 24 of 32 at depth 2 of 3, last conv 32 of 48.
SUBNET = dict(first_conv=8, last_conv=32, width=(16, 16, 24), depth=(2, 1, 2), kernel=(3, 3, 3),
              expand=(1, 2, 2))


def _random_variables(model, size, seed=0):
  """Random params (incl. layer-scale tables and BN scales) and positive BN statistics, without
  compiling `init`."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape).astype(np.float32),
                        shapes["params"])
  stats = jax.tree.map(lambda s: (0.5 + rng.random(s.shape)).astype(np.float32),
                       shapes["batch_stats"])
  return {"params": params, "batch_stats": stats}


@pytest.fixture(scope="module")
def supernet():
  model = create_model("nasvit_supernet_tiny", num_classes=7, img_size=16)
  return model, _random_variables(model, 16)


def test_one_compilation_per_resolution_and_standalone_parity(supernet):
  model, variables = supernet
  fn = jax.jit(model.apply)
  x = np.random.default_rng(1).standard_normal((2, 16, 16, 3)).astype(np.float32)
  fn(variables, x, subnet=nasvit.sample_subnet(jax.random.key(3), nasvit.TINY_SPACE))
  masked = fn(variables, x, subnet=nasvit.as_arrays(SUBNET))
  assert fn._cache_size() == 1  # one compilation for every subnet at this resolution

  standalone = nasvit.NASViT(num_classes=7, img_size=16,
                             space=nasvit.subnet_space(SUBNET, nasvit.TINY_SPACE))
  like = jax.eval_shape(standalone.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  sliced = nasvit.slice_params(variables, like)
  n_super = sum(np.size(a) for a in jax.tree.leaves(variables["params"]))
  assert sum(np.size(a) for a in jax.tree.leaves(sliced["params"])) < 0.6 * n_super
  out = jax.jit(standalone.apply)(sliced, x)
  assert np.abs(np.asarray(out)).max() > 1e-2  # a nonzero signal reaches the head
  np.testing.assert_allclose(out, masked, atol=1e-4, rtol=1e-4)


def _reference_block(p, x, depth):
  """The authors' DynamicSwinTransformerBlock at full width, restated in NumPy. x (B, H, W, C)."""
  b, h, w, c = x.shape
  n, heads = h * w, c // 8
  lin = lambda z, q: z @ q["kernel"] + q["bias"]
  swish = lambda z: z / (1 + np.exp(-z))

  def norm(z, q):  # torch F.layer_norm(z, z.shape[1:]) with a per-channel affine
    mu, var = z.mean((1, 2), keepdims=True), z.var((1, 2), keepdims=True)
    return (z - mu) / np.sqrt(var + 1e-5) * q["scale"] + q["bias"]

  t = x.reshape(b, n, c)
  y = norm(t, p["norm1"])
  q = lin(y, p["q"]).reshape(b, n, heads, 8).transpose(0, 2, 1, 3) * 8**-0.5
  k = lin(y, p["k"]).reshape(b, n, heads, 8).transpose(0, 2, 1, 3)
  v = np.pad(lin(y, p["v"]).reshape(b, h, w, 4 * c), ((0, 0), (1, 1), (1, 1), (0, 0)))
  kernel = p["vconv"]["kernel"]
  v = sum(v[:, i:i + h, j:j + w] * kernel[i, j, 0] for i in range(3) for j in range(3))
  v = v.reshape(b, n, heads, 32).transpose(0, 2, 1, 3)
  attn = q @ k.transpose(0, 1, 3, 2)
  table = p["relative_position_bias_table"]
  for i in range(n):
    for j in range(n):
      dy, dx = i // w - j // w, i % w - j % w
      attn[:, :, i, j] += table[(dy + 17) * 35 + (dx + 17)]
  talk = lambda a, q: np.einsum("bhij,hg->bgij", a, q["kernel"]) + q["bias"][:, None, None]
  attn = talk(attn, p["proj_l"])
  attn = np.exp(attn - attn.max(-1, keepdims=True))
  attn = talk(attn / attn.sum(-1, keepdims=True), p["proj_w"])
  y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, 4 * c)
  t = t + lin(swish(y), p["proj"]) * p["rescale_attn"][depth, n % 8] * 8 / c
  for nm, mlp in (("norm3", "mlp2"), ("norm2", "mlp1")):
    y = lin(swish(lin(norm(t, p[nm]), p[f"{mlp}_fc1"])), p[f"{mlp}_fc2"])
    t = t + y * p["rescale_mlp"][depth, n % 8] * 8 / c
  return t.reshape(b, h, w, c)


def test_transformer_block_matches_numpy_reference(supernet):
  _, variables = supernet
  p = jax.tree.map(np.float64, variables["params"]["stage3_block1"])
  x = np.random.default_rng(4).standard_normal((2, 3, 3, 32))
  block = jax.jit(lambda p, x: nasvit.TransformerBlock().apply({"params": p}, x, None, None, 2))
  out = block(jax.tree.map(np.float32, p), x.astype(np.float32))
  np.testing.assert_allclose(out, _reference_block(p, x, 2), atol=1e-4, rtol=1e-4)


_AUTHORS = {  # Flax module -> the authors' module (facebookresearch/NASViT naming)
    "inverted_bottleneck": "mobile_inverted_conv.inverted_bottleneck.conv.conv",
    "inverted_bottleneck_bn": "mobile_inverted_conv.inverted_bottleneck.bn.bn",
    "depth_conv": "mobile_inverted_conv.depth_conv.conv.conv",
    "depth_conv_bn": "mobile_inverted_conv.depth_conv.bn.bn",
    "se_reduce": "mobile_inverted_conv.depth_conv.se.fc.reduce",
    "se_expand": "mobile_inverted_conv.depth_conv.se.fc.expand",
    "point_linear": "mobile_inverted_conv.point_linear.conv.conv",
    "point_linear_bn": "mobile_inverted_conv.point_linear.bn.bn",
    "shortcut": "shortcut.conv.conv", "vconv": "attn.vconv",
    "relative_position_bias_table": "attn.relative_position_bias_table",
    "first_conv": "first_conv.conv.conv", "first_conv_bn": "first_conv.bn.bn",
    "final_expand": "last_conv.final_expand_layer.conv.conv",
    "final_expand_bn": "last_conv.final_expand_layer.bn.bn",
    "feature_mix": "last_conv.feature_mix_layer.conv.conv",
    "classifier": "classifier.linear.linear",
    **{f"mlp{i}_fc{j}": f"mlp{i}.linear{j}.linear" for i in (1, 2) for j in (1, 2)},
    **{m: f"attn.{m}.linear" for m in ("q", "k", "v", "proj", "proj_l", "proj_w")},
}
_LEAVES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def test_converter_reads_authors_names(supernet):
  model, variables = supernet
  starts = np.cumsum([0] + [max(s.depths) for s in nasvit.TINY_SPACE.stages])
  state_dict = {"blocks.1.shortcut.conv.conv.weight": np.zeros((16, 16, 1, 1)),  # unused ones
                "blocks.4.attn.relative_position_index": np.zeros((9, 9)),
                "blocks.0.mobile_inverted_conv.rescale": np.ones(16),
                "first_conv.bn.bn_tracking.0.running_mean": np.zeros(16)}
  for path, value in jax.tree_util.tree_leaves_with_path(variables):
    names = [getattr(k, "key") for k in path][1:]
    prefix = ""
    if names[0].startswith("stage"):
      stage, block = map(int, names.pop(0)[len("stage"):].split("_block"))
      prefix = f"blocks.{starts[stage - 1] + block}."
    module = ".".join(_AUTHORS.get(m, m) for m in names[:-1])
    leaf = names[-1] if names[-1].startswith(("rescale", "relative")) else _LEAVES.get(
        names[-1], names[-1])
    if names[-1] == "kernel":
      value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
    state_dict["module." + prefix + ".".join(filter(None, [module, leaf]))] = value
  converted = load_pytorch_state_dict("nasvit_supernet_tiny", state_dict, num_classes=7,
                                      img_size=16)
  jax.tree.map(np.testing.assert_array_equal, converted, variables)


def test_gradient_projection_matches_numpy():
  rng = np.random.default_rng(0)
  ref = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
  for sign in (1.0, -1.0):
    g = {"a": sign * ref["a"] + 0.3 * rng.standard_normal((3, 4)),
         "b": sign * ref["b"] + 0.3 * rng.standard_normal(5)}
    out, flag = nasvit_rule.project_conflicting(g, ref)
    gv, rv = np.concatenate([g["a"].ravel(), g["b"]]), np.concatenate([ref["a"].ravel(), ref["b"]])
    dot = gv @ rv
    expected = gv - dot / (rv @ rv) * rv if dot < 0 else gv
    got = np.concatenate([np.asarray(out["a"]).ravel(), np.asarray(out["b"])])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert float(flag) == float(dot < 0)
    if dot < 0:
      assert abs(got @ rv) < 1e-4  # on the normal plane


def test_alpha_divergence_gradient_matches_numpy_kl():
  """With alpha in {1, 1} the surrogate's gradient is KL(p || q)'s gradient: q - p per logit."""
  rng = np.random.default_rng(0)
  student, teacher = rng.standard_normal((2, 6)), rng.standard_normal((2, 6))
  grad = jax.jit(jax.grad(lambda s: nasvit_rule.alpha_divergence(s, teacher, 1.0, 1.0)))(student)
  softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  np.testing.assert_allclose(grad, (softmax(student) - softmax(teacher)) / 2, atol=1e-6)


# A two-stage space (MBConv; MBConv + transformer) keeping the sandwich / recalibration tests'
# compilations short, and a subnet of it masking the first conv (4 of 8), stage 2's hidden width
# (8 of 16) and stage 1's second block.
MICRO_SPACE = nasvit.Space((4, 8), (nasvit.Stage((8,), (1, 2), (3,), (1,), 1),
                                    nasvit.Stage((8, 16), (1, 2), (3,), (1, 2), 2, True, True)),
                           (16,))
MICRO_SUBNET = dict(first_conv=4, last_conv=16, width=(8, 8), depth=(1, 1), kernel=(3, 3),
                    expand=(1, 1))


@pytest.fixture(scope="module")
def micro():
  model = nasvit.NASViT(num_classes=7, img_size=16, space=MICRO_SPACE)
  return model, _random_variables(model, 16)


def test_sandwich_step_compiles_once_across_sampled_resolutions(micro):
  """Steps whose random subnet draws different resolutions (12 or 16 px, resized inside the
  step) share one compilation."""
  from compact_vit import objectives
  model, variables = micro
  rng = np.random.default_rng(5)
  images = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  targets = np.eye(7, dtype=np.float32)[[1, 4]]
  options = {"num_random": 1, "gradient_projection": False, "resolutions": (16, 12)}

  @jax.jit
  def step(params, stats, key):
    ctx = objectives.StepContext(model=model, images=images, targets=targets, rngs={}, key=key,
                                 step=jnp.zeros((), jnp.int32), batch_stats=stats, distill={},
                                 options=options)
    loss, grads, new_stats, metrics = nasvit_rule.nasvit_sandwich(params, ctx)
    return loss, metrics["mean_resolution"], new_stats

  seen = set()
  for seed in range(4):
    loss, mean_res, new_stats = step(variables["params"], variables["batch_stats"],
                                     jax.random.key(seed))
    assert np.isfinite(float(loss))
    seen.add(round(3 * float(mean_res)) - 28)  # (16 + 12 + r) / 3: r the random one's
  assert seen == {12, 16}, seen
  assert step._cache_size() == 1


def test_recalibrated_stats_are_mean_of_batch_moments(micro):
  """Recalibrated BN statistics equal the average over batches of the per-batch mean and biased
  variance (NumPy) of the subnet's activations entering that BN, at the subnet's resolution;
  entries the subnet does not use keep their values."""
  model, variables = micro
  rng = np.random.default_rng(6)
  batches = [rng.standard_normal((3, 16, 16, 3)).astype(np.float32) for _ in range(3)]
  arch = dict(MICRO_SUBNET, resolution=12)
  out = nasvit.recalibrate_batch_stats(model, variables, arch, batches)
  small = model.clone(img_size=12)
  captured = {"first_conv": [], "depth_conv": []}
  capture = jax.jit(lambda v, x: small.apply(
      v, nasvit.resize_images(x, 12), train=True, subnet=nasvit.as_arrays(MICRO_SUBNET),
      mutable=["batch_stats", "intermediates"],
      capture_intermediates=lambda m, name: m.name in captured)[1]["intermediates"])
  for x in batches:  # activations of the subnet in training mode (batch statistics)
    inter = capture(variables, x)
    captured["first_conv"].append(np.asarray(inter["first_conv"]["__call__"][0], np.float64))
    captured["depth_conv"].append(
        np.asarray(inter["stage2_block0"]["depth_conv"]["__call__"][0], np.float64))
  stats, old = out["batch_stats"], variables["batch_stats"]
  for acts, bn, active in ((captured["first_conv"], stats["first_conv_bn"], 4),
                           (captured["depth_conv"], stats["stage2_block0"]["depth_conv_bn"], 8)):
    mean = np.mean([a.mean((0, 1, 2)) for a in acts], 0)
    var = np.mean([a.var((0, 1, 2)) for a in acts], 0)
    np.testing.assert_allclose(bn["mean"][:active], mean[:active], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn["var"][:active], var[:active], rtol=1e-4, atol=1e-5)
  old_dw = old["stage2_block0"]["depth_conv_bn"]
  np.testing.assert_array_equal(stats["stage2_block0"]["depth_conv_bn"]["mean"][8:],
                                old_dw["mean"][8:])  # masked channels untouched
  jax.tree.map(np.testing.assert_array_equal, stats["stage1_block1"],
               old["stage1_block1"])  # inactive block (depth 1 of 2) untouched


def _naive_authors_update(g_sub, g_sup, per_tensor, clip):
  """The authors' gradient for one step, tensor by tensor in NumPy (main.py + misc/constrain_opt):
  the subnets' gradients accumulate in .grad after the supernet's was set aside, clip_grad_norm_
  clips them (total norm over every tensor), then second_step adds the supernet's, scaling a
  conflicting subnet gradient by 1 + clamp(-inner / (1e-6 + |g|^2), 0, 2) after epoch 100."""
  total = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in g_sub.values()))
  scale = min(1.0, clip / (total + 1e-6))
  out = {}
  for k in g_sub:
    g = g_sub[k].astype(np.float64) * scale
    step = 0.0
    if per_tensor:
      step = np.clip(-np.sum(g * g_sup[k]) / (1e-6 + np.sum(g * g)), 0.0, 2.0)
    out[k] = g + g * step + g_sup[k]
  return out


@pytest.mark.parametrize("per_tensor", [False, True])
def test_authors_gradient_rule_matches_a_naive_transcription(per_tensor):
  rng = np.random.default_rng(11)
  g_sub = {k: rng.standard_normal(s).astype(np.float32) for k, s in (("a", (3, 4)), ("b", (5,)))}
  g_sup = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in g_sub.items()}
  g_sup["b"] = -3.0 * g_sub["b"]  # one clearly conflicting tensor
  clipped, _ = optax.clip_by_global_norm(1.0).update(g_sub, optax.EmptyState())
  ours = nasvit_rule.combine_authors(clipped, g_sup, jnp.asarray(per_tensor))
  want = _naive_authors_update(g_sub, g_sup, per_tensor, 1.0)
  for k in g_sub:  # optax clips by max_norm / norm without torch's 1e-6: float32 rounding only
    np.testing.assert_allclose(ours[k], want[k], rtol=1e-5, atol=1e-6)
  if per_tensor:  # the conflicting tensor is scaled up by 1 + 2, the clamp's maximum
    np.testing.assert_allclose(ours["b"] - g_sup["b"], 3.0 * clipped["b"], rtol=1e-5)


def test_teacher_targets_average_the_sharpened_teachers():
  """The largest subnet's targets: mean over teachers of softmax(logits / 0.2) (NumPy)."""
  from compact_vit import objectives

  class Fixed:  # a stand-in teacher module: returns fixed logits
    def __init__(self, logits):
      self.logits = logits

    def apply(self, variables, images, train=False):
      del variables, images, train
      return jnp.asarray(self.logits)

  rng = np.random.default_rng(12)
  t1, t2 = (rng.standard_normal((2, 6)).astype(np.float32) for _ in range(2))
  ctx = objectives.StepContext(model=None, images=np.zeros((2, 4, 4, 3), np.float32),
                               targets=None, rngs={}, key=None, step=0, batch_stats=None,
                               distill={}, options={}, teacher=(Fixed(t1), Fixed(t2)),
                               teacher_vars=({}, {}))
  softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  want = (softmax(5.0 * t1.astype(np.float64)) + softmax(5.0 * t2.astype(np.float64))) / 2
  np.testing.assert_allclose(nasvit_rule.teacher_targets(ctx, 0.2), want, rtol=1e-5, atol=1e-7)
