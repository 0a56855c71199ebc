"""compact_vit.sweep: product expansion, skipping finished points, commands, collected results."""
import csv
import json
import os

import pytest

from compact_vit import sweep


def test_expand_is_the_product_in_sweep_order():
  points = sweep.expand(sweep.parse_sweeps(["model.keep_ratio=0.5,0.7", "config.seed=0,1,2"]))
  assert len(points) == 6
  assert points[0] == (("model.keep_ratio", "0.5"), ("seed", "0"))
  assert points[-1] == (("model.keep_ratio", "0.7"), ("seed", "2"))
  assert sweep.point_name(points[1]) == "model.keep_ratio=0.5,seed=1"
  with pytest.raises(SystemExit):
    sweep.parse_sweeps(["seed"])


def _fake_train(accuracy):
  """A runner standing in for train.py: writes final.json with accuracy(keep_ratio, seed)."""
  calls = []

  def run(cmd):
    calls.append(cmd)
    workdir = cmd[cmd.index("--workdir") + 1]
    flags = dict(a[len("--config."):].split("=", 1) for a in cmd if a.startswith("--config."))
    os.makedirs(workdir, exist_ok=True)
    top1 = accuracy(float(flags["model.keep_ratio"]), int(flags["seed"]))
    with open(os.path.join(workdir, "final.json"), "w") as f:
      json.dump({"step": 10, "train/loss": 1.0, "val/top1": top1, "val/top5": 1.0}, f)
    return 0
  return run, calls


def test_runs_unfinished_points_skips_finished_and_collects(tmp_path):
  points = sweep.expand(sweep.parse_sweeps(["model.keep_ratio=0.5,0.7", "seed=0,1"]))
  run, calls = _fake_train(lambda r, s: r + 0.01 * s)
  extra = ["--config.total_steps=10"]
  # One point finished earlier: only the other three run, each with its own flags.
  run(sweep.train_command("configs/x.py:quick", str(tmp_path), points[0], extra))
  calls.clear()
  status = sweep.run_points("configs/x.py:quick", str(tmp_path), points, extra, runner=run)
  assert len(calls) == 3 and set(status.values()) == {0}
  assert calls[0][-3:] == ["--config.model.keep_ratio=0.5", "--config.seed=1",
                           "--config.total_steps=10"]
  assert sweep.run_points("configs/x.py:quick", str(tmp_path), points, extra, runner=run) == {}

  rows = sweep.collect(str(tmp_path), points)
  assert len(rows) == 4
  with open(tmp_path / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [(r["model.keep_ratio"], r["seed"]) for r in table] == [
      ("0.5", "0"), ("0.5", "1"), ("0.7", "0"), ("0.7", "1")]
  assert float(table[3]["val/top1"]) == pytest.approx(0.71)
  md = (tmp_path / "results.md").read_text().splitlines()
  assert md[0] == "| model.keep_ratio | seeds | train/loss | val/top1 | val/top5 |"
  # keep_ratio 0.7: seeds give 0.70 and 0.71 -> mean 0.705, sample std 0.00707.
  assert md[3].startswith("| 0.7 | 2 |") and "0.7050 ± 0.0071" in md[3]
  assert (tmp_path / "results.png").stat().st_size > 1000


def test_print_commands_writes_one_line_per_unfinished_point(tmp_path, capsys):
  code = sweep.main(["--config", "configs/deit_s.py:quick", "--workdir", str(tmp_path),
                     "--sweep", "model.depth=1,2", "--sweep", "seed=0,1", "--print_commands",
                     "--config.total_steps=5"])
  assert code == 0
  lines = (tmp_path / "commands.sh").read_text().splitlines()
  assert len(lines) == 4 and all(line.startswith("python train.py --config") for line in lines)
  assert "--config.model.depth=2 --config.seed=1 --config.total_steps=5" in lines[-1]
  assert not any(os.path.isdir(tmp_path / d) for d in os.listdir(tmp_path))  # nothing ran
  assert capsys.readouterr().out.count("train.py") == 4
