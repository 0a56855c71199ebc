"""A lost process: two `train.py` processes on loopback, one killed mid-run. The survivor exits
non-zero within the heartbeat bound, with one line naming the lost process; relaunching both resumes
from the last checkpoint exactly as a run that was never interrupted (one process, two devices)."""
import json
import os
import subprocess
import sys
import time


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_multihost import _free_port, _records  # pylint: disable=wrong-import-position

HEARTBEAT_S = 10
FLAGS = ["--config.model.depth=1", "--config.model.embed_dim=32", "--config.model.num_heads=2",
         "--config.log_every=1", "--config.eval_every=100000", "--config.checkpoint_every=2",
         "--config.optim.warmup_epochs=0", "--config.optim.min_lr=0.001", "--config.total_steps=12",
         "--config.keep_checkpoints=10"]


def _start(workdir, data_dir, *extra, devices=1):
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "train.py", "--config", "configs/deit_s.py:quick", "--workdir", str(workdir),
         f"--config.dataset.data_dir={data_dir}", *FLAGS, *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _pair(workdir, data_dir):
  port = _free_port()
  return [_start(workdir, data_dir, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                 f"--process_id={i}", f"--heartbeat_timeout={HEARTBEAT_S}") for i in range(2)]


def _saved(workdir):
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(root) if s.isdigit()) if os.path.isdir(root) else []


def _kill_after_checkpoint(procs, workdir, victim, after_step):
  """Waits for a checkpoint past `after_step`, kills process `victim` (SIGKILL) and returns the
  survivor's (returncode, stdout, stderr, seconds from the kill to its exit)."""
  deadline = time.time() + 1800  # hang guards, generous for a busy machine
  while not any(s > after_step for s in _saved(workdir)):
    assert time.time() < deadline and all(p.poll() is None for p in procs), [
        p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
    time.sleep(0.1)
  procs[victim].kill()
  killed = time.time()
  survivor = procs[1 - victim]
  out, err = survivor.communicate(timeout=HEARTBEAT_S + 120)
  procs[victim].communicate()
  return survivor.returncode, out, err, time.time() - killed


def test_lost_process_ends_the_survivor_and_a_relaunch_resumes_exactly(tmp_path, data_dir):
  reference = _start(tmp_path / "one", data_dir, "--config.input_shards=2", devices=2)
  workdir = tmp_path / "two"

  # Process 1 dies: process 0 names it in one line and exits at once (its collective fails).
  code, _, err, seconds = _kill_after_checkpoint(_pair(workdir, data_dir), workdir, 1, 2)
  assert code == 3, err[-3000:]
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and lines[0].startswith("error: lost process 1 of 2"), err[-3000:]
  assert seconds < HEARTBEAT_S + 60, seconds

  # The coordinator (process 0) dies: process 1 is stopped by the distributed runtime, non-zero.
  first = _saved(workdir)[-1]
  code, _, err, seconds = _kill_after_checkpoint(_pair(workdir, data_dir), workdir, 0, first)
  assert code != 0 and seconds < HEARTBEAT_S + 60, (code, seconds, err[-3000:])
  assert "lost process 0 of 2" in err or "leader task" in err, err[-3000:]

  # Relaunching both finishes the run from the last complete checkpoint, as if never interrupted.
  resumed_from = _saved(workdir)[-1]
  procs = _pair(workdir, data_dir)
  outs = [p.communicate(timeout=1800) for p in procs + [reference]]
  for p, (_, err) in zip(procs + [reference], outs):
    assert p.returncode == 0, err[-3000:]
  assert f"at step {resumed_from}" in outs[0][0]
  ref = {r["step"]: r["train/loss"] for r in _records(tmp_path / "one") if "train/loss" in r}
  got = {r["step"]: r["train/loss"] for r in _records(workdir) if "train/loss" in r}
  assert sorted(got) == sorted(ref) == list(range(1, 13))
  assert max(abs(ref[s] - got[s]) for s in ref) < 1e-5, (ref, got)
  final = [json.loads((d / "final.json").read_text()) for d in (tmp_path / "one", workdir)]
  assert abs(final[0]["val/top1"] - final[1]["val/top1"]) < 1e-6


LOAD_LOOP = r"""
import sys
import jax
pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", 2, pid, heartbeat_timeout_seconds=10,
                           shutdown_timeout_seconds=10)
print(pid, "devices", len(jax.devices()), flush=True)  # every process's backend is up
import numpy as np
from compact_vit import checkpointing
for i in range(6):  # both processes, then process 0 alone (a cache only it reads)
  if i < 3 or pid == 0:
    variables, meta = checkpointing.load_variables(directory)
    assert meta["model"] == "deit_tiny_patch16_224"
    np.testing.assert_array_equal(variables["params"]["w"], np.arange(12.).reshape(3, 4))
    print(pid, "loaded", i, flush=True)
"""


def test_load_variables_does_not_wait_for_other_processes(tmp_path):
  """load_variables under two CPU processes, in a loop: with Orbax's default checkpointer a restore
  runs a cross-process all-gather, so a process loading what the others do not waited for ever."""
  import numpy as np
  from compact_vit import checkpointing
  directory = checkpointing.save_variables(str(tmp_path / "converted"), {
      "params": {"w": np.arange(12.).reshape(3, 4)}}, "deit_tiny_patch16_224")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-c", LOAD_LOOP, str(i), str(port), directory], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=600) for p in procs]  # a hang shows as this timeout
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert [line for line in outs[0][0].splitlines() if "loaded" in line] == [
      f"0 loaded {i}" for i in range(6)]
  assert outs[1][0].count("loaded") == 3
