"""Inputs and outputs in a bucket, in-process, against the GCS-compatible server on loopback
(tests/gcs_server.py): malformed gs:// paths, a missing bucket and refused permission fail in the
preflight; `convert --out gs://`, `init_from` from the bucket, Hugging Face weights converted into
a bucket `COMPACT_VIT_CACHE` once (process 0 converts, another process waits and reads); the sweep's
outputs; a search's search.json and a token picture; metrics.jsonl rewritten whole in a bucket."""
import io
import json
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

import gcs_server
from compact_vit import checkpointing, paths, writers
from compact_vit.convert import hub
from compact_vit.convert.__main__ import main as convert_main
from compact_vit.errors import UserError

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
from safetensors.torch import save as safetensors_bytes  # noqa: E402
from test_convert import random_timm  # noqa: E402
from test_hub import COMMIT, REPO, SPEC, put_in_cache  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(img_size=32)  # the CLI has no --depth: a whole DeiT-Ti, on 32x32 inputs


@pytest.fixture(scope="module")
def gcs():
  server = gcs_server.server()
  gcs_server.use_in_process(server.url)
  server.create_bucket("iotest")
  return server


@pytest.mark.parametrize("bad", ["gs:/iotest/run", "gs://", "gs://Bad_Bucket/run", "gs://iotest//run",
                                 "s4://iotest/run"])
def test_malformed_paths_fail_with_what_to_write(bad):
  with pytest.raises(UserError, match="not a valid gs:// path|unsupported scheme"):
    paths.check_workdir(bad)


def test_missing_bucket_and_refused_permission_fail_in_the_preflight(gcs):
  with pytest.raises(UserError, match="Cannot write to the workdir gs://no-such-bucket/run: the "
                     "bucket does not exist"):
    paths.check_workdir("gs://no-such-bucket/run")
  paths.check_workdir("gs://iotest/run")  # writable: no error, no probe left behind
  assert not [n for n in gcs.object_names("iotest", "run/") if ".write-check" in n]
  proxy = gcs_server.FaultProxy(gcs.url, rules=[gcs_server.Rule("403")])
  try:
    gcs_server.use_in_process(proxy.url)
    with pytest.raises(UserError, match="Cannot write to the workdir gs://iotest/run: permission "
                       "denied"):
      paths.check_workdir("gs://iotest/run")
  finally:
    gcs_server.use_in_process(gcs.url)
    proxy.close()


def test_metrics_in_a_bucket_are_rewritten_whole_and_trimmed_on_resume(gcs):
  workdir = "gs://iotest/metrics"
  writer = writers.MetricWriter(workdir, flush_secs=3600, tensorboard=False)
  for step in (1, 2, 3, 4):
    writer.write(step, {"train/loss": step / 10})
  assert not paths.read_text(f"{workdir}/metrics.jsonl")  # nothing uploaded between flushes
  writer.flush()
  writer.write(5, {"train/loss": 0.5})  # written after the flush, then the process dies
  assert [json.loads(l)["step"] for l in paths.read_text(f"{workdir}/metrics.jsonl").splitlines()] \
      == [1, 2, 3, 4]
  resumed = writers.MetricWriter(workdir, start_step=2, tensorboard=False)  # resumed at step 2
  resumed.write(3, {"train/loss": 0.3})
  resumed.close()
  lines = [json.loads(l) for l in paths.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert [r["step"] for r in lines] == [1, 2, 3]


@pytest.fixture(scope="module")
def tiny_weights():
  _, state_dict = random_timm("deit_tiny_patch16_224", seed=5, **TINY)
  return state_dict


def test_convert_out_to_a_bucket_then_init_from_it(gcs, tiny_weights, tmp_path, capsys):
  source = tmp_path / "model.safetensors"
  source.write_bytes(safetensors_bytes(dict(tiny_weights)))
  out = "gs://iotest/converted/deit_tiny"
  assert convert_main(["--model", "deit_tiny_patch16_224", "--checkpoint", str(source), "--out",
                       out, "--img-size", "32"]) == 0
  assert f"to {out}" in capsys.readouterr().out
  assert hub.resolve_init_from(out, model_name="deit_tiny_patch16_224") == out  # a directory
  variables, meta = checkpointing.load_variables(out)
  assert meta["model"] == "deit_tiny_patch16_224"
  np.testing.assert_array_equal(variables["params"]["blocks_0"]["mlp"]["fc1"]["kernel"],
                                tiny_weights["blocks.0.mlp.fc1.weight"].numpy().T)
  with pytest.raises(UserError, match="does not exist"):
    hub.resolve_init_from("gs://iotest/converted/none", model_name="deit_tiny_patch16_224")
  assert convert_main(["--model", "deit_tiny_patch16_224", "--checkpoint", str(source), "--out",
                       "gs://Bad/x"]) == 1
  assert "not a valid gs:// path" in capsys.readouterr().err


def test_hub_weights_converted_once_into_a_bucket_cache_by_process_0(
    gcs, tiny_weights, tmp_path, monkeypatch):
  hf_cache = tmp_path / "hf"
  hf_cache.mkdir()
  from huggingface_hub import constants  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("COMPACT_VIT_CACHE", "gs://iotest/cache")
  put_in_cache(hf_cache, REPO, {"model.safetensors": safetensors_bytes(dict(tiny_weights))})
  conversions = []
  convert = hub.load_pytorch_state_dict
  monkeypatch.setattr(hub, "load_pytorch_state_dict",
                      lambda name, *a, **k: conversions.append(name) or convert(name, *a, **k))

  # Two processes: process 1 waits (polling the bucket) while process 0 converts.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  overrides = hub._non_default("deit_tiny_patch16_224", dict(TINY))
  waited = {}
  waiter = threading.Thread(target=lambda: waited.update(directory=hub._wait_for_converted(
      SPEC, "deit_tiny_patch16_224", overrides, "gs://iotest/cache", timeout_s=120, poll_s=0.2)))
  waiter.start()
  directory = hub.resolve_init_from(SPEC, model_name="deit_tiny_patch16_224", **TINY)
  waiter.join(120)
  assert directory.startswith("gs://iotest/cache/converted/timm--deit_tiny_patch16_224.fb_in1k/")
  assert waited["directory"] == directory and conversions == ["deit_tiny_patch16_224"]
  source = json.loads(paths.read_text(f"{directory}/source.json"))["source"]
  assert source == {"repo": REPO, "file": "model.safetensors", "commit": COMMIT}
  # Process 1 of the next run finds it without waiting; a single process converts nothing again.
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert hub.resolve_init_from(SPEC, model_name="deit_tiny_patch16_224", **TINY) == directory
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  assert hub.resolve_init_from(SPEC, model_name="deit_tiny_patch16_224", **TINY) == directory
  assert conversions == ["deit_tiny_patch16_224"]
  variables, _ = checkpointing.load_variables(directory)
  np.testing.assert_array_equal(variables["params"]["pos_embed"],
                                tiny_weights["pos_embed"].numpy())


def test_two_point_sweep_in_a_bucket(gcs, data_dir):
  """Both points train in the bucket; results.csv/md/png and commands.sh are written there."""
  workdir = "gs://iotest/sweep"
  tiny = ["--config.model.depth=1", "--config.model.embed_dim=32", "--config.model.num_heads=2",
          "--config.batch_size=16", "--config.total_steps=2", "--config.log_every=1",
          "--config.eval_every=2", f"--config.dataset.data_dir={data_dir}"]
  env = gcs_server.client_env(gcs.url, dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  base = [sys.executable, "-m", "compact_vit.sweep", "--config", "configs/deit_s.py:quick",
          "--workdir", workdir, "--sweep", "seed=0,1", *tiny]
  listed = subprocess.run([*base, "--print_commands"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert listed.returncode == 0, listed.stderr[-3000:]
  commands = paths.read_text(f"{workdir}/commands.sh").splitlines()
  assert len(commands) == 2 and f"--workdir {workdir}/seed=1" in commands[1]
  done = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = paths.read_text(f"{workdir}/results.csv").splitlines()
  assert rows[0].startswith("seed,step,") and len(rows) == 3
  assert [r.split(",")[:2] for r in rows[1:]] == [["0", "2"], ["1", "2"]]
  assert "| 2 |" in paths.read_text(f"{workdir}/results.md")  # one setting, two seeds
  assert paths.read_bytes(f"{workdir}/results.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_and_a_token_picture_written_to_a_bucket(gcs, data_dir, tmp_path, capsys):
  """search.py's work (`search.run`: a tiny TF-TAS search) and `python -m compact_vit.viz tokens`
  (its `main`) with every path in the bucket: the weights, the image, the workdir and the picture."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from compact_vit import search, trainer, viz  # pylint: disable=import-outside-toplevel
  from configs import autoformer_common  # pylint: disable=import-outside-toplevel
  from test_search import TINY as SUPERNET  # pylint: disable=import-outside-toplevel

  config = autoformer_common.search_config("t", "tf_tas", "quick")
  config.model.update(SUPERNET)
  config.img_size = 8
  config.search.num_candidates, config.search.chunk = 4, 2
  config.search.min_params_m, config.search.max_params_m = 0.0, 0.006
  result = search.run(config, "gs://iotest/search")
  written = json.loads(paths.read_text("gs://iotest/search/search.json"))
  assert written["method"] == "tf_tas" and len(written["candidates"]) == 4
  assert written["best"]["score"] == result.best["score"]
  assert "Wrote gs://iotest/search/search.json" in capsys.readouterr().out
  with pytest.raises(UserError, match="not a valid gs:// path"):
    search.run(config, "gs://iotest//search")

  # viz: a DynamicViT (the :quick one, 16x16 digits in 4x4 patches, 3 pruning stages).
  spec = tmp_path / "viz_config.py"
  spec.write_text("from configs import dynamicvit_deit_s\n\n\ndef get_config(arg=None):\n"
                  "  c = dynamicvit_deit_s.get_config('quick')\n"
                  f"  c.dataset.data_dir = {data_dir!r}\n  return c\n")
  config = viz.load_config(str(spec))
  model = trainer.create_model(config, 10)
  variables = jax.jit(lambda: trainer.init_variables(model, jax.random.key(0), config.img_size))()
  checkpointing.save_variables("gs://iotest/viz/weights", variables, config.model.name)
  image = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)).save(
      image, format="PNG")
  paths.write_bytes("gs://iotest/viz/image.png", image.getvalue())
  out = "gs://iotest/viz/tokens.png"
  assert viz.main(["tokens", "--config", str(spec), "--workdir", "gs://iotest/viz/run", "--image",
                   "gs://iotest/viz/image.png", "--out", out,
                   "--init-from", "gs://iotest/viz/weights"]) == 0
  assert f"Wrote {out}: patches kept per stage [11, 7, 5]." in capsys.readouterr().out
  picture = Image.open(io.BytesIO(paths.read_bytes(out)))
  assert picture.format == "PNG"
  assert picture.size == (4 * (viz.PANEL + viz.GAP) - viz.GAP, viz.PANEL)  # the input + 3 stages
