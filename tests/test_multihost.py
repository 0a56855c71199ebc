"""Two `train.py` processes on loopback (jax.distributed, Gloo CPU collectives) against one process
with two devices: the same losses and accuracy; SIGTERM to one process stops both at one step."""
import json
import os
import signal
import socket
import subprocess
import sys
import time


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny DeiT on digits with a constant learning rate (min_lr = lr, no warmup), so runs of different
# lengths follow the same schedule.
FLAGS = ["--config.model.depth=1", "--config.model.embed_dim=32", "--config.model.num_heads=2",
         "--config.log_every=1", "--config.eval_every=3", "--config.checkpoint_every=100000",
         "--config.optim.warmup_epochs=0", "--config.optim.min_lr=0.001"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, data_dir, *extra, devices=1):
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "train.py", "--config", "configs/deit_s.py:quick", "--workdir",
         str(workdir), f"--config.dataset.data_dir={data_dir}", *FLAGS, *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _records(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def test_two_processes_match_one_process_and_stop_together(tmp_path, data_dir):

  # One process, two devices, reading the input as two slices: the global batches of two hosts.
  one = _start(tmp_path / "one", data_dir, "--config.total_steps=6", "--config.input_shards=2",
               devices=2)
  port = _free_port()
  two = [_start(tmp_path / "two", data_dir, "--config.total_steps=100000",
                f"--coordinator_address=localhost:{port}", "--num_processes=2",
                f"--process_id={i}") for i in range(2)]
  deadline = time.time() + 1800  # hang guards, generous for a busy machine
  while time.time() < deadline and not any(r.get("step", 0) >= 6 and "val/top1" in r
                                           for r in _records(tmp_path / "two")):
    assert all(p.poll() is None for p in two), [p.communicate()[1][-2000:] for p in two]
    time.sleep(0.2)
  two[1].send_signal(signal.SIGTERM)  # only the second host is preempted
  outs = [p.communicate(timeout=1800) for p in [one, *two]]
  for p, (_, err) in zip([one, *two], outs):
    assert p.returncode == 0, err[-3000:]

  # Both processes saved the same step and exited; process 0 says why.
  saved = [int(s) for s in os.listdir(tmp_path / "two" / "checkpoints")]
  assert len(saved) == 1 and saved[0] >= 6
  assert "stop request on another process" in outs[1][0], outs[1][0][-2000:]
  assert "[step" not in outs[2][0]  # only process 0 logs
  assert not (tmp_path / "two" / "final.json").exists()  # stopped, not finished
  final = json.loads((tmp_path / "one" / "final.json").read_text())  # what sweeps collect
  assert final["step"] == 6 and 0.0 <= final["val/top1"] <= final["val/top5"] <= 1.0

  def series(workdir, key):
    return {r["step"]: r[key] for r in _records(workdir) if key in r and r["step"] <= 6}

  for key in ("train/loss", "val/top1", "val/top5"):
    ref, got = series(tmp_path / "one", key), series(tmp_path / "two", key)
    assert sorted(ref) == sorted(got) == ([1, 2, 3, 4, 5, 6] if key == "train/loss" else [3, 6])
    assert max(abs(ref[s] - got[s]) for s in ref) < 1e-5, (key, ref, got)
