"""Architecture search: `python search.py --config configs/X.py[:ARGS] [--workdir DIR]`.

`config.search.method` picks the method (compact_vit/search/); every method writes DIR/search.json
with `best` and `candidates` and prints the command that trains the winner.
"""
from absl import app, flags
from ml_collections import config_flags

from compact_vit import cli, xla

xla.set_cpu_defaults()  # XLA CPU flags, unless XLA_FLAGS sets them; before JAX's backend starts

_CONFIG = config_flags.DEFINE_config_file("config", None, "Search config (configs/X.py[:ARGS]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<config>).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  cli.quiet_logs()
  from compact_vit import search
  path, arg = cli.split_config_flag(flags.FLAGS["config"].serialize().split("=", 1)[1])
  workdir = _WORKDIR.value or cli.default_workdir(path, arg)
  cli.run_guarded(lambda: search.run(_CONFIG.value, workdir))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
