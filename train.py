"""Train and evaluate a ResNet.

python train.py --config configs/digits.py --workdir runs/digits [--config.key=value ...]
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import cli, compile_cache, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics.jsonl, TensorBoard events and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])
cli.define_distributed()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
    cli.dump_stacks_on_sigusr1()
    cli.initialize_distributed()

    def run_training():
        compile_cache.enable_compilation_cache(FLAGS.config.get("compilation_cache_dir"))
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)

    sys.exit(cli.run(run_training))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.absl_flags_parser(__doc__))
