"""Training throughput and MFU on one GPU: our `trainer.train_step` beside timm (or the authors'
SepViT) under `torch.compile`, in one process; and DSS scoring speed (TF-TAS) on the same GPU.

  python benchmarks/gpu.py [--sections train,dss] [--models deit_small_patch16_224,...]
      [--batch 256] [--steps 20] [--attention xla,cudnn] [--sepvit-repo DIR] [--out FILE.md]

train: each model's ImageNet config (configs/<name>.py) with `dtype=bfloat16` (float32 parameters
and optimizer state) and distillation off, through the trainer's jitted, donated `train_step`
(DeiT-S once per `--attention` implementation: XLA's and cuDNN's fused flash attention):
Mixup/CutMix, drop path, AdamW, the lot, on random 224x224 images. timm: the same architecture
with the config's drop-path rate, bf16 autocast, `torch.compile(model)`, fused AdamW, soft-target
cross-entropy (no Mixup). With `--on-accelerator` (default) ours also runs with
`dataset.on_accelerator` (the default on a GPU): the same step, which now first resamples a host
batch of uint8 crops in canvases and applies flip, RandAugment and erasing (`accelerator_batch`);
the ratio of the two rates is that work's cost in the step. Both: `--steps` timed steps after 3
warm-up steps (compilation). MFU =
6 x forward MACs (`compact_vit.profile.count_macs`) x images/s / the GPU's dense bf16 peak; the
same FLOP count is used for both sides.

dss: `tf_tas.make_scorer` at full AutoFormer-T size (224 px supernet), candidates per second with
`vmap` and with `lax.map` over chunks of `--dss-chunk`.

Needs no TensorFlow. Results are printed as they come and written to `--out` (Markdown).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {"deit_small_patch16_224": "deit_s", "efficientformer_l1": "efficientformer_l1",
           "sepvit_t": "sepvit_t"}
VIT_MODELS = ("deit_small_patch16_224",)  # VisionTransformer: also run with --attention
# Dense bf16 peak (FLOP/s) by `device_kind` prefix: H100/H200 SXM 989 TFLOP/s, A100 312.
PEAK_BF16 = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def peak_flops(kind: str) -> float | None:
  for prefix, flops in PEAK_BF16.items():
    if kind.startswith(prefix):
      return flops
  return None


def accelerator_batch(config, batch: int, seed: int = 0) -> dict:
  """A host batch as `dataset.on_accelerator` sends it: uint8 crops of 112..canvas pixels a side
  (random, as random-resized crops of ImageNet photos) in canvases, their resampling to img_size,
  and augmentation keys."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from compact_vit.data import accelerator  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  canvas = accelerator.canvas_size(config.img_size, config.dataset.canvas_min_side)
  size = rng.integers(112, canvas + 1, (batch, 2)).astype(np.int32)
  return {"image": rng.integers(0, 256, (batch, canvas, canvas, 3), dtype=np.uint8), "size": size,
          "scale": (config.img_size / size).astype(np.float32),
          "translation": np.zeros((batch, 2), np.float32),
          "aug_key": rng.integers(0, 2**32, (batch, 2), dtype=np.uint32),
          "label": rng.integers(0, 1000, batch).astype(np.int32)}


def ours_train(name: str, batch: int, steps: int, attention: str = "xla",
               on_accelerator: bool = False):
  """(images/s, forward MACs per image) of the trainer's train_step in bf16; `attention` is the
  ViT's attention implementation (`layers.Attention`); `on_accelerator`: the step also resamples
  and augments (DeiT's recipe: flip, RandAugment, erasing) a host batch of crops in canvases
  (`dataset.on_accelerator`), else it gets ready images."""
  import importlib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from compact_vit import optim, profile, trainer  # pylint: disable=import-outside-toplevel
  config = importlib.import_module(f"configs.{CONFIGS[name]}").get_config()
  config.dtype, config.distill.type, config.batch_size = "bfloat16", "none", batch
  if attention != "xla":
    config.model.attention = attention
  try:
    model = trainer.create_model(config, 1000)
    tx, schedule = optim.create_optimizer(config.optim, batch_size=batch, steps_per_epoch=1000,
                                          total_steps=100_000)
    state = jax.jit(functools.partial(trainer.create_train_state, model, tx,
                                      img_size=config.img_size, use_ema=False))(
                                          jax.random.key(0))
    config.dataset.on_accelerator = on_accelerator
    step = jax.jit(functools.partial(
        trainer.train_step, model=model, tx=tx, schedule=schedule, base_rng=jax.random.key(0),
        num_classes=1000, aug=config.aug.to_dict(), distill=config.distill.to_dict(),
        objective=trainer.objective_options(config),
        input_fn=trainer.accelerator_inputs(config)[0]), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    if on_accelerator:
      data = jax.device_put(accelerator_batch(config, batch))
    else:
      data = {"image": jax.device_put(rng.standard_normal(
                  (batch, config.img_size, config.img_size, 3), dtype=np.float32)),
              "label": jax.device_put(rng.integers(0, 1000, batch).astype(np.int32))}
    for _ in range(3):
      state, metrics = step(state, data, None)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, data, None)
    loss = float(metrics["loss"])  # waits for the last step
    rate = batch * steps / (time.perf_counter() - start)
    if not np.isfinite(loss):
      raise FloatingPointError(f"{name}: loss {loss}")
    f32 = trainer.create_model(dict_copy(config, dtype="float32"), 1000)
    if attention != "xla":  # count the MACs of the same attention in XLA's float32 form
      f32 = f32.clone(attention="xla")
    shape = (1, config.img_size, config.img_size, 3)
    macs = profile.count_macs(f32, profile.random_variables(f32, shape), shape)
    return rate, macs, config.model.get("drop_path_rate", 0.0)
  finally:
    jax.clear_caches()


def dict_copy(config, **updates):
  config = config.copy_and_resolve_references()
  for key, value in updates.items():
    config[key] = value
  return config


def torch_model(name: str, drop_path: float, sepvit_repo: str | None):
  import timm  # pylint: disable=import-outside-toplevel
  if name.startswith("sepvit"):
    if not sepvit_repo:
      return None, None
    import hybrids_cpu  # pylint: disable=import-outside-toplevel
    return "authors'", hybrids_cpu.authors_model(name, sepvit_repo)
  return "timm", timm.create_model(name, pretrained=False, drop_path_rate=drop_path)


def torch_train(model, batch: int, steps: int) -> float:
  """images/s of a compiled bf16-autocast AdamW train step of `model`."""
  import torch  # pylint: disable=import-outside-toplevel
  model = model.cuda().train().to(memory_format=torch.channels_last)
  compiled = torch.compile(model)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
  x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
  target = torch.softmax(torch.randn(batch, 1000, device="cuda"), -1)

  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      out = compiled(x)
      heads = out if isinstance(out, (tuple, list)) else (out,)
      loss = sum(torch.nn.functional.cross_entropy(h.float(), target) for h in heads) / len(heads)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  for _ in range(3):
    step()
  torch.cuda.synchronize()
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  torch.cuda.synchronize()
  rate = batch * steps / (time.perf_counter() - start)
  if not torch.isfinite(loss):
    raise FloatingPointError(f"loss {loss}")
  return rate


def train_section(args, out):
  import jax  # pylint: disable=import-outside-toplevel
  kind = jax.devices()[0].device_kind
  peak = peak_flops(kind)
  out(f"## Train step, {kind}, bf16, batch {args.batch}, {args.steps} timed steps\n")
  out("| model | implementation | images/s | MFU | ours / reference |")
  out("|---|---|---|---|---|")
  for name in args.models.split(","):
    rates = {}
    macs = drop_path = None
    variants = [(a, False) for a in (args.attention.split(",") if name in VIT_MODELS else ["xla"])]
    if args.on_accelerator:
      variants.append(("xla", True))
    for attention, on_accelerator in variants:
      label = ("ours" if attention == "xla" else f"ours, attention={attention}") + (
          ", on_accelerator (resampling + DeiT's augmentation in the step)" if on_accelerator else "")
      try:
        rates[label], macs, drop_path = ours_train(name, args.batch, args.steps, attention,
                                                   on_accelerator)
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        out(f"| {name} | {label} | error: {type(e).__name__}: {str(e).splitlines()[0][:150]} "
            "| | |")
    ref = None
    if macs is not None:
      try:
        import torch  # pylint: disable=import-outside-toplevel
        kind_ref, module = torch_model(name, drop_path or 0.0, args.sepvit_repo)
        if module is not None:
          ref = torch_train(module, args.batch, args.steps)
          rates[f"{kind_ref} torch.compile"] = ref
        del module
        torch.cuda.empty_cache()
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        out(f"| {name} | reference | error: {type(e).__name__}: {str(e).splitlines()[0][:150]} "
            "| | |")
    for label, rate in rates.items():
      mfu = f"{6 * macs * rate / peak:.1%}" if peak and macs else ""
      vs = f"{rate / ref:.2f}x" if ref and label.startswith("ours") else ""
      out(f"| {name} | {label} | {rate:.0f} | {mfu} | {vs} |")
    accel = [label for label in rates if "on_accelerator" in label]
    if accel and "ours" in rates:
      out(f"| {name} | on_accelerator step / plain step (speed) | {rates[accel[0]] / rates['ours']:.3f}x "
          "| | |")
    if macs:
      out(f"| {name} | (forward GMACs per image) | {macs / 1e9:.3f} | | |")


def dss_section(args, out):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from compact_vit import trainer  # pylint: disable=import-outside-toplevel
  from compact_vit.search import space as space_lib, tf_tas  # pylint: disable=import-outside-toplevel
  from configs import autoformer_common  # pylint: disable=import-outside-toplevel
  config = autoformer_common.search_config("t", "tf_tas", None)
  model = trainer.create_model(config, 1000)
  params = jax.jit(lambda k: trainer.init_variables(model, k, config.img_size)["params"])(
      jax.random.key(0))
  costs = space_lib.Costs(model)
  limits = space_lib.Limits(config.search.min_params_m, config.search.max_params_m,
                            config.search.max_gmacs)
  rng = np.random.default_rng(0)
  archs = [space_lib.sample_valid(model.space, rng, limits, costs)
           for _ in range(args.dss_candidates)]
  out(f"\n## DSS scoring, AutoFormer-T supernet at {config.img_size} px, "
      f"{jax.devices()[0].device_kind}, float32\n")
  out("| mapping | chunk | compile + first chunk (s) | candidates/s | ms per candidate |")
  out("|---|---|---|---|---|")
  scores = {}
  for vectorize in (True, False):
    score = tf_tas.make_scorer(model, params, chunk=args.dss_chunk, vectorize=vectorize)
    start = time.perf_counter()
    score(archs[:1])
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    scores[vectorize] = score(archs)
    secs = time.perf_counter() - start
    out(f"| {'vmap' if vectorize else 'lax.map'} | {args.dss_chunk} | {compile_s:.1f} | "
        f"{len(archs) / secs:.1f} | {secs / len(archs) * 1e3:.1f} |")
  gap = np.max(np.abs(scores[True] - scores[False]) / np.abs(scores[False]))
  out(f"\nvmap vs lax.map scores: max relative difference {gap:.2e}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sections", default="train,dss")
  parser.add_argument("--models", default=",".join(CONFIGS))
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--attention", default="xla,cudnn",
                      help="attention implementations to train DeiT-S with (layers.Attention)")
  parser.add_argument("--on-accelerator", action=argparse.BooleanOptionalAction, default=True,
                      help="also time the step with dataset.on_accelerator (its input work on the GPU)")
  parser.add_argument("--sepvit-repo", help="checkout of liwei109/SepViT (authors' SepViT)")
  parser.add_argument("--dss-candidates", type=int, default=64)
  parser.add_argument("--dss-chunk", type=int, default=16)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu.md"))
  args = parser.parse_args(argv)
  # JAX and torch share the GPU: leave torch room.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
  import jax  # pylint: disable=import-outside-toplevel

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "a") as f:
    def out(line):
      print(line, flush=True)
      f.write(line + "\n")
      f.flush()
    out(f"\n# {jax.devices()[0].device_kind}: jax {jax.__version__}, "
        f"`{' '.join(sys.argv[1:])}`\n")
    for section in args.sections.split(","):
      {"train": train_section, "dss": dss_section}[section](args, out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
