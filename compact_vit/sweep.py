"""Ablation sweeps: the product of config values, one `train.py` run per point, results collected.

  python -m compact_vit.sweep --config configs/X.py[:ARGS] --workdir DIR \\
      --sweep model.keep_ratio=0.5,0.6,0.7 --sweep seed=0,1 [--config.FIELD=V ...] \\
      [--metric val/top1] [--print_commands] [--collect_only]

Each point `KEY=V,KEY=V` trains in `DIR/KEY=V,KEY=V/` with `--config.KEY=V` for every swept key
(plus any `--config.FIELD=V` given to the sweep). Points run one after another here; with
`--print_commands` nothing runs and `DIR/commands.sh` gets one launch command per unfinished point,
for a cluster scheduler. A point is finished when its `final.json` exists (the trainer writes it at
the end of a run); rerunning the sweep skips finished points and resumes interrupted ones from their
checkpoints. Finally the finished points are collected into:

* `DIR/results.csv`: one row per point (swept values, final step, every metric of final.json);
* `DIR/results.md`: a Markdown table, one row per setting of the non-seed keys, mean ± standard
  deviation over seeds;
* `DIR/results.png`: the metric against the first non-seed key (mean, with the spread over seeds as
  error bars and the individual seeds as dots), one line per setting of the remaining keys.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
from typing import Sequence

from compact_vit import paths
from compact_vit.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_KEY = "seed"

Point = tuple[tuple[str, str], ...]  # ((key, value), ...) in --sweep order


def parse_sweeps(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
  """['model.keep_ratio=0.5,0.6', 'seed=0,1'] -> [('model.keep_ratio', ['0.5', '0.6']), ...]."""
  out = []
  for spec in specs:
    key, sep, values = spec.partition("=")
    key = key.strip().removeprefix("config.")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key or not vals:
      raise SystemExit(f"error: --sweep {spec!r}: use KEY=V1,V2,... (e.g. seed=0,1).")
    if key in dict(out):
      raise SystemExit(f"error: --sweep {key} is given twice.")
    out.append((key, vals))
  return out


def expand(sweeps: Sequence[tuple[str, Sequence[str]]]) -> list[Point]:
  """The product of the swept values, the last key varying fastest."""
  keys = [k for k, _ in sweeps]
  return [tuple(zip(keys, combo)) for combo in itertools.product(*(v for _, v in sweeps))]


def point_name(point: Point) -> str:
  return ",".join(f"{k}={v}" for k, v in point).replace("/", "_")


def train_command(config: str, workdir: str, point: Point, extra: Sequence[str]) -> list[str]:
  return [sys.executable, os.path.join(REPO, "train.py"), "--config", config, "--workdir",
          paths.join(workdir, point_name(point)),
          *[f"--config.{k}={v}" for k, v in point], *extra]


def is_finished(workdir: str, point: Point) -> bool:
  return paths.exists(paths.join(workdir, point_name(point), "final.json"))


def run_points(config: str, workdir: str, points: Sequence[Point], extra: Sequence[str],
               runner=subprocess.call) -> dict[str, int]:
  """Runs the unfinished points one after another; returns {point name: exit status}."""
  status = {}
  todo = [p for p in points if not is_finished(workdir, p)]
  print(f"{len(points)} points, {len(points) - len(todo)} finished, {len(todo)} to run.", flush=True)
  for i, point in enumerate(todo):
    cmd = train_command(config, workdir, point, extra)
    print(f"[{i + 1}/{len(todo)}] {point_name(point)}", flush=True)
    status[point_name(point)] = runner(cmd)
  return status


def write_commands(config: str, workdir: str, points: Sequence[Point],
                   extra: Sequence[str]) -> str:
  """DIR/commands.sh: one launch command per unfinished point. Returns its path."""
  lines = [shlex.join(["python", "train.py", *train_command(config, workdir, p, extra)[2:]])
           for p in points if not is_finished(workdir, p)]
  path = paths.join(workdir, "commands.sh")
  paths.write_text(path, "\n".join(lines) + ("\n" if lines else ""))
  print("\n".join(lines))
  return path


def _number(value: str) -> float | None:
  try:
    return float(value)
  except ValueError:
    return None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def collect(workdir: str, points: Sequence[Point], metric: str = "val/top1") -> list[dict]:
  """Writes results.csv, results.md and results.png from the finished points; returns the rows."""
  rows = []
  for point in points:
    path = paths.join(workdir, point_name(point), "final.json")
    if paths.exists(path):
      rows.append({**dict(point), **json.loads(paths.read_text(path))})
  if not rows:
    print("No finished points to collect yet.")
    return rows
  keys = [k for k, _ in points[0]]
  metrics = sorted({m for r in rows for m in r} - set(keys) - {"step", "stopped"})
  table = io.StringIO(newline="")
  writer = csv.DictWriter(table, fieldnames=[*keys, "step", *metrics])
  writer.writeheader()
  writer.writerows(rows)
  paths.write_text(paths.join(workdir, "results.csv"), table.getvalue())
  groups = _group(rows, [k for k in keys if k != SEED_KEY])
  _write_markdown(paths.join(workdir, "results.md"), groups, keys, metrics)
  if metric in metrics:
    _plot(paths.join(workdir, "results.png"), groups, [k for k in keys if k != SEED_KEY], metric)
  else:
    print(f"No {metric!r} in the results (have {metrics}); no plot.")
  print(f"Collected {len(rows)}/{len(points)} points into {workdir}/results.csv, results.md"
        f"{', results.png' if metric in metrics else ''}.")
  return rows


def _group(rows: Sequence[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
  """Rows by their values of `keys` (the seeds of one setting together), in first-seen order."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in keys), []).append(row)
  return groups


def _write_markdown(path: str, groups: dict[tuple, list[dict]], keys: Sequence[str],
                    metrics: Sequence[str]) -> None:
  setting_keys = [k for k in keys if k != SEED_KEY]
  header = [*setting_keys, "seeds", *metrics]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for setting, rows in groups.items():
    cells = [*setting, str(len(rows))]
    for m in metrics:
      values = [float(r[m]) for r in rows if r.get(m) is not None]
      if not values:
        cells.append("")
        continue
      mean, std = _mean_std(values)
      cells.append(f"{mean:.4f} ± {std:.4f}" if len(values) > 1 else f"{mean:.4f}")
    lines.append("| " + " | ".join(cells) + " |")
  paths.write_text(path, "\n".join(lines) + "\n")


def _plot(path: str, groups: dict[tuple, list[dict]], setting_keys: Sequence[str],
          metric: str) -> None:
  """Metric against the first setting key; one line per value of the other setting keys."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed (pip install matplotlib); no plot.")
    return
  x_key = setting_keys[0] if setting_keys else None
  lines: dict[tuple, list[tuple[str, list[float]]]] = {}
  for setting, rows in groups.items():
    values = [float(r[metric]) for r in rows if r.get(metric) is not None]
    if values:
      x = setting[0] if setting_keys else "all"
      lines.setdefault(tuple(setting[1:]), []).append((x, values))
  xs_all = [x for series in lines.values() for x, _ in series]
  numeric = all(_number(x) is not None for x in xs_all)
  categories = list(dict.fromkeys(xs_all))
  position = (lambda x: _number(x)) if numeric else categories.index
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for other, series in lines.items():
    series = sorted(series, key=lambda s: position(s[0]))
    xs = [position(x) for x, _ in series]
    stats = [_mean_std(v) for _, v in series]
    label = ", ".join(f"{k}={v}" for k, v in zip(setting_keys[1:], other)) or None
    bars = ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                       capsize=3, label=label)
    for x, (_, v) in zip(xs, series):
      ax.scatter([x] * len(v), v, s=10, alpha=0.5, color=bars[0].get_color())
  if not numeric:
    ax.set_xticks(range(len(categories)), categories)
  ax.set_xlabel(x_key or "")
  ax.set_ylabel(f"{metric} (mean ± std over seeds)")
  if any(k for k in lines if k):
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  image = io.BytesIO()
  fig.savefig(image, dpi=120, format="png")
  plt.close(fig)
  paths.write_bytes(path, image.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m compact_vit.sweep", description=__doc__.split("\n\n")[0],
      epilog="Other --config.FIELD=VALUE flags are passed to every run.")
  parser.add_argument("--config", required=True, help="configs/X.py[:ARGS]")
  parser.add_argument("--workdir", required=True, help="sweep directory (one subdirectory a point)")
  parser.add_argument("--sweep", action="append", required=True, metavar="KEY=V1,V2",
                      help="a config field and its values; repeat for a product")
  parser.add_argument("--metric", default="val/top1", help="metric to plot (default val/top1)")
  parser.add_argument("--print_commands", action="store_true",
                      help="write DIR/commands.sh (one command per unfinished point), run nothing")
  parser.add_argument("--collect_only", action="store_true", help="only collect finished points")
  args, extra = parser.parse_known_args(argv)
  bad = [a for a in extra if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments {bad}; only --config.FIELD=VALUE passes through.")
  points = expand(parse_sweeps(args.sweep))
  try:
    paths.check_workdir(args.workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.print_commands:
    write_commands(args.config, args.workdir, points, extra)
    return 0
  failed = {}
  if not args.collect_only:
    failed = {k: v for k, v in run_points(args.config, args.workdir, points, extra).items() if v}
  collect(args.workdir, points, args.metric)
  for name, code in failed.items():
    print(f"error: point {name} failed (exit status {code}); rerun the sweep to retry it.",
          file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
