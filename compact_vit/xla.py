"""XLA settings for the CPU backend, measured in benchmarks/zoo.py (benchmarks/results/zoo_cpu.md).

`set_cpu_defaults()` adds `CPU_XLA_FLAGS` to XLA_FLAGS; `import compact_vit` calls it through
`set_cpu_defaults_on_import()` when JAX's backends have not started yet (unless the environment sets
`COMPACT_VIT_NO_CPU_DEFAULTS=1`), and train.py, eval.py, search.py and the profile CLI call it
before JAX's backend starts. The trainer's train step compiles with `train_compiler_options()`.
Both do nothing on GPU or TPU and yield to the user's XLA_FLAGS.
"""
from __future__ import annotations

import os

import jax

# XLA CPU flags that benchmarks/zoo.py measured to help here (see benchmarks/results/zoo_cpu.md).
# An empty YNNPACK fusion list keeps XLA's own dot and convolution kernels: jaxlib 0.10's default
# hands 1x1 convolutions and some dots to YNNPACK, which ran 1.2x (DeiT-S) to 1.8x
# (EfficientFormer-L1) slower at batch 32 on a 2-core AVX2 machine.
CPU_XLA_FLAGS = ("--xla_cpu_use_xnnpack=true", "--xla_cpu_experimental_ynn_fusion_type=")

# Per-`jax.jit` compiler options for code that takes gradients (the trainer's train step) on CPU:
# YNNPACK's reductions. XLA:CPU's own reduction over leading axes that keeps the minor (channel)
# axis, which is what every bias, BatchNorm and LayerNorm gradient is, ran 10-18x slower than
# YNNPACK's on a 2-core AVX2 machine ((4, 14, 14, 1024) -> (1024,): 1.6 vs 0.1 ms), and the train
# step 1.05x (DeiT-S) to 3.7x (EfficientFormerV2-S0) faster with it. Inference keeps XLA's
# reductions: YNNPACK's stop LayerNorm and softmax fusing (DeiT-S 15.2 -> 13.5 images/s).
CPU_TRAIN_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}

# Set to 1 (or any value but 0) to keep `import compact_vit` from touching XLA_FLAGS.
OPT_OUT_ENV = "COMPACT_VIT_NO_CPU_DEFAULTS"


def _flag_name(flag: str) -> str:
  """'--xla_foo=bar' -> 'xla_foo' (the name compiler_options use too)."""
  return flag.split("=")[0].lstrip("-")


def set_cpu_defaults() -> None:
  """Adds each of `CPU_XLA_FLAGS` to XLA_FLAGS unless the user's XLA_FLAGS already sets that flag.

  XLA reads XLA_FLAGS when JAX's backend starts (the first computation), so call this before.
  """
  current = os.environ.get("XLA_FLAGS", "")
  given = {_flag_name(f) for f in current.split()}
  extra = [f for f in CPU_XLA_FLAGS if _flag_name(f) not in given]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def backends_started() -> bool:
  """Whether JAX has started its backends, after which XLA no longer reads XLA_FLAGS."""
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return xla_bridge.backends_are_initialized()


def set_cpu_defaults_on_import() -> bool:
  """`set_cpu_defaults()` unless `OPT_OUT_ENV` is set (to anything but '' or '0') or JAX's backends
  have already started (then the process keeps the XLA flags it started with). Returns whether it
  ran; `import compact_vit` calls it."""
  if os.environ.get(OPT_OUT_ENV, "") not in ("", "0") or backends_started():
    return False
  set_cpu_defaults()
  return True


def train_compiler_options() -> dict[str, str]:
  """`compiler_options` for `jax.jit` of gradient code: `CPU_TRAIN_COMPILER_OPTIONS` on the CPU
  backend, except options whose flag XLA_FLAGS sets to a value other than `CPU_XLA_FLAGS`'s (the
  user's choice wins); {} on GPU and TPU."""
  if jax.default_backend() != "cpu":
    return {}
  given = {_flag_name(f) for f in os.environ.get("XLA_FLAGS", "").split()
           if f not in CPU_XLA_FLAGS}
  return {k: v for k, v in CPU_TRAIN_COMPILER_OPTIONS.items() if k not in given}
