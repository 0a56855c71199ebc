"""Evaluates the latest checkpoint: `python eval.py --config configs/X.py[:ARGS] --workdir DIR`.

Writes DIR/eval_<split>.json (step, top1, top5, params, gmacs, images_per_sec, params_sha256) and
prints it as a table. With no training checkpoint in DIR, `--config.init_from=SPEC` evaluates
other weights: a converted directory, a PyTorch checkpoint file, or published weights by name
(`hf-hub:timm/deit_small_patch16_224.fb_in1k`), whose published top-1 is printed beside ours.

Multi-host: start the same command on every host with `--coordinator_address=HOST0:PORT
--num_processes=N --process_id=I` (found automatically on Cloud TPU VMs and under SLURM).
"""
import json

from absl import app, flags
from ml_collections import config_flags

from compact_vit import cli, xla

xla.set_cpu_defaults()  # XLA CPU flags, unless XLA_FLAGS sets them; before JAX's backend starts

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:ARGS]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/<config>).")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default config.dataset.eval_split).")
flags.mark_flags_as_required(["config"])
cli.define_distributed_flags()


def main(argv):
  del argv
  cli.quiet_logs()
  cli.run_guarded(lambda: cli.initialize_distributed(
      flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id))
  from compact_vit import evaluator
  path, arg = cli.split_config_flag(flags.FLAGS["config"].serialize().split("=", 1)[1])
  workdir = _WORKDIR.value or cli.default_workdir(path, arg)

  def run():
    record = evaluator.evaluate_checkpoint(_CONFIG.value, workdir, split=_SPLIT.value)
    print(evaluator.format_table(record))
    print(json.dumps(record))

  cli.run_guarded(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
