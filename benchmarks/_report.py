"""Shared output step of the benchmark scripts."""
from __future__ import annotations

import os


def write_markdown(table: str, path: str) -> None:
  """Prints `table` and writes it to `path`, creating the folder."""
  print(table)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(table)
