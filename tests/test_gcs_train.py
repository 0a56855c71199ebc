"""Runs that live in a bucket, and storage that fails: `train.py` / `eval.py` with
`--workdir gs://...` against a GCS-compatible server on loopback (tests/gcs_server.py, no
credentials, no traffic off 127.0.0.1), through a proxy that injects 503/429, dropped connections
and slow answers; a checkpoint save that fails for good; a full disk (a real size-limited tmpfs)
and a read-only workdir (a tmpfs mounted read-only).

One reference run (in the bucket, through the faulty proxy) is compared bit for bit with the run
interrupted by SIGTERM and resumed, and with the run stopped by the full disk and rerun."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import gcs_server
# Imported before any fixture runs: it sets EPATH_USE_TF=false, and etils caches its choice of
# backend at the first epath.Path (the session's data_dir fixture makes one through TFDS); with
# TensorFlow's, the test's own reads of gs:// would ignore the emulator.
from compact_vit import paths  # noqa: F401  pylint: disable=unused-import

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "configs/deit_s.py:quick"
# A tiny model and few steps: the run's I/O is what is tested.
TINY = ["--config.model.depth=1", "--config.model.embed_dim=64", "--config.model.num_heads=2",
        "--config.batch_size=16", "--config.total_steps=12", "--config.log_every=2",
        "--config.eval_every=12", "--config.checkpoint_every=4"]
# fake-gcs-server and tensorstore name objects with %2F in query strings
RATES = ("train/images_per_sec", "train/input_wait_fraction")
CHECKPOINT_8 = r"checkpoints(/|%2F)8(/|%2F|\.)"


@pytest.fixture(scope="module")
def gcs():
  server = gcs_server.server()
  gcs_server.use_in_process(server.url)
  server.create_bucket("runs")
  return server


def _cmd(script, workdir, data_dir, *flags):
  return [sys.executable, script, "--config", QUICK, "--workdir", str(workdir),
          f"--config.dataset.data_dir={data_dir}", *TINY, *flags]


def _env(url):
  return gcs_server.client_env(url, dict(os.environ, PYTHONUNBUFFERED="1",
                                         TF_CPP_MIN_LOG_LEVEL="3"))


def _run(args, url, timeout=1800):  # hang guard, generous for a busy machine
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=_env(url))


def _metrics(workdir):
  from compact_vit import paths  # pylint: disable=import-outside-toplevel
  return [json.loads(line) for line in paths.read_text(f"{workdir}/metrics.jsonl").splitlines()]


def _final_params(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from compact_vit import checkpointing  # pylint: disable=import-outside-toplevel
  step = checkpointing.TrainCheckpointer(f"{workdir}/checkpoints").latest_step()
  return step, ocp.StandardCheckpointer().restore(f"{workdir}/checkpoints/{step}/default")["params"]


def _same(params_a, params_b):
  return (jax.tree.structure(params_a) == jax.tree.structure(params_b) and
          all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_a),
                                                   jax.tree.leaves(params_b))))


LOG_RECORD = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ")  # absl's one-line log records


def _last_line(stderr):
  """Our one error line, the only thing on stderr besides one-line log records: no traceback (not
  even tensorstore's reports of writes that finish after a failed save, see
  checkpointing.quiet_late_tensorstore_callbacks)."""
  others = [line for line in stderr.splitlines() if line.strip() and not LOG_RECORD.match(line)]
  assert len(others) == 1 and others[0].startswith("error: "), stderr[-3000:]
  assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr[-3000:]
  return others[0]


@pytest.fixture(scope="module")
def ref(gcs, data_dir):
  """The reference run, in the bucket, through a proxy that fails a share of the requests for a
  while (503, 429, dropped connections, 1-s delays), after which the clients' retries finish."""
  proxy = gcs_server.FaultProxy(gcs.url, seed=1, rules=[
      gcs_server.Rule("503", share=0.06, limit=8), gcs_server.Rule("429", share=0.03, limit=4),
      gcs_server.Rule("drop", share=0.03, limit=4),
      gcs_server.Rule("slow", share=0.03, limit=4, delay=1.0)])
  try:
    done = _run(_cmd("train.py", "gs://runs/ref", data_dir), proxy.url)
  finally:
    proxy.close()
  assert done.returncode == 0, done.stderr[-3000:]
  return {"workdir": "gs://runs/ref", "stdout": done.stdout, "proxy": proxy}


def test_transient_storage_faults_are_retried_and_lose_nothing(gcs, ref):
  proxy = ref["proxy"]
  for outcome in ("503", "429", "drop", "slow"):
    assert proxy.count(outcome) >= 1, (outcome, proxy.count("forwarded"))
  assert "Done: step 12" in ref["stdout"]
  assert [r["step"] for r in _metrics(ref["workdir"]) if "train/loss" in r] == [2, 4, 6, 8, 10, 12]
  names = gcs.object_names("runs", "ref/")
  for expected in ("ref/metrics.jsonl", "ref/final.json", "ref/config.json"):
    assert expected in names
  assert any(n.startswith("ref/tensorboard/events.out.tfevents") for n in names)
  assert {n.split("/")[2] for n in names if n.startswith("ref/checkpoints/")} >= {"8", "12"}


def test_sigterm_in_a_bucket_resumes_bit_identical(gcs, ref, data_dir):
  workdir = "gs://runs/interrupted"
  proc = subprocess.Popen(_cmd("train.py", workdir, data_dir), cwd=REPO, env=_env(gcs.url),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first = []
  for line in proc.stdout:
    first.append(line)
    if line.startswith("[step 6/"):
      proc.send_signal(signal.SIGTERM)
      break
  stdout, stderr = proc.communicate(timeout=1800)
  assert proc.returncode == 0, stderr[-3000:]
  assert "saved a checkpoint" in "".join(first) + stdout
  resumed = _run(_cmd("train.py", workdir, data_dir), gcs.url)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from {workdir}/checkpoints at step" in resumed.stdout

  (step_a, params_a), (step_b, params_b) = _final_params(ref["workdir"]), _final_params(workdir)
  assert step_a == step_b == 12
  assert _same(params_a, params_b)
  # metrics.jsonl: every logged step once, in order, with the same numbers as the reference
  straight, interrupted = _metrics(ref["workdir"]), _metrics(workdir)
  # (a resumed run's first line has no images/s yet: the rate starts after its first step)
  exact = lambda records: [{k: v for k, v in r.items() if k not in RATES} for r in records]
  assert exact(interrupted) == exact(straight)


@pytest.fixture(scope="module")
def bucket_data(gcs, data_dir):
  """The session's digits TFDS data_dir copied into the bucket: gs://runs/tfds."""
  import gcsfs  # pylint: disable=import-outside-toplevel
  gcsfs.GCSFileSystem().put(data_dir, "runs/tfds", recursive=True)
  assert "tfds/digits/1.0.0/dataset_info.json" in gcs.object_names("runs", "tfds/")
  return "gs://runs/tfds"


def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint_reading_tfds_from_gs(
    gcs, ref, bucket_data):
  """The run reads its dataset from the bucket (TFDS metadata through etils.epath/gcsfs, its
  TFRecord files through TensorFlow's GCS file system) and is killed inside the save of step 8:
  that save's first file reaches the bucket, its other tensorstore uploads hang. The same command then resumes from
  step 4 and ends bit-identical to the reference run, which read the dataset from a local folder."""
  workdir = "gs://runs/killed"
  # tensorstore's one-request uploads of step 8's files: the first lands, the others hang.
  proxy = gcs_server.FaultProxy(gcs.url, rules=[gcs_server.Rule(
      "stall", method="POST", path=r"uploadType=media&name=[^&]*checkpoints%2F8%2F", after=1,
      delay=1800)])
  try:
    proc = subprocess.Popen(_cmd("train.py", workdir, bucket_data), cwd=REPO, env=_env(proxy.url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 1800  # hang guard, generous for a busy machine
    while not proxy.count("stall"):
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
      time.sleep(0.05)
    proc.kill()
    stdout, _ = proc.communicate(timeout=1800)
  finally:
    proxy.close()
  assert proc.returncode == -signal.SIGKILL and "Done:" not in stdout
  read = [p for m, p, _ in proxy.log if m == "GET" and "tfds%2Fdigits%2F1.0.0%2Fdigits-" in p]
  assert read, proxy.log[:20]  # TensorFlow read the TFRecord files from the bucket
  deadline = time.time() + 60  # the uploads forwarded before the kill land
  while not gcs.object_names("runs", "killed/checkpoints/8/") and time.time() < deadline:
    time.sleep(0.1)
  begun = gcs.object_names("runs", "killed/checkpoints/8/")
  assert begun and not [n for n in begun if n.endswith("commit_success.txt")], begun

  resumed = _run(_cmd("train.py", workdir, bucket_data), gcs.url)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from {workdir}/checkpoints at step 4." in resumed.stdout, resumed.stdout
  (step_a, params_a), (step_b, params_b) = _final_params(ref["workdir"]), _final_params(workdir)
  assert step_a == step_b == 12
  assert _same(params_a, params_b)
  exact = lambda records: [{k: v for k, v in r.items() if k not in RATES} for r in records]
  assert exact(_metrics(workdir)) == exact(_metrics(ref["workdir"]))


def _writes(proxy):
  """The uploads a process started through `proxy` (request paths, with the object named in the
  body; a resumable upload's later requests, which carry its upload_id, are not counted again)."""
  return [p for m, p, o in proxy.log
          if m in ("POST", "PUT", "PATCH") and o == "forwarded" and "upload_id=" not in p]


def test_two_processes_on_one_run_in_a_bucket(gcs, ref, bucket_data):
  """train.py's multi-process mode (two CPU processes on loopback, one device each), both reading
  the dataset from the bucket and writing one run directory there, each through its own proxy:
  process 0 alone writes the logs and final.json, each checkpoint is committed once, and the
  result restores."""
  from test_multihost import _free_port  # pylint: disable=import-outside-toplevel
  workdir, port = "gs://runs/two", _free_port()
  proxies = [gcs_server.FaultProxy(gcs.url) for _ in range(2)]
  try:
    procs = [subprocess.Popen(
        _cmd("train.py", workdir, bucket_data, f"--coordinator_address=localhost:{port}",
             "--num_processes=2", f"--process_id={i}"), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=dict(
            _env(proxy.url), JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=1"))
             for i, proxy in enumerate(proxies)]
    outs = [p.communicate(timeout=1800) for p in procs]  # hang guard, generous for a busy machine
  finally:
    for proxy in proxies:
      proxy.close()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "Done: step 12" in outs[0][0] and "[step" not in outs[1][0]

  first, second = (_writes(proxy) for proxy in proxies)
  logs = re.compile(r"metrics\.jsonl|final\.json|config\.json|tensorboard")
  assert [w for w in first if logs.search(w)] and not [w for w in second if logs.search(w)], second
  commits = [re.search(r"checkpoints(?:/|%2F)(\d+)(?:/|%2F)commit_success", w)
             for w in first + second]
  assert sorted(int(c.group(1)) for c in commits if c) == [4, 8, 12], first + second
  assert any("tfds%2Fdigits" in p for proxy in proxies for _, p, _ in proxy.log)  # both read gs://
  assert all(any("tfds%2Fdigits" in p for _, p, _ in proxy.log) for proxy in proxies)

  names = gcs.object_names("runs", "two/")
  markers = [n for n in names if re.fullmatch(r"two/checkpoints/\d+/commit_success\.txt", n)]
  assert sorted(int(n.split("/")[2]) for n in markers) == [8, 12]  # :quick keeps the latest 2
  assert len([n for n in names if n.startswith("two/tensorboard/events.out.tfevents")]) == 1
  assert [r["step"] for r in _metrics(workdir) if "train/loss" in r] == [2, 4, 6, 8, 10, 12]
  assert json.loads(paths.read_text(f"{workdir}/final.json"))["step"] == 12
  # It restores in one process (as eval.py restores it), into the reference run's structure.
  from compact_vit import checkpointing  # pylint: disable=import-outside-toplevel
  ckpt = checkpointing.TrainCheckpointer(f"{workdir}/checkpoints")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          _final_params(ref["workdir"])[1])
  params = ckpt.restore_subtree({"params": abstract})["params"]
  assert ckpt.latest_step() == 12
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_eval_in_a_bucket_reads_the_latest_checkpoint(gcs, ref, data_dir):
  out = _run([sys.executable, "eval.py", "--config", QUICK, "--workdir", ref["workdir"],
              f"--config.dataset.data_dir={data_dir}", *TINY[:3]], gcs.url)
  assert out.returncode == 0, out.stderr[-3000:]
  from compact_vit import checkpointing, paths  # pylint: disable=import-outside-toplevel
  printed = json.loads(out.stdout.strip().splitlines()[-1])
  record = json.loads(paths.read_text(f"{ref['workdir']}/eval_{printed['split']}.json"))
  assert record == printed and record["step"] == 12
  assert record["params_sha256"] == checkpointing.params_sha256(_final_params(ref["workdir"])[1])


def test_a_save_that_fails_for_good_stops_with_one_line_and_the_previous_checkpoint_restores(
    gcs, data_dir):
  workdir = "gs://runs/refused"
  proxy = gcs_server.FaultProxy(gcs.url, rules=[
      gcs_server.Rule("403", method="POST|PUT|PATCH", path=CHECKPOINT_8)])
  try:
    out = _run(_cmd("train.py", workdir, data_dir), proxy.url)
  finally:
    proxy.close()
  assert out.returncode == 2
  line = _last_line(out.stderr)
  assert line.startswith(f"error: Saving the checkpoint of step 8 to {workdir}/checkpoints/8 failed:")
  assert "permission denied" in line and "(step 4) is kept" in line
  from compact_vit import checkpointing  # pylint: disable=import-outside-toplevel
  ckpt = checkpointing.TrainCheckpointer(f"{workdir}/checkpoints")
  assert ckpt.latest_step() == 4
  step, params = _final_params(workdir)
  assert step == 4 and jax.tree.leaves(params)


@pytest.fixture
def small_disk(tmp_path):
  """A tmpfs mounted at tmp_path/disk (the test sets its size); unmounted afterwards."""
  mount_point = tmp_path / "disk"
  mount_point.mkdir()
  yield mount_point
  subprocess.run(["umount", str(mount_point)], check=False)


def _mount(mount_point, options):
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                        capture_output=True, text=True)
  assert done.returncode == 0, f"mounting a tmpfs needs root: {done.stderr}"


def test_full_disk_during_a_save_stops_with_one_line_and_resumes_bit_identical(
    gcs, ref, data_dir, small_disk):
  """A real full file system: a tmpfs with room for one checkpoint and the logs, not two."""
  checkpoint = sum(gcs.object_sizes("runs", "ref/checkpoints/12/").values())
  assert checkpoint > 512 * 1024  # so that 256 KiB of slack holds the logs, not a checkpoint
  _mount(small_disk, f"size={(checkpoint + 256 * 1024) // 4096 * 4096}")
  workdir = small_disk / "run"
  out = _run(_cmd("train.py", workdir, data_dir), gcs.url)
  assert out.returncode == 2, out.stderr[-3000:]
  line = _last_line(out.stderr)
  assert line.startswith(f"error: Saving the checkpoint of step 8 to {workdir}/checkpoints/8 failed: "
                         "the disk is full"), line
  assert "(step 4) is kept" in line and "free space" in line

  subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
  again = _run(_cmd("train.py", workdir, data_dir), gcs.url)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resumed from" in again.stdout and "at step 4." in again.stdout
  (step_a, params_a), (step_b, params_b) = _final_params(ref["workdir"]), _final_params(workdir)
  assert step_a == step_b == 12
  assert _same(params_a, params_b)


def test_read_only_workdir_fails_before_compiling(gcs, data_dir, small_disk):
  _mount(small_disk, "ro,size=1m")
  out = _run(_cmd("train.py", small_disk / "run", data_dir), gcs.url)
  assert out.returncode == 2
  assert _last_line(out.stderr) .startswith(
      f"error: Cannot write to the workdir {small_disk / 'run'}: the file system is read-only.")
  assert "[step" not in out.stdout and "lr per epoch" not in out.stdout  # nothing built or run
