"""Trains a model: `python train.py --config configs/X.py[:ARGS] [--workdir DIR] [--config.F=V]`.

Writes DIR/metrics.jsonl, TensorBoard events and Orbax checkpoints under DIR/checkpoints; rerunning
the same command resumes from the latest checkpoint.

Multi-host: start the same command on every host with `--coordinator_address=HOST0:PORT
--num_processes=N --process_id=I` (found automatically on Cloud TPU VMs and under SLURM).
"""
from absl import app, flags
from ml_collections import config_flags

from compact_vit import cli, xla

xla.set_cpu_defaults()  # XLA CPU flags, unless XLA_FLAGS sets them; before JAX's backend starts

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:ARGS]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<config>).")
flags.mark_flags_as_required(["config"])
cli.define_distributed_flags()


def main(argv):
  del argv
  cli.quiet_logs()
  cli.run_guarded(lambda: cli.initialize_distributed(
      flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id))
  from compact_vit import trainer
  path, arg = cli.split_config_flag(flags.FLAGS["config"].serialize().split("=", 1)[1])
  workdir = _WORKDIR.value or cli.default_workdir(path, arg)
  cli.run_guarded(lambda: trainer.train_and_evaluate(_CONFIG.value, workdir))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
