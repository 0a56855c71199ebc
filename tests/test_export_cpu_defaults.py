"""`import compact_vit` applies the project's XLA CPU settings (compact_vit.xla.set_cpu_defaults)
when JAX's backends have not started: checked in fresh interpreters by what XLA compiles."""
import json
import os
import subprocess
import sys

import pytest

from compact_vit.xla import CPU_XLA_FLAGS, OPT_OUT_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_FLAG = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"

# Compiles a (512, 384) x (384, 1536) matmul and reports XLA_FLAGS and whether XLA:CPU handed the
# dot to YNNPACK, which jaxlib's default does and CPU_XLA_FLAGS turns off.
_PROBE = """
import json, os
{before}
import compact_vit
import jax, jax.numpy as jnp
x, w = jnp.ones((512, 384)), jnp.ones((384, 1536))
hlo = jax.jit(lambda x, w: x @ w).lower(x, w).compile().as_text()
import sys
loaded = [m for m in ("jax2onnx", "onnx", "onnxruntime", "tensorflow", "optax") if m in sys.modules]
print(json.dumps({{"xla_flags": os.environ.get("XLA_FLAGS", ""), "ynn": "__ynn_fusion" in hlo,
                  "loaded": loaded}}))
"""

_CASES = {
    "jax_only": dict(before="import sys; sys.modules['compact_vit'] = object()"),
    "plain_import": dict(before="import compact_vit.models"),
    "opt_out": dict(env={OPT_OUT_ENV: "1"}),
    "user_flag": dict(env={"XLA_FLAGS": USER_FLAG}),
    "jax_started": dict(before="import jax; jax.numpy.ones(1).block_until_ready()"),
}


@pytest.fixture(scope="module")
def probes() -> dict:
  """Each case of _CASES run in its own fresh interpreter (all at once): name -> result."""
  base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", OPT_OUT_ENV)}
  running = {}
  for name, case in _CASES.items():
    env = dict(base, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **case.get("env", {}))
    code = _PROBE.format(before=case.get("before", ""))
    running[name] = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  results = {}
  for name, proc in running.items():
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{name}: {err[-2000:]}"
    results[name] = json.loads(out.strip().splitlines()[-1])
  return results


def test_plain_import_applies_the_cpu_settings(probes):
  assert probes["jax_only"]["ynn"], "jaxlib no longer uses YNNPACK here: the probe tests nothing"
  assert probes["jax_only"]["xla_flags"] == ""
  assert not probes["plain_import"]["ynn"]
  assert probes["plain_import"]["xla_flags"].split() == list(CPU_XLA_FLAGS)
  assert probes["plain_import"]["loaded"] == []  # the models load no export stack, TF or optax


def test_opt_out_and_the_users_flag_win(probes):
  assert probes["opt_out"]["ynn"] and probes["opt_out"]["xla_flags"] == ""
  assert probes["user_flag"]["ynn"]  # the user's choice, not ours
  assert probes["user_flag"]["xla_flags"].split() == [USER_FLAG, "--xla_cpu_use_xnnpack=true"]


def test_import_after_jax_started_leaves_xla_flags_alone(probes):
  assert probes["jax_started"]["ynn"] and probes["jax_started"]["xla_flags"] == ""
