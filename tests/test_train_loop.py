"""End to end through `train.py` / `eval.py`: quick run, exact resume after SIGTERM, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from compact_vit import checkpointing, models, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "configs/deit_s.py:quick"
# A few steps of the quick recipe with frequent logging/checkpoints.
SHORT = ["--config.total_steps=24", "--config.log_every=4", "--config.eval_every=12",
         "--config.checkpoint_every=8"]


def _env(**extra):
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
  env.update(extra)
  return env


def _cmd(script, config, workdir, data_dir, *flags):
  return [sys.executable, script, "--config", config, "--workdir", str(workdir),
          f"--config.dataset.data_dir={data_dir}", *flags]


# Hang guards only: generous, so that a busy machine (a CI host running other jobs) passes too.
TIMEOUT_S = 1800


def _run(script, config, workdir, data_dir, *flags, env=None, timeout=TIMEOUT_S):
  return subprocess.run(_cmd(script, config, workdir, data_dir, *flags), cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, env=env or _env())


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_quick_run_writes_metrics_checkpoints_and_eval(tmp_path, data_dir):
  out = _run("train.py", QUICK, tmp_path, data_dir, *SHORT)
  assert out.returncode == 0, out.stderr[-3000:]
  records = _metrics(tmp_path)
  train = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train] == [4, 8, 12, 16, 20, 24]
  assert all(k in train[0] for k in ("train/lr", "train/images_per_sec"))
  assert all(0.0 <= r["train/input_wait_fraction"] <= 1.0 for r in train)  # input-bound share
  assert "input wait" in out.stdout
  evals = [r for r in records if "val/top1" in r]
  assert [r["step"] for r in evals] == [12, 24]
  assert 0.0 <= evals[-1]["val/top1"] <= evals[-1]["val/top5"] <= 1.0
  assert sorted(os.listdir(tmp_path / "checkpoints"))[-2:] == ["16", "24"]  # keep the last 2

  out = _run("eval.py", QUICK, tmp_path, data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  record = json.load(open(tmp_path / "eval_test.json"))
  assert record["step"] == 24
  assert record["num_examples"] == 360  # every test example exactly once
  assert record["top1"] == pytest.approx(evals[-1]["val/top1"], abs=1e-6)
  for key in ("top5", "params", "gmacs", "images_per_sec", "params_sha256"):
    assert key in record
  assert "top1" in out.stdout and "params_sha256" in out.stdout

  # Rerunning a finished run resumes at its end and trains no further.
  out = _run("train.py", QUICK, tmp_path, data_dir, *SHORT)
  assert out.returncode == 0 and "Resumed" in out.stdout


def _final_params(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  steps = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
  state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(max(steps)) / "default")
  return max(steps), state["params"]


def test_sigterm_saves_and_resume_is_bit_identical(tmp_path, data_dir):
  """With dataset.on_accelerator (the default on a GPU or TPU): the step's augmentation keys come
  from the host's batches, so the resumed run's parameters equal the straight run's bit for bit."""
  flags = [*SHORT, "--config.total_steps=16", "--config.checkpoint_every=1000",
           "--config.eval_every=1000", "--config.dataset.on_accelerator=True"]
  straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
  assert _run("train.py", QUICK, straight, data_dir, *flags).returncode == 0

  proc = subprocess.Popen(_cmd("train.py", QUICK, interrupted, data_dir, *flags), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
  deadline = time.time() + TIMEOUT_S
  while time.time() < deadline:
    path = interrupted / "metrics.jsonl"
    if path.exists() and any(r.get("step", 0) >= 4 for r in _metrics(interrupted)):
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
  assert proc.returncode == 0, stderr[-3000:]
  assert "saved a checkpoint" in stdout
  stopped_at = int(sorted(os.listdir(interrupted / "checkpoints"), key=int)[-1])
  assert 4 <= stopped_at < 16

  assert _run("train.py", QUICK, interrupted, data_dir, *flags).returncode == 0
  (step_a, params_a), (step_b, params_b) = _final_params(straight), _final_params(interrupted)
  assert step_a == step_b == 16
  assert jax.tree.structure(params_a) == jax.tree.structure(params_b)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
  good = ["--config.log_every=1", "--config.checkpoint_every=2", "--config.eval_every=1000"]
  assert _run("train.py", QUICK, tmp_path, data_dir, "--config.total_steps=4",
              *good).returncode == 0
  # Resume the same run with an absurd learning rate: the loss blows up within a few steps.
  out = _run("train.py", QUICK, tmp_path, data_dir, "--config.total_steps=40", *good,
             "--config.optim.lr=1e30")
  assert out.returncode != 0
  assert "Loss became" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
  step = int(out.stderr.split("at step ")[1].split(";")[0])
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert 4 in saved and max(saved) < step
  losses = {r["step"]: r["train/loss"] for r in _metrics(tmp_path) if "train/loss" in r}
  assert all(np.isfinite(losses[s]) for s in saved)


def _assert_clean_error(out, *needles):
  assert out.returncode != 0
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  for needle in needles:
    assert needle in out.stderr, out.stderr[-3000:]


def test_unknown_model_lists_the_choices(tmp_path, data_dir):
  out = _run("train.py", QUICK, tmp_path, data_dir, "--config.model.name=deit_huge")
  _assert_clean_error(out, "Unknown model 'deit_huge'", "deit_small_patch16_224")


def test_unknown_dataset_lists_the_choices(tmp_path, data_dir):
  out = _run("train.py", QUICK, tmp_path, data_dir, "--config.dataset.name=no_such_dataset")
  _assert_clean_error(out, "no_such_dataset", "digits", "imagenet2012", "folder:")


def test_batch_not_divisible_by_devices(tmp_path, data_dir):
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = _run("train.py", QUICK, tmp_path, data_dir, "--config.batch_size=63", env=env)
  _assert_clean_error(out, "batch_size=63", "not divisible")


def test_imagenet_not_prepared_says_how(tmp_path, data_dir):
  out = _run("train.py", "configs/deit_s.py", tmp_path, str(tmp_path / "empty_tfds"))
  _assert_clean_error(out, "ILSVRC2012_img_train.tar", "manual")


def test_eval_without_checkpoint(tmp_path, data_dir):
  out = _run("eval.py", QUICK, tmp_path, data_dir)
  _assert_clean_error(out, "No checkpoint", "init_from")


def test_checkpoint_of_another_model_names_the_keys(tmp_path, data_dir):
  other = models.create_model("deit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4,
                              depth=2, embed_dim=96)
  variables = trainer.init_variables(other, jax.random.key(0), 16)
  checkpointing.save_variables(str(tmp_path / "other"), variables, "deit_tiny_patch16_224")
  out = _run("train.py", QUICK, tmp_path / "run", data_dir,
             f"--config.init_from={tmp_path / 'other'}")
  _assert_clean_error(out, "does not match the model", "missing keys", "shape mismatches",
                      "blocks_2")


def test_config_typo(tmp_path, data_dir):
  out = _run("train.py", QUICK, tmp_path, data_dir, "--config.optim.lrr=0.1")
  _assert_clean_error(out, "lrr")
  out = _run("train.py", "configs/deit_s.py:quik", tmp_path, data_dir)
  _assert_clean_error(out, "quik")
  out = _run("eval.py", "configs/no_such_config.py", tmp_path, data_dir)
  _assert_clean_error(out, "no_such_config.py", "No such file")


def _save_quick_shaped(directory, name="deit_small_patch16_224", seed=7, **extra):
  """Variables of a model shaped like the quick DeiT (digits: 10 classes, 16×16), saved as a
  converted checkpoint."""
  overrides = dict(num_classes=10, img_size=16, patch_size=4, depth=4, embed_dim=192, num_heads=3)
  overrides.update(extra)
  model = models.create_model(name, **overrides)
  variables = trainer.init_variables(model, jax.random.key(seed), 16)
  checkpointing.save_variables(str(directory), variables, name, overrides)
  return variables


def test_init_from_a_converted_checkpoint_for_eval_and_training(tmp_path, data_dir):
  variables = _save_quick_shaped(tmp_path / "converted")
  expected = checkpointing.params_sha256(variables["params"])
  out = _run("eval.py", QUICK, tmp_path / "eval_only", data_dir,
             f"--config.init_from={tmp_path / 'converted'}")
  assert out.returncode == 0, out.stderr[-3000:]
  record = json.load(open(tmp_path / "eval_only" / "eval_test.json"))
  assert record["step"] == 0 and record["params_sha256"] == expected

  # Training starts from those weights: with a zero learning rate they come out unchanged.
  zero_lr = ["--config.total_steps=2", "--config.optim.lr=0", "--config.optim.warmup_lr=0",
             "--config.optim.min_lr=0", "--config.optim.weight_decay=0"]
  out = _run("train.py", QUICK, tmp_path / "finetune", data_dir,
             f"--config.init_from={tmp_path / 'converted'}", *zero_lr)
  assert out.returncode == 0, out.stderr[-3000:]
  out = _run("eval.py", QUICK, tmp_path / "finetune", data_dir, *zero_lr)
  assert json.load(open(tmp_path / "finetune" / "eval_test.json"))["params_sha256"] == expected


def test_hard_distillation_from_a_registry_teacher(tmp_path, data_dir):
  _save_quick_shaped(tmp_path / "teacher", name="deit_tiny_patch16_224", depth=1, embed_dim=96)
  out = _run("train.py", QUICK, tmp_path / "run", data_dir,
             "--config.model.name=deit_small_distilled_patch16_224",
             "--config.distill.type=hard", "--config.distill.teacher=deit_tiny_patch16_224",
             f"--config.distill.teacher_init_from={tmp_path / 'teacher'}",
             "--config.total_steps=3", "--config.log_every=1", "--config.eval_every=3")
  assert out.returncode == 0, out.stderr[-3000:]
  losses = [r["train/loss"] for r in _metrics(tmp_path / "run") if "train/loss" in r]
  assert len(losses) == 3 and all(np.isfinite(losses))


def _unretrieved_failure(filename):
  """Lets asyncio report a future whose exception, raised by code in `filename` (None: set without
  being raised, as tensorstore's native code does), nobody retrieved; returns the messages the
  `asyncio` logger let through."""
  import asyncio
  import gc
  import logging

  class Keep(logging.Handler):
    def __init__(self):
      super().__init__()
      self.messages = []

    def emit(self, record):
      self.messages.append(record.getMessage())

  keep, logger = Keep(), logging.getLogger("asyncio")
  logger.addHandler(keep)
  loop = asyncio.new_event_loop()
  try:
    future = loop.create_future()
    error = ValueError("RESOURCE_EXHAUSTED: No space left on device")
    if filename is not None:
      try:
        exec(compile("raise error", filename, "exec"), {"error": error})
      except ValueError:
        pass  # `error` now has a traceback through `filename`
    future.set_exception(error)
    del future
    gc.collect()
  finally:
    loop.close()
    logger.removeHandler(keep)
  return keep.messages


def test_unretrieved_failures_of_orbax_writes_are_dropped_and_others_kept():
  """After a failed save, writes that fail too are reported by asyncio when their futures are
  collected; those (raised in Orbax, or set by tensorstore) are duplicates of the one `error:` line
  and are dropped."""
  import orbax.checkpoint as ocp
  checkpointing.quiet_late_tensorstore_callbacks()
  checkpointing.quiet_late_tensorstore_callbacks()  # idempotent: one filter
  orbax_file = os.path.join(os.path.dirname(ocp.__file__), "_src", "serialization", "write.py")
  assert _unretrieved_failure(orbax_file) == []
  assert _unretrieved_failure(None) == []  # set by tensorstore: no traceback
  kept = _unretrieved_failure(os.path.join(REPO, "compact_vit", "trainer.py"))
  assert len(kept) == 1 and "Future exception was never retrieved" in kept[0], kept
